"""Inflight I/O tracking, compiled: the shared region a restarted back-end resubmits unfinished requests from.

vhost-user INFLIGHT_SHMFD (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking"): the back-end
records in a memfd the front-end keeps across back-end restarts which requests it has fetched and not
yet completed, in fetch order. Per queue, ``q.inflight`` is the host address of the queue's region
(0: not tracked); the layouts, little-endian as the CPU:

split, ``QueueRegionSplit``: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx,
then ``DescStateSplit desc[desc_num]`` of 16 bytes: u8 inflight, u8 pad[5], u16 next, u64 counter.

packed, ``QueueRegionPacked`` (32-byte header): u64 features, u16 version, u16 desc_num, u16 free_head,
u16 old_free_head, u16 used_idx, u16 old_used_idx, u8 used_wrap_counter, u8 old_used_wrap_counter,
u8 pad[7] (+3 of alignment); then ``DescStatePacked desc[desc_num]`` of 32 bytes: u8 inflight, u8 pad,
u16 next, u16 last, u16 num, u64 counter, u16 id, u16 flags, u32 len, u64 addr.

What the kernels do, per the spec:

* fetch: split, ``desc[head]`` gets the counter, then ``inflight = 1``; packed, each ring descriptor of
  the chain is copied into entries taken from the free list (the head entry counts them and names the
  last one), and the head entry is marked in flight last, so a marked entry is always complete;
* completion, split: each used head is linked into the batch list (``next``, ``last_batch_head``);
  once the used index is published, the batch's entries are cleared and ``used_idx`` catches up;
* completion, packed: the chain's entries go back to the free list and ``used_idx``/wrap advance
  *before* the used descriptor's flags are written; then the head is cleared and the ``old_*``
  copies are committed.

Recovery after a restart (reading the region back, resubmission order) is control-plane work in
devices/inflight.py; ``inflight_packed_walk`` rebuilds a packed chain from the region for it. Every
index read back from the region is range-checked (INFLIGHT_CORRUPT), never trusted.
"""

from __future__ import annotations

from ..rings.state import RingStatus
from ..virtio.constants import VIRTQ_DESC_F_INDIRECT
from . import kernel
from .chain import add_buffer, fail
from .intrinsics import fence_release, load_u8, load_u16, load_u32, load_u64, store_u8, store_u16, store_u32, store_u64
from .packed import _walk_indirect

__all__ = [
    "SPLIT_HEADER",
    "SPLIT_ENTRY",
    "PACKED_HEADER",
    "PACKED_ENTRY",
    "inflight_pop",
    "inflight_push",
    "inflight_pushed",
    "inflight_publish",
    "inflight_packed_walk",
]

SPLIT_HEADER, SPLIT_ENTRY = 16, 16
PACKED_HEADER, PACKED_ENTRY = 32, 32

_OK = int(RingStatus.OK)
_INDEX = int(RingStatus.INDEX_OUT_OF_RANGE)
_CORRUPT = int(RingStatus.INFLIGHT_CORRUPT)

# Header fields (byte offsets).
_DESC_NUM = 10
_LAST_BATCH_HEAD, _SPLIT_USED_IDX = 12, 14
_FREE_HEAD, _OLD_FREE_HEAD, _USED_IDX, _OLD_USED_IDX, _USED_WRAP, _OLD_USED_WRAP = 12, 14, 16, 18, 20, 21
# Entry fields.
_S_NEXT, _S_COUNTER = 6, 8
_P_NEXT, _P_LAST, _P_NUM, _P_COUNTER, _P_ID, _P_FLAGS, _P_LEN, _P_ADDR = 2, 4, 6, 8, 16, 18, 20, 24


@kernel(inline=True)
def _packed_entry(base, index):
    return base + PACKED_HEADER + PACKED_ENTRY * index


@kernel
def _split_pop(q, head):
    entry = q.inflight + SPLIT_HEADER + SPLIT_ENTRY * head  # head < q.size <= desc_num (checked at start)
    store_u64(entry + _S_COUNTER, q.inflight_counter)
    q.inflight_counter += 1
    fence_release()  # a crash must never leave an entry in flight with another request's counter
    store_u8(entry, 1)


@kernel
def _packed_pop(q, start, ndesc):
    base = q.inflight
    desc_num = load_u16(base + _DESC_NUM)
    free_head = load_u16(base + _FREE_HEAD)
    head = load_u16(base + _OLD_FREE_HEAD)  # equals free_head between chains
    if head >= desc_num:
        fail(q, _CORRUPT, head, 0)
        return
    head_entry = _packed_entry(base, head)
    position = start
    for k in range(ndesc):
        if free_head >= desc_num:
            fail(q, _CORRUPT, free_head, 0)
            return
        if k == ndesc - 1:
            store_u16(head_entry + _P_LAST, free_head)
        entry = _packed_entry(base, free_head)
        desc = q.desc + 16 * position
        store_u64(entry + _P_ADDR, load_u64(desc))
        store_u32(entry + _P_LEN, load_u32(desc + 8))
        store_u16(entry + _P_ID, load_u16(desc + 12))
        store_u16(entry + _P_FLAGS, load_u16(desc + 14))
        free_head = load_u16(entry + _P_NEXT)
        position += 1
        if position == q.size:
            position = 0
    store_u16(head_entry + _P_NUM, ndesc)
    store_u64(head_entry + _P_COUNTER, q.inflight_counter)
    q.inflight_counter += 1
    store_u16(base + _FREE_HEAD, free_head)
    store_u16(base + _OLD_FREE_HEAD, free_head)
    fence_release()
    store_u8(head_entry, 1)
    q.inflight_entry = head


