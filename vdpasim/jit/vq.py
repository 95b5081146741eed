"""Layout-independent virtqueue operations: one name per operation, dispatching on ``q.packed``.

Device kernels call these, so each device model is written once for both layouts; the branch is
perfectly predictable and costs nothing next to the ring accesses.

How every kernel in jit/ is compiled, and why (measured with ``vdpasim bench rings``):
* ``_nrt=False``: no kernel allocates, and with Numba's runtime on, each array handed to another
  compiled function gets atomic reference-count updates; that alone made loopback 3x slower.
* ``inline="always"`` on the per-packet path (vq_pop, split/packed pop and walk, iov copies, the
  net receive): an array argument is passed as nine machine words, so a call per chain costs more
  than the chain walk. Numba's cache only tracks a kernel's own file: after editing an inlined
  helper, clear the callers' caches (``__pycache__/*.nbi``, ``*.nbc``).
"""

from __future__ import annotations

from . import kernel
from .packed import (
    packed_disable_notify,
    packed_enable_notify,
    packed_has_avail,
    packed_needs_notify,
    packed_pop,
    packed_prefetch,
    packed_publish,
    packed_push,
)
from .split import (
    split_disable_notify,
    split_enable_notify,
    split_has_avail,
    split_needs_notify,
    split_pop,
    split_prefetch,
    split_publish,
    split_push,
)

__all__ = [
    "vq_has_avail",
    "vq_pop",
    "vq_prefetch",
    "vq_push",
    "vq_publish",
    "vq_needs_notify",
    "vq_enable_notify",
    "vq_disable_notify",
]


@kernel
def vq_has_avail(q):
    return packed_has_avail(q) if q.packed else split_has_avail(q)


@kernel(inline=True)
def vq_pop(q, rows, iov):
    """(status, head or buffer id, ring descriptors consumed, iov entries, readable entries)."""
    if q.packed:
        return packed_pop(q, rows, iov)
    return split_pop(q, rows, iov)


@kernel(inline=True)
def vq_prefetch(q, rows, ahead, for_write):
    """Warm the cache for the pop ``ahead`` chains from now (``for_write``: its buffers will be written)."""
    if q.packed:
        packed_prefetch(q, rows, ahead, for_write)
    else:
        split_prefetch(q, rows, ahead, for_write)


@kernel(inline=True)
def vq_push(q, head, ndesc, written):
    if q.packed:
        packed_push(q, head, ndesc, written)
    else:
        split_push(q, head, ndesc, written)


@kernel(inline=True)
def vq_publish(q):
    """Make pushed used entries visible (split: the used index; packed: the burst's first flags)."""
    if q.packed:
        packed_publish(q)
    else:
        split_publish(q)


@kernel
def vq_needs_notify(q):
    return packed_needs_notify(q) if q.packed else split_needs_notify(q)


@kernel
def vq_enable_notify(q):
    if q.packed:
        packed_enable_notify(q)
    else:
        split_enable_notify(q)


@kernel
def vq_disable_notify(q):
    if q.packed:
        packed_disable_notify(q)
    else:
        split_disable_notify(q)
