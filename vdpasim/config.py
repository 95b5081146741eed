"""Device configurations: frozen, validated once, built the same way from every source.

A device is described by one frozen dataclass. The CLI (``vdpasim dev add ... mac 02:..``), the vdpa
netlink attributes (``VDPA_ATTR_DEV_NET_CFG_MACADDR`` as 6 raw bytes, ``..._MTU`` as an integer) and
the state file (JSON) all go through ``from_mapping``, which accepts either spelling of a value (text
or native), so a device created one way can be re-created another way and compare equal. A bad value
raises ``DeviceRequestError`` (EINVAL) naming the field, which every door reports as-is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from .errors import DeviceRequestError
from .virtio import constants as c
from .virtio.features import DEPENDENCIES, feature_names

__all__ = [
    "NET_SUPPORTED_FEATURES",
    "NET_MODES",
    "NET_MAX_VQP",
    "NetConfig",
    "parse_mac",
    "format_mac",
    "parse_ipv4",
    "parse_features",
]


def _bits(*bits: int) -> int:
    return sum(1 << bit for bit in bits)


# Transport features every device model offers: vdpa_sim's base (ANY_LAYOUT, VERSION_1, ACCESS_PLATFORM)
# and the ring features the engine implements.
TRANSPORT_FEATURES = _bits(
    c.VIRTIO_F_ANY_LAYOUT,
    c.VIRTIO_F_VERSION_1,
    c.VIRTIO_F_ACCESS_PLATFORM,
    c.VIRTIO_RING_F_INDIRECT_DESC,
    c.VIRTIO_RING_F_EVENT_IDX,
    c.VIRTIO_F_RING_PACKED,
    c.VIRTIO_F_IN_ORDER,
)

# What the virtio-net model can offer (a device_features override may only remove bits).
NET_SUPPORTED_FEATURES = TRANSPORT_FEATURES | _bits(
    c.VIRTIO_NET_F_MTU,
    c.VIRTIO_NET_F_MAC,
    c.VIRTIO_NET_F_MRG_RXBUF,
    c.VIRTIO_NET_F_STATUS,
    c.VIRTIO_NET_F_CTRL_VQ,
    c.VIRTIO_NET_F_CTRL_RX,
    c.VIRTIO_NET_F_MQ,
    c.VIRTIO_NET_F_CTRL_MAC_ADDR,
)

NET_MODES = ("loopback", "responder")

# Queue pairs a net device may have: the spec allows 0x8000, but each queue costs memory (its iov
# table) and QEMU caps a device at 1024 queues; 256 pairs is plenty for a simulator.
NET_MAX_VQP = 256

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")  # a vdpa device name; also a file-name part
_MAC_TEXT = re.compile(r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}")


def _invalid(what: str) -> DeviceRequestError:
    return DeviceRequestError(what)


# ----- value parsers shared by every config type -----
def parse_mac(value: str | bytes | bytearray, what: str = "mac") -> bytes:
    """A MAC address from ``aa:bb:cc:dd:ee:ff`` (or ``-``) text or 6 raw bytes (a netlink attribute)."""
    if isinstance(value, bytes | bytearray):
        if len(value) != 6:
            raise _invalid(f"{what}: {len(value)} bytes, a MAC address has 6")
        return bytes(value)
    if isinstance(value, str) and _MAC_TEXT.fullmatch(value):
        return bytes(int(part, 16) for part in re.split("[:-]", value))
    raise _invalid(f"{what}: {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")


def format_mac(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def parse_ipv4(value: str | int, what: str = "peer_ip") -> str:
    """An IPv4 address in dotted form, from text or a host-order integer."""
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise _invalid(f"{what}: {value!r} is not an IPv4 address") from None


def parse_features(value: str | int, what: str = "device_features") -> int:
    """A 64-bit feature mask from an integer or its text (``0x...`` or decimal)."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise _invalid(f"{what}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise _invalid(f"{what}: {value!r} is not a 64-bit feature mask")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise _invalid(f"{what}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{what}: {value!r} is not an integer")
    if not low <= value <= high:
        raise _invalid(f"{what}: {value} is outside {low}..{high}")
    return value


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "on", "yes", "1", "false", "off", "no", "0"):
        return value.lower() in ("true", "on", "yes", "1")
    raise _invalid(f"{what}: {value!r} is not a boolean (on/off)")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid(f"name: {name!r} is not a device name (1-63 of A-Z a-z 0-9 _ . : -, not starting with _.:-)")
    return name


def _check_queue_size(value: Any) -> int:
    size = _int(value, "max_queue_size", 2, c.VIRTQ_MAX_SIZE)
    if size & (size - 1):
        raise _invalid(f"max_queue_size: {size} is not a power of two")
    return size


