"""vhost-user back-end semantics over any DeviceOps: front-end requests in, replies out (no socket here).

``BackendSession.handle(message)`` applies one request to the device and returns the reply to send,
if any. The server (server.py) owns the socket; the session owns the protocol state of one
connection: negotiated (protocol) features, guest memory built from the region fds, and per ring its
kick/call/err fds and the two vhost-user ring states — started (a kick fd starts it, GET_VRING_BASE
stops it) and enabled (SET_VRING_ENABLE; all rings at once when PROTOCOL_FEATURES is not negotiated).
The device serves a queue while it is both started and enabled.

vhost-user has no device status unless the STATUS protocol feature is negotiated, and QEMU's use of
it does not follow the virtio order (it adds FEATURES_OK to a status of 0). So the session drives the
device's status itself, always through the steps the device accepts: SET_FEATURES moves it to
FEATURES_OK; the first started ring (or the front-end's DRIVER_OK) to DRIVER_OK; SET_STATUS(0),
RESET_DEVICE, RESET_OWNER and a closed connection reset it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from vdpasim.errors import DeviceRequestError, PeerError, SessionError, UsageError
from vdpasim.memory import Region, RegionTable
from vdpasim.ops import DeviceOps, RingAddressSpace
from vdpasim.rings.state import PackedState, SplitState
from vdpasim.virtio.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_ID_NET,
)

from .codec import close_fds
from .messages import (
    U64,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigSpace,
    FrontendRequest,
    IovaRange,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)

__all__ = ["BackendSession", "DEFAULT_PROTOCOL_FEATURES", "MAX_MEM_SLOTS", "protocol_features_for"]

F = FrontendRequest
P = ProtocolFeature
MAX_MEM_SLOTS = 32
DEFAULT_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (P.MQ, P.REPLY_ACK, P.CONFIG, P.STATUS, P.BACKEND_REQ, P.RESET_DEVICE, P.CONFIGURE_MEM_SLOTS, P.VDPA)
)


def protocol_features_for(device: DeviceOps) -> int:
    """What to offer for this device: QEMU's vhost-user-net takes no config from a back-end (and warns)."""
    if device.get_device_id() == VIRTIO_ID_NET:
        return DEFAULT_PROTOCOL_FEATURES & ~(1 << P.CONFIG)
    return DEFAULT_PROTOCOL_FEATURES


# Requests legal only once their protocol feature is negotiated (session-level checks).
_NEEDS_PROTOCOL_FEATURE = {
    F.GET_QUEUE_NUM: P.MQ,
    F.GET_CONFIG: P.CONFIG,
    F.SET_CONFIG: P.CONFIG,
    F.SET_BACKEND_REQ_FD: P.BACKEND_REQ,
    F.RESET_DEVICE: P.RESET_DEVICE,
    F.GET_MAX_MEM_SLOTS: P.CONFIGURE_MEM_SLOTS,
    F.ADD_MEM_REG: P.CONFIGURE_MEM_SLOTS,
    F.REM_MEM_REG: P.CONFIGURE_MEM_SLOTS,
    F.SET_STATUS: P.STATUS,
    F.GET_STATUS: P.STATUS,
}
_STATUS_STEPS = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
)


@dataclass
class _Ring:
    started: bool = False
    enabled: bool = False
    kick: int | None = None
    call: int | None = None
    err: int | None = None

    def close(self) -> None:
        close_fds([fd for fd in (self.kick, self.call, self.err) if fd is not None])
        self.kick = self.call = self.err = None


