"""The vhost / vhost-vdpa ioctl ABI (linux include/uapi/linux/vhost.h, vhost_types.h), x86-64.

Ioctl numbers are computed with the kernel's _IOC formula from (direction, nr, argument size), so each
line reads like the uapi header; tests pin them to the values the kernel headers give. Variable-length
arguments (struct vhost_vdpa_config, struct vhost_memory) encode only their fixed header's size.
Struct layouts are ``struct.Struct`` objects in the kernel's field order (note vhost_vring_addr:
desc, *used*, *avail*).
"""

from __future__ import annotations

import struct

VHOST_VIRTIO = 0xAF
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | VHOST_VIRTIO << 8 | nr


# Structs.
VHOST_VRING_STATE = struct.Struct("<II")  # index, num
VHOST_VRING_FILE = struct.Struct("<Ii")  # index, fd (-1 unbinds)
VHOST_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
VHOST_VDPA_CONFIG = struct.Struct("<II")  # off, len, then len bytes
VHOST_VDPA_IOVA_RANGE = struct.Struct("<QQ")  # first, last
VHOST_IOTLB_MSG = struct.Struct("<QQQBB6x")  # iova, size, uaddr, perm, type
VHOST_MSG_V2 = struct.Struct("<II32s32x")  # type, asid, iotlb (in a 64-byte union): 72 bytes
VHOST_MSG_V1 = struct.Struct("<i4x32s32x")  # type, iotlb: 72 bytes
_U64, _U32, _U16, _U8, _INT = 8, 4, 2, 1, 4

# Generic vhost ioctls.
VHOST_GET_FEATURES = _ioc(_READ, 0x00, _U64)
VHOST_SET_FEATURES = _ioc(_WRITE, 0x00, _U64)
VHOST_SET_OWNER = _ioc(_NONE, 0x01, 0)
VHOST_RESET_OWNER = _ioc(_NONE, 0x02, 0)
VHOST_SET_MEM_TABLE = _ioc(_WRITE, 0x03, 8)
VHOST_SET_LOG_BASE = _ioc(_WRITE, 0x04, _U64)
VHOST_SET_LOG_FD = _ioc(_WRITE, 0x07, _INT)
VHOST_SET_VRING_NUM = _ioc(_WRITE, 0x10, VHOST_VRING_STATE.size)
VHOST_SET_VRING_ADDR = _ioc(_WRITE, 0x11, VHOST_VRING_ADDR.size)
VHOST_SET_VRING_BASE = _ioc(_WRITE, 0x12, VHOST_VRING_STATE.size)
VHOST_GET_VRING_BASE = _ioc(_READ | _WRITE, 0x12, VHOST_VRING_STATE.size)
VHOST_SET_VRING_KICK = _ioc(_WRITE, 0x20, VHOST_VRING_FILE.size)
VHOST_SET_VRING_CALL = _ioc(_WRITE, 0x21, VHOST_VRING_FILE.size)
VHOST_SET_VRING_ERR = _ioc(_WRITE, 0x22, VHOST_VRING_FILE.size)
VHOST_SET_BACKEND_FEATURES = _ioc(_WRITE, 0x25, _U64)
VHOST_GET_BACKEND_FEATURES = _ioc(_READ, 0x26, _U64)

# vhost-vdpa ioctls.
VHOST_VDPA_GET_DEVICE_ID = _ioc(_READ, 0x70, _U32)
VHOST_VDPA_GET_STATUS = _ioc(_READ, 0x71, _U8)
VHOST_VDPA_SET_STATUS = _ioc(_WRITE, 0x72, _U8)
VHOST_VDPA_GET_CONFIG = _ioc(_READ, 0x73, VHOST_VDPA_CONFIG.size)
VHOST_VDPA_SET_CONFIG = _ioc(_WRITE, 0x74, VHOST_VDPA_CONFIG.size)
VHOST_VDPA_SET_VRING_ENABLE = _ioc(_WRITE, 0x75, VHOST_VRING_STATE.size)
VHOST_VDPA_GET_VRING_NUM = _ioc(_READ, 0x76, _U16)
VHOST_VDPA_SET_CONFIG_CALL = _ioc(_WRITE, 0x77, _INT)
VHOST_VDPA_GET_IOVA_RANGE = _ioc(_READ, 0x78, VHOST_VDPA_IOVA_RANGE.size)
VHOST_VDPA_GET_CONFIG_SIZE = _ioc(_READ, 0x79, _U32)
VHOST_VDPA_GET_AS_NUM = _ioc(_READ, 0x7A, _INT)
VHOST_VDPA_GET_VRING_GROUP = _ioc(_READ | _WRITE, 0x7B, VHOST_VRING_STATE.size)
VHOST_VDPA_SET_GROUP_ASID = _ioc(_WRITE, 0x7C, VHOST_VRING_STATE.size)
VHOST_VDPA_SUSPEND = _ioc(_NONE, 0x7D, 0)
VHOST_VDPA_RESUME = _ioc(_NONE, 0x7E, 0)
VHOST_VDPA_GET_VRING_DESC_GROUP = _ioc(_READ | _WRITE, 0x7F, VHOST_VRING_STATE.size)
VHOST_VDPA_GET_VQS_COUNT = _ioc(_READ, 0x80, _U32)
VHOST_VDPA_GET_GROUP_NUM = _ioc(_READ, 0x81, _U32)
VHOST_VDPA_GET_VRING_SIZE = _ioc(_READ | _WRITE, 0x82, VHOST_VRING_STATE.size)

# IOTLB messages (written to the device fd).
VHOST_IOTLB_MSG_TYPE = 0x1
VHOST_IOTLB_MSG_V2_TYPE = 0x2
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW = 0x1, 0x2, 0x3

# Backend feature bits (VHOST_BACKEND_F_*), as bit numbers.
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4
VHOST_BACKEND_F_RESUME = 0x5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6
VHOST_BACKEND_F_DESC_ASID = 0x7
VHOST_BACKEND_F_IOTLB_PERSIST = 0x8

VHOST_FILE_UNBIND = -1
VHOST_VRING_F_LOG = 0

__all__ = [name for name in globals() if name.isupper() and not name.startswith("_")]
