"""One picture for every ``vdpasim bench`` verb: per case, each side's median as a bar, its range as a whisker.

The ratio of the first side to the second is written over each group, since that is what the
benchmarks are judged by (compare inside one run, never absolute figures across runs).
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_medians"]

_COLOURS = ("#4C72B0", "#DD8452", "#55A868")


def plot_medians(
    path: Path | str, title: str, unit: str, cases: Sequence[str], sides: Mapping[str, Sequence[Sequence[float]]]
) -> None:
    """``sides[name][i]``: the runs of side ``name`` in case ``cases[i]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sides)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    tops = [0.0] * len(cases)
    for k, name in enumerate(names):
        runs = [list(r) for r in sides[name]]
        medians = [statistics.median(r) for r in runs]
        below = [m - min(r) for m, r in zip(medians, runs, strict=True)]
        above = [max(r) - m for m, r in zip(medians, runs, strict=True)]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, medians, width, yerr=[below, above], capsize=3, label=name, color=_COLOURS[k % len(_COLOURS)])
        tops = [max(t, max(r)) for t, r in zip(tops, runs, strict=True)]
    if len(names) >= 2:
        first, second = (sides[n] for n in names[:2])
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            ratio = statistics.median(a) / statistics.median(b) if statistics.median(b) else 0.0
            ax.annotate(f"{ratio:.2f}x", (i, tops[i]), textcoords="offset points", xytext=(0, 4), ha="center")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel(unit)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
