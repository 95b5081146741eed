"""``vdpasim dev``, ``vdpasim mgmtdev`` and ``vdpasim daemon``: the management commands, in iproute2 ``vdpa`` syntax.

    vdpasim dev add name NAME mgmtdev vdpasim_net [mac M] [mtu N] [max_vqp N] [mode loopback|responder] [peer_ip A]
    vdpasim dev add name NAME mgmtdev vdpasim_blk [capacity SIZE] [file PATH [create]] [read_only]
    vdpasim dev del [name] NAME
    vdpasim dev show [NAME]
    vdpasim dev vstats show NAME qidx Q
    vdpasim mgmtdev show [NAME]
    vdpasim daemon [run | start | stop | status]

Arguments after the verb are keyword/value words, as iproute2 parses them; this module checks only
their syntax (known keyword, value present) and leaves every value to the daemon, which validates it
once for every door. ``-j`` prints the daemon's JSON (``-p`` indented) instead of rich tables, and
may stand anywhere (``vdpasim -j dev show``, ``vdpasim dev show -j``).

``dev add`` and ``mgmtdev show`` start a daemon in the background when none serves the runtime
directory (``VDPASIM_RUNTIME_DIR``); the other commands only report that none runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .control import ControlClient, ControlError
from .errors import VdpasimError
from .runtime import RuntimeDir, runtime_dir

__all__ = ["add_parsers", "parse_dev_add"]

# dev add keywords that take a value, and those that stand alone (iproute2 style flags).
_VALUE_WORDS = frozenset(
    {
        "name",
        "mgmtdev",
        # vdpasim_net
        "mac",
        "mtu",
        "max_vqp",
        "device_features",
        "mode",
        "peer_ip",
        "peer_mac",
        # vdpasim_blk
        "capacity",
        "size",  # the same as capacity
        "file",
        "num_queues",
        "blk_size",
        "serial",
        # both
        "queue_size",
        "busy_poll",
    }
)
_FLAG_WORDS = frozenset({"read_only", "create"})
_JSON_FLAGS = {"-j": "json", "--json": "json", "-p": "pretty", "--pretty": "pretty", "-jp": "both", "-pj": "both"}


class UsageFailure(VdpasimError):
    """The command line is wrong (exit status 2, as argparse)."""


def _usage(message: str) -> NoReturn:
    raise UsageFailure(message, errno=errno.EINVAL)


# ----- word parsing (no I/O) -----
def parse_dev_add(words: list[str]) -> dict[str, Any]:
    """``name N mgmtdev M key value ... flag ...`` -> control-request arguments."""
    args: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in _FLAG_WORDS:
            value: Any = True
            i += 1
        elif word in _VALUE_WORDS:
            if i + 1 >= len(words):
                _usage(f'"{word}" needs a value')
            value = words[i + 1]
            i += 2
        else:
            _usage(f'unknown option "{word}"')
        key = "capacity" if word == "size" else word
        if key in args:
            _usage(f'"{word}" given twice')
        if key == "file":
            value = os.path.abspath(value)  # the daemon runs from /
        args[key] = value
    for required in ("name", "mgmtdev"):
        if required not in args:
            _usage(f'dev add needs "{required}"')
    return args


def _take_name(words: list[str], verb: str) -> str:
    """``[name] NAME`` as the only words."""
    if words[:1] == ["name"]:
        words = words[1:]
    if len(words) != 1:
        _usage(f"{verb} takes one device name")
    return words[0]


def _split_output_flags(words: list[str], args: argparse.Namespace) -> list[str]:
    """Take ``-j``/``-p`` from anywhere in ``words`` into ``args``; return the other words."""
    args.json = getattr(args, "json", False)
    args.pretty = getattr(args, "pretty", False)
    rest = []
    for word in words:
        flag = _JSON_FLAGS.get(word)
        if flag in ("json", "both"):
            args.json = True
        if flag in ("pretty", "both"):
            args.pretty = True
        if flag is None:
            rest.append(word)
    return rest


# ----- output -----
def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=400)  # a pipe or a file: never fold a socket path
    return console


def _print_json(args: argparse.Namespace, obj: Any) -> None:
    print(json.dumps(obj, indent=2 if args.pretty else None))


def _error(exc: BaseException) -> int:
    text = f"{exc} ({exc.errno_name})" if isinstance(exc, ControlError) else str(exc)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    return 2 if isinstance(exc, UsageFailure) else 1


def _say(message: str) -> None:
    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def _features_cell(names: list[str]) -> str:
    return " ".join(names)


def _dev_table(devices: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="vdpasim devices", title_justify="left")
    for column in (
        "name",
        "type",
        "mgmtdev",
        "status",
        "vqs",
        "mac / capacity",
        "negotiated features",
        "vhost-user socket",
    ):
        table.add_column(column, overflow="fold")
    for name, dev in devices.items():
        if dev["type"] == "network":
            address = f"{dev['mac']} mtu {dev['mtu']}"
        else:
            address = f"{dev['capacity']} sectors ({_human(dev['size'])})"
        status = "|".join(dev["status"]) or "0"
        features = " ".join(dev.get("negotiated_features", [])) or "-"
        table.add_row(
            name, dev["type"], dev["mgmtdev"], status, str(dev["max_vqs"]), address, features, dev["vhost_user_socket"]
        )
    return table


def _dev_detail(name: str, dev: dict[str, Any]) -> Table:
    table = Table(title=f"{name}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in dev.items():
        if isinstance(value, list):
            value = " ".join(value) if value else "-"
        elif value is None:
            value = "-"
        table.add_row(key, str(value))
    return table


def _human(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


# ----- talking to the daemon -----
def _connect(runtime: RuntimeDir) -> ControlClient | None:
    """A client of the daemon of ``runtime``, or None if none serves it; never through an unsafe directory,
    where someone else's socket could pose as our daemon."""
    if os.path.lexists(runtime.path):
        runtime.check()
    return ControlClient.try_connect(runtime.control_socket)


