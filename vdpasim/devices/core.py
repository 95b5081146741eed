"""``SimDevice``: the vDPA device operations implemented once, for every simulated device type.

Device types (net.py, blk.py) add only what is theirs: features, config space, queue count and the
queue handler that runs their compiled kernel. Everything the spec says about the device life cycle
lives here, so every door (vhost-user, vhost-vdpa, VDUSE) gets the same behaviour:

* status: only additions or a write of 0 (reset); FEATURES_OK is kept only when the driver's
  features pass ``check_driver_features``; DRIVER_OK starts the data path; a guest that breaks the
  virtqueue contract sets NEEDS_RESET (the device stops and says why, other devices carry on);
* features: the driver's are proposed until FEATURES_OK is accepted, and frozen after;
* config: reads of any range inside the config space, a generation counter bumped on every change,
  and the config-change callback;
* queues: size, addresses, state and readiness; ring areas are translated when the queue starts;
* what a front-end may ask of a running device beyond vDPA (vhost-user's wire needs them): a ready
  queue may be disabled (``set_vq_enabled``: processed without side effects), every write to guest
  memory may be logged in a dirty bitmap (``set_dirty_log``, ``set_vq_log``), and device types that
  support it track inflight requests in a front-end's buffer (``set_vq_inflight``, blk).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from typing import ClassVar

import numpy as np

from ..errors import DeviceFault, DeviceRequestError
from ..memory import RegionTable
from ..ops import Call, IovaRange, RingAddressSpace
from ..rings.state import VqState
from ..runner import DataPath, signal
from ..virtio.constants import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTQ_MAX_SIZE,
)
from ..virtio.features import check_driver_features, feature_names
from ..virtio.status import status_change_error, status_names
from ..virtqueue import Virtqueue
from .inflight import start_tracking

__all__ = ["SimDevice"]

_IOVA_ALL = IovaRange(0, (1 << 63) - 1)


class SimDevice:
    """Base class of the simulated devices; subclasses set ``device_id`` and override the hooks below."""

    device_id: ClassVar[int] = 0
    vendor_id: ClassVar[int] = 0
    supports_inflight: ClassVar[bool] = False  # the data path keeps an inflight region up to date

    def __init__(
        self,
        name: str,
        *,
        features: int,
        num_queues: int,
        max_queue_size: int = VIRTQ_MAX_SIZE,
        busy_poll: bool = False,
    ) -> None:
        self.name = name
        self.log = logging.getLogger(f"vdpasim.device.{name}")
        self.device_features = features
        self.max_queue_size = max_queue_size
        self.vqs = [Virtqueue(i, max_queue_size) for i in range(num_queues)]
        self.memory: RegionTable | None = None
        self.ring_space = RingAddressSpace.GUEST
        self.fault: DeviceFault | None = None
        self._status = 0
        self._driver_features = 0
        self._generation = 0
        self._config_call: Call = None
        self._calls: list[Call] = [None] * num_queues
        self._kicks: list[int | None] = [None] * num_queues
        self._own_kicks: dict[int, int] = {}  # eventfds we made for kick_vq when none was given
        self._own_kicks_lock = threading.Lock()
        self._lock = threading.RLock()
        self._suspended = False
        self._dirty_log: np.ndarray | None = None
        self._log_call: Call = None
        self.datapath = DataPath(self, busy_poll=busy_poll)

    # ----- hooks for device types -----
    def config_space(self) -> bytes:
        """The whole config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        raise DeviceRequestError(f"{self.name}: config space is read-only", errno=errno.EPERM)

    def on_features(self, features: int) -> None:
        """FEATURES_OK accepted ``features``."""

    def on_reset(self) -> None:
        """The device was reset: clear device-type state (filters, counters stay)."""

    def process(self, idx: int) -> bool:
        """Run the kernel for queue ``idx`` (data-path thread). True if work may remain."""
        return False

    # ----- virtqueue operations -----
    def _vq(self, idx: int) -> Virtqueue:
        if not 0 <= idx < len(self.vqs):
            raise DeviceRequestError(
                f"{self.name}: no virtqueue {idx} (the device has {len(self.vqs)})", errno=errno.ENOBUFS
            )
        return self.vqs[idx]

    def set_vq_num(self, idx: int, num: int) -> None:
        with self._lock, self.datapath.paused():
            vq = self._vq(idx)
            vq.set_num(num)
            self._restart_queue(vq)  # the ring areas were checked for the old size

    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None:
        with self._lock, self.datapath.paused():
            vq = self._vq(idx)
            vq.set_address(desc, driver, device)
            if vq.ready and self.driver_ok:
                self._start_queue(vq)

    def set_vq_state(self, idx: int, state: VqState) -> None:
        with self._lock, self.datapath.paused():
            vq = self._vq(idx)
            vq.set_state(state)
            self._restart_queue(vq)  # positions are checked against the ring when it is attached

    def get_vq_state(self, idx: int) -> VqState:
        with self._lock, self.datapath.paused():
            return self._vq(idx).get_state()

    def set_vq_ready(self, idx: int, ready: bool) -> None:
        with self._lock, self.datapath.paused():
            vq = self._vq(idx)
            vq.ready = ready
            if ready and self.driver_ok:
                self._start_queue(vq)
            elif not ready:
                vq.detach()

    def get_vq_ready(self, idx: int) -> bool:
        return self._vq(idx).ready

    def set_vq_enabled(self, idx: int, enabled: bool) -> None:
        """Gate a queue: a ready but disabled queue is processed without side effects (the device type
        says what that means). Queues no one gates are served whenever they are ready."""
        with self._lock, self.datapath.paused():
            self._vq(idx).enabled = enabled

    def get_vq_enabled(self, idx: int) -> bool | None:
        return self._vq(idx).enabled

    def set_vq_log(self, idx: int, addr: int | None) -> None:
        """Log this queue's ring writes too, its device area at guest address ``addr`` (None: buffers only)."""
        with self._lock, self.datapath.paused():
            self._vq(idx).set_log_used(addr)

    def set_vq_inflight(self, idx: int, region: np.ndarray | None, desc_num: int = 0) -> None:
        """Track this queue's inflight requests in ``region`` (``desc_num`` entries), set up or recovered
        when the queue starts; None stops tracking."""
        if region is not None and not self.supports_inflight:
            raise DeviceRequestError(f"{self.name}: no inflight tracking for this device type", errno=errno.EOPNOTSUPP)
        with self._lock, self.datapath.paused():
            vq = self._vq(idx)
            vq.set_inflight(region, desc_num)
            if vq.attached:
                start_tracking(vq, self.log)

    def set_vq_kick(self, idx: int, fd: int | None) -> None:
        with self._lock, self.datapath.paused():
            self._vq(idx)
            self._kicks[idx] = fd

    def kick_vq(self, idx: int) -> None:
        self._vq(idx).record["kicks"] += 1
        fd = self._kicks[idx]
        if fd is None:
            fd = self._own_kick(idx)
        os.eventfd_write(fd, 1)

    def set_vq_call(self, idx: int, call: Call) -> None:
        self._vq(idx)
        self._calls[idx] = call

    def get_vq_num_max(self) -> int:
        return self.max_queue_size

    def get_vq_num_min(self) -> int:
        return 1

    def get_vq_count(self) -> int:
        return len(self.vqs)

    # ----- device operations -----
    def get_device_id(self) -> int:
        return self.device_id

    def get_vendor_id(self) -> int:
        return self.vendor_id

    def get_device_features(self) -> int:
        return self.device_features

    def set_driver_features(self, features: int) -> None:
        with self._lock:
            if self._status & VIRTIO_CONFIG_S_FEATURES_OK:
                raise DeviceRequestError(f"{self.name}: driver features are frozen once FEATURES_OK is set")
            self._driver_features = features

    def get_driver_features(self) -> int:
        return self._driver_features

    @property
    def driver_ok(self) -> bool:
        return bool(self._status & VIRTIO_CONFIG_S_DRIVER_OK) and not self._status & VIRTIO_CONFIG_S_NEEDS_RESET

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        with self._lock:
            if status == 0:
                self.reset()
                return
            reason = status_change_error(self._status, status)
            if reason:
                raise DeviceRequestError(f"{self.name}: {reason}")
            old = self._status
            status = status & ~VIRTIO_CONFIG_S_NEEDS_RESET | old & VIRTIO_CONFIG_S_NEEDS_RESET
            added = status & ~old
            if added & VIRTIO_CONFIG_S_FEATURES_OK:
                refusal = check_driver_features(self._driver_features, self.device_features, self.device_id)
                if refusal:
                    # The driver reads the status back and sees FEATURES_OK missing (§3.1.1 step 6).
                    self.log.warning("refusing driver features: %s", refusal)
                    status &= ~VIRTIO_CONFIG_S_FEATURES_OK
                    added &= ~(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
                    status &= ~VIRTIO_CONFIG_S_DRIVER_OK
                else:
                    for vq in self.vqs:
                        vq.negotiate(self._driver_features)
                    self.on_features(self._driver_features)
                    self.log.info("features %s", ", ".join(feature_names(self._driver_features, self.device_id)))
            self._status = status
            if added & VIRTIO_CONFIG_S_DRIVER_OK:
                self._start()
            if added & VIRTIO_CONFIG_S_FAILED:
                self.log.warning("driver gave up on the device (FAILED)")
                self.datapath.stop()
            self.log.debug("status %s", status_names(self._status))

    def reset(self) -> None:
        with self._lock:
            self.datapath.stop()
            for vq in self.vqs:
                vq.reset()
            self._status = 0
            self._driver_features = 0
            self._calls = [None] * len(self.vqs)
            self._kicks = [None] * len(self.vqs)
            self._dirty_log = None
            self._log_call = None
            self.fault = None
            if self._suspended:  # a reset device runs again once started (vdpa_sim's reset does the same)
                self._suspended = False
                self.datapath.resume()
            self.on_reset()

    def get_config_size(self) -> int:
        return len(self.config_space())

    def get_config(self, offset: int, length: int) -> bytes:
        config = self.config_space()
        if offset < 0 or length < 0 or offset + length > len(config):
            raise DeviceRequestError(
                f"{self.name}: config read {offset}+{length} is outside the {len(config)}-byte config space"
            )
        return config[offset : offset + length]

    def set_config(self, offset: int, data: bytes) -> None:
        with self._lock:
            size = self.get_config_size()
            if offset < 0 or offset + len(data) > size:
                raise DeviceRequestError(
                    f"{self.name}: config write {offset}+{len(data)} is outside the {size}-byte config space"
                )
            self.write_config(offset, data)

    def get_generation(self) -> int:
        return self._generation

    def config_changed(self) -> None:
        """A config field changed: bump the generation and tell the driver."""
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        signal(self._config_call)

    def set_config_cb(self, call: Call) -> None:
        self._config_call = call

    def get_iova_range(self) -> IovaRange:
        return _IOVA_ALL

    def set_dirty_log(self, bitmap: np.ndarray | None, call: Call = None) -> None:
        """Log every write to guest memory in ``bitmap`` (1 bit per 4 KiB guest page, jit/log.py), or stop
        (None). ``call`` is signalled when logged writes were handed to the driver."""
        with self._lock, self.datapath.paused():
            self._dirty_log = bitmap
            self._log_call = call if bitmap is not None else None
            for vq in self.vqs:
                vq.set_log(bitmap)

    @property
    def logging(self) -> bool:
        return self._dirty_log is not None

    def suspend(self) -> None:
        # Idempotent, as vhost-vdpa's SUSPEND: one pause however many times it is asked.
        with self._lock:
            if not self._suspended:
                self._suspended = True
                self.datapath.pause()

    def resume(self) -> None:
        with self._lock:
            if self._suspended:
                self._suspended = False
                self.datapath.resume()

    @property
    def suspended(self) -> bool:
        return self._suspended

    # ----- DMA operations -----
    def set_map(self, table: RegionTable, ring_space: RingAddressSpace = RingAddressSpace.GUEST) -> None:
        with self._lock, self.datapath.paused():
            self.memory = table
            self.ring_space = ring_space
            for vq in self.vqs:
                vq.detach()
                if vq.ready and self.driver_ok:
                    self._start_queue(vq)

    # ----- data path plumbing -----
    def active_queues(self) -> list[tuple[int, int]]:
        # No device lock here: this runs on the data-path thread, and the control plane holds that lock
        # while it waits for the thread to park (it only changes queues once the thread is parked).
        if not self.driver_ok:
            return []
        kicks = self._kicks
        return [
            (vq.index, self._own_kick(vq.index) if kicks[vq.index] is None else kicks[vq.index])
            for vq in self.vqs
            if vq.attached
        ]

    def _own_kick(self, idx: int) -> int:
        with self._own_kicks_lock:
            if idx not in self._own_kicks:
                self._own_kicks[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            return self._own_kicks[idx]

    def _start(self) -> None:
        for vq in self.vqs:
            if vq.ready:
                self._start_queue(vq)
        if self.driver_ok:
            self.datapath.start()

    def _restart_queue(self, vq: Virtqueue) -> None:
        """A running queue's geometry changed: check it again, as at its start."""
        if vq.attached:
            vq.detach()
            if vq.ready and self.driver_ok:
                self._start_queue(vq)

    def _start_queue(self, vq: Virtqueue) -> None:
        if self.memory is None:
            return  # vhost-vdpa sends ring addresses before the IOTLB: start when memory arrives
        try:
            vq.attach(self.memory, self.ring_space)
        except DeviceFault as fault:
            self.needs_reset(fault)
        else:
            if vq.inflight is not None and not vq.inflight_started:
                start_tracking(vq, self.log)
            elif vq.record["inflight"] and vq.size > vq.inflight_desc_num:
                self.log.warning("vq %d: resized beyond its inflight region: no longer tracked", vq.index)
                vq.record["inflight"] = 0
        self.datapath.wake()

    def notify(self, idx: int) -> None:
        """Signal the driver that queue ``idx`` has used buffers."""
        self.vqs[idx].record["notifications"] += 1
        signal(self._calls[idx])
        if self._log_call is not None:
            signal(self._log_call)  # logged writes reached the driver: the log changed

    def needs_reset(self, fault: DeviceFault) -> None:
        """The driver broke the contract: stop serving, set NEEDS_RESET, say why (§2.1.2)."""
        if self.fault is None:
            self.fault = fault
            self.log.error("device needs reset: %s", fault)
        self._status |= VIRTIO_CONFIG_S_NEEDS_RESET
        for vq in self.vqs:
            vq.attached = False
        self.config_changed()
        self.datapath.wake()  # the thread re-reads its (now empty) queue set

    def datapath_crashed(self, error: BaseException) -> None:
        """The data-path thread died of ``error`` (a bug, or the test fault hook): this device alone stops,
        goes NEEDS_RESET and says why; other devices have threads of their own and carry on. A reset (the
        driver's, or a front-end that leaves or reconnects) clears it and the next DRIVER_OK starts a new
        thread."""
        self.needs_reset(DeviceFault(f"data-path thread crashed: {error!r}"))

    def check_queue(self, vq: Virtqueue) -> None:
        """After a kernel call: turn a recorded ring fault into NEEDS_RESET."""
        fault = vq.fault()
        if fault is not None:
            self.needs_reset(fault)

    def stats(self) -> list[dict[str, int]]:
        return [vq.counters() for vq in self.vqs]

    def close(self) -> None:
        self.reset()
        self.datapath.close()
        for fd in self._own_kicks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own_kicks.clear()