def _default_mac(name: str) -> bytes:
    """A locally administered unicast MAC derived from the name, stable across restarts."""
    return bytes([0x02, 0x56]) + hashlib.sha256(name.encode()).digest()[:4]


class _FromMapping:
    """``from_mapping``/``to_mapping`` for config dataclasses whose fields all have a text form."""

    _parsers: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Build from CLI options, netlink attributes or a state file; None values mean "default"."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise _invalid(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_mapping(self) -> dict[str, Any]:
        """Plain JSON-able values (MACs as text); ``from_mapping`` of it gives an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = format_mac(value) if isinstance(value, bytes) else value
        return out


@dataclass(frozen=True)
class NetConfig(_FromMapping):
    """A virtio-net device: identity, config space values, offered features and data-path mode.

    ``mode`` is ``loopback`` (TX frames come back on RX through the receive filter, as the kernel's
    vdpa_sim_net does) or ``responder`` (a peer at ``peer_ip``/``peer_mac`` answers ARP and ping).
    """

    name: str
    mac: bytes | None = None  # None: derived from the name (locally administered)
    mtu: int = 1500
    max_vqp: int = 1
    device_features: int | None = None  # None: all of NET_SUPPORTED_FEATURES
    max_queue_size: int = 256  # the kernel simulator's VDPASIM_QUEUE_MAX
    mode: str = "loopback"
    peer_ip: str | None = None
    peer_mac: bytes = field(default=bytes.fromhex("020000000001"))
    busy_poll: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise values once, here
        name = _check_name(self.name)
        mac = _default_mac(name) if self.mac is None else parse_mac(self.mac)
        if mac[0] & 1:
            raise _invalid(f"mac: {format_mac(mac)} is a multicast address")
        put(self, "mac", mac)
        put(self, "mtu", _int(self.mtu, "mtu", 68, 65535))
        put(self, "max_vqp", _int(self.max_vqp, "max_vqp", 1, NET_MAX_VQP))
        put(self, "max_queue_size", _check_queue_size(self.max_queue_size))
        put(self, "busy_poll", _bool(self.busy_poll, "busy_poll"))
        if self.mode not in NET_MODES:
            raise _invalid(f"mode: {self.mode!r} is not one of {', '.join(NET_MODES)}")
        peer_mac = parse_mac(self.peer_mac, "peer_mac")
        if peer_mac[0] & 1:
            raise _invalid(f"peer_mac: {format_mac(peer_mac)} is a multicast address")
        put(self, "peer_mac", peer_mac)
        if self.peer_ip is not None:
            put(self, "peer_ip", parse_ipv4(self.peer_ip))
        elif self.mode == "responder":
            raise _invalid("peer_ip: responder mode needs the peer's IPv4 address")
        if self.device_features is not None:
            put(self, "device_features", _check_net_features(parse_features(self.device_features)))
        if self.max_vqp > 1 and not self.features >> c.VIRTIO_NET_F_MQ & 1:
            raise _invalid(f"max_vqp: {self.max_vqp} queue pairs need VIRTIO_NET_F_MQ in device_features")

    @property
    def features(self) -> int:
        """The features the device offers."""
        return NET_SUPPORTED_FEATURES if self.device_features is None else self.device_features

    @property
    def num_queues(self) -> int:
        """rx/tx per pair, then the control queue (when offered)."""
        return 2 * self.max_vqp + (self.features >> c.VIRTIO_NET_F_CTRL_VQ & 1)

    @property
    def peer_ip_int(self) -> int:
        return int(ipaddress.IPv4Address(self.peer_ip)) if self.peer_ip else 0


def _check_net_features(features: int) -> int:
    extra = features & ~NET_SUPPORTED_FEATURES
    if extra:
        raise _invalid(f"device_features: {', '.join(feature_names(extra))} not supported by this device")
    if not features >> c.VIRTIO_F_VERSION_1 & 1:
        raise _invalid("device_features: VIRTIO_F_VERSION_1 is required (the device is modern only)")
    # A device must not offer a feature without the ones it depends on (VIRTIO 1.2 §5.1.3.1).
    for feature, (needs, clause) in DEPENDENCIES.items():
        if features >> feature & 1 and any(not features >> n & 1 for n in needs):
            name = feature_names(1 << feature)[0]
            need_names = ", ".join(feature_names(_bits(*needs)))
            raise _invalid(f"device_features: {name} requires {need_names} (VIRTIO 1.2 §{clause})")
    return features


# ======================================================================================================
# virtio-blk (appended by the blk helper; everything above belongs to the net configuration)
# ======================================================================================================

__all__ += ["BLK_SUPPORTED_FEATURES", "BLK_DEFAULT_CAPACITY", "BlkConfig"]

# What the virtio-blk model offers (VIRTIO_BLK_F_RO is added for a read-only disk): vdpa_sim_blk's bits
# plus FLUSH, which a file-backed disk honours with fdatasync.
BLK_SUPPORTED_FEATURES = TRANSPORT_FEATURES | _bits(
    c.VIRTIO_BLK_F_SIZE_MAX,
    c.VIRTIO_BLK_F_SEG_MAX,
    c.VIRTIO_BLK_F_BLK_SIZE,
    c.VIRTIO_BLK_F_FLUSH,
    c.VIRTIO_BLK_F_TOPOLOGY,
    c.VIRTIO_BLK_F_MQ,
    c.VIRTIO_BLK_F_DISCARD,
    c.VIRTIO_BLK_F_WRITE_ZEROES,
)

BLK_DEFAULT_CAPACITY = 0x40000  # sectors: vdpa_sim_blk's 128 MiB
_BLK_MAX_CAPACITY = 1 << 37  # sectors (64 TiB): the disk is mapped whole
_BLK_MAX_SEG = 1022  # a request's data segments plus header and status fit the 1024-row iov


@dataclass(frozen=True)
class BlkConfig(_FromMapping):
    """A virtio-blk device: geometry, limits, backing store and identity.

    The backing store is RAM (``path`` None: an anonymous memfd, zero-filled) or an image file mapped
    shared, so the guest's writes land in the file. ``capacity`` counts 512-byte sectors; None means
    vdpa_sim_blk's 128 MiB for RAM (and for a file being created) or the image's size. ``create``
    creates the image if needed and extends it to ``capacity`` (allocating the blocks, so writes through
    the mapping cannot fail later on a full file system); without it the image must already be that big.
    Defaults mirror the kernel's vdpa_sim_blk: size_max 4096, seg_max 32, blk_size 512, one queue,
    serial ``vdpa_blk_sim``.
    """

    name: str
    capacity: int | None = None
    blk_size: int = 512
    seg_max: int = 32
    size_max: int = 4096
    num_queues: int = 1
    read_only: bool = False
    path: str | None = None
    create: bool = False
    serial: str = "vdpa_blk_sim"
    max_queue_size: int = 256
    busy_poll: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise values once, here
        _check_name(self.name)
        blk_size = _int(self.blk_size, "blk_size", c.VIRTIO_BLK_SECTOR_SIZE, 65536)
        if blk_size & (blk_size - 1):
            raise _invalid(f"blk_size: {blk_size} is not a power of two")
        put(self, "blk_size", blk_size)
        put(self, "seg_max", _int(self.seg_max, "seg_max", 1, _BLK_MAX_SEG))
        put(self, "size_max", _int(self.size_max, "size_max", c.VIRTIO_BLK_SECTOR_SIZE, 0xFFFFFFFF))
        put(self, "num_queues", _int(self.num_queues, "num_queues", 1, 256))
        put(self, "read_only", _bool(self.read_only, "read_only"))
        put(self, "create", _bool(self.create, "create"))
        put(self, "max_queue_size", _check_queue_size(self.max_queue_size))
        put(self, "busy_poll", _bool(self.busy_poll, "busy_poll"))
        if self.path is not None and (not isinstance(self.path, str) or not self.path or "\0" in self.path):
            raise _invalid(f"path: {self.path!r} is not a file name")
        if self.create and self.path is None:
            raise _invalid("create: only an image file (path) can be created")
        if self.create and self.read_only:
            raise _invalid("create: a read-only disk cannot create its image")
        capacity = self.capacity
        if capacity is None and (self.path is None or self.create):
            capacity = BLK_DEFAULT_CAPACITY
        if capacity is not None:
            capacity = _int(capacity, "capacity", 1, _BLK_MAX_CAPACITY)
            if capacity * c.VIRTIO_BLK_SECTOR_SIZE % blk_size:
                raise _invalid(f"capacity: {capacity} sectors is not a whole number of {blk_size}-byte blocks")
        put(self, "capacity", capacity)
        serial = self.serial
        if (
            not isinstance(serial, str)
            or len(serial.encode("ascii", "replace")) > c.VIRTIO_BLK_ID_BYTES
            or not all(" " <= ch <= "~" for ch in serial)
        ):
            raise _invalid(f"serial: {serial!r} is not printable ASCII of at most {c.VIRTIO_BLK_ID_BYTES} characters")

    @property
    def features(self) -> int:
        """The features the device offers."""
        return BLK_SUPPORTED_FEATURES | (1 << c.VIRTIO_BLK_F_RO if self.read_only else 0)
