"""What the end-to-end benchmarks share: CPU placement, A/B alternation, progress lines, JSON output."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["pick_cpus", "alternation", "progress_printer", "print_json"]


def pick_cpus() -> tuple[int, int]:
    """(back-end CPU, front-end CPU): two different CPUs of our affinity set where there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


def alternation(run: int, sides: tuple[str, str] = ("vdpasim", "peer")) -> tuple[str, str]:
    """The order of the two sides in run ``run``: swapped every run, so neither always goes first."""
    return sides if run % 2 == 0 else (sides[1], sides[0])


def progress_printer(console: Console) -> Callable[[str], None]:
    """A progress callback printing time-stamped lines on ``console`` (a rich Console on stderr)."""

    def progress(text: str) -> None:
        console.print(f"[{time.strftime('%H:%M:%S')}] {text}", markup=False, highlight=False)

    return progress


def print_json(objects: Iterable[dict[str, object]]) -> None:
    """One JSON list on stdout, one object per case."""
    json.dump(list(objects), sys.stdout, indent=1)
    sys.stdout.write("\n")
