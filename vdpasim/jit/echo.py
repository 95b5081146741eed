"""The echo test device, compiled: the smallest complete device kernel, canonical for tests and benchmarks.

For each available chain: its device-readable bytes, concatenated, are copied into its
device-writable bytes (truncated to fit) and the chain is returned with len = bytes written.
rings/echo.py is the same on the pure-Python reference; the property tests compare the two.
"""

from __future__ import annotations

from ..rings.state import RingStatus
from . import kernel
from .chain import iov_copy, iov_length
from .log import log_iov
from .vq import vq_needs_notify, vq_pop, vq_publish, vq_push

__all__ = ["echo_burst"]

_OK = int(RingStatus.OK)
_EMPTY = int(RingStatus.EMPTY)


@kernel
def echo_burst(state, rows, iov, budget):
    """Echo up to ``budget`` chains. Returns (status, chains processed, notify the driver)."""
    q = state[0]
    status = _OK
    processed = 0
    while processed < budget:
        status, head, ndesc, n, readable = vq_pop(q, rows, iov)
        if status != _OK:
            break
        written = iov_copy(iov, readable, n, 0, iov, 0, readable, 0, iov_length(iov, 0, readable))
        if q.log:
            log_iov(q, rows, iov, readable, n, written)
        vq_push(q, head, ndesc, written)
        q.packets += 1
        q.bytes += written
        processed += 1
    if status == _EMPTY:
        status = _OK
    # Used entries become visible together; a fault still hands back what was done before it.
    vq_publish(q)
    notify = processed > 0 and vq_needs_notify(q)
    return status, processed, notify
