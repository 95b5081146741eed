"""Packed virtqueue, device side (VIRTIO 1.2 §2.8): the pure-Python reference of jit/packed.py.

Same function names, arguments and results as the compiled kernels, with a ``RegionTable`` where
they take ``table.rows``. Layout, little-endian, at the host addresses of the queue record:

  descriptor ring (q.desc):   struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } [size]
  driver area (q.driver):     struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }  (driver -> device)
  device area (q.device):     struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }  (device -> driver)

Ring positions are 0..size-1 with a wrap counter each for the next available and next used slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..memory import RegionTable
from ..virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from .chain import (
    DESC_SIZE,
    ChainBuilder,
    ChainFault,
    Descriptor,
    Queue,
    as_queue,
    fail,
    load_u16,
    store_u16,
    store_u32,
    translate,
)
from .split import need_event
from .state import USED_HEAD_PENDING, RingStatus

__all__ = [
    "is_available",
    "RingChain",
    "indirect_elements",
    "packed_has_avail",
    "packed_pop",
    "packed_push",
    "packed_publish",
    "packed_needs_notify",
    "packed_enable_notify",
    "packed_disable_notify",
]


def is_available(flags: int, wrap: int) -> bool:
    """§2.8.1: available in lap ``wrap`` when AVAIL matches the wrap counter and USED does not."""
    avail = bool(flags & VIRTQ_DESC_F_AVAIL)
    used = bool(flags & VIRTQ_DESC_F_USED)
    return avail == bool(wrap) and used != bool(wrap)


class RingChain:
    """The ring descriptors of the buffer at the next available slot, in ring order (§2.8.6).

    After iterating, ``position``/``wrap`` are the slot after the buffer, ``count`` its ring
    descriptors and ``last`` its last descriptor (which carries the buffer id).
    """

    def __init__(self, q: Queue) -> None:
        self.q = q
        self.position = q.last_avail
        self.wrap = q.avail_wrap
        self.count = 0
        self.last: Descriptor | None = None

    def __iter__(self) -> Iterator[Descriptor]:
        q = self.q
        while True:
            desc = Descriptor.read_packed(q.desc + DESC_SIZE * self.position, self.position)
            self.count += 1
            # §2.8.17: "A driver MUST NOT create a descriptor list longer than the Queue Size. This implies
            # that loops in the descriptor list are forbidden!"
            if self.count > q.size:
                raise desc.fault(RingStatus.CHAIN_LOOP)
            yield desc
            self.last = desc
            # §2.8.1: the wrap counter flips after the last slot of the ring.
            self.position += 1
            if self.position == q.size:
                self.position = 0
                self.wrap ^= 1
            # §2.8.6: NEXT on all but the last descriptor of the list.
            if not desc.has_next:
                return


def indirect_elements(q: Queue, table: RegionTable, desc: Descriptor) -> Iterator[Descriptor]:
    """The elements of the indirect table ``desc`` refers to (§2.8.7), after the §2.8.19 checks."""
    # §2.8.19: "The driver MUST NOT set the DESC_F_INDIRECT flag unless the VIRTIO_F_INDIRECT_DESC
    # feature was negotiated."
    if not q.indirect:
        raise desc.fault(RingStatus.INDIRECT_NOT_NEGOTIATED)
    # §2.8.19: "A driver MUST NOT write direct descriptors with DESC_F_INDIRECT set in a scatter-gather
    # list linked by VIRTQ_DESC_F_NEXT": an indirect descriptor never continues.
    if desc.has_next:
        raise desc.fault(RingStatus.INDIRECT_WITH_NEXT)
    # §2.8.7: struct pvirtq_desc desc[len / sizeof(struct pvirtq_desc)]: whole descriptors, at least one.
    if desc.len == 0 or desc.len % DESC_SIZE:
        raise desc.fault(RingStatus.BAD_INDIRECT_LENGTH)
    host = translate(table, desc.addr, desc.len, False)
    if host == 0:
        raise desc.fault(RingStatus.ADDR_OUT_OF_RANGE)
    # §2.8.7: table descriptors are consecutive; only WRITE is valid in them, the rest (NEXT, buffer id)
    # is ignored. §2.8.19: "The driver MUST NOT set any flags except DESC_F_WRITE within an indirect
    # descriptor": a nested table is refused.
    for index in range(desc.len // DESC_SIZE):
        inner = Descriptor.read_packed(host + DESC_SIZE * index, index)
        if inner.is_indirect:
            raise inner.fault(RingStatus.NESTED_INDIRECT)
        yield inner


def packed_has_avail(q: np.void | Queue) -> bool:
    q = as_queue(q)
    return is_available(load_u16(q.desc + DESC_SIZE * q.last_avail + 14), q.avail_wrap)


def packed_pop(q: np.void | Queue, table: RegionTable, iov: np.ndarray) -> tuple[int, int, int, int, int]:
    """Take the next available buffer: (status, buffer id, ring descriptors, iov entries, readable)."""
    q = as_queue(q)
    # §2.8.15: "A device MUST NOT use a descriptor unless it observes the VIRTQ_DESC_F_AVAIL bit in its
    # flags being changed"; the driver exposes the head's flags last (§2.8.21.1), so the rest is there.
    if not packed_has_avail(q):
        return int(RingStatus.EMPTY), 0, 0, 0, 0
    builder = ChainBuilder(table, iov)
    chain = RingChain(q)
    try:
        for desc in chain:
            if desc.is_indirect:
                builder.add_all(indirect_elements(q, table, desc))
            else:
                builder.add(desc)
        last = chain.last
        assert last is not None
        # §2.8.6: "Buffer ID is included in the last descriptor in the list"; ids name one of size buffers.
        if last.next >= q.size:
            raise ChainFault(RingStatus.INDEX_OUT_OF_RANGE, last.next, last.addr)
    except ChainFault as fault:
        return fail(q, fault.status, fault.index, fault.addr), 0, 0, 0, 0
    q.last_avail = chain.position
    q.avail_wrap = chain.wrap
    return int(RingStatus.OK), last.next, chain.count, builder.n, builder.readable


def packed_push(q: np.void | Queue, buffer_id: int, ndesc: int, written: int) -> None:
    """Write a used descriptor over the first slot of the buffer and skip its other slots (§2.8.6)."""
    q = as_queue(q)
    desc = q.desc + DESC_SIZE * q.used_idx
    store_u32(desc + 8, written)
    store_u16(desc + 12, buffer_id)
    # §2.8.1: used means AVAIL and USED both equal to the device's wrap counter. §2.8.3/§2.8.4: WRITE
    # tells whether the device wrote anything; without it the driver ignores len.
    flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if q.used_wrap else 0
    if written:
        flags |= VIRTQ_DESC_F_WRITE
    # The flags last, after id and len: they hand the buffer back (§2.8.15). The first buffer since the
    # last publish keeps them back until packed_publish, so the driver (reading in ring order) gets the
    # whole burst at once; not with inflight tracking, which counts a pushed buffer as handed back.
    if q.used_head_flags or q.inflight:
        store_u16(desc + 14, flags)
    else:
        q.used_head_flags = USED_HEAD_PENDING | flags
        q.used_head_pos = q.used_idx
    position = q.used_idx + ndesc
    if position >= q.size:
        position -= q.size
        q.used_wrap ^= 1
    q.used_idx = position


def packed_publish(q: np.void | Queue) -> None:
    """Hand over the buffers pushed since the last publish: write the held-back first flags."""
    q = as_queue(q)
    if q.used_head_flags:
        store_u16(q.desc + DESC_SIZE * q.used_head_pos + 14, q.used_head_flags & 0xFFFF)
        q.used_head_flags = 0


def _unwrapped(position: int, wrap: int, current_wrap: int, size: int) -> int:
    """A ring position as a count relative to the current lap: the previous lap is ``size`` behind."""
    return position if wrap == current_wrap else position - size


def packed_needs_notify(q: np.void | Queue) -> bool:
    """Whether to send a used buffer notification, per the driver event suppression structure (§2.8.10)."""
    q = as_queue(q)
    new = q.used_idx | q.used_wrap << 15
    if q.signalled_valid and q.signalled_used == new:
        return False  # nothing used since the last notification
    old, known = q.signalled_used, q.signalled_valid
    q.signalled_used = new
    q.signalled_valid = 1
    # §2.8.14: desc_event_flags is a 2-bit field; 0x3 is reserved (and treated as ENABLE here).
    flags = load_u16(q.driver + 2) & 0x3
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    # §2.8.10: RING_EVENT_FLAGS_DESC is "only valid if VIRTIO_F_RING_EVENT_IDX has been negotiated".
    if flags != RING_EVENT_FLAGS_DESC or not q.event_idx:
        return True
    if not known:
        return True
    # §2.8.10: notify when the descriptor at (off, wrap) is used: was it among the slots used since old?
    off_wrap = load_u16(q.driver)
    event = _unwrapped(off_wrap & 0x7FFF, off_wrap >> 15, q.used_wrap, q.size)
    since = _unwrapped(old & 0x7FFF, old >> 15, q.used_wrap, q.size)
    return need_event(event, q.used_idx, since)


def packed_enable_notify(q: np.void | Queue) -> None:
    """Ask for available buffer notifications; the caller re-checks packed_has_avail after."""
    q = as_queue(q)
    if q.event_idx:
        # The slot the device reads next: notify me when the driver makes it available (§2.8.10).
        store_u16(q.device, q.last_avail | q.avail_wrap << 15)
        store_u16(q.device + 2, RING_EVENT_FLAGS_DESC)
    else:
        store_u16(q.device + 2, RING_EVENT_FLAGS_ENABLE)


def packed_disable_notify(q: np.void | Queue) -> None:
    store_u16(as_queue(q).device + 2, RING_EVENT_FLAGS_DISABLE)