@kernel(inline=True)
def inflight_pop(q, head, start, ndesc):
    """A chain was fetched: ``head`` its head (split), ``start`` its first ring position (packed)."""
    if q.packed:
        _packed_pop(q, start, ndesc)
    else:
        _split_pop(q, head)


@kernel
def _split_push(q, head):
    base = q.inflight
    store_u16(base + SPLIT_HEADER + SPLIT_ENTRY * head + _S_NEXT, load_u16(base + _LAST_BATCH_HEAD))
    store_u16(base + _LAST_BATCH_HEAD, head)


@kernel
def _packed_push(q, ndesc):
    base = q.inflight
    desc_num = load_u16(base + _DESC_NUM)
    head = q.inflight_entry
    last = load_u16(_packed_entry(base, head) + _P_LAST)
    if head >= desc_num or last >= desc_num:
        fail(q, _CORRUPT, head, last)
        return
    store_u16(_packed_entry(base, last) + _P_NEXT, load_u16(base + _FREE_HEAD))
    store_u16(base + _FREE_HEAD, head)
    used = q.used_idx + ndesc
    wrap = q.used_wrap
    if used >= q.size:
        used -= q.size
        wrap ^= 1
    store_u16(base + _USED_IDX, used)
    store_u8(base + _USED_WRAP, wrap)
    fence_release()  # all of this before the used descriptor's flags hand the buffer back


@kernel(inline=True)
def inflight_push(q, head, ndesc):
    """Before the used entry of ``head`` is written."""
    if q.packed:
        _packed_push(q, ndesc)
    else:
        _split_push(q, head)


@kernel
def inflight_pushed(q):
    """After a packed used entry was written (and so published): commit the region's completion."""
    if not q.packed:
        return
    base = q.inflight
    head = q.inflight_entry
    if head >= load_u16(base + _DESC_NUM):
        return
    fence_release()
    store_u8(_packed_entry(base, head), 0)
    store_u16(base + _OLD_FREE_HEAD, load_u16(base + _FREE_HEAD))
    store_u16(base + _OLD_USED_IDX, load_u16(base + _USED_IDX))
    store_u8(base + _OLD_USED_WRAP, load_u8(base + _USED_WRAP))


@kernel
def inflight_publish(q):
    """After a split used index was published: the batch is done, clear its entries, then ``used_idx``."""
    if q.packed:
        return
    base = q.inflight
    batch = (q.used_idx - load_u16(base + _SPLIT_USED_IDX)) & 0xFFFF
    if batch == 0:
        return
    desc_num = load_u16(base + _DESC_NUM)
    fence_release()  # the used index before the entries (recovery repairs a crash in between)
    head = load_u16(base + _LAST_BATCH_HEAD)
    for _ in range(batch):
        if head >= desc_num:
            fail(q, _CORRUPT, head, 0)
            return
        entry = base + SPLIT_HEADER + SPLIT_ENTRY * head
        store_u8(entry, 0)
        head = load_u16(entry + _S_NEXT)
    fence_release()
    store_u16(base + _SPLIT_USED_IDX, q.used_idx)


@kernel
def inflight_packed_walk(q, rows, head, iov):
    """A packed chain rebuilt from region entries (the ring slots may be reused since it was fetched).

    Returns (status, buffer id, ring descriptors, iov entries, readable entries), as packed_pop.
    """
    base = q.inflight
    desc_num = load_u16(base + _DESC_NUM)
    if head >= desc_num:
        return fail(q, _CORRUPT, head, 0), 0, 0, 0, 0
    num = load_u16(_packed_entry(base, head) + _P_NUM)
    if num == 0 or num > q.size:
        return fail(q, _CORRUPT, head, num), 0, 0, 0, 0
    n = 0
    readable = 0
    total = 0
    entry_index = head
    buffer_id = 0
    addr = 0
    for _ in range(num):
        if entry_index >= desc_num:
            return fail(q, _CORRUPT, entry_index, 0), 0, 0, 0, 0
        entry = _packed_entry(base, entry_index)
        addr = load_u64(entry + _P_ADDR)
        length = load_u32(entry + _P_LEN)
        flags = load_u16(entry + _P_FLAGS)
        buffer_id = load_u16(entry + _P_ID)
        if flags & VIRTQ_DESC_F_INDIRECT:
            status, n, readable, total = _walk_indirect(
                q, rows, iov, n, readable, total, addr, length, flags, entry_index
            )
        else:
            status, n, readable, total = add_buffer(q, rows, iov, n, readable, total, addr, length, flags, entry_index)
        if status != _OK:
            return status, 0, 0, 0, 0
        entry_index = load_u16(entry + _P_NEXT)
    if buffer_id >= q.size:
        return fail(q, _INDEX, buffer_id, addr), 0, 0, 0, 0
    return _OK, buffer_id, num, n, readable
