"""The ``vdpasim`` command."""

from __future__ import annotations

import argparse
import sys

from bridge import reverse

from . import bench, cli_dev, compare, demo, run
from .guest import cli as guest_cli

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdpasim", description="Userspace vDPA device simulator")
    parser.add_argument("-j", "--json", action="store_true", help="JSON output (dev, mgmtdev, daemon)")
    parser.add_argument("-p", "--pretty", action="store_true", help="indented JSON output")
    parser.add_argument("-x", "--extensions", action="store_true", help="vdpasim's extension fields (dev show)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    compare.add_parser(commands)
    reverse.add_parser(commands)
    bench.add_parser(commands)
    guest_cli.add_parser(commands)
    cli_dev.add_parsers(commands)
    run.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