class BackendSession:
    def __init__(
        self,
        device: DeviceOps,
        *,
        protocol_features: int | None = None,
        queue_num: int | None = None,
        name: str = "vhost-user",
    ) -> None:
        self.device = device
        self.offered_protocol_features = (
            protocol_features_for(device) if protocol_features is None else protocol_features
        )
        self.queue_num = device.get_vq_count() if queue_num is None else queue_num
        self.log = logging.getLogger(f"vdpasim.vhost_user.{name}")
        self.protocol_features = 0
        self.acked_features: int | None = None
        self.owner = False
        self.backend_channel: int | None = None  # fd of the back-end request channel
        self.regions: list[tuple[MemoryRegion, Region]] = []
        self.memory: RegionTable | None = None
        self.rings = [_Ring() for _ in range(device.get_vq_count())]
        self.requests = 0
        self._handlers: dict[FrontendRequest, Callable[[Message], Payload | None]] = {
            F.GET_FEATURES: self._get_features,
            F.SET_FEATURES: self._set_features,
            F.SET_OWNER: self._set_owner,
            F.RESET_OWNER: self._reset,
            F.RESET_DEVICE: self._reset,
            F.GET_PROTOCOL_FEATURES: lambda m: U64(self.offered_protocol_features),
            F.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            F.GET_QUEUE_NUM: lambda m: U64(self.queue_num),
            F.GET_MAX_MEM_SLOTS: lambda m: U64(MAX_MEM_SLOTS),
            F.SET_MEM_TABLE: self._set_mem_table,
            F.ADD_MEM_REG: self._add_mem_reg,
            F.REM_MEM_REG: self._rem_mem_reg,
            F.SET_VRING_NUM: self._set_vring_num,
            F.SET_VRING_ADDR: self._set_vring_addr,
            F.SET_VRING_BASE: self._set_vring_base,
            F.GET_VRING_BASE: self._get_vring_base,
            F.SET_VRING_KICK: self._set_vring_kick,
            F.SET_VRING_CALL: self._set_vring_call,
            F.SET_VRING_ERR: self._set_vring_err,
            F.SET_VRING_ENABLE: self._set_vring_enable,
            F.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            F.GET_CONFIG: self._get_config,
            F.SET_CONFIG: self._set_config,
            F.SET_STATUS: self._set_status,
            F.GET_STATUS: lambda m: U64(self.device.get_status()),
            F.VDPA_GET_DEVICE_ID: lambda m: U64(self.device.get_device_id()),
            F.VDPA_GET_VENDOR_ID: lambda m: U64(self.device.get_vendor_id()),
            F.VDPA_GET_VRING_NUM: lambda m: U64(self.device.get_vq_num_max()),
            F.VDPA_GET_CONFIG_SIZE: lambda m: U64(self.device.get_config_size()),
            F.VDPA_GET_IOVA_RANGE: self._get_iova_range,
            F.VDPA_GET_VQS_COUNT: lambda m: U64(self.device.get_vq_count()),
            F.VDPA_SUSPEND: lambda m: self.device.suspend(),
            F.VDPA_RESUME: lambda m: self.device.resume(),
            F.VDPA_GET_GROUP_NUM: lambda m: U64(1),
            F.VDPA_GET_AS_NUM: lambda m: U64(1),
            F.VDPA_GET_VRING_GROUP: self._get_vring_group,
            F.VDPA_SET_GROUP_ASID: self._set_group_asid,
            F.VDPA_SET_CONFIG_CALL: self._set_config_call,
            F.VDPA_GET_VRING_SIZE: self._get_vring_size,
        }

    # ----- entry point -----
    def handle(self, message: Message) -> Message | None:
        """Apply one request. Raises PeerError when it is invalid and no reply can carry the failure."""
        self.requests += 1
        request = message.request
        handler = self._handlers.get(request)  # type: ignore[arg-type]
        ack_wanted = message.need_reply and self._negotiated(P.REPLY_ACK)
        try:
            if message.reply:
                raise SessionError(f"{request.name}: a reply where a request was expected")
            if handler is None:
                raise SessionError(f"{request.name} is not supported", errno=errno.EOPNOTSUPP)
            feature = _NEEDS_PROTOCOL_FEATURE.get(request)  # type: ignore[call-overload]
            is_extension = request >= F.VDPA_GET_DEVICE_ID
            if is_extension:
                feature = P.VDPA
            if feature is not None and not self._negotiated(feature):
                raise SessionError(f"{request.name} without protocol feature {feature.name}")
            payload = handler(message)
        except PeerError as exc:
            close_fds(message.fds)
            self.log.warning("%s refused: %s", request.name, exc)
            if ack_wanted:
                return Message(request, U64(exc.errno or 1), reply=True)
            if request in (F.GET_CONFIG,):
                # The spec's failure reply for GET_CONFIG is an empty config payload.
                return Message(request, ConfigSpace(0, 0, 0), reply=True)
            raise
        if payload is not None:
            return Message(request, payload, reply=True)
        if ack_wanted:
            return Message(request, U64(0), reply=True)
        return None

    def close(self) -> None:
        """The front-end left: reset the device, release memory and every fd."""
        with contextlib.suppress(PeerError):
            self.device.reset()
        for ring in self.rings:
            ring.close()
        self._set_memory([])
        self.memory = None
        if self.backend_channel is not None:
            close_fds([self.backend_channel])
            self.backend_channel = None

    def _negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    # ----- features, owner, status -----
    def _get_features(self, message: Message) -> U64:
        return U64(self.device.get_device_features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_features(self, message: Message) -> None:
        assert isinstance(message.payload, U64)
        features = message.payload.value & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if features == self.acked_features and self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            return  # QEMU repeats SET_FEATURES for each queue pair of one device
        if self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise SessionError("SET_FEATURES after the features were accepted (reset the device first)")
        self._raise_status(VIRTIO_CONFIG_S_DRIVER)
        self.device.set_driver_features(features)
        self._raise_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise DeviceRequestError(f"the device refused features {features:#x}")
        self.acked_features = features
        if not message.payload.value >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for ring in self.rings:  # without PROTOCOL_FEATURES rings are enabled from the start
                ring.enabled = True

    def _set_owner(self, message: Message) -> None:
        self.owner = True  # repeated per queue pair by QEMU: idempotent

    def _set_protocol_features(self, message: Message) -> None:
        assert isinstance(message.payload, U64)
        requested = message.payload.value
        if requested & ~self.offered_protocol_features:
            raise SessionError(f"protocol features {requested & ~self.offered_protocol_features:#x} were not offered")
        self.protocol_features = requested

    def _raise_status(self, target: int) -> None:
        """Bring the device status up to ``target`` through the virtio order of steps."""
        status = self.device.get_status()
        for step in _STATUS_STEPS:
            if status & step:
                continue
            status |= step
            self.device.set_status(status)
            if step == target:
                return

    def _set_status(self, message: Message) -> None:
        assert isinstance(message.payload, U64)
        status = message.payload.value & 0xFF
        if status == 0:
            self._reset(message)
            return
        for step in reversed(_STATUS_STEPS):
            if status & step:
                self._raise_status(step)
                break

    def _reset(self, message: Message) -> None:
        self.device.reset()
        self.acked_features = None
        for ring in self.rings:
            ring.close()
            ring.started = False
            ring.enabled = False

    # ----- memory -----
    def _map(self, region: MemoryRegion, fd: int) -> Region:
        try:
            return Region.from_fd(
                fd,
                guest_addr=region.guest_addr,
                size=region.size,
                user_addr=region.user_addr,
                offset=region.mmap_offset,
            )
        except (OSError, ValueError, OverflowError, UsageError) as exc:
            raise DeviceRequestError(f"cannot map memory region {region}: {exc}") from exc
        finally:
            os.close(fd)

    def _set_mem_table(self, message: Message) -> None:
        assert isinstance(message.payload, MemoryTable)
        mapped: list[tuple[MemoryRegion, Region]] = []
        try:
            for region, fd in zip(message.payload.regions, message.fds, strict=True):
                mapped.append((region, self._map(region, fd)))
        except PeerError:
            close_fds(message.fds[len(mapped) + 1 :])
            for _, region_map in mapped:
                region_map.close()
            raise
        self._set_memory(mapped)

    def _add_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        if len(self.regions) >= MAX_MEM_SLOTS:
            close_fds(message.fds)
            raise DeviceRequestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        region = message.payload.region
        self._set_memory([*self.regions, (region, self._map(region, message.fds[0]))])

    def _rem_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        close_fds(message.fds)
        target = message.payload.region
        same = (target.guest_addr, target.size, target.user_addr)
        keep = [(r, m) for r, m in self.regions if (r.guest_addr, r.size, r.user_addr) != same]
        if len(keep) == len(self.regions):
            raise DeviceRequestError(f"REM_MEM_REG: no region {target}")
        self._set_memory(keep)

    def _set_memory(self, regions: list[tuple[MemoryRegion, Region]]) -> None:
        """Swap guest memory whole; unmap the regions that left only after the device let go of them."""
        old = {id(mapping) for _, mapping in self.regions}
        try:
            table = RegionTable(mapping for _, mapping in regions)
        except UsageError as exc:
            for _, mapping in regions:
                if id(mapping) not in old:
                    mapping.close()
            raise DeviceRequestError(f"invalid memory table: {exc}") from exc
        self.device.set_map(table, RingAddressSpace.USER)
        kept = {id(mapping) for _, mapping in regions}
        for _, mapping in self.regions:
            if id(mapping) not in kept:
                mapping.close()
        self.regions = regions
        self.memory = table

    # ----- rings -----
    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise DeviceRequestError(f"no ring {index} (the device has {len(self.rings)})", errno=errno.ENOBUFS)
        return self.rings[index]

    def _set_vring_num(self, message: Message) -> None:
        assert isinstance(message.payload, VringState)
        self._ring(message.payload.index)
        self.device.set_vq_num(message.payload.index, message.payload.num)

    def _set_vring_addr(self, message: Message) -> None:
        addr = message.payload
        assert isinstance(addr, VringAddr)
        self._ring(addr.index)
        self.device.set_vq_address(addr.index, addr.desc, addr.avail, addr.used)

    def _packed(self) -> bool:
        return bool((self.acked_features or 0) >> VIRTIO_F_RING_PACKED & 1)

    def _set_vring_base(self, message: Message) -> None:
        assert isinstance(message.payload, VringState)
        index, num = message.payload.index, message.payload.num
        self._ring(index)
        state = PackedState.decode(num) if self._packed() else SplitState(num & 0xFFFF)
        self.device.set_vq_state(index, state)

    def _get_vring_base(self, message: Message) -> VringState:
        assert isinstance(message.payload, VringState)
        index = message.payload.index
        ring = self._ring(index)
        ring.started = False  # GET_VRING_BASE stops the ring (spec "Starting and stopping rings")
        self._update_ready(index)
        state = self.device.get_vq_state(index)
        if ring.kick is not None:
            self.device.set_vq_kick(index, None)
            close_fds([ring.kick])
            ring.kick = None
        return VringState(index, state.encode())

    def _vring_fd(self, message: Message) -> tuple[int, int | None]:
        assert isinstance(message.payload, U64)
        index = message.payload.value & VRING_IDX_MASK
        if message.payload.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise DeviceRequestError(f"{message.request.name}: stray bits in {message.payload.value:#x}")
        self._ring(index)
        return index, (None if message.payload.value & VRING_NOFD_MASK else message.fds[0])

    def _set_vring_kick(self, message: Message) -> None:
        index, fd = self._vring_fd(message)
        ring = self.rings[index]
        if fd is None:
            raise DeviceRequestError("polling rings without a kick fd is not supported", errno=errno.EOPNOTSUPP)
        old, ring.kick = ring.kick, fd
        self.device.set_vq_kick(index, fd)
        if old is not None:
            close_fds([old])
        ring.started = True  # a kick fd starts the ring
        if not self.device.get_status() & VIRTIO_CONFIG_S_DRIVER_OK and not self._negotiated(P.STATUS):
            self._raise_status(VIRTIO_CONFIG_S_DRIVER_OK)
        self._update_ready(index)

    def _set_vring_call(self, message: Message) -> None:
        index, fd = self._vring_fd(message)
        ring = self.rings[index]
        old, ring.call = ring.call, fd
        self.device.set_vq_call(index, fd)
        if old is not None:
            close_fds([old])

    def _set_vring_err(self, message: Message) -> None:
        index, fd = self._vring_fd(message)
        ring = self.rings[index]
        old, ring.err = ring.err, fd
        if old is not None:
            close_fds([old])

    def _set_vring_enable(self, message: Message) -> None:
        assert isinstance(message.payload, VringState)
        index, enable = message.payload.index, message.payload.num
        if enable not in (0, 1):
            raise DeviceRequestError(f"SET_VRING_ENABLE {enable} (0 or 1)")
        self._ring(index).enabled = bool(enable)
        self._update_ready(index)

    def _update_ready(self, index: int) -> None:
        ring = self.rings[index]
        ready = ring.started and ring.enabled
        if ready != self.device.get_vq_ready(index):
            self.device.set_vq_ready(index, ready)

    def _set_backend_req_fd(self, message: Message) -> None:
        if self.backend_channel is not None:
            close_fds([self.backend_channel])
        self.backend_channel = message.fds[0]

    # ----- config -----
    def _get_config(self, message: Message) -> ConfigSpace:
        assert isinstance(message.payload, ConfigSpace)
        offset, size = message.payload.offset, message.payload.size
        return ConfigSpace(offset, size, message.payload.flags, self.device.get_config(offset, size))

    def _set_config(self, message: Message) -> None:
        assert isinstance(message.payload, ConfigSpace)
        self.device.set_config(message.payload.offset, message.payload.data)

    def _set_config_call(self, message: Message) -> None:
        _, fd = self._vring_fd(message)
        self.device.set_config_cb(fd)

    # ----- the vDPA extension -----
    def _get_iova_range(self, message: Message) -> IovaRange:
        iova = self.device.get_iova_range()
        return IovaRange(iova.first, iova.last)

    def _get_vring_group(self, message: Message) -> VringState:
        assert isinstance(message.payload, VringState)
        self._ring(message.payload.index)
        return VringState(message.payload.index, 0)

    def _set_group_asid(self, message: Message) -> None:
        assert isinstance(message.payload, VringState)
        if message.payload.index != 0 or message.payload.num != 0:
            raise DeviceRequestError("the device has one group and one address space")

    def _get_vring_size(self, message: Message) -> VringState:
        assert isinstance(message.payload, VringState)
        self._ring(message.payload.index)
        return VringState(message.payload.index, self.device.get_vq_num_max())
