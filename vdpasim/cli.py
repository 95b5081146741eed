"""The ``vdpasim`` command."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo
from .guest import cli as guest_cli

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdpasim", description="Userspace vDPA device simulator")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    bench.add_parser(commands)
    guest_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
