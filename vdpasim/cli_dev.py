"""``vdpasim mgmtdev``, ``vdpasim dev`` and ``vdpasim daemon``: iproute2 ``vdpa`` over the daemon's netlink.

    vdpasim [-j] [-p] [-x] mgmtdev show [MGMTDEV]
    vdpasim [-j] [-p] [-x] dev show [NAME]
    vdpasim dev add name NAME mgmtdev vdpasim_net [mac M] [mtu N] [max_vqp N] [device_features HEX]
                    [mode loopback|responder] [peer_ip A] [peer_mac M] [queue_size N] [busy_poll on|off]
    vdpasim dev add name NAME mgmtdev vdpasim_blk [capacity SIZE] [file PATH [create]] [read_only]
                    [num_queues N] [blk_size N] [serial S] [queue_size N] [busy_poll on|off]
    vdpasim dev del NAME
    vdpasim dev set name NAME mac M
    vdpasim [-j] [-p] dev config show [NAME]
    vdpasim [-j] [-p] dev vstats show NAME qidx Q
    vdpasim daemon [run | start | stop | status]

Why it looks like this: users (and scripts written for the kernel) should not have to learn a second
tool. The requests are the vdpa generic-netlink messages iproute2 6.1 sends (bus/netlink.py
``VdpaSocket`` over the daemon's control socket), and the output is what iproute2 6.1's ``vdpa``
prints for the same replies, text and JSON (``-j``, ``-p`` indented), errors included
(``Error: vdpa: <extack>.`` and ``kernel answers: <strerror>``, exit status 1). The words after
``dev add`` that iproute2 does not know are vdpasim's extension attributes (docs/netlink.md).

``-x`` (vdpasim only) asks the daemon for vdpasim's extension attributes: ``dev show`` then also
reports each device's ``vhost_user_socket`` and ``vhost_vdpa_node``, ``dev config show`` the
data-path mode, peer, backing file, and the block fields iproute2 6.1 does not print, and
``dev vstats show`` answers also before a driver negotiated features and after it left. Without ``-x`` the request and
the reply carry nothing iproute2 does not know, so the output is byte-identical to ``vdpa``'s.

``dev add`` and ``mgmtdev show`` start a daemon in the background when none serves the runtime
directory (``VDPASIM_RUNTIME_DIR``); ``dev show`` then shows no device, other commands fail.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pyroute2.netlink.exceptions import NetlinkError
from rich.console import Console
from rich.markup import escape

from .bus import netlink as nl
from .control import ControlClient
from .errors import VdpasimError
from .runtime import RuntimeDir, runtime_dir
from .virtio import constants as c

__all__ = ["add_parsers", "parse_dev_add", "VdpaCli", "CliFailure", "format_text", "format_json"]

_JSON_FLAGS = {"-j": "j", "--json": "j", "-p": "p", "--pretty": "p", "-jp": "jp", "-pj": "jp", "-x": "x"}
_SECTOR = 512


class CliFailure(VdpasimError):
    """The command failed after printing its reason, as iproute2 does (exit status 1)."""


# ----- word parsing (no I/O) -----
def _mac(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 and all(ch in "0123456789abcdefABCDEF" for ch in p) for p in parts):
        raise CliFailure(f'"{text}" is invalid lladdr.')
    return ":".join(f"{int(p, 16):02x}" for p in parts)


def _u16(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF:
        raise CliFailure(f'"{text}" is not a valid number')
    return value


def _size_sectors(text: str) -> int:
    from .daemon import parse_size

    return parse_size(text) // _SECTOR


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise CliFailure(f'"{text}" is neither on nor off')
    return text == "on"


# word -> (request keyword, parser); the first six are iproute2's, the rest vdpasim's extension attributes.
_ADD_WORDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "name": ("name", str),
    "mgmtdev": ("mgmtdev", str),
    "mac": ("mac", _mac),
    "mtu": ("mtu", _u16),
    "max_vqp": ("max_vqp", _u16),
    "device_features": ("device_features", lambda t: int(t, 16)),
    "mode": ("mode", str),
    "peer_ip": ("peer_ip", lambda t: str(ipaddress.IPv4Address(t))),
    "peer_mac": ("peer_mac", _mac),
    "capacity": ("capacity", _size_sectors),
    "size": ("capacity", _size_sectors),
    "file": ("path", os.path.abspath),  # the daemon runs from /
    "num_queues": ("num_queues", _u16),
    "blk_size": ("blk_size", int),
    "serial": ("serial", str),
    "queue_size": ("max_queue_size", _u16),
    "busy_poll": ("busy_poll", _on_off),
}
_ADD_FLAGS = {"read_only": "read_only", "create": "create"}


def parse_dev_add(words: list[str]) -> dict[str, Any]:
    """``name N mgmtdev M key value ... flag ...`` -> ``VdpaSocket.dev('add', ...)`` keywords."""
    args: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in _ADD_FLAGS:
            args[_ADD_FLAGS[word]] = True
            i += 1
            continue
        if word not in _ADD_WORDS:
            raise CliFailure(f'Unknown option "{word}"')
        if i + 1 >= len(words):
            raise CliFailure("String parameter expected")
        key, parse = _ADD_WORDS[word]
        try:
            args[key] = parse(words[i + 1])
        except (ValueError, VdpasimError) as exc:
            raise CliFailure(str(exc) if isinstance(exc, CliFailure) else f"{word}: {exc}") from None
        i += 2
    if "mgmtdev" not in args:
        raise CliFailure("management device handle not set.")
    if "name" not in args:
        raise CliFailure("device name is not set.")
    return args


def _one_name(words: list[str], *, allow_keyword: bool = False) -> str | None:
    if allow_keyword and words[:1] == ["name"]:
        words = words[1:]
    if not words:
        return None
    if len(words) > 1:
        raise CliFailure(f'Unknown option "{words[1]}"')
    return words[0]


# ----- output: what iproute2 6.1 `vdpa` prints (no I/O) -----
def _feature_words(features: int, device_id: int) -> str:
    return "".join(f" bit_{f}" if isinstance(f, int) else f" {f}" for f in nl.feature_strings(features, device_id))


def _handle(msg: nl.vdpa_msg) -> str:
    bus = msg.get_attr("VDPA_ATTR_MGMTDEV_BUS_NAME")
    name = msg.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME")
    return f"{bus}/{name}" if bus else name


def _text_mgmtdev(msg: nl.vdpa_msg) -> str:
    out = f"{_handle(msg)}: "
    classes = msg.get_attr("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES")
    if classes is not None:
        names = [{c.VIRTIO_ID_NET: "net", c.VIRTIO_ID_BLOCK: "block"}.get(i, "< unknown class >") for i in range(1, 64)
                 if classes >> i & 1]  # fmt: skip
        out += "\n  supported_classes" + "".join(f" {n}" for n in names)
    max_vqs = msg.get_attr("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS")
    if max_vqs is not None:
        out += f"\n  max_supported_vqs {max_vqs}"
    features = msg.get_attr("VDPA_ATTR_DEV_SUPPORTED_FEATURES")
    if features is not None:
        device_id = c.VIRTIO_ID_NET if (classes or 0) >> c.VIRTIO_ID_NET & 1 else 0
        out += "\n  dev_features" + _feature_words(features, device_id)
    return out + "\n"


_TYPES = {c.VIRTIO_ID_NET: "network", c.VIRTIO_ID_BLOCK: "block"}
_EXT_KEYS = (("VDPASIM_ATTR_VHOST_USER_PATH", "vhost_user_socket"), ("VDPASIM_ATTR_VHOST_VDPA_NODE", "vhost_vdpa_node"))
# `-x dev config show`: vdpasim's extension attributes, and the block fields iproute2 6.1 does not print.
_CONFIG_EXT_KEYS = (
    ("VDPA_ATTR_DEV_BLK_CFG_CAPACITY", "capacity"),
    ("VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES", "num_queues"),
    ("VDPA_ATTR_DEV_BLK_READ_ONLY", "read_only"),
    ("VDPASIM_ATTR_NET_MODE", "mode"),
    ("VDPASIM_ATTR_NET_PEER_IP", "peer_ip"),
    ("VDPASIM_ATTR_NET_PEER_MAC", "peer_mac"),
    ("VDPASIM_ATTR_BLK_PATH", "file"),
    ("VDPASIM_ATTR_BUSY_POLL", "busy_poll"),
)


def _extension_values(msg: nl.vdpa_msg, section: str) -> list[tuple[str, Any]]:
    """The extension fields of one reply, as (key, value); none unless the request asked for them."""
    if section == "dev":
        keys = _EXT_KEYS
    elif section == "config" and msg.get_attr("VDPASIM_ATTR_BUSY_POLL") is not None:  # only with extensions
        keys = _CONFIG_EXT_KEYS
    else:
        return []
    out = []
    for attr, key in keys:
        value = msg.get_attr(attr)
        if value is not None:
            out.append((key, bool(value) if key in ("read_only", "busy_poll") else value))
    return out


def _text_dev(msg: nl.vdpa_msg) -> str:
    out = f"{msg.get_attr('VDPA_ATTR_DEV_NAME')}: type {_TYPES.get(msg.get_attr('VDPA_ATTR_DEV_ID'), '<unknown type>')}"
    out += f" mgmtdev {_handle(msg)}"
    for attr, key in (
        ("VDPA_ATTR_DEV_VENDOR_ID", "vendor_id"),
        ("VDPA_ATTR_DEV_MAX_VQS", "max_vqs"),
        ("VDPA_ATTR_DEV_MAX_VQ_SIZE", "max_vq_size"),
    ):
        value = msg.get_attr(attr)
        if value is not None:
            out += f" {key} {value}"
    for key, value in _extension_values(msg, "dev"):
        out += f" {key} {value}"
    return out + "\n"


def _text_config(msg: nl.vdpa_msg) -> str:
    out = f"{msg.get_attr('VDPA_ATTR_DEV_NAME')}: "
    device_id = msg.get_attr("VDPA_ATTR_DEV_ID")
    if device_id == c.VIRTIO_ID_NET:
        mac = msg.get_attr("VDPA_ATTR_DEV_NET_CFG_MACADDR")
        if mac is not None:
            out += f"mac {mac} "
        status = msg.get_attr("VDPA_ATTR_DEV_NET_STATUS")
        if status is not None:
            out += f"link {'up' if status & c.VIRTIO_NET_S_LINK_UP else 'down'} "
            out += f"link_announce {'true' if status & c.VIRTIO_NET_S_ANNOUNCE else 'false'} "
        for attr, key in (("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", "max_vq_pairs"), ("VDPA_ATTR_DEV_NET_CFG_MTU", "mtu")):
            value = msg.get_attr(attr)
            if value is not None:
                out += f"{key} {value} "
        negotiated = msg.get_attr("VDPA_ATTR_DEV_NEGOTIATED_FEATURES")
        if negotiated is not None:
            out += "\n  negotiated_features" + _feature_words(negotiated, device_id)
    extension = _extension_values(msg, "config")
    if extension:
        words = " ".join(f"{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in extension)
        out += f"\n  vdpasim {words}"
    return out + "\n"


def _text_vstats(msg: nl.vdpa_msg) -> str:
    out = f"{msg.get_attr('VDPA_ATTR_DEV_NAME')}: "
    if msg.get_attr("VDPA_ATTR_DEV_ID") == c.VIRTIO_ID_NET:
        entry = nl.vstats_view([msg])["vstats"][msg.get_attr("VDPA_ATTR_DEV_NAME")]
        for key, value in entry.items():
            out += f"queue_type {value} " if key == "queue_type" else f"{key} {value} "
    return out + "\n"


_SECTIONS: dict[str, tuple[str, Callable[[nl.vdpa_msg], str], Callable[[list], dict[str, Any]]]] = {
    "mgmtdev": ("mgmtdev", _text_mgmtdev, nl.mgmtdev_view),
    "dev": ("dev", _text_dev, nl.dev_view),
    "config": ("config", _text_config, nl.config_view),
    "vstats": ("vstats", _text_vstats, nl.vstats_view),
}


def format_text(section: str, msgs: Iterator[Any] | list[Any]) -> str:
    """What ``vdpa SECTION show`` prints for these replies."""
    _, text, _ = _SECTIONS[section]
    return "".join(text(m) for m in msgs if isinstance(m, nl.vdpa_msg))


def format_json(section: str, msgs: Iterator[Any] | list[Any], *, pretty: bool = False) -> str:
    """What ``vdpa -j [-p] SECTION show`` prints for these replies (iproute2's json_writer layout)."""
    _, _, view = _SECTIONS[section]
    msgs = [m for m in msgs if isinstance(m, nl.vdpa_msg)]
    obj = view(msgs)
    for msg in msgs:  # vdpasim's extension fields, present only when -x asked for them
        entry = obj[_SECTIONS[section][0]].get(msg.get_attr("VDPA_ATTR_DEV_NAME"))
        if entry is not None:
            entry.update(_extension_values(msg, section))
    if pretty:
        return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


def format_error(exc: NetlinkError) -> str:
    """iproute2's report of a refused request: the extack (``Error: ...``), then ``kernel answers: ...``."""
    code = abs(exc.code)
    strerror = os.strerror(code)
    message = exc.args[1] if len(exc.args) > 1 else None
    out = ""
    if message and message != strerror:
        out += f"Error: {message}" + ("" if message.endswith(".") else ".") + "\n"
    return out + f"kernel answers: {strerror}\n"


# ----- the commands -----
class VdpaCli:
    """One ``vdpasim`` management command over a ``VdpaSocket``: parse, request, print as ``vdpa`` prints."""

    def __init__(
        self,
        vdpa: nl.VdpaSocket | None,
        *,
        json_out: bool = False,
        pretty: bool = False,
        extensions: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.vdpa = vdpa
        self.json = json_out
        self.pretty = pretty
        self.extensions = extensions
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def _show(self, section: str, request: Callable[[], Any]) -> int:
        msgs: list[Any] = []
        try:
            msgs = list(request()) if self.vdpa is not None else []
        except NetlinkError as exc:
            if self.json:
                self.stdout.write(format_json(section, [], pretty=self.pretty))
            self.stderr.write(format_error(exc))
            return 1
        self.stdout.write(format_json(section, msgs, pretty=self.pretty) if self.json else format_text(section, msgs))
        return 0

    def _do(self, request: Callable[[], Any]) -> int:
        try:
            replies = request()
        except NetlinkError as exc:
            self.stderr.write(format_error(exc))
            return 1
        for reply in replies or ():
            if isinstance(reply, nl.vdpa_errmsg) and (warning := reply.get_attr("NLMSGERR_ATTR_MSG")):
                # A successful ack with an extack message: iproute2 prints it as a warning.
                self.stderr.write(f"Warning: {warning}" + ("" if warning.endswith(".") else ".") + "\n")
        if self.json:
            self.stdout.write("\n")  # iproute2's JSON writer ends with a newline even when nothing was printed
        return 0

    def mgmtdev(self, words: list[str]) -> int:
        verb, rest = (words[0], words[1:]) if words else ("help", [])
        if verb == "help":
            self.stderr.write("Usage: vdpasim mgmtdev show [ DEV ]\n")
            return 0
        if verb not in ("show", "list"):
            raise CliFailure(f'Command "{verb}" not found')
        name = _one_name(rest)
        return self._show("mgmtdev", lambda: self.vdpa.mgmtdev("show", name))  # type: ignore[union-attr]

    def dev(self, words: list[str]) -> int:
        verb, rest = (words[0], words[1:]) if words else ("show", [])
        vdpa = self.vdpa
        if verb == "help":
            self.stderr.write(_DEV_USAGE + "\n")
            return 0
        if verb in ("show", "list"):
            name = _one_name(rest)
            ext = {"extensions": True} if self.extensions else {}
            return self._show("dev", lambda: vdpa.dev("show", name, **ext))  # type: ignore[union-attr]
        if verb == "add":
            args = parse_dev_add(rest)
            name = args.pop("name")
            return self._do(lambda: vdpa.dev("add", name, **args))  # type: ignore[union-attr]
        if verb in ("del", "delete"):
            name = _one_name(rest, allow_keyword=True)
            if name is None:
                raise CliFailure("device name is not set.")
            return self._do(lambda: vdpa.dev("del", name))  # type: ignore[union-attr]
        if verb == "set":
            if len(rest) != 4 or rest[0] != "name" or rest[2] != "mac":
                raise CliFailure("Usage: vdpasim dev set name NAME mac MACADDR")
            name, mac = rest[1], _mac(rest[3])
            return self._do(lambda: vdpa.dev("set", name, mac=mac))  # type: ignore[union-attr]
        if verb == "config":
            if rest[:1] in ([], ["show"]):
                name = _one_name(rest[1:])
                ext = self.extensions
                return self._show("config", lambda: vdpa.config("show", name, ext))  # type: ignore[union-attr]
            raise CliFailure(f'Command "{rest[0]}" not found')
        if verb == "vstats":
            if rest[:1] == ["show"]:
                rest = rest[1:]
            if len(rest) != 3 or rest[1] != "qidx":
                raise CliFailure("Usage: vdpasim dev vstats show DEV qidx QUEUE_INDEX")
            name, qidx = rest[0], rest[2]
            if not qidx.isdigit() or int(qidx) > 0xFFFFFFFF:
                raise CliFailure(f'"{qidx}" is not a valid number')
            ext = self.extensions
            return self._show("vstats", lambda: vdpa.vstats("show", name, int(qidx), ext))  # type: ignore[union-attr]
        raise CliFailure(f'Command "{verb}" not found')


_DEV_USAGE = """\
Usage: vdpasim dev show [ DEV ]
       vdpasim dev add name NAME mgmtdev MANAGEMENTDEV [ mac MACADDR ] [ mtu MTU ] [ max_vqp MAX_VQ_PAIRS ]
                   [ device_features FEATURES ] [ mode loopback|responder ] [ peer_ip A ] [ peer_mac M ]
                   [ capacity SIZE ] [ file PATH [ create ] ] [ read_only ] [ num_queues N ]
                   [ blk_size N ] [ serial S ] [ queue_size N ] [ busy_poll on|off ]
       vdpasim dev del DEV
       vdpasim dev set name NAME mac MACADDR
       vdpasim dev config show [ DEV ]
       vdpasim dev vstats show DEV qidx QUEUE_INDEX"""


# ----- talking to the daemon -----
def _split_output_flags(words: list[str], args: argparse.Namespace) -> list[str]:
    """Take ``-j``/``-p``/``-x`` from anywhere in ``words`` into ``args``; return the other words."""
    args.json = getattr(args, "json", False)
    args.pretty = getattr(args, "pretty", False)
    args.extensions = getattr(args, "extensions", False)
    rest = []
    for word in words:
        flag = _JSON_FLAGS.get(word)
        if flag is None:
            rest.append(word)
            continue
        args.json = args.json or "j" in flag
        args.pretty = args.pretty or "p" in flag
        args.extensions = args.extensions or "x" in flag
    return rest


def _say(message: str) -> None:
    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _vdpa_socket(runtime: RuntimeDir, *, start: bool) -> Iterator[nl.VdpaSocket | None]:
    sock = runtime.connect_control()
    if sock is None and start:
        from .daemon import spawn_daemon

        pid = spawn_daemon(runtime)
        _say(escape(f"vdpasim: started a daemon (pid {pid}) in {runtime.path}, log {runtime.log_file}"))
        sock = runtime.connect_control()
    if sock is None:
        yield None
        return
    try:
        vdpa = nl.VdpaSocket(use_socket=sock)
        try:
            yield vdpa
        finally:
            vdpa.close()
    finally:
        sock.close()


def _run(args: argparse.Namespace, what: str) -> int:
    words = _split_output_flags(args.words, args)
    if any(word in ("-h", "--help") for word in words):
        words = ["help"]
    runtime = runtime_dir()
    try:
        verb = words[0] if words else "show"
        start = what == "mgmtdev" or verb == "add"
        needs_daemon = not (what == "dev" and verb in ("show", "list", "help")) and verb != "help"
        with _vdpa_socket(runtime, start=start and verb != "help") as vdpa:
            if vdpa is None and needs_daemon:
                sys.stderr.write("Failed to connect to vdpa Netlink\n")
                _say(escape(f"vdpasim: no daemon serves {runtime.path}"))
                return 1
            if what == "mgmtdev" and vdpa is not None:
                return _mgmtdev_show(args, words, runtime, vdpa)
            cli = VdpaCli(vdpa, json_out=args.json, pretty=args.pretty, extensions=args.extensions)
            return cli.mgmtdev(words) if what == "mgmtdev" else cli.dev(words)
    except CliFailure as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    except (VdpasimError, OSError) as exc:
        _say(f"[bold red]error:[/] {escape(str(exc))}")
        return 1


def _daemon_mode(runtime: RuntimeDir) -> str:
    client = ControlClient.try_connect(runtime.control_socket, timeout=10.0)
    if client is None:
        return "user"
    with client:
        return str(client.request("daemon_get")["daemon"].get("mode", "user"))


def _mgmtdev_show(args: argparse.Namespace, words: list[str], runtime: RuntimeDir, vdpa: nl.VdpaSocket) -> int:
    """``mgmtdev show``: the daemon's management devices in user mode, the kernel's (its real family) in
    kernel mode; with ``-x`` also the mode in use (a last text line, or a ``mode`` field in JSON)."""
    mode = _daemon_mode(runtime)
    kernel = nl.VdpaSocket() if mode == "kernel" else None
    out = io.StringIO()
    try:
        cli = VdpaCli(kernel or vdpa, json_out=args.json, pretty=args.pretty, extensions=args.extensions, stdout=out)
        status = cli.mgmtdev(words)
    finally:
        if kernel is not None:
            kernel.close()
    text = out.getvalue()
    if args.extensions and (words or ["show"])[0] in ("show", "list"):
        if args.json:
            obj = json.loads(text)
            obj["mode"] = mode
            if args.pretty:
                text = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
            else:
                text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"
        else:
            text += f"mode {mode}\n"
    sys.stdout.write(text)
    return status


def _cmd_dev(args: argparse.Namespace) -> int:
    return _run(args, "dev")


def _cmd_mgmtdev(args: argparse.Namespace) -> int:
    return _run(args, "mgmtdev")


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=400)  # a pipe or a file: never fold a socket path
    return console


def _print_json(args: argparse.Namespace, obj: Any) -> None:
    print(json.dumps(obj, indent=2 if args.pretty else None))


def _error(exc: BaseException) -> int:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return 1


def _dev_detail(name: str, dev: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{name}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in dev.items():
        if isinstance(value, list):
            value = " ".join(value) if value else "-"
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif value is None:
            value = "-"
        table.add_row(key, str(value))
    return table


def _safe(runtime: RuntimeDir) -> bool:
    if os.path.lexists(runtime.path):
        runtime.check()
    return True


def _cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run_foreground, spawn_daemon, stop_daemon

    runtime = runtime_dir()
    _split_output_flags([], args)
    try:
        if args.action == "run":
            return run_foreground(args)
        if args.action == "start":
            client = ControlClient.try_connect(runtime.control_socket, timeout=10.0) if _safe(runtime) else None
            if client is not None:
                with client:
                    pid = client.request("daemon_get")["daemon"]["pid"]
                _say(escape(f"vdpasim: a daemon (pid {pid}) already serves {runtime.path}"))
                return 0
            pid = spawn_daemon(runtime, log_level=args.log_level, mode=args.mode)
            _say(escape(f"vdpasim: started a daemon (pid {pid}) in {runtime.path}, log {runtime.log_file}"))
            return 0
        if args.action == "stop":
            pid = stop_daemon(runtime)
            done = f"stopped the daemon (pid {pid})" if pid else f"no daemon serves {runtime.path}"
            _say(escape(f"vdpasim: {done}"))
            return 0
        # status
        client = ControlClient.try_connect(runtime.control_socket) if _safe(runtime) else None
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
    output.add_argument(
        "-x", "--extensions", action="store_true", default=argparse.SUPPRESS, help="vdpasim's extension fields"
    )

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
    daemon.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "kernel", "user"),
        help="kernel: devices through VDUSE on the kernel's vDPA bus; user: the userspace bus (vhost-user); "
        "auto (default): kernel where /dev/vduse/control and the kernel's vdpa family exist, else user",
    )
    daemon.add_argument(
        "--vhost-user",
        default="server",
        choices=("server", "client"),
        help="server (default): each new device listens on <runtime>/<name>.vhost-user.sock (QEMU connects, "
        "reconnect=1); client: each new device connects to <runtime>/<name>.qemu.sock, where QEMU listens "
        "(server=on,wait=off), and again after every restart (docs/reliability.md)",
    )
    daemon.set_defaults(handler=_cmd_daemon)
