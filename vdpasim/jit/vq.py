"""Layout-independent virtqueue operations: one name per operation, dispatching on ``q.packed``.

Device kernels call these, so each device model is written once for both layouts; the branch is
perfectly predictable and costs nothing next to the ring accesses.
"""

from __future__ import annotations

from numba import njit

from .packed import (
    packed_disable_notify,
    packed_enable_notify,
    packed_has_avail,
    packed_needs_notify,
    packed_pop,
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


@njit(cache=True, nogil=True)
def vq_has_avail(q):
    return packed_has_avail(q) if q.packed else split_has_avail(q)


@njit(cache=True, nogil=True)
def vq_pop(q, rows, iov):
    """(status, head or buffer id, ring descriptors consumed, iov entries, readable entries)."""
    if q.packed:
        return packed_pop(q, rows, iov)
    return split_pop(q, rows, iov)


@njit(cache=True, nogil=True, inline="always")
def vq_push(q, head, ndesc, written):
    if q.packed:
        packed_push(q, head, ndesc, written)
    else:
        split_push(q, head, ndesc, written)


@njit(cache=True, nogil=True, inline="always")
def vq_publish(q):
    """Make pushed used entries visible (split: the used index; packed entries are visible when pushed)."""
    if not q.packed:
        split_publish(q)


@njit(cache=True, nogil=True)
def vq_needs_notify(q):
    return packed_needs_notify(q) if q.packed else split_needs_notify(q)


@njit(cache=True, nogil=True)
def vq_enable_notify(q):
    if q.packed:
        packed_enable_notify(q)
    else:
        split_enable_notify(q)


@njit(cache=True, nogil=True)
def vq_disable_notify(q):
    if q.packed:
        packed_disable_notify(q)
    else:
        split_disable_notify(q)