def _client(runtime: RuntimeDir, *, start: bool, log_level: str = "info") -> ControlClient | None:
    client = _connect(runtime)
    if client is not None or not start:
        return client
    from .daemon import spawn_daemon

    pid = spawn_daemon(runtime, log_level=log_level)
    _say(escape(f"vdpasim: started a daemon (pid {pid}) in {runtime.path}, log {runtime.log_file}"))
    client = _connect(runtime)
    if client is None:
        raise VdpasimError(f"the daemon started but its control socket {runtime.control_socket} does not answer")
    return client


def _no_daemon(runtime: RuntimeDir) -> ControlError:
    return ControlError(f"no vdpasim daemon serves {runtime.path}", errno=errno.ECONNREFUSED)


# ----- commands -----
_DEV_USAGE = """\
vdpasim dev add name NAME mgmtdev vdpasim_net [mac M] [mtu N] [max_vqp N] [device_features X]
                [mode loopback|responder] [peer_ip A] [peer_mac M] [queue_size N] [busy_poll on|off]
vdpasim dev add name NAME mgmtdev vdpasim_blk [capacity SIZE] [file PATH [create]] [read_only]
                [num_queues N] [blk_size N] [serial S] [queue_size N] [busy_poll on|off]
vdpasim dev del [name] NAME
vdpasim dev show [NAME]
vdpasim dev vstats show NAME qidx Q"""


def _cmd_dev(args: argparse.Namespace) -> int:
    if any(word in ("-h", "--help") for word in args.words) or args.words[:1] == ["help"]:
        args.parser.print_help()
        return 0
    try:
        return _dev(args, _split_output_flags(args.words, args))
    except (VdpasimError, OSError) as exc:
        return _error(exc)


def _dev(args: argparse.Namespace, words: list[str]) -> int:
    runtime = runtime_dir()
    verb, rest = (words[0], words[1:]) if words else ("show", [])
    if verb == "add":
        request = parse_dev_add(rest)
        client = _client(runtime, start=True)
        assert client is not None
        with client:
            result = client.request("dev_new", **request)
        if args.json:
            _print_json(args, result)
        else:
            name, dev = next(iter(result["dev"].items()))
            _say(f"added [bold]{name}[/] ({dev['mgmtdev']}): vhost-user socket {escape(dev['vhost_user_socket'])}")
        return 0
    if verb in ("del", "delete"):
        name = _take_name(rest, "dev del")
        client = _client(runtime, start=False)
        if client is None:
            raise _no_daemon(runtime)
        with client:
            client.request("dev_del", name=name)
        if not args.json:
            _say(f"deleted [bold]{name}[/]")
        return 0
    if verb in ("show", "list"):
        name = _take_name(rest, "dev show") if rest else None
        client = _client(runtime, start=False)
        if client is None:
            if name is not None:
                raise _no_daemon(runtime)
            result: dict[str, Any] = {"dev": {}}
        else:
            with client:
                result = client.request("dev_get", name=name)
        result.setdefault("dev", {})
        if args.json:
            _print_json(args, result)
        elif name is not None:
            _console().print(_dev_detail(name, result["dev"][name]))
        else:
            _console().print(_dev_table(result["dev"]))
        return 0
    if verb == "vstats":
        if rest[:1] == ["show"]:
            rest = rest[1:]
        if rest[:1] == ["name"]:
            rest = rest[1:]
        if len(rest) != 3 or rest[1] != "qidx":
            _usage("usage: dev vstats show NAME qidx Q")
        name, qidx = rest[0], rest[2]
        if not qidx.isdigit():
            _usage(f'qidx "{qidx}" is not a queue index')
        client = _client(runtime, start=False)
        if client is None:
            raise _no_daemon(runtime)
        with client:
            result = client.request("dev_vstats_get", name=name, qidx=int(qidx))
        if args.json:
            _print_json(args, result)
        else:
            entry = result["vstats"][name]
            table = Table(title=f"{name} queue {entry['queue_index']} ({entry['queue_type']})", title_justify="left")
            table.add_column("name")
            table.add_column("value", justify="right")
            for key, value in entry["stats"].items():
                table.add_row(key, str(value))
            _console().print(table)
        return 0
    _usage(f'unknown dev command "{verb}" (add, del, show, vstats show)')


