"""Descriptor-chain pieces shared by both layouts, and scatter-gather copies over a popped chain.

A popped chain is described by rows of an int64 ``iov`` array: (host address, length, writable).
Device-readable rows come first, then device-writable ones (the walk enforces that order).
"""

from __future__ import annotations

import numpy as np

from ..rings.state import MAX_CHAIN, RingStatus
from ..virtio.constants import VIRTQ_DESC_F_WRITE
from . import kernel
from .intrinsics import memcpy, memset
from .memory import TRANSLATE_READ_ONLY, translate

__all__ = [
    "IOV_ADDR",
    "IOV_LEN",
    "IOV_WRITABLE",
    "new_iov",
    "fail",
    "add_buffer",
    "iov_length",
    "iov_gather",
    "iov_scatter",
    "iov_copy",
    "iov_fill",
]

IOV_ADDR, IOV_LEN, IOV_WRITABLE = 0, 1, 2

_OK = int(RingStatus.OK)
_ADDR = int(RingStatus.ADDR_OUT_OF_RANGE)
_TOO_LONG = int(RingStatus.CHAIN_TOO_LONG)
_OVERFLOW = int(RingStatus.LENGTH_OVERFLOW)
_ORDER = int(RingStatus.WRITE_BEFORE_READ)
_READ_ONLY = int(RingStatus.READ_ONLY_MEMORY)
_MAX_CHAIN_BYTES = 0xFFFFFFFF


def new_iov() -> np.ndarray:
    return np.zeros((MAX_CHAIN, 3), dtype=np.int64)


@kernel
def fail(q, status, index, addr):
    """Record the first fault of a queue (what, which descriptor, which address) and return its status."""
    if q.error == _OK:
        q.error = status
        q.error_index = index
        q.error_addr = addr
    return status


@kernel(inline=True)
def add_buffer(q, rows, iov, n, readable, total, addr, length, flags, index):
    """Append one descriptor's buffer to iov. Returns (status, n, readable, total).

    Zero-length buffers are legal and carry nothing, so they take no iov row (and no address check).
    """
    writable = flags & VIRTQ_DESC_F_WRITE != 0
    if not writable and n > readable:
        return fail(q, _ORDER, index, addr), n, readable, total
    total += length
    if total > _MAX_CHAIN_BYTES:
        return fail(q, _OVERFLOW, index, addr), n, readable, total
    if length == 0:
        return _OK, n, readable, total
    if n >= iov.shape[0]:
        return fail(q, _TOO_LONG, index, addr), n, readable, total
    host = translate(rows, addr, length, writable)
    if host == 0:
        return fail(q, _ADDR, index, addr), n, readable, total
    if host == TRANSLATE_READ_ONLY:
        return fail(q, _READ_ONLY, index, addr), n, readable, total
    iov[n, 0] = host
    iov[n, 1] = length
    iov[n, 2] = writable
    return _OK, n + 1, readable + (0 if writable else 1), total


@kernel(inline=True)
def iov_length(iov, first, last):
    total = 0
    for i in range(first, last):
        total += iov[i, IOV_LEN]
    return total


@kernel(inline=True)
def iov_gather(iov, first, last, skip, dst, length):
    """Copy up to ``length`` bytes of iov rows [first, last), from byte ``skip`` on, to host address dst."""
    copied = 0
    for i in range(first, last):
        size = iov[i, IOV_LEN]
        if skip >= size:
            skip -= size
            continue
        chunk = min(size - skip, length - copied)
        memcpy(dst + copied, iov[i, IOV_ADDR] + skip, chunk)
        copied += chunk
        skip = 0
        if copied == length:
            break
    return copied


@kernel
def iov_scatter(iov, first, last, skip, src, length):
    """Copy up to ``length`` bytes from host address src into iov rows [first, last) from byte ``skip`` on."""
    copied = 0
    for i in range(first, last):
        size = iov[i, IOV_LEN]
        if skip >= size:
            skip -= size
            continue
        chunk = min(size - skip, length - copied)
        memcpy(iov[i, IOV_ADDR] + skip, src + copied, chunk)
        copied += chunk
        skip = 0
        if copied == length:
            break
    return copied


@kernel
def iov_fill(iov, first, last, skip, byte, length):
    """Set up to ``length`` bytes of iov rows [first, last), from byte ``skip`` on, to ``byte``."""
    done = 0
    for i in range(first, last):
        size = iov[i, IOV_LEN]
        if skip >= size:
            skip -= size
            continue
        chunk = min(size - skip, length - done)
        memset(iov[i, IOV_ADDR] + skip, byte, chunk)
        done += chunk
        skip = 0
        if done == length:
            break
    return done


@kernel(inline=True)
def iov_copy(dst, dst_first, dst_last, dst_skip, src, src_first, src_last, src_skip, length):
    """Copy up to ``length`` bytes between two iov ranges, each from a byte offset; returns bytes copied."""
    copied = 0
    d = dst_first
    s = src_first
    # Position both cursors at their starting byte.
    while d < dst_last and dst_skip >= dst[d, IOV_LEN]:
        dst_skip -= dst[d, IOV_LEN]
        d += 1
    while s < src_last and src_skip >= src[s, IOV_LEN]:
        src_skip -= src[s, IOV_LEN]
        s += 1
    while d < dst_last and s < src_last and copied < length:
        chunk = min(dst[d, IOV_LEN] - dst_skip, src[s, IOV_LEN] - src_skip, length - copied)
        memcpy(dst[d, IOV_ADDR] + dst_skip, src[s, IOV_ADDR] + src_skip, chunk)
        copied += chunk
        dst_skip += chunk
        src_skip += chunk
        if dst_skip == dst[d, IOV_LEN]:
            d += 1
            dst_skip = 0
        if src_skip == src[s, IOV_LEN]:
            s += 1
            src_skip = 0
    return copied
