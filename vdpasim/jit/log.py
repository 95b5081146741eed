"""Dirty-page logging for live migration, compiled: one bit per 4 KiB guest-physical page the device writes.

A vhost-user front-end migrating a guest asks the back-end to log its writes to guest memory
(VHOST_F_LOG_ALL, with the bitmap passed by SET_LOG_BASE under VHOST_USER_PROTOCOL_F_LOG_SHMFD):
page ``addr // VHOST_LOG_PAGE`` is bit ``page % 8`` of byte ``page // 8``, set with an atomic OR
because the front-end reads and clears the bitmap concurrently (QEMU docs/interop/vhost-user.rst,
"Migration"). Two kinds of writes are logged:

* every byte written into a guest buffer (RX frames, blk read data, status and ack bytes), at the
  buffer's guest-physical address, found by translating the host address back through the region
  table (the iov rows only keep host addresses);
* ring writes (used entries and index, notification fields) when the ring's VHOST_VRING_F_LOG flag
  is set: the device area is logged at the ``log_guest_addr`` the front-end gave (which need not be
  inside guest memory), packed used entries at the descriptor area's guest address.

The queue record holds the bitmap's host address and size (``log``, 0 when logging is off),
``log_ring``, ``log_used`` and ``log_desc``; callers test ``q.log`` first, so logging costs one
predictable branch per written chain when it is off. A write the bitmap is too small to cover is a
device fault (LOG_OUT_OF_RANGE), never a write outside the bitmap.
"""

from __future__ import annotations

from ..memory import GUEST, HOST, SIZE
from ..rings.state import RingStatus
from . import kernel
from .chain import IOV_ADDR, IOV_LEN, fail
from .intrinsics import atomic_or_u8

__all__ = ["VHOST_LOG_PAGE", "log_range", "log_host", "log_iov", "log_device_area", "log_descriptors"]

VHOST_LOG_PAGE = 0x1000
_PAGE_SHIFT = 12

_LOG = int(RingStatus.LOG_OUT_OF_RANGE)


@kernel
def log_range(q, gpa, length):
    """Mark the pages of guest-physical range [gpa, gpa+length) dirty. False (and a fault) if the log is too small."""
    if length <= 0:
        return True
    last = gpa + length - 1
    # gpa is a u64 bit pattern: above 2**63 it is negative here, and no log covers it.
    if gpa < 0 or last < gpa or (last >> _PAGE_SHIFT) >> 3 >= q.log_size:
        fail(q, _LOG, 0, gpa)
        return False
    for page in range(gpa >> _PAGE_SHIFT, (last >> _PAGE_SHIFT) + 1):
        atomic_or_u8(q.log + (page >> 3), 1 << (page & 7))
    return True


@kernel
def log_host(q, rows, host, length):
    """Log a write at host address ``host`` (inside guest memory) by its guest-physical address."""
    for i in range(rows.shape[0]):
        offset = host - rows[i, HOST]
        if 0 <= offset <= rows[i, SIZE] - length:
            return log_range(q, rows[i, GUEST] + offset, length)
    fail(q, _LOG, 0, host)  # unreachable for addresses that came from translate()
    return False


@kernel
def log_iov(q, rows, iov, first, last, length):
    """Log the first ``length`` bytes of iov rows [first, last): what the device wrote into a chain."""
    for i in range(first, last):
        if length <= 0:
            break
        chunk = min(iov[i, IOV_LEN], length)
        log_host(q, rows, iov[i, IOV_ADDR], chunk)
        length -= chunk


@kernel
def log_device_area(q, host, length):
    """Log a ring write into the device area (split used ring, packed device event suppression)."""
    if q.log_ring:
        log_range(q, q.log_used + (host - q.device), length)


@kernel
def log_descriptors(q, host, length):
    """Log a ring write into the descriptor area (packed used entries)."""
    if q.log_ring:
        log_range(q, q.log_desc + (host - q.desc), length)
