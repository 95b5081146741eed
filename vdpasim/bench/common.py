"""What the end-to-end benchmarks share: CPU placement, A/B alternation, progress lines, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["require_program", "pick_cpus", "alternation", "progress_printer", "print_json"]


def require_program(program: str, packages: Sequence[str], say: Callable[[str], None]) -> str:
    """The path of ``program``. Missing, its Debian ``packages`` are installed with apt-get (as root, as
    scripts/setup.sh would); elsewhere a UsageError says what to install."""
    path = shutil.which(program)
    if path is not None:
        return path
    hint = f"{program} not found: install it (Debian: apt-get install {' '.join(packages)}; or run scripts/setup.sh)"
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise UsageError(hint)
    say(f"{program} not found: installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", *packages]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise UsageError(f"{hint}. apt-get failed: {done.stderr.strip()[-400:]}")
    path = shutil.which(program)
    if path is None:
        raise UsageError(hint)
    return path


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
