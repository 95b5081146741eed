"""Inflight I/O tracking, control-plane side: region sizes, set-up when a queue starts, recovery after a restart.

The front-end (QEMU's vhost-user-blk) asks the back-end for a shared buffer with GET_INFLIGHT_FD,
keeps it across back-end restarts and hands it to every new back-end with SET_INFLIGHT_FD. The buffer
is one region per queue, each ``queue_region_size(queue_size, packed)`` bytes (the header and entries
of jit/inflight.py, rounded up to 64 bytes as libvhost-user and DPDK lay it out).

When a queue starts with a region (``start_tracking``), a region whose version is 0 (fresh, or the VM
was reset) is initialised; any other region is what a previous back-end left, and is recovered as
QEMU's docs/interop/vhost-user.rst says:

* split: if the region's ``used_idx`` lags the used ring's index, the back-end died after publishing a
  batch and before clearing it: the batch's entries (``last_batch_head`` onwards) are no longer in
  flight. The entries still in flight are resubmitted in counter order, and the next available index
  is the used index plus their number (as libvhost-user: everything fetched was either completed or is
  in flight, whatever SET_VRING_BASE said);
* packed: an unfinished completion is committed if its used descriptor reached the ring, rolled back
  otherwise; the free list is walked to clear the entries on it; the chains still in flight are
  resubmitted in counter order from their entries, and the ring positions continue after them. The
  free list is then rebuilt from every entry no chain in flight uses, so no crash can leak entries.

Nothing read back is trusted: indices out of range make that part of the region unusable, which is
logged, and the region is set up afresh rather than followed.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from ..jit.inflight import PACKED_ENTRY, PACKED_HEADER, SPLIT_ENTRY, SPLIT_HEADER
from ..virtio.constants import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from ..virtqueue import Virtqueue

__all__ = [
    "INFLIGHT_ALIGN",
    "INFLIGHT_VERSION",
    "SPLIT_HEADER_DTYPE",
    "SPLIT_DESC_DTYPE",
    "PACKED_HEADER_DTYPE",
    "PACKED_DESC_DTYPE",
    "queue_region_size",
    "split_region",
    "packed_region",
    "start_tracking",
]

INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1

SPLIT_HEADER_DTYPE = np.dtype(
    [("features", "u8"), ("version", "u2"), ("desc_num", "u2"), ("last_batch_head", "u2"), ("used_idx", "u2")]
)
SPLIT_DESC_DTYPE = np.dtype([("inflight", "u1"), ("padding", "u1", 5), ("next", "u2"), ("counter", "u8")])
PACKED_HEADER_DTYPE = np.dtype(
    {
        "names": [
            "features",
            "version",
            "desc_num",
            "free_head",
            "old_free_head",
            "used_idx",
            "old_used_idx",
            "used_wrap_counter",
            "old_used_wrap_counter",
        ],
        "formats": ["u8", "u2", "u2", "u2", "u2", "u2", "u2", "u1", "u1"],
        "offsets": [0, 8, 10, 12, 14, 16, 18, 20, 21],
        "itemsize": PACKED_HEADER,
    }
)
PACKED_DESC_DTYPE = np.dtype(
    [
        ("inflight", "u1"),
        ("padding", "u1"),
        ("next", "u2"),
        ("last", "u2"),
        ("num", "u2"),
        ("counter", "u8"),
        ("id", "u2"),
        ("flags", "u2"),
        ("len", "u4"),
        ("addr", "u8"),
    ]
)
assert SPLIT_HEADER_DTYPE.itemsize == SPLIT_HEADER and SPLIT_DESC_DTYPE.itemsize == SPLIT_ENTRY
assert PACKED_DESC_DTYPE.itemsize == PACKED_ENTRY


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's region for queues of ``queue_size`` descriptors."""
    raw = PACKED_HEADER + PACKED_ENTRY * queue_size if packed else SPLIT_HEADER + SPLIT_ENTRY * queue_size
    return -(-raw // INFLIGHT_ALIGN) * INFLIGHT_ALIGN


def split_region(region: np.ndarray, desc_num: int) -> tuple[np.ndarray, np.ndarray]:
    """(header, entries) views of a split queue region."""
    header = region[:SPLIT_HEADER].view(SPLIT_HEADER_DTYPE)[0:1]
    entries = region[SPLIT_HEADER : SPLIT_HEADER + SPLIT_ENTRY * desc_num].view(SPLIT_DESC_DTYPE)
    return header, entries


def packed_region(region: np.ndarray, desc_num: int) -> tuple[np.ndarray, np.ndarray]:
    """(header, entries) views of a packed queue region."""
    header = region[:PACKED_HEADER].view(PACKED_HEADER_DTYPE)[0:1]
    entries = region[PACKED_HEADER : PACKED_HEADER + PACKED_ENTRY * desc_num].view(PACKED_DESC_DTYPE)
    return header, entries


class _Corrupt(Exception):
    """The region holds an index out of range: set it up afresh rather than follow it."""


def start_tracking(vq: Virtqueue, log: logging.Logger) -> None:
    """The queue starts with an inflight region: set it up, or recover what a previous back-end left.

    Leaves ``vq.resubmit`` (what to serve before new requests) and, when recovering, the queue's
    indices set; the record's ``inflight`` field turns tracking on in the kernels.
    """
    region, desc_num = vq.inflight, vq.inflight_desc_num
    record = vq.record
    vq.inflight_started = True
    record["inflight"] = 0
    if region is None:
        return
    if vq.size > desc_num:
        log.warning(
            "vq %d: inflight region for %d descriptors, the queue has %d: not tracked", vq.index, desc_num, vq.size
        )
        return
    if len(region) < queue_region_size(desc_num, vq.packed):
        # Sized for the other layout (the features changed after SET_INFLIGHT_FD): it cannot hold ours.
        log.warning(
            "vq %d: inflight region of %d bytes is too small for this layout: not tracked", vq.index, len(region)
        )
        return
    header = region[8:10].view(np.uint16)  # version, at the same place in both layouts
    fresh = header[0] == 0
    if not fresh:
        try:
            resubmit = _recover_packed(vq, log) if vq.packed else _recover_split(vq, log)
        except _Corrupt as exc:
            log.warning("vq %d: inflight region unusable (%s): starting it afresh", vq.index, exc)
            fresh = True
        else:
            vq.resubmit, vq.resubmit_pos = resubmit, 0
            if len(resubmit):
                log.info("vq %d: resubmitting %d requests left in flight", vq.index, len(resubmit))
    if fresh:
        _initialise(vq)
    record["inflight"] = region.ctypes.data


def _initialise(vq: Virtqueue) -> None:
    region, desc_num, record = vq.inflight, vq.inflight_desc_num, vq.record
    assert region is not None
    region[:] = 0
    if vq.packed:
        header, entries = packed_region(region, desc_num)
        entries["next"] = np.arange(1, desc_num + 1)
        header["used_idx"] = header["old_used_idx"] = record["used_idx"]
        header["used_wrap_counter"] = header["old_used_wrap_counter"] = record["used_wrap"]
    else:
        header, _ = split_region(region, desc_num)
        header["used_idx"] = record["used_idx"]
    header["desc_num"] = desc_num
    header["version"] = INFLIGHT_VERSION
    vq.resubmit, vq.resubmit_pos = np.zeros(0, dtype=np.int64), 0
    record["inflight_counter"] = 1


def _check_desc_num(header: np.ndarray, desc_num: int) -> None:
    if int(header["desc_num"][0]) != desc_num:
        raise _Corrupt(f"desc_num {int(header['desc_num'][0])}, expected {desc_num}")


def _in_order(entries: np.ndarray, heads: np.ndarray) -> np.ndarray:
    return heads[np.argsort(entries["counter"][heads], kind="stable")].astype(np.int64)


def _recover_split(vq: Virtqueue, log: logging.Logger) -> np.ndarray:
    assert vq.inflight is not None
    desc_num, record = vq.inflight_desc_num, vq.record
    header, entries = split_region(vq.inflight, desc_num)
    _check_desc_num(header, desc_num)
    used = int(record["used_idx"])  # read from the used ring when the queue was attached
    batch = (used - int(header["used_idx"][0])) & 0xFFFF
    if batch:
        # Published but not cleared: the last batch is complete.
        if batch > desc_num:
            raise _Corrupt(f"used index {used} is {batch} ahead of the region's")
        head = int(header["last_batch_head"][0])
        for _ in range(batch):
            if head >= desc_num:
                raise _Corrupt(f"batch list reaches entry {head}")
            entries["inflight"][head] = 0
            head = int(entries["next"][head])
        header["used_idx"] = used
    heads = np.flatnonzero(entries["inflight"])
    if len(heads) and (heads[-1] >= vq.size or len(heads) > vq.size):
        raise _Corrupt(f"{len(heads)} entries in flight, up to head {int(heads[-1])}, in a queue of {vq.size}")
    record["last_avail"] = (used + len(heads)) & 0xFFFF
    record["inflight_counter"] = int(entries["counter"].max(initial=0)) + 1
    return _in_order(entries, heads)


def _ring_flags(vq: Virtqueue, position: int) -> int:
    return ctypes.c_uint16.from_address(int(vq.record["desc"]) + 16 * position + 14).value


def _recover_packed(vq: Virtqueue, log: logging.Logger) -> np.ndarray:
    assert vq.inflight is not None
    desc_num, record, size = vq.inflight_desc_num, vq.record, vq.size
    header, entries = packed_region(vq.inflight, desc_num)
    _check_desc_num(header, desc_num)
    h = {name: int(header[name][0]) for name in PACKED_HEADER_DTYPE.names}
    if h["used_idx"] >= size or h["old_used_idx"] >= size:
        raise _Corrupt(f"used index {h['used_idx']}/{h['old_used_idx']} in a queue of {size}")
    if (h["used_idx"], h["used_wrap_counter"]) != (h["old_used_idx"], h["old_used_wrap_counter"]):
        # A completion was under way: it happened if its used descriptor reached the ring, i.e. the
        # descriptor at old_used_idx no longer reads as available in the old lap.
        wrap = h["old_used_wrap_counter"] & 1
        available = (VIRTQ_DESC_F_AVAIL if wrap else 0) | (0 if wrap else VIRTQ_DESC_F_USED)
        bits = _ring_flags(vq, h["old_used_idx"]) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
        if bits != available:
            for name in ("free_head", "used_idx", "used_wrap_counter"):
                h["old_" + name] = h[name]
    free_head, used, used_wrap = h["old_free_head"], h["old_used_idx"], h["old_used_wrap_counter"] & 1
    # Entries on the free list are not in flight, whatever their flag says.
    index, seen = free_head, 0
    while index < desc_num and seen < desc_num:
        entries["inflight"][index] = 0
        index = int(entries["next"][index])
        seen += 1
    chains: list[int] = []
    taken = np.zeros(desc_num, dtype=bool)
    ring_slots = 0
    for head in np.flatnonzero(entries["inflight"]):
        members = []
        index, num = int(head), int(entries["num"][head])
        if not 1 <= num <= size:
            raise _Corrupt(f"entry {int(head)} holds a chain of {num} descriptors")
        for _ in range(num):
            if index >= desc_num or taken[index]:
                raise _Corrupt(f"chain at entry {int(head)} reaches entry {index}")
            members.append(index)
            index = int(entries["next"][index])
        taken[members] = True
        chains.append(int(head))
        ring_slots += num
    if ring_slots > size:
        raise _Corrupt(f"{ring_slots} descriptors in flight in a queue of {size}")
    # Rebuild the free list from every entry no chain in flight uses.
    free = np.flatnonzero(~taken)
    entries["next"][free] = np.append(free[1:], desc_num)
    first_free = int(free[0]) if len(free) else desc_num
    header["free_head"] = header["old_free_head"] = first_free
    header["used_idx"] = header["old_used_idx"] = used
    header["used_wrap_counter"] = header["old_used_wrap_counter"] = used_wrap
    # The device resumes where the region says: completions up to ``used``, then the chains in flight.
    avail, avail_wrap = used + ring_slots, used_wrap
    if avail >= size:
        avail -= size
        avail_wrap ^= 1
    record["used_idx"], record["used_wrap"] = used, used_wrap
    record["last_avail"], record["avail_wrap"] = avail, avail_wrap
    record["signalled_valid"] = 0
    record["inflight_counter"] = int(entries["counter"].max(initial=0)) + 1
    heads = np.array(chains, dtype=np.int64)
    return _in_order(entries, heads)
