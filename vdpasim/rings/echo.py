"""The echo test device on the reference implementation (mirror of jit/echo.py).

For each available chain: its device-readable bytes, concatenated, are copied into its
device-writable bytes (truncated to fit) and the chain is returned with len = bytes written.
"""

from __future__ import annotations

import numpy as np

from ..memory import RegionTable
from .chain import as_queue, iov_copy, iov_length
from .state import RingStatus
from .vq import vq_needs_notify, vq_pop, vq_publish, vq_push

__all__ = ["echo_burst"]


def echo_burst(state: np.ndarray, table: RegionTable, iov: np.ndarray, budget: int) -> tuple[int, int, bool]:
    """Echo up to ``budget`` chains. Returns (status, chains processed, notify the driver)."""
    q = as_queue(state[0])
    status = int(RingStatus.OK)
    processed = 0
    while processed < budget:
        status, head, ndesc, n, readable = vq_pop(q, table, iov)
        if status != RingStatus.OK:
            break
        written = iov_copy(iov, readable, n, 0, iov, 0, readable, 0, iov_length(iov, 0, readable))
        vq_push(q, head, ndesc, written)
        q.packets += 1
        q.bytes += written
        processed += 1
    if status == RingStatus.EMPTY:
        status = int(RingStatus.OK)
    # Used entries become visible together; a fault still hands back what was done before it.
    vq_publish(q)
    notify = processed > 0 and vq_needs_notify(q)
    return status, processed, notify
