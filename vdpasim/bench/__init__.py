"""Benchmarks behind ``vdpasim bench``: options are declared here, each verb runs from its own module.

Those modules import Numba and compile kernels, so they load only when their verb runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its verbs to the top-level sub-parsers."""
    bench = commands.add_parser("bench", help="measure the data path")
    verbs = bench.add_subparsers(dest="bench_command", required=True)
    rings = verbs.add_parser(
        "rings",
        help="split and packed ring loopback: the compiled kernels against a C reference",
        description="One-thread virtio-net loopback through the compiled ring kernels and through a C reference "
        "of the same semantics (benchmarks/ring_loopback.c, built with gcc -O2), alternating runs, medians.",
    )
    rings.add_argument("--layout", choices=("split", "packed"), action="append", help="ring layout (repeatable)")
    rings.add_argument("--size", type=int, action="append", help="Ethernet frame bytes (repeatable; default 64, 1500)")
    rings.add_argument("--burst", type=int, action="append", help="packets per burst (repeatable; default 32, 256)")
    rings.add_argument("--runs", type=int, default=7, help="runs per side and configuration (default 7)")
    rings.add_argument("--duration", type=float, default=0.2, help="seconds per run, roughly (default 0.2)")
    rings.add_argument("--packets", type=int, help="packets per run, instead of --duration")
    rings.add_argument("--queue-size", type=int, default=256, help="virtqueue size (default 256)")
    rings.add_argument("--cc", default="gcc", help="C compiler for the reference (default gcc)")
    rings.add_argument("--json", action="store_true", help="print a JSON list on stdout instead of a table")
    rings.set_defaults(handler=_rings)
    e2e = verbs.add_parser(
        "e2e",
        help="end to end over vhost-user: a vdpasim net device against DPDK's vhost back-end, both driven by testpmd",
        description="dpdk-testpmd with a net_virtio_user port in flowgen mode (the guest driver) against (a) a "
        "vdpasim net device in loopback mode served over vhost-user and (b) dpdk-testpmd with a net_vhost port "
        "forwarding every frame back (io mode), alternating runs, medians of the front-end's receive rate.",
    )
    e2e.add_argument("--ring", choices=("split", "packed"), action="append", help="ring layout (repeatable)")
    e2e.add_argument("--size", type=int, action="append", help="Ethernet frame bytes (repeatable; default 64, 1500)")
    _alternation_options(e2e, warmup=1.0, what="traffic")
    e2e.add_argument(
        "--no-huge", action="store_true", help="run the testpmds on plain memory even where hugepages can be reserved"
    )
    _output_options(e2e)
    e2e.set_defaults(handler=_e2e)
    blk = verbs.add_parser(
        "blk",
        help="4 KiB random reads and writes: a vdpasim blk device against qemu-storage-daemon, over vhost-user",
        description="A compiled virtio-blk driver loop (this process) on one split queue over vhost-user against "
        "(a) a vdpasim blk device with a RAM disk in a child process and (b) qemu-storage-daemon exporting a tmpfs "
        "image (iothread with polling, Linux AIO on O_DIRECT); alternating runs, medians of IOPS and per-request "
        "latency. Every status byte and every block read is checked.",
    )
    blk.add_argument("--op", choices=("read", "write"), action="append", help="random read or write (repeatable)")
    blk.add_argument("--qd", type=int, action="append", help="queue depth (repeatable; default 32, 1)")
    _alternation_options(blk, warmup=0.5, what="I/O")
    blk.add_argument("--disk-mib", type=int, default=128, help="disk size in MiB, both back-ends (default 128)")
    _output_options(blk)
    blk.set_defaults(handler=_blk)

    bypass = verbs.add_parser(
        "bypass",
        help="the vhost-vdpa bypass: control-plane cost per device start, data path against vhost-user direct",
        description="A harness (a VMM and a compiled guest driver) starts a daemon's loopback net device through "
        "/dev/vhost-vdpa-N under the supervisor and through its vhost-user socket: traps and time per device "
        "start, then frames per second through each door, alternating runs, medians.",
    )
    bypass.add_argument("--size", type=int, action="append", help="Ethernet frame bytes (repeatable; default 64, 1500)")
    bypass.add_argument("--runs", type=int, default=5, help="traffic alternations per frame size (default 5)")
    bypass.add_argument("--starts", type=int, default=10, help="device starts measured per door (default 10)")
    bypass.add_argument("--seconds", type=float, default=2.0, help="measured seconds per traffic run (default 2)")
    bypass.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    bypass.set_defaults(handler=_bypass)


def _alternation_options(verb: argparse.ArgumentParser, *, warmup: float, what: str) -> None:
    """The options of a bench that alternates a vdpasim device with a peer back-end."""
    verb.add_argument("--runs", type=int, default=5, help="alternations per case (default 5)")
    verb.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run (default 2)")
    verb.add_argument(
        "--warmup", type=float, default=warmup, help=f"seconds of {what} before each measurement (default {warmup:g})"
    )
    verb.add_argument(
        "--no-busy-poll", action="store_true", help="run the vdpasim device on kicks instead of busy-polling"
    )


def _output_options(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--json", action="store_true", help="print a JSON list (one object per case) instead of a table")
    verb.add_argument("--plot", metavar="FILE.png", help="also draw each side's medians and ranges per case")


def _rings(args: argparse.Namespace) -> int:
    from .rings import command

    return command(args)


def _e2e(args: argparse.Namespace) -> int:
    from .e2e import command

    return command(args)


def _blk(args: argparse.Namespace) -> int:
    from .blk import command

    return command(args)


def _bypass(args: argparse.Namespace) -> int:
    from .bypass import command

    return command(args)
