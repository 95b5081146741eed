"""The VDUSE uapi (include/uapi/linux/vduse.h, API version 0 as in Linux 6.12), as ctypes structures.

Why ctypes and not struct formats: the ioctls pass these records by address and the kernel writes some
of them back (IOTLB_GET_FD, VQ_GET_INFO), so a mutable buffer with named fields is the natural fit, and
``ctypes.sizeof`` lets the tests pin every size the ioctl numbers encode. Names are the uapi's, verbatim.
Fields that newer kernels carved out of ``reserved`` (API 1: ngroups, nas, group, asid) stay reserved
here: API 0 requires them to be zero.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "VDUSE_BASE",
    "VDUSE_API_VERSION",
    "VDUSE_NAME_MAX",
    "VDUSE_CONTROL_PATH",
    "VDUSE_DEV_DIR",
    "vduse_dev_config",
    "vduse_iotlb_entry",
    "vduse_config_data",
    "vduse_vq_config",
    "vduse_vq_state_split",
    "vduse_vq_state_packed",
    "vduse_vq_info",
    "vduse_vq_eventfd",
    "vduse_iova_umem",
    "vduse_iova_info",
    "vduse_vq_state",
    "vduse_dev_status",
    "vduse_iova_range",
    "vduse_dev_request",
    "vduse_dev_response",
    "VDUSE_GET_API_VERSION",
    "VDUSE_SET_API_VERSION",
    "VDUSE_CREATE_DEV",
    "VDUSE_DESTROY_DEV",
    "VDUSE_IOTLB_GET_FD",
    "VDUSE_DEV_GET_FEATURES",
    "VDUSE_DEV_SET_CONFIG",
    "VDUSE_DEV_INJECT_CONFIG_IRQ",
    "VDUSE_VQ_SETUP",
    "VDUSE_VQ_GET_INFO",
    "VDUSE_VQ_SETUP_KICKFD",
    "VDUSE_VQ_INJECT_IRQ",
    "VDUSE_IOTLB_REG_UMEM",
    "VDUSE_IOTLB_DEREG_UMEM",
    "VDUSE_IOTLB_GET_INFO",
    "VDUSE_ACCESS_RO",
    "VDUSE_ACCESS_WO",
    "VDUSE_ACCESS_RW",
    "VDUSE_EVENTFD_DEASSIGN",
    "VDUSE_IOVA_CAP_UMEM",
    "VDUSE_GET_VQ_STATE",
    "VDUSE_SET_STATUS",
    "VDUSE_UPDATE_IOTLB",
    "VDUSE_REQ_RESULT_OK",
    "VDUSE_REQ_RESULT_FAILED",
    "config_request",
]

VDUSE_BASE = 0x81
VDUSE_API_VERSION = 0
VDUSE_NAME_MAX = 256
VDUSE_CONTROL_PATH = "/dev/vduse/control"
VDUSE_DEV_DIR = "/dev/vduse"

# asm-generic/ioctl.h encoding: nr 8 bits, type 8 bits, size 14 bits, direction 2 bits.
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | VDUSE_BASE << 8 | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


class vduse_dev_config(ctypes.Structure):
    """VDUSE_CREATE_DEV's argument; the config space bytes follow it (``config_request``)."""

    _fields_ = [
        ("name", ctypes.c_char * VDUSE_NAME_MAX),
        ("vendor_id", ctypes.c_uint32),
        ("device_id", ctypes.c_uint32),
        ("features", ctypes.c_uint64),
        ("vq_num", ctypes.c_uint32),
        ("vq_align", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 13),
        ("config_size", ctypes.c_uint32),
    ]


class vduse_iotlb_entry(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("last", ctypes.c_uint64),
        ("perm", ctypes.c_uint8),
    ]


VDUSE_ACCESS_RO = 0x1
VDUSE_ACCESS_WO = 0x2
VDUSE_ACCESS_RW = 0x3


class vduse_config_data(ctypes.Structure):
    """VDUSE_DEV_SET_CONFIG's header; ``length`` bytes of config follow it."""

    _fields_ = [("offset", ctypes.c_uint32), ("length", ctypes.c_uint32)]


class vduse_vq_config(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("max_size", ctypes.c_uint16),
        ("reserved", ctypes.c_uint16 * 13),
    ]


class vduse_vq_state_split(ctypes.Structure):
    _fields_ = [("avail_index", ctypes.c_uint16)]


class vduse_vq_state_packed(ctypes.Structure):
    _fields_ = [
        ("last_avail_counter", ctypes.c_uint16),
        ("last_avail_idx", ctypes.c_uint16),
        ("last_used_counter", ctypes.c_uint16),
        ("last_used_idx", ctypes.c_uint16),
    ]


