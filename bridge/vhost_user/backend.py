"""vhost-user back-end semantics over any DeviceOps: front-end requests in, replies out (no socket here).

``BackendSession.handle(message)`` applies one request to the device and returns the reply to send,
if any. The server (server.py) owns the socket; the session owns the protocol state of one
connection: negotiated (protocol) features, guest memory built from the region fds, and per ring its
kick/call/err fds and the two vhost-user ring states — started (a kick fd starts it, GET_VRING_BASE
stops it) and enabled (SET_VRING_ENABLE; all rings at once when PROTOCOL_FEATURES is not negotiated).
The device serves a started ring; a started but disabled ring is served without side effects
(``set_vq_enabled``: net drops TX and delivers no RX, blk leaves it alone). With every ring stopped
(or after the extension's VDPA_SUSPEND) the back-end is suspended: nothing is written to guest memory,
no notification and no back-end request goes out (a config change waits for the end of it), and
requests are still answered.

What the data path does for a front-end beyond vDPA: GET_QUEUE_NUM answers what QEMU compares with
its own queue count (net: queue pairs); VHOST_F_LOG_ALL with the bitmap of SET_LOG_BASE (LOG_SHMFD)
logs every write to guest memory, and used-ring writes of rings whose SET_VRING_ADDR has
VHOST_VRING_F_LOG; GET/SET_INFLIGHT_FD (INFLIGHT_SHMFD, blk) lets the device track requests in flight
in a buffer the front-end keeps across back-end restarts; with BACKEND_REQ a device config change
becomes BACKEND_CONFIG_CHANGE_MSG on the back-end channel, sent by a ``BackendSender`` that never
blocks the caller (server.BackendChannel waits for acks on a thread of its own, with a timeout).

vhost-user has no device status unless the STATUS protocol feature is negotiated, and QEMU's use of
it does not follow the virtio order (it adds FEATURES_OK to a status of 0). So the session drives the
device's status itself, always through the steps the device accepts: SET_FEATURES moves it to
FEATURES_OK; the first started ring (or the front-end's DRIVER_OK) to DRIVER_OK; SET_STATUS(0),
RESET_DEVICE, RESET_OWNER and a closed connection reset it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vdpasim.devices.inflight import queue_region_size
from vdpasim.errors import DeviceRequestError, PeerError, SessionError, UsageError
from vdpasim.memory import Region, RegionTable
from vdpasim.ops import DeviceOps, RingAddressSpace, supports
from vdpasim.rings.state import PackedState, SplitState, VqState
from vdpasim.runner import signal
from vdpasim.virtio.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
)

from .codec import close_fds
from .messages import (
    U64,
    VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    VHOST_BACKEND_F_RESUME,
    VHOST_BACKEND_F_SUSPEND,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigSpace,
    Empty,
    ErrorReply,
    FrontendRequest,
    InflightInfo,
    IovaRange,
    LogArea,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    payload_types,
)

__all__ = [
    "BackendSession",
    "BackendSender",
    "DEFAULT_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "VHOST_F_LOG_ALL",
    "VHOST_VRING_F_LOG",
    "protocol_features_for",
]

F = FrontendRequest
P = ProtocolFeature
MAX_MEM_SLOTS = 32
DEFAULT_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (P.MQ, P.REPLY_ACK, P.CONFIG, P.STATUS, P.BACKEND_REQ, P.RESET_DEVICE, P.CONFIGURE_MEM_SLOTS, P.VDPA)
)


VHOST_F_LOG_ALL = 26  # vhost feature bit (GET/SET_FEATURES): log every write to guest memory
VHOST_VRING_F_LOG = 0  # SET_VRING_ADDR flags bit: log used-ring writes at log_guest_addr
_MAX_LOG_BYTES = 1 << 32  # covers 128 TiB of guest memory; a larger log is not a real front-end's
_MAX_INFLIGHT_QUEUE_SIZE = 32768


def protocol_features_for(device: DeviceOps) -> int:
    """What to offer for this device.

    QEMU's vhost-user-net takes no config from a back-end (and warns); dirty logging where the device
    can log (LOG_SHMFD, with VHOST_F_LOG_ALL in GET_FEATURES); inflight tracking for blk devices that
    keep it (INFLIGHT_SHMFD, which QEMU's vhost-user-blk uses across back-end restarts).
    """
    features = DEFAULT_PROTOCOL_FEATURES
    if device.get_device_id() == VIRTIO_ID_NET:
        features &= ~(1 << P.CONFIG)
    if supports(device, "set_dirty_log"):
        features |= 1 << P.LOG_SHMFD
    if device.get_device_id() == VIRTIO_ID_BLOCK and getattr(device, "supports_inflight", False):
        features |= 1 << P.INFLIGHT_SHMFD
    return features


def _queue_num(device: DeviceOps) -> int:
    """GET_QUEUE_NUM: for net the queue pairs (QEMU compares it with ``-netdev queues=N``), else the queues."""
    if device.get_device_id() == VIRTIO_ID_NET:
        if not device.get_device_features() >> VIRTIO_NET_F_MQ & 1:
            return 1
        try:
            return struct.unpack("<H", device.get_config(8, 2))[0]  # max_virtqueue_pairs (VIRTIO 1.2 §5.1.4)
        except PeerError:  # a device with no readable config (a plain vhost-user client): its data queues
            return max(1, device.get_vq_count() // 2)
    return device.get_vq_count()


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _unmap(region: Region) -> None:
    """Unmap a log or inflight buffer the device no longer uses."""
    with contextlib.suppress(BufferError):  # a view still alive: the mapping goes when it does
        region.close()


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
    F.SET_LOG_BASE: P.LOG_SHMFD,
    F.GET_INFLIGHT_FD: P.INFLIGHT_SHMFD,
    F.SET_INFLIGHT_FD: P.INFLIGHT_SHMFD,
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
    # The ring position when the device was reset: QEMU 7.2 sends SET_STATUS(0) before GET_VRING_BASE.
    base_at_reset: VqState | None = None

    def close(self) -> None:
        close_fds([fd for fd in (self.kick, self.call, self.err) if fd is not None])
        self.kick = self.call = self.err = None


class BackendSender(Protocol):
    """Where back-end requests go (the channel of SET_BACKEND_REQ_FD). ``send`` must never block: the
    front-end may be waiting for a reply of ours on the main channel (server.BackendChannel)."""

    def send(self, message: Message) -> None: ...
    def close(self) -> None: ...


class _Outbox:
    """The sender of a session with no server around it (sans-IO use): keeps the messages, owns the fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.messages: list[Message] = []

    def send(self, message: Message) -> None:
        self.messages.append(message)

    def close(self) -> None:
        close_fds([self.fd])


class BackendSession:
    def __init__(
        self,
        device: DeviceOps,
        *,
        protocol_features: int | None = None,
        queue_num: int | None = None,
        name: str = "vhost-user",
        channel_factory: Callable[[int], BackendSender] | None = None,
    ) -> None:
        self.device = device
        self.offered_protocol_features = (
            protocol_features_for(device) if protocol_features is None else protocol_features
        )
        self.queue_num = _queue_num(device) if queue_num is None else queue_num
        self.log = logging.getLogger(f"vdpasim.vhost_user.{name}")
        self.protocol_features = 0
        self.acked_features: int | None = None
        self.owner = False
        self.backend_channel: BackendSender | None = None  # the back-end request channel (SET_BACKEND_REQ_FD)
        self._channel_factory: Callable[[int], BackendSender] = channel_factory or _Outbox
        self.config_call: int | None = None  # eventfd of VDPA_SET_CONFIG_CALL
        # Suspended (all rings stopped, or VDPA_SUSPEND): config changes wait here until it ends.
        self.vdpa_suspended = False
        self._config_change_pending = False
        # Dirty logging: the bitmap of SET_LOG_BASE, the eventfd of SET_LOG_FD, VHOST_F_LOG_ALL acked.
        self.dirty_log: Region | None = None
        self.log_call: int | None = None
        self.log_all = False
        # Inflight tracking: the buffer of SET_INFLIGHT_FD, mapped.
        self.inflight: Region | None = None
        self.regions: list[tuple[MemoryRegion, Region]] = []
        # ADD_MEM_REG repeats of a region already mapped, by (guest_addr, size, user_addr): QEMU sends
        # every region once per vhost_dev, i.e. once per queue pair, all on this one connection.
        self.region_repeats: dict[tuple[int, int, int], int] = {}
        self.memory: RegionTable | None = None
        self.rings = [_Ring() for _ in range(device.get_vq_count())]
        self.requests = 0
        self._handlers: dict[FrontendRequest, Callable[[Message], Payload | None]] = {
            F.GET_FEATURES: self._get_features,
            F.SET_FEATURES: self._set_features,
            F.SET_OWNER: self._set_owner,
            F.SET_LOG_BASE: self._set_log_base,
            F.SET_LOG_FD: self._set_log_fd,
            F.GET_INFLIGHT_FD: self._get_inflight_fd,
            F.SET_INFLIGHT_FD: self._set_inflight_fd,
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
            F.VDPA_SUSPEND: self._vdpa_suspend,
            F.VDPA_RESUME: self._vdpa_resume,
            F.VDPA_GET_GROUP_NUM: lambda m: U64(1),
            F.VDPA_GET_AS_NUM: lambda m: U64(1),
            F.VDPA_GET_VRING_GROUP: self._get_vring_group,
            F.VDPA_SET_GROUP_ASID: self._set_group_asid,
            F.VDPA_SET_CONFIG_CALL: self._set_config_call,
            F.VDPA_GET_VRING_SIZE: self._get_vring_size,
            F.VDPA_GET_CONFIG_GENERATION: lambda m: U64(self.device.get_generation()),
            F.VDPA_GET_BACKEND_FEATURES: self._get_backend_features,
        }
        if supports(device, "set_config_cb"):
            device.set_config_cb(self._config_changed)  # config changes reach the front-end through us

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
            # With the vDPA extension every device type has a config space (docs/vhost-user-vdpa.md).
            if feature is P.CONFIG and self._negotiated(P.VDPA):
                feature = None
            if feature is not None and not self._negotiated(feature):
                raise SessionError(f"{request.name} without protocol feature {feature.name}")
            payload = handler(message)
        except PeerError as exc:
            close_fds(message.fds)
            self.log.warning("%s refused: %s", request.name, exc)
            if payload_types(request)[1] is not None:
                # A request with a reply payload gets no ack (REPLY_ACK: "unless the message already has
                # an explicit reply body"); its failure answer is the extension's error reply, or for
                # GET_CONFIG the spec's empty config; else the caller closes the connection.
                if self._negotiated(P.VDPA):
                    return Message(request, ErrorReply(exc.errno or errno.EIO), reply=True)
                if request is F.GET_CONFIG:
                    return Message(request, ConfigSpace(0, 0, 0), reply=True)
                raise
            if ack_wanted:
                return Message(request, U64(exc.errno or 1), reply=True)
            raise
        if isinstance(payload, Message):
            return payload  # a reply that carries fds (GET_INFLIGHT_FD): the caller closes them once sent
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
        self.region_repeats.clear()
        self.memory = None
        if supports(self.device, "set_config_cb"):
            with contextlib.suppress(PeerError):
                self.device.set_config_cb(None)  # the device must not call into a closed session
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.config_call is not None:
            close_fds([self.config_call])
            self.config_call = None
        self._release_log()
        self._release_inflight()

    def _negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    # ----- features, owner, status -----
    def _get_features(self, message: Message) -> U64:
        features = self.device.get_device_features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if supports(self.device, "set_dirty_log"):
            features |= 1 << VHOST_F_LOG_ALL  # QEMU allows migration only with it
        return U64(features)

    def _set_features(self, message: Message) -> None:
        assert isinstance(message.payload, U64)
        value = message.payload.value
        if value >> VHOST_F_LOG_ALL & 1 and not supports(self.device, "set_dirty_log"):
            raise DeviceRequestError("VHOST_F_LOG_ALL was not offered")
        features = value & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL)
        if (
            self.device.get_device_id() == VIRTIO_ID_NET
            and features >> VIRTIO_NET_F_MQ & 1
            and self.device.get_device_features() >> VIRTIO_NET_F_CTRL_VQ & 1
        ):
            # QEMU's vhost-user-net serves the control queue itself and passes on only data-path
            # features, so MQ arrives without the CTRL_VQ the guest negotiated with it (and which MQ
            # requires); the pairs are then chosen with SET_VRING_ENABLE.
            features |= 1 << VIRTIO_NET_F_CTRL_VQ
        if features == self.acked_features and self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            # QEMU repeats SET_FEATURES for each queue pair of one device, and sets it again with
            # VHOST_F_LOG_ALL to start (and without to stop) logging for a migration.
            self._set_log_all(bool(value >> VHOST_F_LOG_ALL & 1))
            return
        if self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise SessionError("SET_FEATURES after the features were accepted (reset the device first)")
        self._raise_status(VIRTIO_CONFIG_S_DRIVER)
        self.device.set_driver_features(features)
        self._raise_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.device.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise DeviceRequestError(f"the device refused features {features:#x}")
        self.acked_features = features
        self._set_log_all(bool(value >> VHOST_F_LOG_ALL & 1))
        if not value >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for index, ring in enumerate(self.rings):  # without PROTOCOL_FEATURES rings are enabled from the start
                ring.enabled = True
                self._update_ready(index)

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
            if not status & step:
                status |= step
                self.device.set_status(status)
            if step == target:  # also when it was already set: never go past the target
                return

    def _set_status(self, message: Message) -> None:
        assert isinstance(message.payload, U64)
        status = message.payload.value & 0xFF
        if status == 0:
            self._reset(message)
            return
        if status & VIRTIO_CONFIG_S_DRIVER_OK:
            self._warn_if_no_memory("DRIVER_OK")
        for step in reversed(_STATUS_STEPS):
            if status & step:
                self._raise_status(step)
                break

    def _warn_if_no_memory(self, what: str) -> None:
        if not self.regions:
            # QEMU silently leaves out RAM it cannot pass as an fd: the rings can never be translated.
            self.log.warning(
                "%s with no guest memory mapped: is the front-end's RAM shared "
                "(-object memory-backend-memfd,share=on)?",
                what,
            )

    def _reset(self, message: Message) -> None:
        for index, ring in enumerate(self.rings):
            ring.base_at_reset = self.device.get_vq_state(index) if ring.started else None
        self.device.reset()  # also ends dirty logging and inflight tracking in the device
        self.acked_features = None
        self.log_all = False
        self.vdpa_suspended = False
        self._config_change_pending = False
        self._release_inflight()  # QEMU hands the buffer again (SET_INFLIGHT_FD) at the next start
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

    # fds: a handler that fails leaves every fd of the message to handle(), which closes them once;
    # closing one here first would close it twice, and the second close may hit a reused number
    # (another device's eventfd or socket). So the memory handlers close their fds only on success.
    def _set_mem_table(self, message: Message) -> None:
        assert isinstance(message.payload, MemoryTable)
        mapped: list[tuple[MemoryRegion, Region]] = []
        try:
            for region, fd in zip(message.payload.regions, message.fds, strict=True):
                mapped.append((region, self._map(region, fd)))
        except PeerError:
            for _, region_map in mapped:
                region_map.close()
            raise
        self._set_memory(mapped)
        self.region_repeats.clear()
        close_fds(message.fds)

    def _add_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise DeviceRequestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        region = message.payload.region
        key = (region.guest_addr, region.size, region.user_addr)
        if any((r.guest_addr, r.size, r.user_addr) == key for r, _ in self.regions):
            close_fds(message.fds)  # the same memory again, from another queue pair's vhost_dev
            self.region_repeats[key] = self.region_repeats.get(key, 0) + 1
            return
        self._set_memory([*self.regions, (region, self._map(region, message.fds[0]))])
        close_fds(message.fds)

    def _rem_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        target = message.payload.region
        same = (target.guest_addr, target.size, target.user_addr)
        if self.region_repeats.get(same):
            self.region_repeats[same] -= 1  # another vhost_dev still has it
            close_fds(message.fds)
            return
        keep = [(r, m) for r, m in self.regions if (r.guest_addr, r.size, r.user_addr) != same]
        if len(keep) == len(self.regions):
            raise DeviceRequestError(f"REM_MEM_REG: no region {target}")
        self._set_memory(keep)
        close_fds(message.fds)

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
        if addr.flags & ~(1 << VHOST_VRING_F_LOG):
            raise DeviceRequestError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        log_ring = bool(addr.flags >> VHOST_VRING_F_LOG & 1)
        if log_ring and not supports(self.device, "set_vq_log"):
            raise DeviceRequestError("SET_VRING_ADDR: VHOST_VRING_F_LOG, but the device cannot log")
        # Sent again on a running ring to turn used-ring logging on or off (migration): same addresses.
        self.device.set_vq_address(addr.index, addr.desc, addr.avail, addr.used)
        if supports(self.device, "set_vq_log"):
            self.device.set_vq_log(addr.index, addr.log if log_ring else None)

    def _packed(self) -> bool:
        return bool((self.acked_features or 0) >> VIRTIO_F_RING_PACKED & 1)

    def _set_vring_base(self, message: Message) -> None:
        assert isinstance(message.payload, VringState)
        index, num = message.payload.index, message.payload.num
        self._ring(index).base_at_reset = None
        if not self._packed():
            state: SplitState | PackedState = SplitState(num & 0xFFFF)
        elif num >> 16:
            state = PackedState.decode(num)
        else:
            # Only the avail half (bits 0-15), as DPDK's virtio_user sends (32768 for a new ring): the used
            # position is the same one, which is what DPDK's vhost library assumes of every SET_VRING_BASE.
            # Read as (0, wrap 0) instead, used entries would carry the wrong wrap counter and the driver
            # would never see one.
            state = PackedState(num & 0x7FFF, num >> 15 & 1, num & 0x7FFF, num >> 15 & 1)
        self.device.set_vq_state(index, state)

    def _get_vring_base(self, message: Message) -> VringState:
        assert isinstance(message.payload, VringState)
        index = message.payload.index
        ring = self._ring(index)
        ring.started = False  # GET_VRING_BASE stops the ring (spec "Starting and stopping rings")
        self._update_ready(index)
        if self.suspended:
            self.log.debug("every ring stopped: suspended")
        state = ring.base_at_reset or self.device.get_vq_state(index)
        ring.base_at_reset = None
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
        if not self._negotiated(P.STATUS):  # else DRIVER_OK starts the device (memory may come until then)
            self._warn_if_no_memory(f"ring {index} started")
            if not self.device.get_status() & VIRTIO_CONFIG_S_DRIVER_OK:
                self._raise_status(VIRTIO_CONFIG_S_DRIVER_OK)
        self._update_ready(index)
        self._flush_config_change()  # the device may have been suspended

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
        """Map the two vhost-user ring states onto the device: started = ready (served); enabled, where
        the device can gate a ready queue (a disabled ring is served without side effects), else the
        device serves only started and enabled rings."""
        ring = self.rings[index]
        if supports(self.device, "set_vq_enabled"):
            if self.device.get_vq_enabled(index) is not ring.enabled:  # type: ignore[attr-defined]
                self.device.set_vq_enabled(index, ring.enabled)  # type: ignore[attr-defined]
            ready = ring.started
        else:
            ready = ring.started and ring.enabled
        if ready != self.device.get_vq_ready(index):
            self.device.set_vq_ready(index, ready)

    def _set_backend_req_fd(self, message: Message) -> None:
        try:
            channel = self._channel_factory(message.fds[0])
        except OSError as exc:
            raise DeviceRequestError(f"SET_BACKEND_REQ_FD: not a usable socket: {exc}") from exc
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = channel

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
        old, self.config_call = self.config_call, fd  # the session owns it and signals it on config changes
        if old is not None:
            close_fds([old])

    # ----- config changes, suspension -----
    @property
    def suspended(self) -> bool:
        """vhost-user's suspended state: every ring stopped (or the extension's VDPA_SUSPEND). The device
        then writes no guest memory, signals nothing and sends no back-end request; requests are answered."""
        return self.vdpa_suspended or not any(ring.started for ring in self.rings)

    def _config_changed(self) -> None:
        """The device's config-change callback (from the data-path thread or ours): tell the front-end."""
        self._config_change_pending = True
        if not self.suspended:
            self._flush_config_change()

    def _flush_config_change(self) -> None:
        if not self._config_change_pending or self.suspended:
            return
        self._config_change_pending = False
        signal(self.config_call)
        config_messages = self._negotiated(P.CONFIG) or self._negotiated(P.VDPA)
        if self.backend_channel is not None and self._negotiated(P.BACKEND_REQ) and config_messages:
            # The front-end re-reads the config space (GET_CONFIG); with REPLY_ACK it acks first.
            need_reply = self._negotiated(P.REPLY_ACK)
            self.backend_channel.send(Message(BackendRequest.CONFIG_CHANGE_MSG, Empty(), need_reply=need_reply))

    def _vdpa_suspend(self, message: Message) -> None:
        if supports(self.device, "suspend"):
            self.device.suspend()
        self.vdpa_suspended = True

    def _vdpa_resume(self, message: Message) -> None:
        if supports(self.device, "resume"):
            self.device.resume()
        self.vdpa_suspended = False
        self._flush_config_change()

    # ----- dirty logging (live migration) -----
    def _set_log_base(self, message: Message) -> U64:
        area = message.payload
        assert isinstance(area, LogArea)
        if not 0 < area.size <= _MAX_LOG_BYTES:
            raise DeviceRequestError(f"SET_LOG_BASE: log of {area.size} bytes (1 to {_MAX_LOG_BYTES})")
        try:
            log = Region.from_fd(message.fds[0], guest_addr=0, size=area.size, offset=area.offset)
        except (OSError, ValueError, OverflowError, UsageError) as exc:
            raise DeviceRequestError(f"SET_LOG_BASE: cannot map {area.size} bytes at {area.offset:#x}: {exc}") from exc
        close_fds(message.fds)
        old, self.dirty_log = self.dirty_log, log
        self._apply_log()  # QEMU resizes the log during a migration: swap it under the running device
        if old is not None:
            _unmap(old)
        return U64(0)  # with LOG_SHMFD the front-end waits for this reply

    def _set_log_fd(self, message: Message) -> None:
        if not _is_eventfd(message.fds[0]):
            # Signalled from the data-path thread: a pipe or socket could block it, a file would be written.
            raise DeviceRequestError("SET_LOG_FD: the fd is not an eventfd")
        old, self.log_call = self.log_call, message.fds[0]
        self._apply_log()
        if old is not None:
            close_fds([old])

    def _set_log_all(self, on: bool) -> None:
        if on != self.log_all:
            self.log.info("dirty logging %s", "on" if on else "off")
            if on and self.dirty_log is None:
                self.log.warning("VHOST_F_LOG_ALL before SET_LOG_BASE: nothing is logged until the log arrives")
        self.log_all = on
        self._apply_log()

    def _apply_log(self) -> None:
        if supports(self.device, "set_dirty_log"):
            bitmap = self.dirty_log.data if self.log_all and self.dirty_log is not None else None
            self.device.set_dirty_log(bitmap, self.log_call)  # type: ignore[attr-defined]

    def _release_log(self) -> None:
        self.log_all = False
        if supports(self.device, "set_dirty_log"):
            with contextlib.suppress(PeerError):
                self.device.set_dirty_log(None)  # type: ignore[attr-defined]
        if self.dirty_log is not None:
            _unmap(self.dirty_log)
            self.dirty_log = None
        if self.log_call is not None:
            close_fds([self.log_call])
            self.log_call = None

    # ----- inflight tracking (blk) -----
    def _inflight_geometry(self, info: InflightInfo) -> int:
        """Bytes per queue region, after checking the request's numbers."""
        if not 1 <= info.num_queues <= len(self.rings):
            raise DeviceRequestError(f"{info.num_queues} inflight queues (the device has {len(self.rings)})")
        if not 1 <= info.queue_size <= _MAX_INFLIGHT_QUEUE_SIZE:
            raise DeviceRequestError(f"inflight queue size {info.queue_size}")
        return queue_region_size(info.queue_size, self._packed())

    def _get_inflight_fd(self, message: Message) -> Message:
        info = message.payload
        assert isinstance(info, InflightInfo)
        size = info.num_queues * self._inflight_geometry(info)
        # A zeroed memfd (version 0: set up when the queues start) whose size nobody can change.
        fd = os.memfd_create("vdpasim-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except OSError as exc:
            close_fds([fd])
            raise DeviceRequestError(f"GET_INFLIGHT_FD: {exc}", errno=exc.errno or errno.ENOMEM) from exc
        reply = InflightInfo(size, 0, info.num_queues, info.queue_size)
        return Message(message.request, reply, (fd,), reply=True)

    def _set_inflight_fd(self, message: Message) -> None:
        info = message.payload
        assert isinstance(info, InflightInfo)
        per_queue = self._inflight_geometry(info)
        if info.mmap_size < info.num_queues * per_queue:
            raise DeviceRequestError(
                f"SET_INFLIGHT_FD: {info.mmap_size} bytes for {info.num_queues} queues of {info.queue_size}"
                f" ({info.num_queues * per_queue} needed)"
            )
        if not supports(self.device, "set_vq_inflight"):
            raise DeviceRequestError("the device does not track inflight requests", errno=errno.EOPNOTSUPP)
        try:
            region = Region.from_fd(message.fds[0], guest_addr=0, size=info.mmap_size, offset=info.mmap_offset)
        except (OSError, ValueError, OverflowError, UsageError) as exc:
            raise DeviceRequestError(f"SET_INFLIGHT_FD: cannot map {info.mmap_size} bytes: {exc}") from exc
        close_fds(message.fds)
        try:
            for index in range(len(self.rings)):
                if index < info.num_queues:
                    view = region.data[index * per_queue : (index + 1) * per_queue]
                    self.device.set_vq_inflight(index, view, info.queue_size)  # type: ignore[attr-defined]
                else:
                    self.device.set_vq_inflight(index, None)  # type: ignore[attr-defined]
        except PeerError:
            self._detach_inflight()
            _unmap(region)
            raise
        old, self.inflight = self.inflight, region
        if old is not None:
            _unmap(old)

    def _detach_inflight(self) -> None:
        if supports(self.device, "set_vq_inflight"):
            for index in range(len(self.rings)):
                with contextlib.suppress(PeerError):
                    self.device.set_vq_inflight(index, None)  # type: ignore[attr-defined]

    def _release_inflight(self) -> None:
        if self.inflight is not None:
            self._detach_inflight()
            _unmap(self.inflight)
            self.inflight = None

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

    def _get_backend_features(self, message: Message) -> U64:
        bits = 1 << VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK  # rings may be enabled after DRIVER_OK
        if supports(self.device, "suspend"):
            bits |= 1 << VHOST_BACKEND_F_SUSPEND
        if supports(self.device, "resume"):
            bits |= 1 << VHOST_BACKEND_F_RESUME
        return U64(bits)

    def _get_vring_size(self, message: Message) -> VringState:
        assert isinstance(message.payload, VringState)
        self._ring(message.payload.index)
        return VringState(message.payload.index, self.device.get_vq_num_max())
