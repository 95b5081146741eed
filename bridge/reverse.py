"""``vdpasim bridge``: a vhost-user socket in front of a vhost-vdpa device (the reverse bridge).

A ``VhostUserServer`` stacked on a ``VhostVdpaClient``: any vhost-user front-end (QEMU's vhost-user-net or
vhost-user-blk, DPDK's virtio-user) drives a /dev/vhost-vdpa-N device, as DPDK's vDPA framework does for
hardware. The node may be the kernel's (vdpa_sim, VDUSE, hardware) or, under ``vdpasim run``, one the bypass
serves for a simulated device. Guest memory follows: the front-end's fds are mapped here, and the IOTLB
updates name those mappings, which the kernel pins (or the bypass finds the shared file behind).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from vdpasim.errors import VdpasimError

__all__ = ["add_parser", "serve"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("bridge", help="serve a vhost-vdpa device (/dev/vhost-vdpa-N) on a vhost-user socket")
    cmd.add_argument("--vhost-vdpa", required=True, metavar="NODE", help="the device node, e.g. /dev/vhost-vdpa-0")
    cmd.add_argument("--vhost-user", required=True, metavar="SOCKET", help="the socket to listen on (created 0600)")
    cmd.add_argument("--name", default="", help="name in log lines (default: the node's)")
    cmd.set_defaults(handler=run)


def serve(node: str, socket_path: str, name: str = "", stop: threading.Event | None = None) -> None:
    """Serve until ``stop`` is set; one front-end at a time, the device reset whenever one leaves."""
    from bridge.vhost_user.server import VhostUserServer
    from bridge.vhost_vdpa.client import VhostVdpaClient

    stop = stop or threading.Event()
    device = VhostVdpaClient(node)
    try:
        server = VhostUserServer(device, socket_path, name=name or os.path.basename(node))
        server.start()
        try:
            stop.wait()
        finally:
            server.stop()
    finally:
        device.close()


def run(args: argparse.Namespace) -> int:
    from vdpasim.daemon import configure_logging

    configure_logging("warning")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve(args.vhost_vdpa, args.vhost_user, args.name, stop)
    except (VdpasimError, OSError) as exc:
        print(f"vdpasim bridge: {exc}", flush=True)
        return 1
    return 0
