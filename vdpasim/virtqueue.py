"""A virtqueue as the control plane sees it: a thin Python view over the compiled kernels' state record.

Besides size, addresses and indices, a queue carries what a front-end may ask of a running device:

* ``enabled``: None while no door gates the queue (vDPA: ready means served); True or False once one
  does (vhost-user SET_VRING_ENABLE). A ready but disabled queue is processed without side effects:
  the device decides what that means (net drops TX and delivers no RX, blk leaves requests queued).
* dirty logging: the bitmap (``log``/``log_size`` in the record, set by the device for every queue)
  and, per queue, whether ring writes are logged and at which guest address (``set_log_used``).
* inflight tracking: the queue's region of the front-end's inflight buffer (``set_inflight``), set
  up or recovered when the queue starts (devices/inflight.py), and the requests to resubmit.
"""

from __future__ import annotations

import numpy as np

from .errors import DeviceFault, DeviceRequestError
from .jit.chain import new_iov
from .memory import RegionTable
from .ops import RingAddressSpace
from .rings.state import PackedState, RingStatus, SplitState, VqState, new_queue_state
from .virtio.constants import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_MAX_SIZE,
)

__all__ = ["Virtqueue", "ring_area_sizes", "COUNTERS"]

COUNTERS = ("packets", "bytes", "errors", "overruns", "drops", "requests", "successes", "kicks", "notifications")


