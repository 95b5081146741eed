"""Sans-I/O codec of the IOTLB messages written to a vhost-vdpa fd (struct vhost_msg / vhost_msg_v2).

Both framings are 72 bytes: ``int type`` (VHOST_IOTLB_MSG = 1 or VHOST_IOTLB_MSG_V2 = 2), then for v1 four
bytes of padding and for v2 a ``u32 asid``, then a 64-byte union whose first 32 bytes are
``struct vhost_iotlb_msg`` (iova, size, uaddr, perm, type).

``parse`` reads them as the kernel's ``vhost_chr_write_iter`` (drivers/vhost/vhost.c) does:

* the framing is chosen by the message's own type field, whatever backend features were negotiated
  (the kernel accepts v1 messages after IOTLB_MSG_V2 was acked and v2 messages before it);
* the asid field of a v2 message is read only when VHOST_BACKEND_F_IOTLB_ASID was negotiated (``asid``),
  and taken as 0 otherwise;
* only the bytes it needs are read: 4 (type) + 4 (padding or asid) + 32 (the iotlb message). Fewer bytes,
  an unknown framing type, or an UPDATE of size 0 are refused with EINVAL (``CodecError``). Bytes past
  the first 40 are ignored, and a write of at least 40 bytes is answered with the framing's full size
  (``MESSAGE_SIZE``), as the kernel does.

The iotlb message's own type (UPDATE, INVALIDATE, BATCH_BEGIN/END, or anything else) is not judged here:
the kernel refuses unknown ones in the device's message handler (vhost_vdpa_process_iotlb_msg), so the
server does too. ``encode`` builds full 72-byte messages for a client.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from vdpasim.errors import CodecError

from .abi import (
    VHOST_ACCESS_RO,
    VHOST_ACCESS_RW,
    VHOST_ACCESS_WO,
    VHOST_IOTLB_BATCH_BEGIN,
    VHOST_IOTLB_BATCH_END,
    VHOST_IOTLB_INVALIDATE,
    VHOST_IOTLB_MSG,
    VHOST_IOTLB_MSG_TYPE,
    VHOST_IOTLB_MSG_V2_TYPE,
    VHOST_IOTLB_UPDATE,
    VHOST_MSG_V1,
    VHOST_MSG_V2,
)

__all__ = [
    "IotlbMessage",
    "parse",
    "encode",
    "MESSAGE_SIZE",
    "NEEDED_BYTES",
    "PERMS",
    "TYPE_NAMES",
]

MESSAGE_SIZE = VHOST_MSG_V2.size  # sizeof(struct vhost_msg) == sizeof(struct vhost_msg_v2) == 72
NEEDED_BYTES = 4 + 4 + VHOST_IOTLB_MSG.size  # what vhost_chr_write_iter copies: 40
_TYPE = struct.Struct("<i")
_ASID = struct.Struct("<I")
PERMS = frozenset({VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW})
TYPE_NAMES = {
    1: "MISS",
    VHOST_IOTLB_UPDATE: "UPDATE",
    VHOST_IOTLB_INVALIDATE: "INVALIDATE",
    4: "ACCESS_FAIL",
    VHOST_IOTLB_BATCH_BEGIN: "BATCH_BEGIN",
    VHOST_IOTLB_BATCH_END: "BATCH_END",
}


@dataclass(frozen=True)
class IotlbMessage:
    """One IOTLB message. ``version`` is the framing it came in (1 or 2); ``asid`` is 0 for v1."""

    type: int
    asid: int = 0
    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    version: int = 2

    @property
    def last(self) -> int:
        """The last IOVA of the range, computed modulo 2**64 as the kernel does (size 0 wraps)."""
        return (self.iova + self.size - 1) & 0xFFFFFFFFFFFFFFFF

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")


def parse(data: bytes, asid: bool) -> IotlbMessage:
    """Decode one written message; ``asid``: VHOST_BACKEND_F_IOTLB_ASID is negotiated. Raises CodecError (EINVAL)."""
    if len(data) < _TYPE.size:
        raise CodecError(f"IOTLB write of {len(data)} bytes has no type", errno=errno.EINVAL)
    (framing,) = _TYPE.unpack_from(data)
    if framing == VHOST_IOTLB_MSG_TYPE:
        version, space = 1, 0
    elif framing == VHOST_IOTLB_MSG_V2_TYPE:
        version = 2
        space = _ASID.unpack_from(data, 4)[0] if asid and len(data) >= 8 else 0
        if asid and len(data) < 8:
            raise CodecError(f"IOTLB v2 write of {len(data)} bytes has no asid", errno=errno.EINVAL)
    else:
        raise CodecError(f"IOTLB write of unknown framing type {framing}", errno=errno.EINVAL)
    if len(data) < NEEDED_BYTES:
        raise CodecError(f"IOTLB write of {len(data)} bytes, {NEEDED_BYTES} needed", errno=errno.EINVAL)
    iova, size, uaddr, perm, kind = VHOST_IOTLB_MSG.unpack_from(data, 8)
    if kind == VHOST_IOTLB_UPDATE and size == 0:
        raise CodecError(f"IOTLB UPDATE of size 0 at iova {iova:#x}", errno=errno.EINVAL)
    return IotlbMessage(kind, space, iova, size, uaddr, perm, version)


def encode(message: IotlbMessage, v2: bool) -> bytes:
    """The 72 bytes of ``message`` in the v2 framing (with its asid) or the v1 one (asid must be 0)."""
    iotlb = VHOST_IOTLB_MSG.pack(message.iova, message.size, message.uaddr, message.perm, message.type)
    if v2:
        return VHOST_MSG_V2.pack(VHOST_IOTLB_MSG_V2_TYPE, message.asid, iotlb)
    if message.asid:
        raise CodecError(f"asid {message.asid} cannot be said in a v1 IOTLB message", errno=errno.EINVAL)
    return VHOST_MSG_V1.pack(VHOST_IOTLB_MSG_TYPE, iotlb)
