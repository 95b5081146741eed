"""Numba kernels of the data path.

Numba's on-disk cache (``cache=True``) is keyed by the source file of each kernel only, yet kernels
inline functions from other modules (ring layouts, intrinsics, constants): an edit there would leave
stale machine code in use. So the cache lives in a directory named after a digest of every source the
kernels are built from, set here before any kernel module is imported. ``NUMBA_CACHE_DIR`` overrides.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numba

__all__ = ["CACHE_DIR", "kernel"]

_PACKAGE = Path(__file__).resolve().parent.parent
_SOURCES = ("jit/*.py", "rings/state.py", "memory.py", "virtio/constants.py")


def _digest() -> str:
    digest = hashlib.sha256(numba.__version__.encode())
    for pattern in _SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_dir() -> str:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    root = Path(os.environ.get("VDPASIM_CACHE_DIR") or Path.home() / ".cache" / "vdpasim") / "numba"
    current = root / _digest()
    current.mkdir(parents=True, exist_ok=True)
    # Caches of other sources go once unused for a day: not at once, another checkout may be running them.
    for old in root.iterdir():
        if old != current and old.is_dir() and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    os.utime(current)
    return str(current)


CACHE_DIR = _cache_dir()
numba.config.CACHE_DIR = CACHE_DIR


def kernel(func=None, *, inline: bool = False):
    """Compile a data-path function: the one set of Numba options every kernel uses.

    cached on disk; ``nogil`` so data-path threads run in parallel; no reference counting (``_nrt``
    off: kernels never allocate, and counting the arrays passed between compiled functions cost half
    the time of a burst); ``inline=True`` for the per-descriptor helpers, where a call (nine machine
    words per array argument) costs more than the work.
    """
    decorate = numba.njit(cache=True, nogil=True, _nrt=False, inline="always" if inline else "never")
    return decorate if func is None else decorate(func)