def ring_area_sizes(size: int, packed: bool) -> tuple[int, int, int]:
    """Bytes of the descriptor area, driver area and device area (VIRTIO 1.2 §2.7, §2.8)."""
    if packed:
        return 16 * size, 4, 4
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class Virtqueue:
    """Configuration, indices and counters of one queue; ``state`` is what the kernels mutate."""

    def __init__(self, index: int, max_size: int = VIRTQ_MAX_SIZE) -> None:
        self.index = index
        self.max_size = max_size
        self.state = new_queue_state()
        self.iov = new_iov()
        self.ready = False
        self.attached = False  # ring areas translated to host addresses
        self.addresses = (0, 0, 0)
        self.enabled: bool | None = None
        self.log_used: int | None = None  # guest address the device area is logged at (VHOST_VRING_F_LOG)
        self.inflight: np.ndarray | None = None  # this queue's inflight region (uint8)
        self.inflight_desc_num = 0
        self.inflight_started = False  # the region was set up or recovered since it was given
        self.resubmit = np.zeros(0, dtype=np.int64)  # heads (split) or region entries (packed) to serve first
        self.resubmit_pos = 0

    @property
    def record(self) -> np.record:
        return self.state[0]

    @property
    def size(self) -> int:
        return int(self.record["size"])

    @property
    def packed(self) -> bool:
        return bool(self.record["packed"])

    def negotiate(self, features: int) -> None:
        record = self.record
        record["packed"] = features >> VIRTIO_F_RING_PACKED & 1
        record["event_idx"] = features >> VIRTIO_RING_F_EVENT_IDX & 1
        record["indirect"] = features >> VIRTIO_RING_F_INDIRECT_DESC & 1

    def set_num(self, num: int) -> None:
        power_of_two = num & (num - 1) == 0
        if not 1 <= num <= self.max_size or (not self.packed and not power_of_two):
            layout = "packed" if self.packed else "split (power of two)"
            raise DeviceRequestError(
                f"vq {self.index}: size {num} invalid for a {layout} queue of at most {self.max_size}"
            )
        self.record["size"] = num

    def set_address(self, desc: int, driver: int, device: int) -> None:
        self.addresses = (desc, driver, device)
        self.attached = False

    def set_state(self, state: VqState) -> None:
        record = self.record
        if isinstance(state, PackedState):
            record["last_avail"], record["avail_wrap"] = state.last_avail, state.avail_wrap
            record["used_idx"], record["used_wrap"] = state.used_idx, state.used_wrap
        else:
            record["last_avail"] = record["used_idx"] = state.last_avail & 0xFFFF
        record["signalled_valid"] = 0

    def get_state(self) -> VqState:
        record = self.record
        if self.packed:
            return PackedState(
                int(record["last_avail"]), int(record["avail_wrap"]), int(record["used_idx"]), int(record["used_wrap"])
            )
        return SplitState(int(record["last_avail"]))

    def attach(self, table: RegionTable, space: RingAddressSpace) -> None:
        """Translate the ring areas to host addresses; each must lie inside one region (checked once here)."""
        record = self.record
        if not record["size"]:
            raise DeviceFault(f"vq {self.index}: started without a size", queue=self.index)
        if self.packed and not (
            0 <= record["last_avail"] < record["size"] and 0 <= record["used_idx"] < record["size"]
        ):
            # Packed positions index the descriptor ring: one past its end would read outside it.
            raise DeviceFault(
                f"vq {self.index}: packed ring positions {int(record['last_avail'])}/{int(record['used_idx'])}"
                f" outside a ring of {self.size}",
                queue=self.index,
            )
        user = space is RingAddressSpace.USER
        hosts = []
        for name, addr, length in zip(
            ("descriptor", "driver", "device"), self.addresses, ring_area_sizes(self.size, self.packed), strict=True
        ):
            host = table.host_addr(addr, length, user=user)
            if host == 0:
                self.record["error"] = RingStatus.ADDR_OUT_OF_RANGE
                self.record["error_addr"] = addr
                raise DeviceFault(
                    f"vq {self.index}: {name} area {addr:#x}+{length:#x} is outside guest memory",
                    queue=self.index,
                    code=RingStatus.ADDR_OUT_OF_RANGE,
                )
            hosts.append(host)
        record["desc_addr"], record["driver_addr"], record["device_addr"] = self.addresses
        record["desc"], record["driver"], record["device"] = hosts
        # Guest address of the descriptor area: packed used entries are logged there (jit/log.py).
        hit = table.find(self.addresses[0], 16 * self.size, user=user)
        record["log_desc"] = 0 if hit is None else hit[0].guest_addr + hit[1]
        if not self.packed:
            # The used index lives in guest memory; resume from it (vhost does the same at start).
            record["used_idx"] = int(table.view(self.addresses[2] + 2, 2, user=user).view(np.uint16)[0])
        self.attached = True

    def detach(self) -> None:
        self.attached = False
        record = self.record
        record["desc"] = record["driver"] = record["device"] = 0

    def set_log(self, bitmap: np.ndarray | None) -> None:
        """Log writes into ``bitmap`` (1 bit per 4 KiB guest page), or stop logging (None)."""
        record = self.record
        record["log"] = 0 if bitmap is None else bitmap.ctypes.data
        record["log_size"] = 0 if bitmap is None else bitmap.size

    def set_log_used(self, addr: int | None) -> None:
        """Log ring writes too, the device area at guest address ``addr`` (None: buffers only)."""
        self.log_used = addr
        self.record["log_ring"] = addr is not None
        # A u64 from the wire: above 2**63 it is stored as its int64 bit pattern (negative), which no
        # log covers (jit/log.py refuses negative addresses).
        self.record["log_used"] = 0 if addr is None else (addr & (1 << 64) - 1) - ((addr & 1 << 63) << 1)

    def set_inflight(self, region: np.ndarray | None, desc_num: int = 0) -> None:
        """Track inflight requests in ``region`` (this queue's part of the buffer) from the next start."""
        self.inflight = region
        self.inflight_desc_num = desc_num
        self.inflight_started = False
        self.record["inflight"] = 0
        self.resubmit = np.zeros(0, dtype=np.int64)
        self.resubmit_pos = 0

    @property
    def resubmitting(self) -> bool:
        return self.resubmit_pos < len(self.resubmit)

    def reset(self) -> None:
        """Back to the state of a new queue, counters excepted: like vdpa_sim_net's vstats they count for
        the device's lifetime, so the management side still reads them after a reset or a front-end left."""
        counters = {name: self.record[name] for name in COUNTERS}
        self.__init__(self.index, self.max_size)  # type: ignore[misc]
        for name, value in counters.items():
            self.record[name] = value

    def clear_counters(self) -> None:
        for name in COUNTERS:
            self.record[name] = 0

    def fault(self) -> DeviceFault | None:
        """The queue's recorded fault as an exception naming what was wrong, or None."""
        record = self.record
        code = int(record["error"])
        if code == RingStatus.OK:
            return None
        status = RingStatus(code)
        return DeviceFault(
            f"vq {self.index}: {status.description} (descriptor {int(record['error_index'])}, "
            f"address {int(record['error_addr']) & (1 << 64) - 1:#x})",
            queue=self.index,
            code=code,
        )

    def counters(self) -> dict[str, int]:
        record = self.record
        return {name: int(record[name]) for name in COUNTERS}
