"""The vhost-user vocabulary: request numbers, protocol features, payload layouts, and one Message type.

Facts from QEMU's docs/interop/vhost-user.rst (the protocol spec) as summarised in
shared/reference/protocols.md §4. Payloads are frozen dataclasses that validate themselves and know
their wire layout (``pack``/``unpack``); which payload a request carries, in each direction, is one
table (``REQUEST_PAYLOADS``), so the codec has no per-request code and server and client cannot
disagree. The vDPA extension (docs/vhost-user-vdpa.md) lives in the same tables.

Payload classes check syntax only (sizes, field widths, the "no fd" and padding rules); what a value
means for a device is the session's and the device's business.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

from vdpasim.errors import CodecError

__all__ = [
    "FrontendRequest",
    "BackendRequest",
    "ProtocolFeature",
    "HEADER",
    "VERSION",
    "FLAG_REPLY",
    "FLAG_NEED_REPLY",
    "MAX_PAYLOAD",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "VRING_NOFD_MASK",
    "VRING_IDX_MASK",
    "VHOST_BACKEND_F_SUSPEND",
    "VHOST_BACKEND_F_RESUME",
    "VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK",
    "Payload",
    "Empty",
    "U64",
    "VringState",
    "VringAddr",
    "MemoryRegion",
    "MemoryTable",
    "SingleMemoryRegion",
    "LogArea",
    "IotlbMsg",
    "ConfigSpace",
    "VringArea",
    "InflightInfo",
    "DeviceStateTransfer",
    "IovaRange",
    "SharedObject",
    "ShmemConfig",
    "ShmemMap",
    "ErrorReply",
    "Raw",
    "Message",
    "REQUEST_PAYLOADS",
    "BACKEND_PAYLOADS",
    "payload_types",
]

HEADER = struct.Struct("<III")  # request, flags, payload size
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 0x1000 * 4  # QEMU's largest payload (SHMEM config, 2056 B) fits; more is malformed
MAX_FDS = 32  # fds per message (rust-vmm's MAX_ATTACHED_FD_ENTRIES); SET_MEM_TABLE needs 8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS

# Bits of the VDPA_GET_BACKEND_FEATURES reply: the VHOST_BACKEND_F_* bits (linux/vhost_types.h) that
# depend on the device behind the socket rather than on the vhost-vdpa server in front of it.
VHOST_BACKEND_F_SUSPEND = 4
VHOST_BACKEND_F_RESUME = 5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 6


class FrontendRequest(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    # The vDPA extension (docs/vhost-user-vdpa.md): ids far from the spec's, behind ProtocolFeature.VDPA.
    VDPA_GET_DEVICE_ID = 0x7D01
    VDPA_GET_VENDOR_ID = 0x7D02
    VDPA_GET_VRING_NUM = 0x7D03  # max queue size
    VDPA_GET_CONFIG_SIZE = 0x7D04
    VDPA_GET_IOVA_RANGE = 0x7D05
    VDPA_GET_VQS_COUNT = 0x7D06
    VDPA_SUSPEND = 0x7D07
    VDPA_RESUME = 0x7D08
    VDPA_GET_GROUP_NUM = 0x7D09
    VDPA_GET_AS_NUM = 0x7D0A
    VDPA_GET_VRING_GROUP = 0x7D0B
    VDPA_SET_GROUP_ASID = 0x7D0C
    VDPA_SET_CONFIG_CALL = 0x7D0D
    VDPA_GET_VRING_SIZE = 0x7D0E
    VDPA_GET_BACKEND_FEATURES = 0x7D0F
    VDPA_GET_CONFIG_GENERATION = 0x7D10


class BackendRequest(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22
    # The vDPA extension: a bit no VMM knows (QEMU 7.2 masks offers with (1 << 17) - 1). Negotiated
    # only together with REPLY_ACK; it also opens GET/SET_CONFIG to every device type and answers
    # failed requests that have a reply payload with ErrorReply (docs/vhost-user-vdpa.md).
    VDPA = 63


# ----- payloads -----


class Payload:
    """A fixed wire layout; subclasses set ``LAYOUT`` and are frozen dataclasses in field order."""

    LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls, data: bytes) -> Payload:
        if len(data) != cls.LAYOUT.size:
            raise CodecError(f"{cls.__name__} payload is {len(data)} bytes, expected {cls.LAYOUT.size}")
        return cls(*cls.LAYOUT.unpack(data))


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise CodecError(f"{name}={value} does not fit in {bits} bits")


@dataclass(frozen=True)
class Empty(Payload):
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("")


@dataclass(frozen=True)
class U64(Payload):
    value: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        _check_range("u64", self.value, 64)


@dataclass(frozen=True)
class VringState(Payload):
    index: int
    num: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        _check_range("index", self.index, 32)
        _check_range("num", self.num, 32)


@dataclass(frozen=True)
class VringAddr(Payload):
    """Ring addresses; note the spec's order: descriptor, used, available (as struct vhost_vring_addr)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")


