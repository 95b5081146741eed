"""The DeviceOps contract as a test suite any implementation can be held to (as trio's check_*_stream).

``check_device_ops(make)`` runs every check against fresh objects from ``make``, a zero-argument
callable returning a context manager that yields a DeviceOps (and tears everything down on exit):
a device model, or a client in front of a server in front of a device. Each check is also callable
alone, through ``CHECKS``, so a test can parametrize over them and name the one that fails.

What is checked is what vdpasim/ops.py and the virtio spec promise a driver, nothing device-specific:

* identity: device id, queue count and maximum size, config size, a modern feature set, IOVA range;
* the status machine (VIRTIO 1.2 §2.1, §3.1.1): bits only added, in order, cleared only by a write
  of 0; FEATURES_OK kept only for an acceptable feature set and read back missing otherwise;
  driver features frozen after FEATURES_OK;
* config space: reads inside it agree with one whole read, reads past it are refused, the generation
  stays put while nothing changes;
* rings: size, addresses, base (read back unchanged, also from a running ring), kick and call
  eventfds, readiness, DRIVER_OK; sizes the device cannot take are refused;
* queue indexes the device does not have are refused with ENOBUFS, for every per-queue operation;
* reset: status 0, rings not ready, driver features forgotten, and a new bring-up works;
* optional operations (suspend/resume), only when ``ops.supports`` says they are there.

Refusals must be ``PeerError`` (the class every door turns into its wire's error), never another
exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from ..errors import PeerError
from ..ops import DeviceOps, supports
from ..rings.state import SplitState
from ..virtio import constants as c
from .driver import DriverQueue, GuestMemory

__all__ = [
    "Maker",
    "CHECKS",
    "check_device_ops",
    "check_identity",
    "check_status_machine",
    "check_feature_negotiation",
    "check_config_space",
    "check_ring_setup",
    "check_bad_queue_indexes",
    "check_reset",
    "check_suspend_resume",
]

Maker = Callable[[], AbstractContextManager[DeviceOps]]

ACK = c.VIRTIO_CONFIG_S_ACKNOWLEDGE
DRIVER = c.VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = c.VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = c.VIRTIO_CONFIG_S_DRIVER_OK
_TRANSPORT_RESERVED = {30}  # vhost-user's VHOST_USER_F_PROTOCOL_FEATURES: not a driver's to ask for


def _fail(message: str) -> None:
    raise AssertionError(message)


@contextlib.contextmanager
def _refused(what: str, errno_wanted: int | None = None) -> Iterator[None]:
    """The block must raise PeerError (with ``errno_wanted`` if given), nothing else."""
    try:
        yield
    except PeerError as exc:
        if errno_wanted is not None and exc.errno != errno_wanted:
            _fail(f"{what}: refused with errno {exc.errno}, expected {errno_wanted} ({exc})")
        return
    _fail(f"{what}: accepted, but the device must refuse it")


def _usable_features(ops: DeviceOps) -> int:
    """The offered features a plain split-ring driver accepts."""
    return ops.get_device_features() & ~(1 << c.VIRTIO_F_RING_PACKED)


def _negotiate(ops: DeviceOps, features: int) -> int:
    ops.set_status(0)
    ops.set_status(ACK)
    ops.set_status(ACK | DRIVER)
    ops.set_driver_features(features)
    ops.set_status(ACK | DRIVER | FEATURES_OK)
    return ops.get_status()


def _queue_size(ops: DeviceOps) -> int:
    size = 1
    while size * 2 <= min(64, ops.get_vq_num_max()):
        size *= 2
    return size


class _Rings:
    """Rings for every queue in guest memory, with kick and call eventfds; closes what it made."""

    def __init__(self, ops: DeviceOps, memory: GuestMemory) -> None:
        self.ops = ops
        self.memory = memory
        self.size = _queue_size(ops)
        self.fds: list[int] = []
        self.queues: dict[int, DriverQueue] = {}

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def bring_up(self, *, base: int = 0) -> None:
        """The driver's side of §3.1.1 steps 7-8 for every queue, then DRIVER_OK."""
        ops = self.ops
        status = _negotiate(ops, _usable_features(ops))
        if not status & FEATURES_OK:
            _fail(f"the device refused the features it offered, without the packed layout (status {status:#x})")
        ops.set_map(self.memory.table)
        for idx in range(ops.get_vq_count()):
            # The rings as a driver that had been running up to ``base`` would have left them.
            dq = self.queues[idx] = DriverQueue(self.memory, self.size, start=base)
            ops.set_vq_num(idx, self.size)
            ops.set_vq_address(idx, dq.desc_addr, dq.driver_addr, dq.device_addr)
            ops.set_vq_state(idx, SplitState(base))
            ops.set_vq_kick(idx, self.eventfd())
            ops.set_vq_call(idx, self.eventfd())
            ops.set_vq_ready(idx, True)
        ops.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@contextlib.contextmanager
