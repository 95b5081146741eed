"""Split virtqueue, device side (VIRTIO 1.2 §2.7), compiled.

Layout, all little-endian, at the host addresses of the queue record:
  descriptor table (q.desc):  struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } [size]
  available ring (q.driver):  le16 flags; le16 idx; le16 ring[size]; le16 used_event
  used ring (q.device):       le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event

Functions mirror rings/split.py one for one and return the same RingStatus codes. Every write to the
used ring is logged when dirty logging is on (``q.log``, jit/log.py): one untaken branch otherwise.
"""

from __future__ import annotations

from ..rings.state import RingStatus
from ..virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_USED_F_NO_NOTIFY,
)
from . import kernel
from .chain import add_buffer, fail
from .intrinsics import (
    fence_acquire,
    fence_full,
    fence_release,
    load_u16,
    load_u32,
    load_u64,
    prefetch,
    store_u16,
    store_u32,
)
from .log import log_device_area
from .memory import prefetch_buffer, translate

__all__ = [
    "split_avail_idx",
    "split_has_avail",
    "split_pop",
    "split_prefetch",
    "split_push",
    "split_publish",
    "split_needs_notify",
    "split_enable_notify",
    "split_disable_notify",
]

_OK = int(RingStatus.OK)
_EMPTY = int(RingStatus.EMPTY)
_ADDR = int(RingStatus.ADDR_OUT_OF_RANGE)
_INDEX = int(RingStatus.INDEX_OUT_OF_RANGE)
_AHEAD = int(RingStatus.AVAIL_IDX_AHEAD)
_LOOP = int(RingStatus.CHAIN_LOOP)
_NESTED = int(RingStatus.NESTED_INDIRECT)
_WITH_NEXT = int(RingStatus.INDIRECT_WITH_NEXT)
_INDIRECT_LEN = int(RingStatus.BAD_INDIRECT_LENGTH)
_NO_INDIRECT = int(RingStatus.INDIRECT_NOT_NEGOTIATED)

_DESC_SIZE = 16


@kernel(inline=True)
def _slot(q, index):
    """Ring slot of a free-running index. Split sizes are powers of two (Virtqueue.set_num checks it), so
    a mask does what ``%`` would without a division per access; it stays below the size regardless."""
    return index & (q.size - 1)


@kernel(inline=True)
def split_avail_idx(q):
    return load_u16(q.driver + 2)


@kernel
def split_has_avail(q):
    return split_avail_idx(q) != q.last_avail


@kernel(inline=True)
def split_pop(q, rows, iov):
    """Take the next available chain. Returns (status, head, descriptors used in the ring, iov entries, readable).

    iov rows are (host address, length, writable); the readable ones come first (§2.7.4.2).
    """
    avail_idx = split_avail_idx(q)
    if avail_idx == q.last_avail:
        return _EMPTY, 0, 0, 0, 0
    # A driver never makes more than size buffers available at once (rust-vmm's DoS guard).
    if (avail_idx - q.last_avail) & 0xFFFF > q.size:
        return fail(q, _AHEAD, avail_idx, 0), 0, 0, 0, 0
    fence_acquire()  # read the ring entry only after the index that published it
    head = load_u16(q.driver + 4 + 2 * _slot(q, q.last_avail))
    status, n, readable = split_walk(q, rows, head, iov)
    if status != _OK:
        return status, head, 0, 0, 0
    q.last_avail = (q.last_avail + 1) & 0xFFFF
    return _OK, head, 1, n, readable


@kernel(inline=True)
def split_prefetch(q, rows, ahead, for_write):
    """Start fetching what the pop ``ahead`` chains from now will touch: its descriptor, the used-ring
    entry it will fill, and the buffer of the chain half as far ahead (whose descriptor an earlier call
    fetched). Only a hint: nothing is checked beyond what keeps the addresses inside guest memory, and
    nothing is consumed."""
    prefetch(q.device + 4 + 8 * _slot(q, q.used_idx + ahead), 1)
    available = (split_avail_idx(q) - q.last_avail) & 0xFFFF
    if available > q.size:
        return  # split_pop reports this
    if available > ahead:
        head = load_u16(q.driver + 4 + 2 * _slot(q, q.last_avail + ahead))
        if head < q.size:
            prefetch(q.desc + _DESC_SIZE * head, 0)
    near = ahead >> 1
    if available > near:
        head = load_u16(q.driver + 4 + 2 * _slot(q, q.last_avail + near))
        if head < q.size:
            desc = q.desc + _DESC_SIZE * head
            if not load_u16(desc + 12) & VIRTQ_DESC_F_INDIRECT:
                prefetch_buffer(rows, load_u64(desc), load_u32(desc + 8), for_write)


