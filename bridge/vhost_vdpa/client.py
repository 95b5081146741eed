"""A vhost-vdpa user that speaks the vDPA device operations: ``VhostVdpaClient(path_or_fd)`` is a DeviceOps.

It opens (or takes) a /dev/vhost-vdpa-N fd -- the kernel's, or one served by ``VhostVdpaServer`` under the
bypass supervisor -- and turns every operation of vdpasim/ops.py into the ioctls and IOTLB writes QEMU would
make. So a vhost-user back-end (``VhostUserServer``) can be stacked on it: the reverse bridge, a vhost-user
socket in front of a real vDPA device.

At open it reads the backend features, acks IOTLB_MSG_V2, IOTLB_BATCH, SUSPEND, RESUME and
ENABLE_AFTER_DRIVER_OK where offered, and becomes the owner (SET_OWNER). Then:

* status, features, config, queue size/base/enable, device id, IOVA range: the matching ioctl, the
  kernel's errno raised as ``DeviceRequestError``. A status of 0 resets. There is no vhost-vdpa request for
  the vendor id or the config generation: both read 0.
* kicks and calls are eventfds: an fd number given to ``set_vq_kick``/``set_vq_call`` is passed as is;
  ``set_vq_kick(idx, None)`` installs our own eventfd, which ``kick_vq`` writes; a callable call target gets
  our own eventfd and a notifier thread that calls it (the config callback likewise).
* ``set_map(table, ring_space)`` is one IOTLB batch (when IOTLB_BATCH was acked): INVALIDATE of every range
  sent before, then one UPDATE per region with iova = guest address, uaddr = the region's address in this
  process (``Region.host_addr``: the kernel, or the supervisor's ``map_file``, finds the shared file behind
  it), perm RW or RO; v2 framing when IOTLB_MSG_V2 was acked.
* ring addresses: with ``RingAddressSpace.GUEST`` they are IOVAs already. With ``RingAddressSpace.USER`` (a
  vhost-user back-end session hands the front-end's addresses) they are translated through the table
  (``Region.user_addr`` -> ``guest_addr``) before SET_VRING_ADDR. Addresses given before any table are kept
  and sent once a table arrives; a new table re-sends addresses whose translation changed.
* ``suspend``/``resume`` exist on the instance only when the backend features offer them
  (``vdpasim.ops.supports`` sees them absent otherwise).

Errors: an ioctl or write the device refuses raises ``DeviceRequestError`` with its errno; ring addresses
outside every region raise it with EFAULT. One request at a time, under a lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from bridge.vhost_user.client import _Notifier
from vdpasim.errors import DeviceRequestError, PeerError
from vdpasim.memory import RegionTable
from vdpasim.ops import Call, IovaRange, RingAddressSpace
from vdpasim.rings.state import PackedState, SplitState, VqState
from vdpasim.virtio.constants import VIRTIO_F_RING_PACKED

from . import abi as a
from .iotlb import IotlbMessage, encode

__all__ = ["VhostVdpaClient", "Transport", "FdTransport", "WANTED_BACKEND_FEATURES"]

log = logging.getLogger("vdpasim.vhost_vdpa.client")

WANTED_BACKEND_FEATURES = sum(
    1 << bit
    for bit in (
        a.VHOST_BACKEND_F_IOTLB_MSG_V2,
        a.VHOST_BACKEND_F_IOTLB_BATCH,
        a.VHOST_BACKEND_F_SUSPEND,
        a.VHOST_BACKEND_F_RESUME,
        a.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    )
)
_U8, _U16, _U32, _I32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<i", "<Q"))


class Transport(Protocol):
    """How requests reach the device: a real fd (``FdTransport``) or, in tests, a server in this process."""

    def ioctl(self, request: int, buffer: bytearray | None) -> None:
        """Make the ioctl with ``buffer`` as its argument (updated in place); raise OSError with the errno."""

    def write(self, data: bytes) -> int: ...

    def close(self) -> None: ...


class FdTransport:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ioctl(self, request: int, buffer: bytearray | None) -> None:
        if buffer is None:
            fcntl.ioctl(self.fd, request, 0)
        else:
            fcntl.ioctl(self.fd, request, buffer, True)

    def write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@dataclass
class _Ring:
    ready: bool = False
    own_kick: int | None = None
    own_call: int | None = None
    address: tuple[int, int, int] | None = None  # as given (ring space of the caller)
    sent: tuple[int, int, int] | None = None  # as last sent (IOVAs)


class VhostVdpaClient:
    """A DeviceOps over a vhost-vdpa fd; see the module docstring."""

    def __init__(self, path_or_fd: str | int | None = None, *, transport: Transport | None = None) -> None:
        if transport is None:
            if path_or_fd is None:
                raise ValueError("a path, an fd or a transport")
            fd = os.open(path_or_fd, os.O_RDWR | os.O_CLOEXEC) if isinstance(path_or_fd, str) else path_or_fd
            transport = FdTransport(fd)
        self.name = str(path_or_fd) if path_or_fd is not None else "vhost-vdpa"
        self._io = transport
        self._lock = threading.RLock()
        self._notifier: _Notifier | None = None
        self._config_own: int | None = None
        self._table: RegionTable | None = None
        self._ring_space: RingAddressSpace | None = None  # known once a table arrives
        self._mapped: list[tuple[int, int]] = []  # (iova, size) sent in UPDATEs
        self._driver_features = 0
        try:
            self.offered_backend_features = self._get(a.VHOST_GET_BACKEND_FEATURES, _U64)
            self.backend_features = self.offered_backend_features & WANTED_BACKEND_FEATURES
            self._put(a.VHOST_SET_BACKEND_FEATURES, _U64, self.backend_features)
            self._request(a.VHOST_SET_OWNER, None)
            self._nvqs = self._get(a.VHOST_VDPA_GET_VQS_COUNT, _U32)
        except BaseException:
            transport.close()
            raise
        self._rings = [_Ring() for _ in range(self._nvqs)]
        # Optional operations exist only when the device offers them (vdpasim.ops.supports).
        if self._has(a.VHOST_BACKEND_F_SUSPEND):
            self.suspend = self._suspend
        if self._has(a.VHOST_BACKEND_F_RESUME):
            self.resume = self._resume

    # ===== plumbing =====
    def _has(self, bit: int) -> bool:
        return bool(self.backend_features >> bit & 1)

    def _request(self, request: int, buffer: bytearray | None) -> None:
        with self._lock:
            try:
                self._io.ioctl(request, buffer)
            except OSError as exc:
                number = exc.errno or errno.EIO
                raise DeviceRequestError(
                    f"{self.name}: {_name(request)} failed: {os.strerror(number)}", errno=number
                ) from exc

    def _get(self, request: int, layout: struct.Struct, *prefix: int) -> int:
        buffer = bytearray(layout.pack(*prefix, *([0] * (len(layout.unpack(bytes(layout.size))) - len(prefix)))))
        self._request(request, buffer)
        return layout.unpack(buffer)[-1]

    def _put(self, request: int, layout: struct.Struct, *values: int) -> None:
        self._request(request, bytearray(layout.pack(*values)))

    def _ring(self, idx: int) -> _Ring:
        if not 0 <= idx < self._nvqs:
            raise DeviceRequestError(
                f"{self.name}: no virtqueue {idx} (the device has {self._nvqs})", errno=errno.ENOBUFS
            )
        return self._rings[idx]

    def _notify(self) -> _Notifier:
        if self._notifier is None:
            self._notifier = _Notifier(self.name)
        return self._notifier

    def _send_iotlb(self, message: IotlbMessage) -> None:
        data = encode(message, self._has(a.VHOST_BACKEND_F_IOTLB_MSG_V2))
        with self._lock:
            try:
                self._io.write(data)
            except OSError as exc:
                number = exc.errno or errno.EIO
                raise DeviceRequestError(
                    f"{self.name}: IOTLB {message.type_name} {message.iova:#x}+{message.size:#x} failed: "
                    f"{os.strerror(number)}",
                    errno=number,
                ) from exc

    def close(self) -> None:
        with self._lock:
            if self._notifier is not None:
                self._notifier.close()
                self._notifier = None
            self._io.close()  # the device resets on release
            for ring in self._rings:
                for fd in (ring.own_kick, ring.own_call):
                    if fd is not None:
                        os.close(fd)
                ring.own_kick = ring.own_call = None
            if self._config_own is not None:
                os.close(self._config_own)
                self._config_own = None

    def __enter__(self) -> VhostVdpaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ===== virtqueue operations =====
    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None:
        with self._lock:
            ring = self._ring(idx)
            ring.address = (desc, driver, device)
            if self._ring_space is not None:
                iovas = self._translate(ring.address)
                if iovas is None:
                    raise DeviceRequestError(
                        f"{self.name}: ring {idx} addresses {desc:#x}/{driver:#x}/{device:#x} are outside guest memory",
                        errno=errno.EFAULT,
                    )
                self._send_address(idx, ring, iovas)

    def _translate(self, address: tuple[int, int, int]) -> tuple[int, int, int] | None:
        if self._ring_space is RingAddressSpace.GUEST:
            return address
        if self._table is None or self._ring_space is None:
            return None
        out = []
        for addr in address:
            hit = self._table.find(addr, 1, user=True)
            if hit is None:
                return None
            region, offset = hit
            out.append(region.guest_addr + offset)
        return (out[0], out[1], out[2])

    def _send_address(self, idx: int, ring: _Ring, iovas: tuple[int, int, int]) -> None:
        desc, avail, used = iovas
        self._request(a.VHOST_SET_VRING_ADDR, bytearray(a.VHOST_VRING_ADDR.pack(idx, 0, desc, used, avail, 0)))
        ring.sent = iovas

    def set_vq_num(self, idx: int, num: int) -> None:
        self._ring(idx)
        self._put(a.VHOST_SET_VRING_NUM, a.VHOST_VRING_STATE, idx, num)

    def kick_vq(self, idx: int) -> None:
        with self._lock:
            ring = self._ring(idx)
            if ring.own_kick is None:
                self.set_vq_kick(idx, None)
            assert ring.own_kick is not None
            os.eventfd_write(ring.own_kick, 1)

    def set_vq_kick(self, idx: int, fd: int | None) -> None:
        with self._lock:
            ring = self._ring(idx)
            if fd is None:
                if ring.own_kick is None:
                    ring.own_kick = _eventfd()
                fd = ring.own_kick
            self._put(a.VHOST_SET_VRING_KICK, a.VHOST_VRING_FILE, idx, fd)

    def set_vq_call(self, idx: int, call: Call) -> None:
        with self._lock:
            ring = self._ring(idx)
            if callable(call):
                if ring.own_call is None:
                    ring.own_call = _eventfd()
                self._notify().remove(ring.own_call)
                self._notify().add(ring.own_call, call)
                fd = ring.own_call
            else:
                fd = a.VHOST_FILE_UNBIND if call is None else call
            self._put(a.VHOST_SET_VRING_CALL, a.VHOST_VRING_FILE, idx, fd)

    def set_vq_ready(self, idx: int, ready: bool) -> None:
        with self._lock:
            ring = self._ring(idx)
            self._put(a.VHOST_VDPA_SET_VRING_ENABLE, a.VHOST_VRING_STATE, idx, int(ready))
            ring.ready = ready

    def get_vq_ready(self, idx: int) -> bool:
        return self._ring(idx).ready  # vhost-vdpa has no request to read it back

    def _packed(self) -> bool:
        return bool(self._driver_features >> VIRTIO_F_RING_PACKED & 1)

    def set_vq_state(self, idx: int, state: VqState) -> None:
        self._ring(idx)
        num = state.encode() if isinstance(state, PackedState) else state.last_avail & 0xFFFF
        self._put(a.VHOST_SET_VRING_BASE, a.VHOST_VRING_STATE, idx, num)

    def get_vq_state(self, idx: int) -> VqState:
        self._ring(idx)
        num = self._get(a.VHOST_GET_VRING_BASE, a.VHOST_VRING_STATE, idx)
        return PackedState.decode(num) if self._packed() else SplitState(num & 0xFFFF)

    def get_vq_num_max(self) -> int:
        return self._get(a.VHOST_VDPA_GET_VRING_NUM, _U16)

    def get_vq_count(self) -> int:
        return self._nvqs

    # ===== device operations =====
    def get_device_id(self) -> int:
        return self._get(a.VHOST_VDPA_GET_DEVICE_ID, _U32)

    def get_vendor_id(self) -> int:
        return 0  # not readable through vhost-vdpa

    def get_device_features(self) -> int:
        return self._get(a.VHOST_GET_FEATURES, _U64)

    def set_driver_features(self, features: int) -> None:
        self._put(a.VHOST_SET_FEATURES, _U64, features)
        self._driver_features = features

    def get_driver_features(self) -> int:
        return self._driver_features

    def get_status(self) -> int:
        return self._get(a.VHOST_VDPA_GET_STATUS, _U8)

    def set_status(self, status: int) -> None:
        self._put(a.VHOST_VDPA_SET_STATUS, _U8, status)
        if status == 0:
            self._forget_rings()

    def reset(self) -> None:
        self.set_status(0)

    def _forget_rings(self) -> None:
        self._driver_features = 0
        for ring in self._rings:
            ring.ready = False
            ring.sent = None
            ring.address = None

    def get_config_size(self) -> int:
        return self._get(a.VHOST_VDPA_GET_CONFIG_SIZE, _U32)

    def get_config(self, offset: int, length: int) -> bytes:
        if not (0 <= offset <= 0xFFFFFFFF and 0 <= length <= 0xFFFFFFFF):
            raise DeviceRequestError(f"{self.name}: config read {offset}+{length}", errno=errno.EINVAL)
        buffer = bytearray(a.VHOST_VDPA_CONFIG.pack(offset, length) + bytes(length))
        self._request(a.VHOST_VDPA_GET_CONFIG, buffer)
        return bytes(buffer[a.VHOST_VDPA_CONFIG.size :])

    def set_config(self, offset: int, data: bytes) -> None:
        if not 0 <= offset <= 0xFFFFFFFF:
            raise DeviceRequestError(f"{self.name}: config write at {offset}", errno=errno.EINVAL)
        self._request(a.VHOST_VDPA_SET_CONFIG, bytearray(a.VHOST_VDPA_CONFIG.pack(offset, len(data)) + data))

    def get_generation(self) -> int:
        return 0  # not readable through vhost-vdpa

    def set_config_cb(self, call: Call) -> None:
        with self._lock:
            if callable(call):
                if self._config_own is None:
                    self._config_own = _eventfd()
                self._notify().remove(self._config_own)
                self._notify().add(self._config_own, call)
                fd = self._config_own
            else:
                fd = a.VHOST_FILE_UNBIND if call is None else call
            self._put(a.VHOST_VDPA_SET_CONFIG_CALL, _I32, fd)

    def get_iova_range(self) -> IovaRange:
        buffer = bytearray(a.VHOST_VDPA_IOVA_RANGE.size)
        self._request(a.VHOST_VDPA_GET_IOVA_RANGE, buffer)
        first, last = a.VHOST_VDPA_IOVA_RANGE.unpack(buffer)
        return IovaRange(first, last)

    def _suspend(self) -> None:
        self._request(a.VHOST_VDPA_SUSPEND, None)

    def _resume(self) -> None:
        self._request(a.VHOST_VDPA_RESUME, None)

    # ===== DMA operations =====
    def set_map(self, table: RegionTable, ring_space: RingAddressSpace = RingAddressSpace.GUEST) -> None:
        with self._lock:
            batch = self._has(a.VHOST_BACKEND_F_IOTLB_BATCH)
            if batch:
                self._send_iotlb(IotlbMessage(a.VHOST_IOTLB_BATCH_BEGIN))
            for iova, size in self._mapped:
                self._send_iotlb(IotlbMessage(a.VHOST_IOTLB_INVALIDATE, iova=iova, size=size))
            self._mapped = []
            for region in table.regions:
                perm = a.VHOST_ACCESS_RW if region.writable else a.VHOST_ACCESS_RO
                message = IotlbMessage(
                    a.VHOST_IOTLB_UPDATE, iova=region.guest_addr, size=region.size, uaddr=region.host_addr, perm=perm
                )
                self._send_iotlb(message)
                self._mapped.append((region.guest_addr, region.size))
            if batch:
                self._send_iotlb(IotlbMessage(a.VHOST_IOTLB_BATCH_END))
            self._table = table
            self._ring_space = ring_space
            for idx, ring in enumerate(self._rings):
                if ring.address is None:
                    continue
                iovas = self._translate(ring.address)
                if iovas is None:
                    log.warning("%s: ring %d addresses are outside the new memory table", self.name, idx)
                elif iovas != ring.sent:
                    try:
                        self._send_address(idx, ring, iovas)
                    except PeerError as exc:
                        log.warning("%s: ring %d addresses not updated: %s", self.name, idx, exc)

    # ===== the rest of vhost-vdpa (requests a DeviceOps does not name) =====
    def get_vq_size(self, idx: int) -> int:
        self._ring(idx)
        return self._get(a.VHOST_VDPA_GET_VRING_SIZE, a.VHOST_VRING_STATE, idx)

    def get_vq_group(self, idx: int) -> int:
        self._ring(idx)
        return self._get(a.VHOST_VDPA_GET_VRING_GROUP, a.VHOST_VRING_STATE, idx)

    def get_group_num(self) -> int:
        return self._get(a.VHOST_VDPA_GET_GROUP_NUM, _U32)

    def get_as_num(self) -> int:
        return self._get(a.VHOST_VDPA_GET_AS_NUM, _U32)

    def set_group_asid(self, group: int, asid: int) -> None:
        self._put(a.VHOST_VDPA_SET_GROUP_ASID, a.VHOST_VRING_STATE, group, asid)

    def get_backend_features(self) -> int:
        """The parent-dependent backend bits the fd offered (for a vhost-user back-end stacked on us)."""
        return self.offered_backend_features


_NAMES = {
    value: name.removeprefix("VHOST_")
    for name, value in vars(a).items()
    if isinstance(value, int) and value >> 8 & 0xFF == a.VHOST_VIRTIO and name.startswith("VHOST_")
}


def _name(request: int) -> str:
    return _NAMES.get(request, f"ioctl {request:#x}")
