"""The userspace vDPA bus: management devices, the devices they create, and the kernel's rules for both.

This is the part of the kernel's drivers/vdpa/vdpa.c (Linux 6.12) that is not netlink encoding,
with vdpasim's device models in the place of drivers/vdpa/vdpa_sim: two management devices,
``vdpasim_net`` and ``vdpasim_blk`` (no bus name, like the kernel's simulators), and a registry of
the devices created through them. Every door that creates or inspects devices (the netlink server
of bus/server.py, the daemon's control socket, the CLI) goes through ``Bus``, so they all refuse
the same requests in the same order with the same errno.

Each refusal is a ``BusError``: an errno, a readable message, and ``extack``, the exact text the
kernel would put in the netlink extended ack (None where the kernel sets none, so that a netlink
reply stays byte-identical). Where the kernel's vdpa core refuses, the errno and text are the
kernel's. Where a device model refuses (a value NetConfig/BlkConfig rejects, a queue with no
statistics), the errno is the model's and the text, prefixed with the management device's name as a
kernel driver's would be with its module's, is vdpasim's: the kernel's simulators answer most of
these with a bare errno.

Management devices differ from the kernel's simulators where vdpasim's models do more:
``vdpasim_net`` accepts max_vqp (the kernel's vdpasim_net has no MQ) and reports the models' real
limits and features; ``vdpasim_blk``, like the kernel's, accepts none of the kernel's attributes
(so ``mac`` or ``device_features`` on it is EOPNOTSUPP) and takes its capacity, read-only flag and
backing file through vdpasim's extension attributes (bus/netlink.py, VDPASIM_ATTR_*).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import BLK_SUPPORTED_FEATURES, NET_MAX_VQP, NET_SUPPORTED_FEATURES, BlkConfig, NetConfig, format_mac
from ..devices.blk import BlkDevice
from ..devices.core import SimDevice
from ..devices.net import NetDevice
from ..errors import DeviceRequestError, PeerError
from ..virtio import constants as c
from .netlink import (
    VDPA_ATTR_DEV_FEATURES,
    VDPA_ATTR_DEV_NET_CFG_MACADDR,
    VDPA_ATTR_DEV_NET_CFG_MAX_VQP,
    VDPA_ATTR_DEV_NET_CFG_MTU,
)

__all__ = [
    "BusError",
    "DevSetConfig",
    "MgmtDev",
    "VdpaDevice",
    "Bus",
    "VDPASIM_NET",
    "VDPASIM_BLK",
    "NET_ATTRS_MASK",
    "VIRTIO_DEVICE_F_MASK",
    "QUEUE_INDEX_MAX",
    "VendorStats",
]

log = logging.getLogger("vdpasim.bus")


def _bit(attr: int) -> int:
    return 1 << attr


# VDPA_DEV_NET_ATTRS_MASK: the attributes that only mean something to a net device.
NET_ATTRS_MASK = (
    _bit(VDPA_ATTR_DEV_NET_CFG_MACADDR) | _bit(VDPA_ATTR_DEV_NET_CFG_MTU) | _bit(VDPA_ATTR_DEV_NET_CFG_MAX_VQP)
)
# Feature bits that belong to a device type (all but the transport range 28..41).
VIRTIO_DEVICE_F_MASK = 0xFFFFFC000FFFFFFF
QUEUE_INDEX_MAX = c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX  # vstats: a larger index is -ERANGE


class BusError(DeviceRequestError):
    """A request the bus refuses: ``errno``, a message for people, and the kernel's extack text (or None)."""

    def __init__(self, message: str, *, errno: int, extack: str | None = None) -> None:
        super().__init__(message, errno=errno)
        self.extack = extack


def _refuse(err: int, extack: str | None, message: str | None = None) -> BusError:
    return BusError(message or extack or os.strerror(err), errno=err, extack=extack)


@dataclass(frozen=True)
class DevSetConfig:
    """What a device-creation request asks for: the kernel's struct vdpa_dev_set_config plus vdpasim's own.

    None means "not provided" (the device's default). ``extension`` holds vdpasim's extension values
    by NetConfig/BlkConfig field name (mode, peer_ip, capacity, path...).
    """

    mac: bytes | None = None
    mtu: int | None = None
    max_vqp: int | None = None
    device_features: int | None = None
    extension: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> int:
        """BIT_ULL(VDPA_ATTR_*) of the kernel attributes provided, as the kernel computes config.mask."""
        mask = 0
        if self.mac is not None:
            mask |= _bit(VDPA_ATTR_DEV_NET_CFG_MACADDR)
        if self.mtu is not None:
            mask |= _bit(VDPA_ATTR_DEV_NET_CFG_MTU)
        if self.max_vqp is not None:
            mask |= _bit(VDPA_ATTR_DEV_NET_CFG_MAX_VQP)
        if self.device_features is not None:
            mask |= _bit(VDPA_ATTR_DEV_FEATURES)
        return mask