@kernel(inline=True)
def split_walk(q, rows, head, iov):
    """Walk the chain starting at ``head`` into iov; returns (status, entries, readable entries)."""
    if head >= q.size:
        return fail(q, _INDEX, head, 0), 0, 0
    table = q.desc
    count = q.size  # descriptors in the current table: more visits than this means a loop (§2.7.5.3.1)
    index = head
    visited = 0
    indirect = False
    n = 0
    readable = 0
    total = 0
    while True:
        desc = table + _DESC_SIZE * index
        addr = load_u64(desc)
        length = load_u32(desc + 8)
        flags = load_u16(desc + 12)
        visited += 1
        if visited > count:
            return fail(q, _LOOP, index, addr), 0, 0
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not q.indirect:
                return fail(q, _NO_INDIRECT, index, addr), 0, 0
            if indirect:
                return fail(q, _NESTED, index, addr), 0, 0
            if flags & VIRTQ_DESC_F_NEXT:
                return fail(q, _WITH_NEXT, index, addr), 0, 0
            if length == 0 or length % _DESC_SIZE:
                return fail(q, _INDIRECT_LEN, index, addr), 0, 0
            table = translate(rows, addr, length, False)
            if table == 0:
                return fail(q, _ADDR, index, addr), 0, 0
            indirect = True
            count = length // _DESC_SIZE
            index = 0
            visited = 0
            continue
        status, n, readable, total = add_buffer(q, rows, iov, n, readable, total, addr, length, flags, index)
        if status != _OK:
            return status, 0, 0
        if not flags & VIRTQ_DESC_F_NEXT:
            return _OK, n, readable
        index = load_u16(desc + 14)
        if index >= count:
            return fail(q, _INDEX, index, addr), 0, 0


@kernel(inline=True)
def split_push(q, head, ndesc, written):
    """Add one used element; the driver sees it at the next split_publish."""
    elem = q.device + 4 + 8 * _slot(q, q.used_idx)
    store_u32(elem, head)
    store_u32(elem + 4, written)
    if q.log:
        log_device_area(q, elem, 8)
    q.used_idx = (q.used_idx + 1) & 0xFFFF


@kernel(inline=True)
def split_publish(q):
    fence_release()  # used elements before the index that publishes them
    store_u16(q.device + 2, q.used_idx)
    if q.log:
        log_device_area(q, q.device + 2, 2)


@kernel
def split_needs_notify(q):
    """Whether to signal the driver for what was published since the last signal (§2.7.7.2, §2.7.10)."""
    if q.signalled_valid and q.signalled_used == q.used_idx:
        return False
    fence_full()  # the used index store before reading the driver's suppression fields
    old = q.signalled_used
    new = q.used_idx
    valid = q.signalled_valid
    q.signalled_used = new
    q.signalled_valid = 1
    if q.event_idx:
        used_event = load_u16(q.driver + 4 + 2 * q.size)
        return not valid or ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    return not load_u16(q.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT


@kernel
def split_enable_notify(q):
    """Ask for a kick when more buffers arrive; the caller re-checks split_has_avail afterwards."""
    if q.event_idx:
        store_u16(q.device + 4 + 8 * q.size, q.last_avail)
        if q.log:
            log_device_area(q, q.device + 4 + 8 * q.size, 2)
    else:
        store_u16(q.device, 0)
        if q.log:
            log_device_area(q, q.device, 2)
    fence_full()


@kernel
def split_disable_notify(q):
    if not q.event_idx:
        store_u16(q.device, VIRTQ_USED_F_NO_NOTIFY)
        if q.log:
            log_device_area(q, q.device, 2)