@dataclass(frozen=True)
class MemoryRegion(Payload):
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class MemoryTable(Payload):
    regions: tuple[MemoryRegion, ...]
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise CodecError(f"memory table of {len(self.regions)} regions (at most {MAX_MEM_REGIONS})")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def full_size(cls) -> int:
        """Bytes of the whole struct VhostUserMemory (all 8 region slots)."""
        return cls.LAYOUT.size + MAX_MEM_REGIONS * MemoryRegion.LAYOUT.size

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        if len(data) < cls.LAYOUT.size:
            raise CodecError(f"memory table payload of {len(data)} bytes")
        count, padding = cls.LAYOUT.unpack_from(data)
        size = MemoryRegion.LAYOUT.size
        # QEMU 7.2 sends exactly `count` regions; other front-ends send the whole 8-region array of
        # struct VhostUserMemory, of which only the first `count` mean anything. Nothing else is valid.
        if count > MAX_MEM_REGIONS or len(data) not in (cls.LAYOUT.size + count * size, cls.full_size()):
            raise CodecError(f"memory table claims {count} regions in {len(data)} bytes")
        if padding:
            raise CodecError(f"memory table padding is {padding:#x}, not 0")
        offset = cls.LAYOUT.size
        return cls(tuple(MemoryRegion.unpack(data[offset + i * size : offset + (i + 1) * size]) for i in range(count)))