DeviceConfig = NetConfig | BlkConfig


@dataclass(frozen=True)
class MgmtDev:
    """A management device (struct vdpa_mgmt_dev): what it can create and which request attributes it takes."""

    name: str
    bus: str | None
    id_table: tuple[int, ...]  # virtio device ids it creates
    max_supported_vqs: int
    supported_features: int
    config_attr_mask: int  # BIT_ULL(VDPA_ATTR_*) of the kernel attributes dev_add accepts
    extension_fields: frozenset[str]  # vdpasim extension fields dev_add accepts
    build_config: Callable[[str, DevSetConfig], DeviceConfig]  # validates, no side effects
    build_device: Callable[[Any], SimDevice]
    set_attr: bool = False  # has dev_set_attr (DEV_ATTR_SET)

    @property
    def handle(self) -> str:
        """``[bus/]name`` as iproute2 prints it."""
        return f"{self.bus}/{self.name}" if self.bus else self.name

    @property
    def supported_classes(self) -> int:
        return sum(1 << device_id for device_id in self.id_table if device_id <= 63)

    def matches(self, name: str, bus: str | None) -> bool:
        """mgmtdev_handle_match: a bus name must be given exactly when the device has a bus."""
        if (bus is None) != (self.bus is None):
            return False
        return self.name == name and bus == self.bus


def _net_config(name: str, config: DevSetConfig) -> NetConfig:
    values: dict[str, Any] = {"name": name, **config.extension}
    values.update(mac=config.mac, mtu=config.mtu, max_vqp=config.max_vqp, device_features=config.device_features)
    return NetConfig.from_mapping(values)


def _blk_config(name: str, config: DevSetConfig) -> BlkConfig:
    return BlkConfig.from_mapping({"name": name, **config.extension})


_COMMON_FIELDS = frozenset({"max_queue_size", "busy_poll"})

VDPASIM_NET = MgmtDev(
    name="vdpasim_net",
    bus=None,
    id_table=(c.VIRTIO_ID_NET,),
    max_supported_vqs=2 * NET_MAX_VQP + 1,
    supported_features=NET_SUPPORTED_FEATURES,
    config_attr_mask=NET_ATTRS_MASK | _bit(VDPA_ATTR_DEV_FEATURES),
    extension_fields=_COMMON_FIELDS | {"mode", "peer_ip", "peer_mac"},
    build_config=_net_config,
    build_device=NetDevice,
    set_attr=True,
)

VDPASIM_BLK = MgmtDev(
    name="vdpasim_blk",
    bus=None,
    id_table=(c.VIRTIO_ID_BLOCK,),
    max_supported_vqs=256,
    supported_features=BLK_SUPPORTED_FEATURES | 1 << c.VIRTIO_BLK_F_RO,
    config_attr_mask=0,
    extension_fields=_COMMON_FIELDS | {"capacity", "read_only", "path", "create", "num_queues", "blk_size", "serial"},
    build_config=_blk_config,
    build_device=BlkDevice,
)


@dataclass(eq=False)
class VdpaDevice:
    """A device on the bus (struct vdpa_device): its model, and where the daemon serves it."""

    name: str
    mgmtdev: MgmtDev
    device: SimDevice
    nvqs: int  # fixed at registration, as vdev->nvqs
    vhost_user_path: str | None = None
    vhost_vdpa_node: str | None = None

    @property
    def config(self) -> DeviceConfig:
        """The device's current configuration (``dev set`` changes a net device's MAC in it)."""
        return self.device.config  # type: ignore[attr-defined]

    @property
    def device_id(self) -> int:
        return self.device.get_device_id()

    @property
    def vendor_id(self) -> int:
        return self.device.get_vendor_id()

    @property
    def max_vq_size(self) -> int:
        return self.device.get_vq_num_max()

    @property
    def min_vq_size(self) -> int:
        return self.device.get_vq_num_min()


@dataclass(frozen=True)
class VendorStats:
    """One queue's vendor statistics, with what the kernel reports around them."""

    device: VdpaDevice
    qidx: int
    negotiated_features: int
    max_vqp: int | None  # only when MQ or RSS was negotiated
    values: tuple[tuple[str, int], ...]


def _model_refusal(mgmtdev: MgmtDev, error: PeerError | OSError) -> BusError:
    """A device model's refusal, worded for the extack as a driver would (prefixed with its name)."""
    if isinstance(error, OSError):
        text = f"{error.filename}: {error.strerror}" if error.filename else str(error.strerror)
        err = error.errno or errno.EIO
    else:
        text, err = str(error), error.errno
    return BusError(f"{mgmtdev.name}: {text}", errno=err, extack=f"{mgmtdev.name}: {text}")


