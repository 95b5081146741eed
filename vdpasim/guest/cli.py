"""``vdpasim guest build`` and ``vdpasim guest boot``: make the test guest, and run a workload in it by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import DEFAULT_MODULES, build_guest
from .qemu import GuestVM

__all__ = ["add_parser"]


def _progress(message: str) -> None:
    print(f"guest: {message}", file=sys.stderr, flush=True)


def _build(args: argparse.Namespace):
    modules = [m for m in args.modules.split(",") if m] if args.modules else DEFAULT_MODULES
    return build_guest(modules=modules, cache=args.cache_dir, progress=_progress, force=args.force)


def _cmd_build(args: argparse.Namespace) -> int:
    image = _build(args)
    summary = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_version": image.kernel_version,
        "modules": image.manifest["modules"],
        "key": image.manifest["key"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_boot(args: argparse.Namespace) -> int:
    image = _build(args)
    params = dict(p.split("=", 1) for p in args.param)
    qemu_args = args.qemu_args[1:] if args.qemu_args[:1] == ["--"] else args.qemu_args
    vm = GuestVM(image, args.workload, params, qemu_args, log_path=args.log, timeout=args.timeout)
    _progress(f"booting: console log in {args.log or 'a temporary file'}")
    with vm:
        result = vm.wait()
    for line in result.results:
        print(json.dumps(line))
    _progress(f"guest rc={result.guest_rc}, qemu rc={result.returncode}, {result.seconds:.1f} s, log {result.log_path}")
    if result.timed_out or result.guest_rc is None:
        print(result.tail(), file=sys.stderr)
        return 2
    return result.guest_rc


def add_parser(commands: argparse._SubParsersAction) -> None:
    guest = commands.add_parser("guest", help="the QEMU test guest (Debian 6.12 kernel + busybox initramfs)")
    verbs = guest.add_subparsers(dest="guest_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache-dir", type=Path, help="cache directory (default $VDPASIM_CACHE_DIR or ~/.cache/vdpasim)"
        )
        p.add_argument("--modules", help=f"comma-separated modules to pack (default {','.join(DEFAULT_MODULES)})")
        p.add_argument("--force", action="store_true", help="rebuild even if a cached image matches")

    build = verbs.add_parser("build", help="build (or find in the cache) the guest image and print its paths")
    common(build)
    build.set_defaults(handler=_cmd_build)

    boot = verbs.add_parser("boot", help="boot the guest under QEMU TCG, run workloads, print their results")
    common(boot)
    boot.add_argument(
        "--workload", "-w", default="selftest", help="comma-separated: selftest, ping, net-loopback, blk, script"
    )
    boot.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE", help="vdpasim.KEY=VALUE")
    boot.add_argument("--log", type=Path, help="console log file")
    boot.add_argument("--timeout", type=float, default=120.0)
    boot.add_argument("qemu_args", nargs=argparse.REMAINDER, help="after --: extra QEMU arguments")
    boot.set_defaults(handler=_cmd_boot)
