"""Packed virtqueue, device side (VIRTIO 1.2 §2.8), compiled.

Layout, little-endian, at the host addresses of the queue record:
  descriptor ring (q.desc):   struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } [size]
  driver area (q.driver):     struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }  (driver -> device)
  device area (q.device):     struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }  (device -> driver)

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED bit does
not; the device marks a used one by writing both bits equal to its own wrap counter (§2.8.1).
Functions mirror rings/packed.py one for one and return the same RingStatus codes. Used entries (written
into the descriptor ring) and device-area writes are logged when dirty logging is on (``q.log``).
"""

from __future__ import annotations

from ..rings.state import USED_HEAD_PENDING, RingStatus
from ..virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
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
from .log import log_descriptors, log_device_area
from .memory import prefetch_buffer, translate

__all__ = [
    "packed_has_avail",
    "packed_pop",
    "packed_prefetch",
    "packed_push",
    "packed_publish",
    "packed_needs_notify",
    "packed_enable_notify",
    "packed_disable_notify",
]

_OK = int(RingStatus.OK)
_EMPTY = int(RingStatus.EMPTY)
_ADDR = int(RingStatus.ADDR_OUT_OF_RANGE)
_INDEX = int(RingStatus.INDEX_OUT_OF_RANGE)
_LOOP = int(RingStatus.CHAIN_LOOP)
_NESTED = int(RingStatus.NESTED_INDIRECT)
_WITH_NEXT = int(RingStatus.INDIRECT_WITH_NEXT)
_INDIRECT_LEN = int(RingStatus.BAD_INDIRECT_LENGTH)
_NO_INDIRECT = int(RingStatus.INDIRECT_NOT_NEGOTIATED)

_DESC_SIZE = 16