def _rings(make: Maker) -> Iterator[tuple[DeviceOps, _Rings]]:
    # The memory and eventfds outlive the device (made first, closed last): a device may touch them
    # until it is closed.
    with GuestMemory(1 << 20) as memory:
        rings: _Rings | None = None
        try:
            with make() as ops:
                rings = _Rings(ops, memory)
                yield ops, rings
        finally:
            if rings is not None:
                rings.close()


# ----- the checks -----
def check_identity(make: Maker) -> None:
    with make() as ops:
        if ops.get_device_id() <= 0:
            _fail(f"device id {ops.get_device_id()}: 0 is reserved for 'no device'")
        if not isinstance(ops.get_vendor_id(), int):
            _fail("vendor id is not an integer")
        if ops.get_vq_count() < 1:
            _fail(f"{ops.get_vq_count()} virtqueues")
        if not 1 <= ops.get_vq_num_max() <= c.VIRTQ_MAX_SIZE:
            _fail(f"maximum queue size {ops.get_vq_num_max()}")
        if not ops.get_device_features() >> c.VIRTIO_F_VERSION_1 & 1:
            _fail("the device does not offer VIRTIO_F_VERSION_1 (every vDPA device is modern)")
        if ops.get_config_size() < 0:
            _fail(f"config size {ops.get_config_size()}")
        iova = ops.get_iova_range()
        if not 0 <= iova.first <= iova.last < 1 << 64:
            _fail(f"IOVA range {iova}")
        if ops.get_status() != 0:
            _fail(f"a new device has status {ops.get_status():#x}, not 0")


def check_status_machine(make: Maker) -> None:
    with make() as ops:
        ops.set_status(0)
        with _refused("DRIVER before ACKNOWLEDGE"):
            ops.set_status(DRIVER)
        ops.set_status(ACK)
        if ops.get_status() != ACK:
            _fail(f"status {ops.get_status():#x} after ACKNOWLEDGE")
        ops.set_status(ACK | DRIVER)
        with _refused("clearing DRIVER by a write other than 0"):
            ops.set_status(ACK)
        with _refused("DRIVER_OK before FEATURES_OK"):
            ops.set_status(ACK | DRIVER | DRIVER_OK)
        if ops.get_status() != ACK | DRIVER:
            _fail(f"refused writes changed the status to {ops.get_status():#x}")
        ops.set_status(0)
        if ops.get_status() != 0:
            _fail(f"status {ops.get_status():#x} after a write of 0")


def check_feature_negotiation(make: Maker) -> None:
    with make() as ops:
        offered = ops.get_device_features()
        wanted = _usable_features(ops)
        if not _negotiate(ops, wanted) & FEATURES_OK:
            _fail(f"FEATURES_OK refused for offered features {wanted:#x}")
        if ops.get_driver_features() != wanted:
            _fail(f"driver features read back {ops.get_driver_features():#x}, set {wanted:#x}")
        with _refused("changing driver features after FEATURES_OK"):
            ops.set_driver_features(wanted & ~(1 << c.VIRTIO_RING_F_EVENT_IDX))
        if not ops.get_status() & FEATURES_OK:
            _fail("the refused feature change cleared FEATURES_OK")
        # Step 6 of §3.1.1: an unacceptable set is refused by FEATURES_OK missing when read back.
        legacy = wanted & ~(1 << c.VIRTIO_F_VERSION_1)
        if _negotiate(ops, legacy) & FEATURES_OK:
            _fail("FEATURES_OK kept for features without VIRTIO_F_VERSION_1")
        stray = next(bit for bit in range(64) if not offered >> bit & 1 and bit not in _TRANSPORT_RESERVED)
        if _negotiate(ops, wanted | 1 << stray) & FEATURES_OK:
            _fail(f"FEATURES_OK kept for feature bit {stray}, which the device did not offer")
        if not _negotiate(ops, wanted) & FEATURES_OK:
            _fail("FEATURES_OK refused after a reset, for features accepted before")


