"""``vdpasim run [--] CMD ARGS...``: run an unmodified program in kernel-bypass mode.

CMD runs under the seccomp supervisor (bridge/supervisor/supervisor.py) with the netlink bypass
(bridge/supervisor/netlink.py): its NETLINK_GENERIC sockets are emulated and their requests answered by the
daemon of the runtime directory (started as ``vdpasim dev add`` starts one, on the first request), so
``vdpasim run -- vdpa mgmtdev show`` lists vdpasim's management devices; and it opens the daemon's devices as
/dev/vhost-vdpa-N (``vdpasim -x dev show`` names each one's node), so ``-netdev vhost-vdpa,vhostdev=...``
works in an unmodified QEMU (bridge/bypass.py). Every other syscall runs untouched.
The exit status is CMD's (128 + N when a signal N ended it); SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to
``vdpasim run`` are passed on to CMD.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import Any

from .daemon import configure_logging

__all__ = ["add_parser", "run", "supervise", "build_nodes"]

log = logging.getLogger("vdpasim.run")

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run a program with the vDPA bus and /dev/vhost-vdpa-N served in userspace (kernel bypass)",
        description="Run CMD under the seccomp supervisor: its vdpa netlink requests go to the daemon, and the "
        "daemon's devices open as /dev/vhost-vdpa-N.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log at info level (-vv: debug)")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] CMD ARGS", help="the program to run")
    parser.set_defaults(handler=_main)


def build_nodes(runtime: Any) -> Any:
    """The simulated char devices: /dev/vhost-vdpa-N of every device the daemon holds, looked up at each open
    (bridge/bypass.py), so a device added while CMD runs is found too."""
    from bridge.bypass import DaemonNodes

    return DaemonNodes(runtime)


def supervise(argv: list[str], *, runtime: Any = None, **popen: Any) -> Any:
    """``argv`` started under the supervisor with the netlink bypass and the daemon's nodes, as ``vdpasim run``
    starts it (the bench measures this very set-up); ``popen`` goes to subprocess.Popen. Raises OSError."""
    from bridge.supervisor.netlink import DaemonTransport, NetlinkBypass
    from bridge.supervisor.supervisor import Supervisor

    from .runtime import runtime_dir

    runtime = runtime or runtime_dir()
    bypass = NetlinkBypass(DaemonTransport(runtime))
    try:
        return Supervisor(argv, build_nodes(runtime), netlink=bypass, **popen)
    except BaseException:
        bypass.close()
        raise


def run(argv: list[str], *, runtime: Any = None) -> int:
    """Run ``argv`` under the supervisor with the netlink bypass; its exit status (128 + signal)."""
    try:
        supervisor = supervise(argv, runtime=runtime)
    except OSError as exc:
        sys.stderr.write(f"vdpasim run: cannot run {argv[0]}: {exc.strerror or exc}\n")
        return 127 if isinstance(exc, FileNotFoundError) else 126

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            supervisor.process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        code = supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        supervisor.close()
    log.info("%s exited with %d (%d trapped calls)", argv[0], code, supervisor.calls)
    return 128 - code if code < 0 else code


def _main(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.stderr.write("vdpasim run: no command given (vdpasim run [--] CMD ARGS...)\n")
        return 2
    configure_logging(("warning", "info", "debug")[min(args.verbose, 2)])
    return run(argv)
