"""Layout-independent virtqueue operations on the reference implementation (mirror of jit/vq.py)."""

from __future__ import annotations

import numpy as np

from ..memory import RegionTable
from .chain import Queue, as_queue
from .packed import (
    packed_disable_notify,
    packed_enable_notify,
    packed_has_avail,
    packed_needs_notify,
    packed_pop,
    packed_publish,
    packed_push,
)
from .split import (
    split_disable_notify,
    split_enable_notify,
    split_has_avail,
    split_needs_notify,
    split_pop,
    split_publish,
    split_push,
)

__all__ = [
    "vq_has_avail",
    "vq_pop",
    "vq_push",
    "vq_publish",
    "vq_needs_notify",
    "vq_enable_notify",
    "vq_disable_notify",
]


def vq_has_avail(q: np.void | Queue) -> bool:
    q = as_queue(q)
    return packed_has_avail(q) if q.packed else split_has_avail(q)


def vq_pop(q: np.void | Queue, table: RegionTable, iov: np.ndarray) -> tuple[int, int, int, int, int]:
    """(status, head or buffer id, ring descriptors consumed, iov entries, readable entries)."""
    q = as_queue(q)
    return packed_pop(q, table, iov) if q.packed else split_pop(q, table, iov)


def vq_push(q: np.void | Queue, head: int, ndesc: int, written: int) -> None:
    q = as_queue(q)
    if q.packed:
        packed_push(q, head, ndesc, written)
    else:
        split_push(q, head, ndesc, written)


def vq_publish(q: np.void | Queue) -> None:
    """Make pushed used entries visible (split: the used index; packed: the burst's first flags)."""
    q = as_queue(q)
    if q.packed:
        packed_publish(q)
    else:
        split_publish(q)


def vq_needs_notify(q: np.void | Queue) -> bool:
    q = as_queue(q)
    return packed_needs_notify(q) if q.packed else split_needs_notify(q)


def vq_enable_notify(q: np.void | Queue) -> None:
    q = as_queue(q)
    if q.packed:
        packed_enable_notify(q)
    else:
        split_enable_notify(q)


def vq_disable_notify(q: np.void | Queue) -> None:
    q = as_queue(q)
    if q.packed:
        packed_disable_notify(q)
    else:
        split_disable_notify(q)
