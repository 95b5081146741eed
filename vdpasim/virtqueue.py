"""A virtqueue as the control plane sees it: a thin Python view over the compiled kernels' state record."""

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
        if not self.packed:
            # The used index lives in guest memory; resume from it (vhost does the same at start).
            record["used_idx"] = int(table.view(self.addresses[2] + 2, 2, user=user).view(np.uint16)[0])
        self.attached = True

    def detach(self) -> None:
        self.attached = False
        record = self.record
        record["desc"] = record["driver"] = record["device"] = 0

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