Listener = Callable[[str, VdpaDevice], None]


class Bus:
    """The registry of management devices and devices, applying the kernel's rules in the kernel's order."""

    def __init__(self, mgmtdevs: tuple[MgmtDev, ...] = (VDPASIM_NET, VDPASIM_BLK)) -> None:
        self.mgmtdevs = mgmtdevs
        self._devices: dict[str, VdpaDevice] = {}
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener("add", vdev)`` after a device is added and ``("del", vdev)`` before it goes.

        The daemon uses this to start and stop serving a device (vhost-user socket, vhost-vdpa node)
        whichever door created or deleted it. Listeners run outside the bus lock; one that raises is
        logged and does not undo the change.
        """
        self._listeners.append(listener)

    # ----- management devices -----
    def _lookup(self, name: str | None, bus: str | None) -> MgmtDev:
        """vdpa_mgmtdev_get_from_attr: -EINVAL without a name, -ENODEV if none matches."""
        if name is None:
            raise _refuse(errno.EINVAL, None, "no management device name")
        for mgmtdev in self.mgmtdevs:
            if mgmtdev.matches(name, bus):
                return mgmtdev
        raise _refuse(errno.ENODEV, None, f"no management device {bus + '/' if bus else ''}{name}")

    def mgmtdev(self, name: str | None, bus: str | None = None) -> MgmtDev:
        """One management device, as VDPA_CMD_MGMTDEV_GET looks it up."""
        try:
            return self._lookup(name, bus)
        except BusError as error:
            extack = "vdpa: Fail to find the specified mgmt device"
            raise BusError(str(error), errno=error.errno, extack=extack) from None

    # ----- devices -----
    def devices(self) -> list[VdpaDevice]:
        """Every device, in the order they were added (the kernel's bus order)."""
        with self._lock:
            return list(self._devices.values())

    def get(self, name: str | None) -> VdpaDevice:
        if name is None:
            raise _refuse(errno.EINVAL, None, "no device name")
        with self._lock:
            vdev = self._devices.get(name)
        if vdev is None:
            raise _refuse(errno.ENODEV, "vdpa: device not found", f"no device {name}")
        return vdev

    def add(
        self,
        name: str | None,
        mgmtdev: str | None,
        config: DevSetConfig | None = None,
        *,
        bus: str | None = None,
        net_admin: bool = True,
    ) -> VdpaDevice:
        """VDPA_CMD_DEV_NEW: the checks of vdpa_nl_cmd_dev_add_set_doit in its order, then the model's."""
        config = config or DevSetConfig()
        if name is None:
            raise _refuse(errno.EINVAL, None, "no device name")
        if config.max_vqp == 0:
            raise _refuse(errno.EINVAL, "vdpa: At least one pair of VQs is required")
        if config.device_features is not None:
            missing = 0
            features = config.device_features
            if config.mac is not None and not features >> c.VIRTIO_NET_F_MAC & 1:
                missing |= 1 << c.VIRTIO_NET_F_MAC
            if config.mtu is not None and not features >> c.VIRTIO_NET_F_MTU & 1:
                missing |= 1 << c.VIRTIO_NET_F_MTU
            if (config.max_vqp or 0) > 1 and not features >> c.VIRTIO_NET_F_MQ & 1:
                missing |= 1 << c.VIRTIO_NET_F_MQ
            if missing:
                raise _refuse(errno.EINVAL, f"vdpa: Missing features 0x{missing:x} for provided attributes")
        if config.mask & NET_ATTRS_MASK and not net_admin:
            raise _refuse(errno.EPERM, None, "network attributes need CAP_NET_ADMIN")
        with self._lock:
            try:
                mdev = self._lookup(mgmtdev, bus)
            except BusError as error:
                raise BusError(
                    str(error), errno=error.errno, extack="vdpa: Fail to find the specified management device"
                ) from None
            unsupported = config.mask & ~mdev.config_attr_mask
            if unsupported:
                raise _refuse(errno.EOPNOTSUPP, f"vdpa: Some provided attributes are not supported: 0x{unsupported:x}")
            classes = mdev.supported_classes
            if config.mask & NET_ATTRS_MASK and not classes >> c.VIRTIO_ID_NET & 1:
                raise _refuse(errno.EINVAL, "vdpa: Network class attributes provided on unsupported management device")
            if (
                not config.mask & NET_ATTRS_MASK
                and config.device_features is not None
                and classes >> c.VIRTIO_ID_NET & 1
                and len(mdev.id_table) > 1
                and config.device_features & VIRTIO_DEVICE_F_MASK
            ):
                raise _refuse(
                    errno.EINVAL,
                    "vdpa: Management device supports multi-class while device features specified are ambiguous",
                )
            extra = sorted(set(config.extension) - mdev.extension_fields)
            if extra:
                raise _refuse(errno.EOPNOTSUPP, f"vdpasim: {mdev.name} does not take {', '.join(extra)}")
            # The model validates first (no side effects), then the name must be free, then the device
            # is built: a kernel simulator also refuses bad features before it registers (-EEXIST).
            try:
                device_config = mdev.build_config(name, config)
            except PeerError as error:
                raise _model_refusal(mdev, error) from None
            if name in self._devices:
                raise _refuse(errno.EEXIST, None, f"device {name} already exists")
            try:
                device = mdev.build_device(device_config)
            except (PeerError, OSError) as error:
                raise _model_refusal(mdev, error) from None
            vdev = VdpaDevice(name, mdev, device, nvqs=device.get_vq_count())
            self._devices[name] = vdev
        log.info("added %s (%s)", name, mdev.handle)
        self._notify("add", vdev)
        return vdev

    def _notify(self, event: str, vdev: VdpaDevice) -> None:
        # A failing listener is a bug on our side: log it, and keep the bus as the request left it.
        for listener in self._listeners:
            try:
                listener(event, vdev)
            except Exception:
                log.exception("%s listener failed for %s", event, vdev.name)

    def delete(self, name: str | None) -> None:
        """VDPA_CMD_DEV_DEL: the device stops and its resources go."""
        vdev = self.get(name)
        self._notify("del", vdev)
        with self._lock:
            if self._devices.get(vdev.name) is not vdev:
                return  # deleted meanwhile
            del self._devices[vdev.name]
        vdev.device.close()
        log.info("deleted %s", vdev.name)

    def set_attr(self, name: str | None, mac: bytes | None = None) -> str | None:
        """VDPA_CMD_DEV_ATTR_SET as Linux 6.12 has it: only a net device's MAC.

        Returns the warning the kernel then puts in its (successful) ack, or None.
        """
        vdev = self.get(name)
        mdev = vdev.mgmtdev
        if not mdev.supported_classes >> c.VIRTIO_ID_NET & 1:
            return f"vdpa: {vdev.name} device not supported"  # and the kernel answers success
        if mac is None:
            raise _refuse(errno.EOPNOTSUPP, None, "nothing to set")
        if mac[0] & 1 or not any(mac):  # is_valid_ether_addr
            raise _refuse(errno.EOPNOTSUPP, "vdpa: Invalid MAC address", f"invalid MAC address {format_mac(mac)}")
        if not mdev.set_attr or not isinstance(vdev.device, NetDevice):
            raise _refuse(errno.EOPNOTSUPP, "vdpa: Operation not supported by the device.")
        try:
            vdev.device.set_mac(mac)
        except PeerError as error:
            raise _model_refusal(mdev, error) from None
        log.info("%s: mac %s", vdev.name, format_mac(mac))
        return None

    def vstats(self, name: str | None, qidx: int, *, any_status: bool = False) -> VendorStats:
        """VDPA_CMD_DEV_VSTATS_GET: a queue's counters, once the driver has negotiated features.

        ``any_status`` (vdpasim's extension, asked for with VDPASIM_ATTR_EXTENSIONS) answers at any
        status too: the counters live as long as the device, also before a driver and after it left.
        """
        vdev = self.get(name)
        device = vdev.device
        if vdev.device_id != c.VIRTIO_ID_NET:
            raise _refuse(errno.EOPNOTSUPP, None, f"{vdev.name}: only net devices have vendor statistics")
        if qidx > QUEUE_INDEX_MAX:
            raise _refuse(errno.ERANGE, "vdpa: queue index exceeds max value")
        stats = getattr(device, "vstats", None)
        if stats is None:
            raise _refuse(errno.EOPNOTSUPP, None, f"{vdev.name}: no vendor statistics")
        if not any_status and not device.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK:
            raise _refuse(errno.EAGAIN, "vdpa: feature negotiation not complete")
        features = device.get_driver_features()
        max_vqp = None
        if features & (1 << c.VIRTIO_NET_F_MQ | 1 << c.VIRTIO_NET_F_RSS):
            max_vqp = int.from_bytes(device.get_config(8, 2), "little")
        try:
            values = tuple(stats(qidx).items())
        except PeerError as error:
            raise _model_refusal(vdev.mgmtdev, error) from None
        return VendorStats(vdev, qidx, features, max_vqp, values)

    def close(self) -> None:
        """Delete every device."""
        for vdev in reversed(self.devices()):
            self.delete(vdev.name)
