"""Split virtqueue, device side (VIRTIO 1.2 §2.7): the pure-Python reference of jit/split.py.

Same function names, arguments and results as the compiled kernels, with a ``RegionTable`` where
they take ``table.rows``. Layout, little-endian, at the host addresses of the queue record:

  descriptor table (q.desc):  struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } [size]
  available ring (q.driver):  le16 flags; le16 idx; le16 ring[size]; le16 used_event
  used ring (q.device):       le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..memory import RegionTable
from ..virtio.constants import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
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
from .state import RingStatus

__all__ = [
    "SplitChain",
    "need_event",
    "split_avail_idx",
    "split_has_avail",
    "split_pop",
    "split_walk",
    "split_push",
    "split_publish",
    "split_needs_notify",
    "split_enable_notify",
    "split_disable_notify",
]


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event of the spec's virtio_ring.h: did the 16-bit index move from old to new past event?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitChain:
    """The descriptors of the chain at ``head``, in order, following NEXT and at most one indirect table.

    Indirect descriptors are consumed here (the table's descriptors are yielded in their place), so the
    caller sees only buffer elements. Like rust-vmm's ``DescriptorChain``, a ttl bounds the walk.
    """

    def __init__(self, q: Queue, table: RegionTable, head: int) -> None:
        self.q = q
        self.table = table
        self.head = head

    def __iter__(self) -> Iterator[Descriptor]:
        q = self.q
        # §2.7.6: ring entries are indices into the descriptor table of Queue Size entries.
        if self.head >= q.size:
            raise ChainFault(RingStatus.INDEX_OUT_OF_RANGE, self.head, 0)
        base, count, index = q.desc, q.size, self.head
        in_indirect = False
        # §2.7.5.2: "loops in the descriptor chain are forbidden": no chain visits more entries than its table has.
        ttl = count
        while True:
            desc = Descriptor.read_split(base + DESC_SIZE * index, index)
            ttl -= 1
            if ttl < 0:
                raise desc.fault(RingStatus.CHAIN_LOOP)
            if desc.is_indirect:
                base = self._indirect_table(desc, in_indirect)
                count = ttl = desc.len // DESC_SIZE
                index = 0
                in_indirect = True
                continue
            yield desc
            if not desc.has_next:
                return
            index = desc.next
            # §2.7.5: next is an index into the current table (the ring's, or the indirect one of len/16).
            if index >= count:
                raise ChainFault(RingStatus.INDEX_OUT_OF_RANGE, index, desc.addr)

    def _indirect_table(self, desc: Descriptor, in_indirect: bool) -> int:
        """Host address of the table an indirect descriptor refers to, after the §2.7.5.3 checks."""
        # §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the
        # VIRTIO_F_INDIRECT_DESC feature was negotiated."
        if not self.q.indirect:
            raise desc.fault(RingStatus.INDIRECT_NOT_NEGOTIATED)
        # §2.7.5.3.1: "... MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor".
        if in_indirect:
            raise desc.fault(RingStatus.NESTED_INDIRECT)
        # §2.7.5.3.1: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in flags."
        if desc.has_next:
            raise desc.fault(RingStatus.INDIRECT_WITH_NEXT)
        # §2.7.5.3: the table is struct virtq_desc desc[len / 16]: whole descriptors, at least one.
        if desc.len == 0 or desc.len % DESC_SIZE:
            raise desc.fault(RingStatus.BAD_INDIRECT_LENGTH)
        # §2.7.5.3.2: the WRITE flag of this descriptor is ignored; the device only reads the table.
        host = translate(self.table, desc.addr, desc.len, False)
        if host == 0:
            raise desc.fault(RingStatus.ADDR_OUT_OF_RANGE)
        return host


def split_avail_idx(q: np.void | Queue) -> int:
    return load_u16(as_queue(q).driver + 2)


def split_has_avail(q: np.void | Queue) -> bool:
    q = as_queue(q)
    return split_avail_idx(q) != q.last_avail


def split_walk(q: np.void | Queue, table: RegionTable, head: int, iov: np.ndarray) -> tuple[int, int, int]:
    """Walk the chain at ``head`` into iov; returns (status, iov entries, readable entries)."""
    q = as_queue(q)
    builder = ChainBuilder(table, iov)
    try:
        builder.add_all(iter(SplitChain(q, table, head)))
    except ChainFault as fault:
        return fail(q, fault.status, fault.index, fault.addr), 0, 0
    return int(RingStatus.OK), builder.n, builder.readable


def split_pop(q: np.void | Queue, table: RegionTable, iov: np.ndarray) -> tuple[int, int, int, int, int]:
    """Take the next available chain: (status, head, ring descriptors consumed (1), iov entries, readable)."""
    q = as_queue(q)
    avail_idx = split_avail_idx(q)
    if avail_idx == q.last_avail:
        return int(RingStatus.EMPTY), 0, 0, 0, 0
    # §2.7.13: the ring holds Queue Size entries, so idx is never more than that ahead of what the
    # device has consumed; more is a broken (or hostile) driver (rust-vmm's InvalidAvailRingIndex).
    if (avail_idx - q.last_avail) & 0xFFFF > q.size:
        return fail(q, RingStatus.AVAIL_IDX_AHEAD, avail_idx, 0), 0, 0, 0, 0
    # §2.7.13.2: the entry idx % Queue Size holds the head of the chain.
    head = load_u16(q.driver + 4 + 2 * (q.last_avail % q.size))
    status, n, readable = split_walk(q, table, head, iov)
    if status != RingStatus.OK:
        return status, head, 0, 0, 0
    q.last_avail = (q.last_avail + 1) & 0xFFFF
    return int(RingStatus.OK), head, 1, n, readable


def split_push(q: np.void | Queue, head: int, ndesc: int, written: int) -> None:
    """Add one used element (§2.7.8: id = head of the chain, len = bytes written); visible at split_publish."""
    q = as_queue(q)
    elem = q.device + 4 + 8 * (q.used_idx % q.size)
    store_u32(elem, head)
    store_u32(elem + 4, written)
    q.used_idx = (q.used_idx + 1) & 0xFFFF


def split_publish(q: np.void | Queue) -> None:
    """§2.7.8.2: "The device MUST set len prior to updating the used idx": the elements are written already."""
    q = as_queue(q)
    store_u16(q.device + 2, q.used_idx)


def split_needs_notify(q: np.void | Queue) -> bool:
    """Whether to send a used buffer notification for what was published since the last one (§2.7.7)."""
    q = as_queue(q)
    new = q.used_idx
    if q.signalled_valid and q.signalled_used == new:
        return False  # nothing used since the last notification
    old, known = q.signalled_used, q.signalled_valid
    q.signalled_used = new
    q.signalled_valid = 1
    if q.event_idx:
        # §2.7.7.2: with EVENT_IDX the device ignores flags and MUST notify when the used idx passes
        # used_event. Without a previous notification to measure from, notify.
        used_event = load_u16(q.driver + 4 + 2 * q.size)
        return not known or need_event(used_event, new, old)
    # §2.7.7.2: flags 1 (NO_INTERRUPT): SHOULD NOT notify; flags 0: MUST notify.
    return not load_u16(q.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT


def split_enable_notify(q: np.void | Queue) -> None:
    """Ask for available buffer notifications (§2.7.10.2); the caller re-checks split_has_avail after."""
    q = as_queue(q)
    if q.event_idx:
        # Notify me once the driver makes the entry at last_avail available.
        store_u16(q.device + 4 + 8 * q.size, q.last_avail)
    else:
        store_u16(q.device, 0)


def split_disable_notify(q: np.void | Queue) -> None:
    """§2.7.10.2: without EVENT_IDX the device MAY set flags to 1; with it, flags stay 0 (and avail_event is left)."""
    q = as_queue(q)
    if not q.event_idx:
        store_u16(q.device, VIRTQ_USED_F_NO_NOTIFY)