@kernel(inline=True)
def _is_available(flags, wrap):
    return (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap and (flags & VIRTQ_DESC_F_USED != 0) != wrap


@kernel
def packed_has_avail(q):
    return _is_available(load_u16(q.desc + _DESC_SIZE * q.last_avail + 14), q.avail_wrap)


@kernel(inline=True)
def packed_pop(q, rows, iov):
    """Take the next available buffer. Returns (status, buffer id, ring descriptors, iov entries, readable)."""
    position = q.last_avail
    wrap = q.avail_wrap
    if not _is_available(load_u16(q.desc + _DESC_SIZE * position + 14), wrap):
        return _EMPTY, 0, 0, 0, 0
    fence_acquire()  # the rest of the descriptor only after its flags said it is available
    n = 0
    readable = 0
    total = 0
    ndesc = 0
    while True:
        desc = q.desc + _DESC_SIZE * position
        addr = load_u64(desc)
        length = load_u32(desc + 8)
        buffer_id = load_u16(desc + 12)
        flags = load_u16(desc + 14)
        ndesc += 1
        if ndesc > q.size:
            return fail(q, _LOOP, position, addr), 0, 0, 0, 0
        if flags & VIRTQ_DESC_F_INDIRECT:
            status, n, readable, total = _walk_indirect(q, rows, iov, n, readable, total, addr, length, flags, position)
            if status != _OK:
                return status, 0, 0, 0, 0
        else:
            status, n, readable, total = add_buffer(q, rows, iov, n, readable, total, addr, length, flags, position)
            if status != _OK:
                return status, 0, 0, 0, 0
        position += 1
        if position == q.size:
            position = 0
            wrap ^= 1
        if not flags & VIRTQ_DESC_F_NEXT:
            break
    # The buffer id travels in the last descriptor of the chain (§2.8.6).
    if buffer_id >= q.size:
        return fail(q, _INDEX, buffer_id, addr), 0, 0, 0, 0
    q.last_avail = position
    q.avail_wrap = wrap
    return _OK, buffer_id, ndesc, n, readable


@kernel(inline=True)
def packed_prefetch(q, rows, ahead, for_write):
    """Start fetching what a pop ``ahead`` ring slots from now will touch: that slot's descriptor, and
    the buffer of the slot half as far ahead if the driver made it available (one descriptor per
    buffer is the common case; otherwise this merely fetches a slot early). A hint only."""
    if ahead >= q.size:
        return  # a ring this small: one subtraction below must bring a slot back inside it
    far = q.last_avail + ahead
    prefetch(q.desc + _DESC_SIZE * (far - q.size if far >= q.size else far), 0)  # no division per frame
    position = q.last_avail + (ahead >> 1)
    wrap = q.avail_wrap
    if position >= q.size:
        position -= q.size
        wrap ^= 1
    desc = q.desc + _DESC_SIZE * position
    flags = load_u16(desc + 14)
    if _is_available(flags, wrap) and not flags & VIRTQ_DESC_F_INDIRECT:
        fence_acquire()
        prefetch_buffer(rows, load_u64(desc), load_u32(desc + 8), for_write)


@kernel
def _walk_indirect(q, rows, iov, n, readable, total, addr, length, flags, position):
    """Add the buffers of an indirect table: consecutive descriptors, NEXT ignored (§2.8.19)."""
    if not q.indirect:
        return fail(q, _NO_INDIRECT, position, addr), n, readable, total
    if flags & VIRTQ_DESC_F_NEXT:
        return fail(q, _WITH_NEXT, position, addr), n, readable, total
    if length == 0 or length % _DESC_SIZE:
        return fail(q, _INDIRECT_LEN, position, addr), n, readable, total
    table = translate(rows, addr, length, False)
    if table == 0:
        return fail(q, _ADDR, position, addr), n, readable, total
    for index in range(length // _DESC_SIZE):
        desc = table + _DESC_SIZE * index
        inner_addr = load_u64(desc)
        inner_flags = load_u16(desc + 14)
        if inner_flags & VIRTQ_DESC_F_INDIRECT:
            return fail(q, _NESTED, index, inner_addr), n, readable, total
        status, n, readable, total = add_buffer(
            q, rows, iov, n, readable, total, inner_addr, load_u32(desc + 8), inner_flags, index
        )
        if status != _OK:
            return status, n, readable, total
    return _OK, n, readable, total


@kernel(inline=True)
def packed_push(q, buffer_id, ndesc, written):
    """Mark a buffer used: id and length first, then the flags that hand it back (§2.8.9).

    The first buffer pushed after a publish keeps its flags back until ``packed_publish``: the driver
    reads used descriptors in ring order, so the ones after it stay unseen too and the whole burst
    reaches it at once, instead of its CPU pulling the descriptor line over once per buffer. Not with
    inflight tracking, which records each completion as published the moment it is pushed.
    """
    desc = q.desc + _DESC_SIZE * q.used_idx
    store_u32(desc + 8, written)
    store_u16(desc + 12, buffer_id)
    # WRITE says the device wrote data; without it the driver ignores len (§2.8.3, §2.8.4).
    flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if q.used_wrap else 0
    if written:
        flags |= VIRTQ_DESC_F_WRITE
    if q.used_head_flags or q.inflight:
        fence_release()
        store_u16(desc + 14, flags)
    else:
        q.used_head_flags = USED_HEAD_PENDING | flags
        q.used_head_pos = q.used_idx
    if q.log:
        log_descriptors(q, desc, 16)
    q.used_idx += ndesc
    if q.used_idx >= q.size:
        q.used_idx -= q.size
        q.used_wrap ^= 1


@kernel(inline=True)
def packed_publish(q):
    """Hand the buffers pushed since the last publish to the driver: the held-back first flags last."""
    if q.used_head_flags:
        desc = q.desc + _DESC_SIZE * q.used_head_pos
        fence_release()  # every other entry of the burst before the one that reveals them
        store_u16(desc + 14, q.used_head_flags & 0xFFFF)
        if q.log:  # logged again: the bit must follow the last write to the page
            log_descriptors(q, desc, 16)
        q.used_head_flags = 0


@kernel
def packed_needs_notify(q):
    """Whether to signal the driver, per its event suppression structure (§2.8.10, §2.8.21.3)."""
    new = q.used_idx | q.used_wrap << 15
    if q.signalled_valid and q.signalled_used == new:
        return False
    fence_full()  # the used flags before reading the driver's suppression structure
    old = q.signalled_used
    valid = q.signalled_valid
    q.signalled_used = new
    q.signalled_valid = 1
    flags = load_u16(q.driver + 2) & 3
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    if flags != RING_EVENT_FLAGS_DESC or not q.event_idx:
        return True
    if not valid:
        return True
    # Event offset and positions as unwrapped 16-bit counters, as vhost's packed need_event does.
    off_wrap = load_u16(q.driver)
    event = off_wrap & 0x7FFF
    if off_wrap >> 15 != q.used_wrap:
        event -= q.size
    old_idx = old & 0x7FFF
    if old >> 15 != q.used_wrap:
        old_idx -= q.size
    return ((q.used_idx - event - 1) & 0xFFFF) < ((q.used_idx - old_idx) & 0xFFFF)


@kernel
def packed_enable_notify(q):
    """Ask for a kick when more buffers arrive; the caller re-checks packed_has_avail afterwards."""
    if q.event_idx:
        store_u16(q.device, q.last_avail | q.avail_wrap << 15)
        fence_release()
        store_u16(q.device + 2, RING_EVENT_FLAGS_DESC)
    else:
        store_u16(q.device + 2, RING_EVENT_FLAGS_ENABLE)
    if q.log:
        log_device_area(q, q.device, 4)
    fence_full()


@kernel
def packed_disable_notify(q):
    store_u16(q.device + 2, RING_EVENT_FLAGS_DISABLE)
    if q.log:
        log_device_area(q, q.device + 2, 2)