class _vq_state_union(ctypes.Union):
    _fields_ = [("split", vduse_vq_state_split), ("packed", vduse_vq_state_packed)]


class vduse_vq_info(ctypes.Structure):
    _anonymous_ = ("state",)
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("num", ctypes.c_uint32),
        ("desc_addr", ctypes.c_uint64),
        ("driver_addr", ctypes.c_uint64),
        ("device_addr", ctypes.c_uint64),
        ("state", _vq_state_union),
        ("ready", ctypes.c_uint8),
    ]


VDUSE_EVENTFD_DEASSIGN = -1


class vduse_vq_eventfd(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class vduse_iova_umem(ctypes.Structure):
    _fields_ = [
        ("uaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 3),
    ]


VDUSE_IOVA_CAP_UMEM = 1 << 0


class vduse_iova_info(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("last", ctypes.c_uint64),
        ("capability", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 3),
    ]


# Control ioctls (/dev/vduse/control).
VDUSE_GET_API_VERSION = _ior(0x00, 8)
VDUSE_SET_API_VERSION = _iow(0x01, 8)
VDUSE_CREATE_DEV = _iow(0x02, ctypes.sizeof(vduse_dev_config))
VDUSE_DESTROY_DEV = _iow(0x03, VDUSE_NAME_MAX)

# Device ioctls (/dev/vduse/$NAME).
VDUSE_IOTLB_GET_FD = _iowr(0x10, ctypes.sizeof(vduse_iotlb_entry))
VDUSE_DEV_GET_FEATURES = _ior(0x11, 8)
VDUSE_DEV_SET_CONFIG = _iow(0x12, ctypes.sizeof(vduse_config_data))
VDUSE_DEV_INJECT_CONFIG_IRQ = _io(0x13)
VDUSE_VQ_SETUP = _iow(0x14, ctypes.sizeof(vduse_vq_config))
VDUSE_VQ_GET_INFO = _iowr(0x15, ctypes.sizeof(vduse_vq_info))
VDUSE_VQ_SETUP_KICKFD = _iow(0x16, ctypes.sizeof(vduse_vq_eventfd))
VDUSE_VQ_INJECT_IRQ = _iow(0x17, 4)
VDUSE_IOTLB_REG_UMEM = _iow(0x18, ctypes.sizeof(vduse_iova_umem))  # Linux 6.0+
VDUSE_IOTLB_DEREG_UMEM = _iow(0x19, ctypes.sizeof(vduse_iova_umem))  # Linux 6.0+
VDUSE_IOTLB_GET_INFO = _iowr(0x1A, ctypes.sizeof(vduse_iova_info))  # Linux 6.0+

# Control messages: read(2) a request, write(2) the response.
VDUSE_GET_VQ_STATE = 0
VDUSE_SET_STATUS = 1
VDUSE_UPDATE_IOTLB = 2

VDUSE_REQ_RESULT_OK = 0x00
VDUSE_REQ_RESULT_FAILED = 0x01


class vduse_vq_state(ctypes.Structure):
    _anonymous_ = ("state",)
    _fields_ = [("index", ctypes.c_uint32), ("state", _vq_state_union)]


class vduse_dev_status(ctypes.Structure):
    _fields_ = [("status", ctypes.c_uint8)]


class vduse_iova_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("last", ctypes.c_uint64)]


class _request_union(ctypes.Union):
    _fields_ = [
        ("vq_state", vduse_vq_state),
        ("s", vduse_dev_status),
        ("iova", vduse_iova_range),
        ("padding", ctypes.c_uint32 * 32),
    ]


class vduse_dev_request(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("request_id", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 4),
        ("u", _request_union),
    ]


class _response_union(ctypes.Union):
    _fields_ = [("vq_state", vduse_vq_state), ("padding", ctypes.c_uint32 * 32)]


class vduse_dev_response(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_id", ctypes.c_uint32),
        ("result", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 4),
        ("u", _response_union),
    ]


def config_request(
    name: str, *, device_id: int, vendor_id: int, features: int, vq_num: int, vq_align: int, config: bytes
) -> bytearray:
    """VDUSE_CREATE_DEV's whole argument: the header followed by the config space.

    The ioctl number encodes only the header's size; the kernel copies ``config_size`` more bytes from
    right after it, so both must live in one buffer.
    """
    raw = name.encode()
    if not raw or len(raw) >= VDUSE_NAME_MAX or b"\0" in raw:
        raise ValueError(f"VDUSE device name {name!r}: 1..{VDUSE_NAME_MAX - 1} bytes, no NUL")
    head = vduse_dev_config(
        name=raw,
        vendor_id=vendor_id,
        device_id=device_id,
        features=features,
        vq_num=vq_num,
        vq_align=vq_align,
        config_size=len(config),
    )
    return bytearray(bytes(head) + config)
