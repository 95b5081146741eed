"""Per-virtqueue state shared by the compiled kernels (jit/) and the pure-Python oracle (rings/).

A queue is plain state (as rust-vmm's ``Queue``): sizes, ring addresses, indices, notification
bookkeeping, error report and counters, in one numpy record so compiled code mutates it in place and
Python reads it without copies. Guest memory is always a separate argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "USED_HEAD_PENDING",
    "QUEUE_DTYPE",
    "RingStatus",
    "SplitState",
    "PackedState",
    "VqState",
    "new_queue_state",
    "MAX_CHAIN",
]

USED_HEAD_PENDING = 1 << 16  # marks a queue's used_head_flags as set (the flags themselves may be 0)

# The longest chain (descriptors, after following an indirect table) any queue accepts.
MAX_CHAIN = 1024

QUEUE_DTYPE = np.dtype(
    [
        ("size", np.int64),
        ("packed", np.int64),  # 1: packed layout (VIRTIO_F_RING_PACKED), 0: split
        ("event_idx", np.int64),  # VIRTIO_RING_F_EVENT_IDX negotiated
        ("indirect", np.int64),  # VIRTIO_RING_F_INDIRECT_DESC negotiated
        # Ring areas as the driver gave them (guest or user addresses) and their host addresses.
        ("desc_addr", np.int64),
        ("driver_addr", np.int64),  # split: available ring; packed: driver event suppression
        ("device_addr", np.int64),  # split: used ring; packed: device event suppression
        ("desc", np.int64),
        ("driver", np.int64),
        ("device", np.int64),
        # Device-side indices. Split: free-running 16-bit counters. Packed: ring positions + wrap counters.
        ("last_avail", np.int64),
        ("avail_wrap", np.int64),
        ("used_idx", np.int64),
        ("used_wrap", np.int64),
        # Packed: the first used descriptor pushed since the last publish keeps its flags back until the
        # publish, so the driver sees a burst at once (USED_HEAD_PENDING | flags, 0: none), and its position.
        ("used_head_flags", np.int64),
        ("used_head_pos", np.int64),
        # Notification bookkeeping: used index when the driver was last notified.
        ("signalled_used", np.int64),
        ("signalled_valid", np.int64),
        # Error report of the first fault (RingStatus), the descriptor index and address involved.
        ("error", np.int64),
        ("error_index", np.int64),
        ("error_addr", np.int64),
        # Counters (vdpa_sim_net vstats names; blk uses packets/bytes/errors).
        ("packets", np.int64),
        ("bytes", np.int64),
        ("errors", np.int64),
        ("overruns", np.int64),
        ("drops", np.int64),
        ("requests", np.int64),
        ("successes", np.int64),
        ("kicks", np.int64),
        ("notifications", np.int64),
        # Dirty-page logging (jit/log.py): host address and byte size of the bitmap (0: logging off);
        # whether ring writes are logged (vhost VHOST_VRING_F_LOG), the guest address the device area is
        # logged at, and the guest address of the descriptor area (packed used entries are written there).
        ("log", np.int64),
        ("log_size", np.int64),
        ("log_ring", np.int64),
        ("log_used", np.int64),
        ("log_desc", np.int64),
        # Inflight tracking (jit/inflight.py): host address of this queue's region (0: off), the fetch
        # counter, and the region entry of the chain being served (packed layout).
        ("inflight", np.int64),
        ("inflight_counter", np.int64),
        ("inflight_entry", np.int64),
    ]
)


class RingStatus(enum.IntEnum):
    """Results of ring operations; identical in jit/ and rings/. Values >= ADDR_OUT_OF_RANGE are faults."""

    OK = 0
    EMPTY = 1  # nothing available: not an error
    NO_BUFFER = 2  # the device ran out of driver buffers (RX): not an error
    ADDR_OUT_OF_RANGE = 10  # a buffer, indirect table or ring outside guest memory
    INDEX_OUT_OF_RANGE = 11  # a head, next index or buffer id >= queue size
    AVAIL_IDX_AHEAD = 12  # split: avail idx moved more than queue size past last_avail
    CHAIN_LOOP = 13  # more descriptors than the table holds: a loop
    CHAIN_TOO_LONG = 14  # more than MAX_CHAIN descriptors
    LENGTH_OVERFLOW = 15  # total chain length over 2**32 - 1
    NESTED_INDIRECT = 16  # INDIRECT inside an indirect table
    INDIRECT_WITH_NEXT = 17  # INDIRECT together with NEXT
    BAD_INDIRECT_LENGTH = 18  # indirect table of zero length or not a multiple of 16
    INDIRECT_NOT_NEGOTIATED = 19
    WRITE_BEFORE_READ = 20  # a device-readable descriptor after a device-writable one
    READ_ONLY_MEMORY = 21  # a device-writable buffer in a read-only region
    BAD_REQUEST = 22  # the device could not parse the request (device-specific)
    LOG_OUT_OF_RANGE = 23  # a write to log lies beyond the dirty log the front-end gave
    INFLIGHT_CORRUPT = 24  # an index in the inflight region is out of range

    @property
    def is_fault(self) -> bool:
        return self >= RingStatus.ADDR_OUT_OF_RANGE

    @property
    def description(self) -> str:
        return _DESCRIPTIONS.get(self, self.name.lower().replace("_", " "))


_DESCRIPTIONS = {
    RingStatus.ADDR_OUT_OF_RANGE: "address outside guest memory",
    RingStatus.INDEX_OUT_OF_RANGE: "descriptor index or buffer id >= queue size",
    RingStatus.AVAIL_IDX_AHEAD: "available index more than the queue size ahead",
    RingStatus.CHAIN_LOOP: "descriptor chain loops (longer than its table)",
    RingStatus.CHAIN_TOO_LONG: f"descriptor chain longer than {MAX_CHAIN} descriptors",
    RingStatus.LENGTH_OVERFLOW: "descriptor chain length over 4 GiB",
    RingStatus.NESTED_INDIRECT: "indirect descriptor inside an indirect table",
    RingStatus.INDIRECT_WITH_NEXT: "descriptor with both INDIRECT and NEXT",
    RingStatus.BAD_INDIRECT_LENGTH: "indirect table of zero length or not a multiple of 16",
    RingStatus.INDIRECT_NOT_NEGOTIATED: "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC",
    RingStatus.WRITE_BEFORE_READ: "device-readable descriptor after a device-writable one",
    RingStatus.READ_ONLY_MEMORY: "device-writable buffer in read-only memory",
    RingStatus.BAD_REQUEST: "malformed request",
    RingStatus.LOG_OUT_OF_RANGE: "guest write beyond the end of the dirty log",
    RingStatus.INFLIGHT_CORRUPT: "inflight region entry out of range",
}


@dataclass(frozen=True)
class SplitState:
    """vring base of a split queue: the next available index to process (free-running 16 bits)."""

    last_avail: int

    def encode(self) -> int:
        return self.last_avail & 0xFFFF


@dataclass(frozen=True)
class PackedState:
    """vring base of a packed queue: positions and wrap counters, vhost-user encoding."""

    last_avail: int
    avail_wrap: int
    used_idx: int
    used_wrap: int

    def encode(self) -> int:
        return (
            (self.last_avail & 0x7FFF)
            | (self.avail_wrap & 1) << 15
            | (self.used_idx & 0x7FFF) << 16
            | (self.used_wrap & 1) << 31
        )

    @classmethod
    def decode(cls, num: int) -> PackedState:
        return cls(num & 0x7FFF, num >> 15 & 1, num >> 16 & 0x7FFF, num >> 31 & 1)


VqState = SplitState | PackedState


def new_queue_state() -> np.ndarray:
    """A one-element record array (kernels take ``state[0]`` views, which write through)."""
    state = np.zeros(1, dtype=QUEUE_DTYPE)
    state[0]["avail_wrap"] = 1
    state[0]["used_wrap"] = 1
    return state