def check_config_space(make: Maker) -> None:
    with make() as ops:
        size = ops.get_config_size()
        generation = ops.get_generation()
        whole = ops.get_config(0, size)
        if len(whole) != size:
            _fail(f"a whole config read returned {len(whole)} bytes of {size}")
        for offset, length in ((0, 1), (0, min(size, 6)), (size // 2, size - size // 2), (size - 1, 1), (size, 0)):
            if size == 0 and length:
                continue
            got = ops.get_config(offset, length)
            if got != whole[offset : offset + length]:
                _fail(f"config read {offset}+{length} = {got.hex()}, the whole read says {whole.hex()}")
        with _refused("a config read past the end"):
            ops.get_config(max(size - 1, 0), 2)
        with _refused("a config read starting past the end"):
            ops.get_config(size + 4, 1)
        if ops.get_config(0, size) != whole or ops.get_generation() != generation:
            _fail("the config space or its generation changed while nothing happened")


def check_ring_setup(make: Maker) -> None:
    with _rings(make) as (ops, rings):
        rings.bring_up(base=7)
        status = ops.get_status()
        if status & (DRIVER_OK | c.VIRTIO_CONFIG_S_NEEDS_RESET) != DRIVER_OK:
            _fail(f"status {status:#x} after DRIVER_OK")
        for idx in range(ops.get_vq_count()):
            if not ops.get_vq_ready(idx):
                _fail(f"vq {idx} not ready after set_vq_ready(True)")
            # Reading the base of a running ring returns it and leaves the ring running.
            if ops.get_vq_state(idx) != SplitState(7):
                _fail(f"vq {idx}: base read back as {ops.get_vq_state(idx)}, set 7")
            if not ops.get_vq_ready(idx):
                _fail(f"vq {idx}: reading its base made it not ready")
        with _refused("a queue size above the maximum"):
            ops.set_vq_num(0, ops.get_vq_num_max() * 2)
        if ops.get_vq_num_max() >= 4:
            with _refused("a split queue size that is not a power of two"):
                ops.set_vq_num(0, 3)
        ops.set_vq_ready(0, False)
        if ops.get_vq_ready(0):
            _fail("vq 0 still ready after set_vq_ready(False)")
        if ops.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET:
            _fail(f"the device needs a reset after a plain bring-up (status {ops.get_status():#x})")


def check_bad_queue_indexes(make: Maker) -> None:
    with _rings(make) as (ops, rings):
        count = ops.get_vq_count()
        fd = rings.eventfd()
        for idx in (count, count + 1, -1):
            what = f"virtqueue {idx} of {count}"
            with _refused(f"set_vq_num on {what}", errno.ENOBUFS):
                ops.set_vq_num(idx, 64)
            with _refused(f"set_vq_address on {what}", errno.ENOBUFS):
                ops.set_vq_address(idx, 0x1000, 0x2000, 0x3000)
            with _refused(f"set_vq_state on {what}", errno.ENOBUFS):
                ops.set_vq_state(idx, SplitState(0))
            with _refused(f"get_vq_state on {what}", errno.ENOBUFS):
                ops.get_vq_state(idx)
            with _refused(f"set_vq_ready on {what}", errno.ENOBUFS):
                ops.set_vq_ready(idx, True)
            with _refused(f"get_vq_ready on {what}", errno.ENOBUFS):
                ops.get_vq_ready(idx)
            with _refused(f"set_vq_kick on {what}", errno.ENOBUFS):
                ops.set_vq_kick(idx, fd)
            with _refused(f"set_vq_call on {what}", errno.ENOBUFS):
                ops.set_vq_call(idx, fd)
        if ops.get_status() != 0:
            _fail(f"refused requests changed the status to {ops.get_status():#x}")


def check_reset(make: Maker) -> None:
    with _rings(make) as (ops, rings):
        rings.bring_up()
        ops.reset()
        if ops.get_status() != 0:
            _fail(f"status {ops.get_status():#x} after reset")
        if ops.get_driver_features() != 0:
            _fail(f"driver features {ops.get_driver_features():#x} survived the reset")
        for idx in range(ops.get_vq_count()):
            if ops.get_vq_ready(idx):
                _fail(f"vq {idx} still ready after reset")
        rings.bring_up(base=3)  # a second bring-up on the same device works as the first
        if ops.get_status() & (DRIVER_OK | c.VIRTIO_CONFIG_S_NEEDS_RESET) != DRIVER_OK:
            _fail(f"status {ops.get_status():#x} after a bring-up following a reset")
        if ops.get_vq_state(0) != SplitState(3):
            _fail(f"vq 0 base {ops.get_vq_state(0)} after the second bring-up, set 3")
        ops.set_status(0)
        if ops.get_status() != 0:
            _fail(f"status {ops.get_status():#x} after a write of 0")


def check_suspend_resume(make: Maker) -> None:
    with _rings(make) as (ops, rings):
        if not (supports(ops, "suspend") and supports(ops, "resume")):
            return  # optional: a consumer probes and falls back
        rings.bring_up(base=5)
        ops.suspend()
        ops.suspend()  # idempotent, as VHOST_VDPA_SUSPEND
        if ops.get_vq_state(0) != SplitState(5):
            _fail(f"vq 0 base {ops.get_vq_state(0)} while suspended, set 5")
        ops.resume()
        ops.resume()
        if ops.get_status() & (DRIVER_OK | c.VIRTIO_CONFIG_S_NEEDS_RESET) != DRIVER_OK:
            _fail(f"status {ops.get_status():#x} after suspend and resume")


CHECKS: dict[str, Callable[[Maker], None]] = {
    "identity": check_identity,
    "status_machine": check_status_machine,
    "feature_negotiation": check_feature_negotiation,
    "config_space": check_config_space,
    "ring_setup": check_ring_setup,
    "bad_queue_indexes": check_bad_queue_indexes,
    "reset": check_reset,
    "suspend_resume": check_suspend_resume,
}


def check_device_ops(make: Maker) -> None:
    """Run every check of the DeviceOps contract against fresh objects from ``make``."""
    for check in CHECKS.values():
        check(make)
