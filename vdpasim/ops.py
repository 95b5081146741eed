"""The vDPA device operations: the one interface every door serves and every client speaks.

Named and grouped like the kernel's ``struct vdpa_config_ops`` (include/linux/vdpa.h), which are
also the vhost-vdpa ioctls a reader will know. Per-queue operations take the queue index first.

* Devices (devices/net.py, devices/blk.py) implement it natively.
* Clients (vhost-user front-end, vhost-vdpa fd client) implement it over a wire.
* Servers (vhost-user back-end, vhost-vdpa char device, VDUSE) take one and expose it on a wire.

Contract: every operation is mandatory unless listed in ``OPTIONAL_OPS``; a server probes optional
ones with ``supports(ops, name)`` and maps absence to its wire's answer (an unset feature bit or an
errno), never to an exception. Invalid requests raise ``PeerError`` subclasses carrying an errno.
Addresses given to ``set_vq_address`` are in the device's ring address space (``RingAddressSpace``):
IOVA/GPA for vhost-vdpa and VDUSE, the front-end's user addresses for vhost-user.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .memory import RegionTable
from .rings.state import VqState

__all__ = [
    "DeviceOps",
    "IovaRange",
    "RingAddressSpace",
    "Call",
    "OPTIONAL_OPS",
    "supports",
]


class RingAddressSpace(enum.Enum):
    GUEST = "guest"  # GPA or IOVA: vhost-vdpa, VDUSE, vhost-user with IOMMU_PLATFORM
    USER = "user"  # the front-end's virtual addresses: vhost-user


@dataclass(frozen=True)
class IovaRange:
    first: int
    last: int


# A call (interrupt) target: an eventfd number, or a callable for in-process drivers and tests.
Call = int | Callable[[], None] | None


@runtime_checkable
class DeviceOps(Protocol):
    # --- virtqueue operations ---
    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None: ...
    def set_vq_num(self, idx: int, num: int) -> None: ...
    def kick_vq(self, idx: int) -> None: ...
    def set_vq_kick(self, idx: int, fd: int | None) -> None:
        """Kick eventfd to watch (None: the caller kicks through kick_vq)."""

    def set_vq_call(self, idx: int, call: Call) -> None: ...
    def set_vq_ready(self, idx: int, ready: bool) -> None: ...
    def get_vq_ready(self, idx: int) -> bool: ...
    def set_vq_state(self, idx: int, state: VqState) -> None: ...
    def get_vq_state(self, idx: int) -> VqState: ...
    def get_vq_num_max(self) -> int: ...
    def get_vq_num_min(self) -> int: ...
    def get_vq_count(self) -> int: ...

    # --- device operations ---
    def get_device_id(self) -> int: ...
    def get_vendor_id(self) -> int: ...
    def get_device_features(self) -> int: ...
    def set_driver_features(self, features: int) -> None: ...
    def get_driver_features(self) -> int: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def reset(self) -> None: ...
    def get_config_size(self) -> int: ...
    def get_config(self, offset: int, length: int) -> bytes: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def get_generation(self) -> int: ...
    def set_config_cb(self, call: Call) -> None: ...
    def get_iova_range(self) -> IovaRange: ...
    def suspend(self) -> None: ...
    def resume(self) -> None: ...

    # --- DMA operations ---
    def set_map(self, table: RegionTable, ring_space: RingAddressSpace) -> None:
        """Replace guest memory whole (SET_MEM_TABLE, or an IOTLB batch)."""


OPTIONAL_OPS = frozenset({"suspend", "resume", "set_config_cb", "get_vq_num_min"})


def supports(ops: object, name: str) -> bool:
    return callable(getattr(ops, name, None))