@dataclass(frozen=True)
class SingleMemoryRegion(Payload):
    region: MemoryRegion
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemoryRegion:
        if len(data) != 8 + MemoryRegion.LAYOUT.size:
            raise CodecError(f"single memory region payload of {len(data)} bytes, expected 40")
        if cls.LAYOUT.unpack_from(data)[0]:
            raise CodecError("single memory region padding is not 0")
        return cls(MemoryRegion.unpack(data[8:]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LogArea(Payload):
    size: int
    offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class IotlbMsg(Payload):
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")


@dataclass(frozen=True)
class ConfigSpace(Payload):
    offset: int
    size: int
    flags: int
    data: bytes = b""
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<III")
    MAX_SIZE: ClassVar[int] = 256  # VHOST_USER_MAX_CONFIG_SIZE

    def __post_init__(self) -> None:
        if self.size > self.MAX_SIZE or len(self.data) != self.size:
            raise CodecError(f"config payload of {len(self.data)} bytes for size {self.size} (at most {self.MAX_SIZE})")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        if len(data) < cls.LAYOUT.size:
            raise CodecError(f"config payload of {len(data)} bytes")
        offset, size, flags = cls.LAYOUT.unpack_from(data)
        return cls(offset, size, flags, bytes(data[cls.LAYOUT.size :]))


@dataclass(frozen=True)
class VringArea(Payload):
    index_flags: int
    size: int
    offset: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQ")


@dataclass(frozen=True)
class InflightInfo(Payload):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")


@dataclass(frozen=True)
class DeviceStateTransfer(Payload):
    direction: int
    phase: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True)
class IovaRange(Payload):
    first: int
    last: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class SharedObject(Payload):
    """VhostUserShared: a 16-byte UUID naming an object exported by a back-end (virtio shared objects)."""

    uuid: bytes
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<16s")

    def __post_init__(self) -> None:
        if len(self.uuid) != 16:
            raise CodecError(f"shared object UUID of {len(self.uuid)} bytes, expected 16")


@dataclass(frozen=True)
class ShmemMap(Payload):
    """VhostUserMMap (BACKEND_SHMEM_MAP/UNMAP): map ``len`` bytes of the fd into shared memory region ``shmid``."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int  # bit 0: writable
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")


@dataclass(frozen=True)
class ShmemConfig(Payload):
    """VhostUserShMemConfig (GET_SHMEM_CONFIG reply): the size of each shared memory region, by shmid."""

    sizes: tuple[int, ...]
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II256Q")
    MAX_REGIONS: ClassVar[int] = 256

    def __post_init__(self) -> None:
        if len(self.sizes) > self.MAX_REGIONS:
            raise CodecError(f"{len(self.sizes)} shared memory regions (at most {self.MAX_REGIONS})")
        for size in self.sizes:
            _check_range("memory size", size, 64)

    def pack(self) -> bytes:
        sizes = list(self.sizes) + [0] * (self.MAX_REGIONS - len(self.sizes))
        return self.LAYOUT.pack(len(self.sizes), 0, *sizes)

    @classmethod
    def unpack(cls, data: bytes) -> ShmemConfig:
        if len(data) != cls.LAYOUT.size:
            raise CodecError(f"ShmemConfig payload is {len(data)} bytes, expected {cls.LAYOUT.size}")
        count, _, *sizes = cls.LAYOUT.unpack(data)
        if count > cls.MAX_REGIONS or any(sizes[count:]):
            raise CodecError(f"shared memory config of {count} regions with sizes beyond them")
        return cls(tuple(sizes[:count]))


@dataclass(frozen=True)
class ErrorReply(Payload):
    """The vDPA extension's failure reply to a request that has a reply payload: a positive errno.

    Four bytes long, a size no reply of the protocol has, so it cannot be mistaken for a real answer.
    Only a back-end whose front-end negotiated ProtocolFeature.VDPA sends it (docs/vhost-user-vdpa.md).
    """

    errno: int
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<I")
    MAX_ERRNO: ClassVar[int] = 4095  # the kernel's MAX_ERRNO: the values a -errno can take

    def __post_init__(self) -> None:
        if not 1 <= self.errno <= self.MAX_ERRNO:
            raise CodecError(f"error reply with errno {self.errno} (1..{self.MAX_ERRNO})")


@dataclass(frozen=True)
class Raw(Payload):
    """Bytes of a request whose payload vdpasim does not interpret (crypto sessions, shared objects...)."""

    data: bytes = b""
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("")

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Raw:
        return cls(bytes(data))


# ----- which payload each request carries: (request payload, reply payload or None for no reply) -----

F = FrontendRequest
REQUEST_PAYLOADS: dict[FrontendRequest, tuple[type[Payload], type[Payload] | None]] = {
    F.GET_FEATURES: (Empty, U64),
    F.SET_FEATURES: (U64, None),
    F.SET_OWNER: (Empty, None),
    F.RESET_OWNER: (Empty, None),
    F.SET_MEM_TABLE: (MemoryTable, None),
    F.SET_LOG_BASE: (LogArea, U64),
    F.SET_LOG_FD: (Empty, None),
    F.SET_VRING_NUM: (VringState, None),
    F.SET_VRING_ADDR: (VringAddr, None),
    F.SET_VRING_BASE: (VringState, None),
    F.GET_VRING_BASE: (VringState, VringState),
    F.SET_VRING_KICK: (U64, None),
    F.SET_VRING_CALL: (U64, None),
    F.SET_VRING_ERR: (U64, None),
    F.GET_PROTOCOL_FEATURES: (Empty, U64),
    F.SET_PROTOCOL_FEATURES: (U64, None),
    F.GET_QUEUE_NUM: (Empty, U64),
    F.SET_VRING_ENABLE: (VringState, None),
    F.SEND_RARP: (U64, None),
    F.NET_SET_MTU: (U64, None),
    F.SET_BACKEND_REQ_FD: (Empty, None),
    F.IOTLB_MSG: (IotlbMsg, U64),
    F.SET_VRING_ENDIAN: (VringState, None),
    F.GET_CONFIG: (ConfigSpace, ConfigSpace),
    F.SET_CONFIG: (ConfigSpace, None),
    F.CREATE_CRYPTO_SESSION: (Raw, Raw),
    F.CLOSE_CRYPTO_SESSION: (U64, None),
    F.POSTCOPY_ADVISE: (Empty, Empty),
    F.POSTCOPY_LISTEN: (Empty, None),
    F.POSTCOPY_END: (Empty, U64),
    F.GET_INFLIGHT_FD: (InflightInfo, InflightInfo),
    F.SET_INFLIGHT_FD: (InflightInfo, None),
    F.GPU_SET_SOCKET: (Empty, None),
    F.RESET_DEVICE: (Empty, None),
    F.VRING_KICK: (VringState, None),
    F.GET_MAX_MEM_SLOTS: (Empty, U64),
    F.ADD_MEM_REG: (SingleMemoryRegion, None),
    F.REM_MEM_REG: (SingleMemoryRegion, None),
    F.SET_STATUS: (U64, None),
    F.GET_STATUS: (Empty, U64),
    F.GET_SHARED_OBJECT: (SharedObject, U64),
    F.SET_DEVICE_STATE_FD: (DeviceStateTransfer, U64),
    F.CHECK_DEVICE_STATE: (Empty, U64),
    F.GET_SHMEM_CONFIG: (Empty, ShmemConfig),
    F.VDPA_GET_DEVICE_ID: (Empty, U64),
    F.VDPA_GET_VENDOR_ID: (Empty, U64),
    F.VDPA_GET_VRING_NUM: (Empty, U64),
    F.VDPA_GET_CONFIG_SIZE: (Empty, U64),
    F.VDPA_GET_IOVA_RANGE: (Empty, IovaRange),
    F.VDPA_GET_VQS_COUNT: (Empty, U64),
    F.VDPA_SUSPEND: (Empty, None),
    F.VDPA_RESUME: (Empty, None),
    F.VDPA_GET_GROUP_NUM: (Empty, U64),
    F.VDPA_GET_AS_NUM: (Empty, U64),
    F.VDPA_GET_VRING_GROUP: (VringState, VringState),
    F.VDPA_SET_GROUP_ASID: (VringState, None),
    F.VDPA_SET_CONFIG_CALL: (U64, None),
    F.VDPA_GET_VRING_SIZE: (VringState, VringState),
    F.VDPA_GET_BACKEND_FEATURES: (Empty, U64),
    F.VDPA_GET_CONFIG_GENERATION: (Empty, U64),
}
del F

B = BackendRequest
BACKEND_PAYLOADS: dict[BackendRequest, tuple[type[Payload], type[Payload] | None]] = {
    B.IOTLB_MSG: (IotlbMsg, None),
    B.CONFIG_CHANGE_MSG: (Empty, None),
    B.VRING_HOST_NOTIFIER_MSG: (VringArea, None),
    B.VRING_CALL: (VringState, None),
    B.VRING_ERR: (VringState, None),
    B.SHARED_OBJECT_ADD: (SharedObject, None),
    B.SHARED_OBJECT_REMOVE: (SharedObject, None),
    B.SHARED_OBJECT_LOOKUP: (SharedObject, None),
    B.SHMEM_MAP: (ShmemMap, None),
    B.SHMEM_UNMAP: (ShmemMap, None),
}
del B


def payload_types(request: FrontendRequest | BackendRequest) -> tuple[type[Payload], type[Payload] | None]:
    table = REQUEST_PAYLOADS if isinstance(request, FrontendRequest) else BACKEND_PAYLOADS
    return table[request]  # type: ignore[index]


@dataclass(frozen=True)
class Message:
    """One vhost-user message: a request or its reply, its payload, and the fds that came with it."""

    request: FrontendRequest | BackendRequest
    payload: Payload = field(default_factory=Empty)
    fds: tuple[int, ...] = ()
    reply: bool = False
    need_reply: bool = False

    @property
    def flags(self) -> int:
        return VERSION | (FLAG_REPLY if self.reply else 0) | (FLAG_NEED_REPLY if self.need_reply else 0)