def _cmd_mgmtdev(args: argparse.Namespace) -> int:
    try:
        words = _split_output_flags(args.words, args)
        if words[:1] not in ([], ["show"], ["list"]):
            _usage(f'unknown mgmtdev command "{words[0]}" (show)')
        rest = words[1:]
        name = _take_name(rest, "mgmtdev show") if rest else None
        client = _client(runtime_dir(), start=True)
        assert client is not None
        with client:
            result = client.request("mgmtdev_get", name=name)
        if args.json:
            _print_json(args, result)
            return 0
        table = Table(title="vdpasim management devices", title_justify="left")
        for column in ("mgmtdev", "supported_classes", "max_supported_vqs", "dev_features", "attributes"):
            table.add_column(column, overflow="fold")
        for mgmt, spec in result["mgmtdev"].items():
            table.add_row(
                mgmt,
                " ".join(spec["supported_classes"]),
                str(spec["max_supported_vqs"]),
                _features_cell(spec["dev_features"]),
                " ".join(spec["attributes"]),
            )
        _console().print(table)
        return 0
    except (VdpasimError, OSError) as exc:
        return _error(exc)


def _cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run_foreground, spawn_daemon, stop_daemon

    runtime = runtime_dir()
    _split_output_flags([], args)
    try:
        if args.action == "run":
            return run_foreground(args)
        if args.action == "start":
            client = _connect(runtime)
            if client is not None:
                with client:
                    pid = client.request("daemon_get")["daemon"]["pid"]
                _say(escape(f"vdpasim: a daemon (pid {pid}) already serves {runtime.path}"))
                return 0
            pid = spawn_daemon(runtime, log_level=args.log_level)
            _say(escape(f"vdpasim: started a daemon (pid {pid}) in {runtime.path}, log {runtime.log_file}"))
            return 0
        if args.action == "stop":
            pid = stop_daemon(runtime)
            done = f"stopped the daemon (pid {pid})" if pid else f"no daemon serves {runtime.path}"
            _say(escape(f"vdpasim: {done}"))
            return 0
        # status
        client = _connect(runtime)
        if client is None:
            if args.json:
                _print_json(args, {"daemon": None})
            _say(escape(f"vdpasim: no daemon serves {runtime.path}"))
            return 1
        with client:
            info = client.request("daemon_get")["daemon"]
        if args.json:
            _print_json(args, {"daemon": info})
        else:
            _console().print(_dev_detail("vdpasim daemon", {**info, "devices": info["devices"]}))
        return 0
    except (VdpasimError, OSError) as exc:
        return _error(exc)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``dev``, ``mgmtdev`` and ``daemon`` with the top-level sub-parsers."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-j", "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    output.add_argument("-p", "--pretty", action="store_true", default=argparse.SUPPRESS, help="indent JSON")

    dev = commands.add_parser(
        "dev",
        parents=[output],
        help="add, delete and show simulated vDPA devices (iproute2 `vdpa dev` syntax)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DEV_USAGE,
        epilog="docs/daemon.md lists every keyword with its default.",
    )
    dev.add_argument("words", nargs=argparse.REMAINDER, help="the command, as for `vdpa dev`")
    dev.set_defaults(handler=_cmd_dev, parser=dev)

    mgmtdev = commands.add_parser("mgmtdev", parents=[output], help="show the management devices (vdpasim_net, ...)")
    mgmtdev.add_argument("words", nargs=argparse.REMAINDER, help="show [NAME]")
    mgmtdev.set_defaults(handler=_cmd_mgmtdev)

    daemon = commands.add_parser(
        "daemon",
        parents=[output],
        help="run the daemon (foreground), or start, stop or query one in the background",
        description="The daemon owns the devices and serves each on a vhost-user socket in the runtime "
        "directory ($VDPASIM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vdpasim, else /run/vdpasim).",
    )
    daemon.add_argument("action", nargs="?", choices=("run", "start", "stop", "status"), default="run")
    daemon.add_argument("--foreground", action="store_true", help="run in the foreground (the default for run)")
    daemon.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    daemon.set_defaults(handler=_cmd_daemon)
