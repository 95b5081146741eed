"""Translation of guest addresses through the region table, bounds-checked (Numba checks nothing itself)."""

from __future__ import annotations

from ..memory import FLAGS, GUEST, HOST, REGION_WRITABLE, SIZE
from . import kernel
from .intrinsics import prefetch

__all__ = ["translate", "prefetch_buffer", "TRANSLATE_READ_ONLY"]

# translate() result for a writable buffer inside a read-only region (0 means outside memory).
TRANSLATE_READ_ONLY = -1


@kernel(inline=True)
def translate(rows, addr, length, writable):
    """Host address of guest range [addr, addr+length), or 0 when no region holds it whole.

    ``addr`` comes from the guest as a u64 bit pattern: above 2**63 it is negative here and misses.
    ``length`` is at most 2**32 - 1, so ``size - length`` cannot overflow.
    """
    for i in range(rows.shape[0]):
        offset = addr - rows[i, GUEST]
        if 0 <= offset <= rows[i, SIZE] - length:
            if writable and not rows[i, FLAGS] & REGION_WRITABLE:
                return TRANSLATE_READ_ONLY
            return rows[i, HOST] + offset
    return 0


@kernel(inline=True)
def prefetch_buffer(rows, addr, length, for_write):
    """Start fetching the first two cache lines of a guest buffer (a frame's header and start), if it
    lies in guest memory: a hint for a chain about to be popped, never a read."""
    host = translate(rows, addr, min(length, 128), False)
    if host > 0:
        prefetch(host, for_write)
        prefetch(host + 64, for_write)
