"""The vdpa generic-netlink family served in userspace, free of I/O: one request in, the kernel's replies out.

``VdpaNetlinkServer.handle(request, sender_pid=...)`` takes the bytes of one sendmsg() on a
NETLINK_GENERIC socket and returns the messages the Linux 6.12 kernel would queue for that socket,
in order; the caller moves them (the bypass supervisor into a trapped program's recvmsg, the daemon
onto its control socket, a test onto a socketpair). Two families are served, as the kernel's
generic-netlink core serves them: the controller ``nlctrl`` (CTRL_CMD_GETFAMILY, so that tools can
resolve "vdpa" to a family id) and ``vdpa`` itself, over a ``Bus`` (bus/model.py).

What "as the kernel would" covers, with where each rule comes from:

* message walk (netlink_rcv_skb): several messages per datagram; a message that is not a request, or
  is a control message, is only acked; a truncated one ends the walk; an ack follows every request
  with NLM_F_ACK, and an error reply every failed one;
* generic netlink (genl_family_rcv_msg): unknown family id -ENOENT; short header -EINVAL; for commands
  from the family's ``resv_start_op`` on (vdpa: 8, DEV_ATTR_SET) the genlmsghdr reserved field and
  the nlmsg flags are checked; unknown command or a dump of a command without one -EOPNOTSUPP;
  GENL_ADMIN_PERM commands without CAP_NET_ADMIN -EPERM;
* attribute validation (lib/nlattr.c): the vdpa family is strictly validated (every op, since Linux
  6.5), the controller's GETFAMILY liberally; error texts, errnos, the offending attribute's offset
  and its policy are the kernel's;
* replies (drivers/vdpa/vdpa.c): the kernel's reply commands, attributes and their order; dumps as
  NLM_F_MULTI messages and an NLMSG_DONE;
* acks (netlink_ack): NLMSG_ERROR with the request's header, its payload unless NETLINK_CAP_ACK
  (NLM_F_CAPPED, always set on success), and with NETLINK_EXT_ACK the extended-ack attributes
  (NLM_F_ACK_TLVS). Those socket options, and CAP_NET_ADMIN, are parameters of ``handle``.

Replies are encoded with the family's pyroute2 declaration (bus/netlink.py ``vdpa_msg``); requests
are walked attribute by attribute here, since validation needs every attribute's raw length and
offset. Not served: CTRL_CMD_GETPOLICY (-EOPNOTSUPP) and multicast notifications.

A reply list is one message per element. The kernel delivers a doit reply and its ack as two
datagrams, and a dump's messages in one datagram with NLMSG_DONE in the next; ``datagrams`` groups
a reply list that way for a transport that wants to be exact.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    CTRL_CMD_GETPOLICY,
    CTRL_CMD_NEWFAMILY,
    GENL_ID_CTRL,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_ECHO,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_MIN_TYPE,
    ctrlmsg,
)

from ..config import format_mac
from ..devices.core import SimDevice
from ..errors import PeerError
from ..virtio import constants as c
from .model import Bus, BusError, DevSetConfig, MgmtDev, VdpaDevice
from .netlink import (
    EXTENSION_FIELDS,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSGERR_ATTR_MSG,
    NLMSGERR_ATTR_OFFS,
    NLMSGERR_ATTR_POLICY,
    VDPA_ATTR_DEV_FEATURES,
    VDPA_ATTR_DEV_NAME,
    VDPA_ATTR_DEV_NET_CFG_MACADDR,
    VDPA_ATTR_DEV_NET_CFG_MAX_VQP,
    VDPA_ATTR_DEV_NET_CFG_MTU,
    VDPA_ATTR_DEV_QUEUE_INDEX,
    VDPA_ATTR_MAX,
    VDPA_ATTR_MGMTDEV_BUS_NAME,
    VDPA_ATTR_MGMTDEV_DEV_NAME,
    VDPA_CMD_DEV_ATTR_SET,
    VDPA_CMD_DEV_CONFIG_GET,
    VDPA_CMD_DEV_DEL,
    VDPA_CMD_DEV_GET,
    VDPA_CMD_DEV_NEW,
    VDPA_CMD_DEV_VSTATS_GET,
    VDPA_CMD_MGMTDEV_GET,
    VDPA_CMD_MGMTDEV_NEW,
    VDPA_GENL_NAME,
    VDPA_GENL_VERSION,
    VDPASIM_ATTR_BLK_BLK_SIZE,
    VDPASIM_ATTR_BLK_CAPACITY,
    VDPASIM_ATTR_BLK_CREATE,
    VDPASIM_ATTR_BLK_NUM_QUEUES,
    VDPASIM_ATTR_BLK_PATH,
    VDPASIM_ATTR_BLK_READ_ONLY,
    VDPASIM_ATTR_BLK_SERIAL,
    VDPASIM_ATTR_BUSY_POLL,
    VDPASIM_ATTR_EXTENSIONS,
    VDPASIM_ATTR_MAX_VQ_SIZE,
    VDPASIM_ATTR_NET_MODE,
    VDPASIM_ATTR_NET_PEER_IP,
    VDPASIM_ATTR_NET_PEER_MAC,
    VDPASIM_ATTR_VHOST_USER_PATH,
    VDPASIM_ATTR_VHOST_VDPA_NODE,
    vdpa_msg,
)

__all__ = [
    "NlaType",
    "Policy",
    "VDPA_POLICY",
    "EXTENSION_POLICY",
    "VDPA_FAMILY_ID",
    "VdpaNetlinkServer",
    "datagrams",
    "DUMP_DATAGRAM_SIZE",
]

log = logging.getLogger("vdpasim.netlink")

VDPA_FAMILY_ID = 0x1F  # ours to choose: tools resolve the family by name through nlctrl

_HDR = struct.Struct("=IHHII")  # struct nlmsghdr
_GENL = struct.Struct("=BBH")  # struct genlmsghdr
_NLA = struct.Struct("=HH")  # struct nlattr
_NLA_F_NESTED = 1 << 15
_NLA_TYPE_MASK = ~(1 << 15 | 1 << 14) & 0xFFFF
_GENL_HDRLEN = _GENL.size

# genl op flags (include/uapi/linux/genetlink.h)
_GENL_ADMIN_PERM = 0x01
_GENL_CMD_CAP_DO = 0x02
_GENL_CMD_CAP_DUMP = 0x04
_GENL_CMD_CAP_HASPOL = 0x08


def _align(n: int) -> int:
    return (n + 3) & ~3


# ----- attribute policies (struct nla_policy) -----
class NlaType(enum.Enum):
    """The kernel's NLA_* policy types used here, with their NL_ATTR_TYPE_* number for policy reports."""

    UNSPEC = 0
    FLAG = 1
    U8 = 2
    U16 = 3
    U32 = 4
    U64 = 5
    BINARY = 10
    STRING = 11
    NUL_STRING = 12


_EXACT_LEN = {NlaType.U8: 1, NlaType.U16: 2, NlaType.U32: 4, NlaType.U64: 8}
_INT_MAX = {NlaType.U8: 0xFF, NlaType.U16: 0xFFFF, NlaType.U32: 0xFFFFFFFF, NlaType.U64: (1 << 64) - 1}


@dataclass(frozen=True)
class Policy:
    """One attribute's policy: type, ``len`` (a string's or binary's maximum), optional range (min/max)."""

    type: NlaType = NlaType.UNSPEC
    len: int = 0
    min: int | None = None
    max: int | None = None

    @property
    def ranged(self) -> bool:
        return self.min is not None or self.max is not None

    def range(self) -> tuple[int, int]:
        """nla_get_range_unsigned: the type's bounds, narrowed by the policy's."""
        top = 0xFFFF if self.type is NlaType.BINARY else _INT_MAX[self.type]
        return (self.min or 0, top if self.max is None else self.max)

    def report(self) -> bytes:
        """The NLMSGERR_ATTR_POLICY nest's content (netlink_policy_dump_write_attr)."""
        out = b""
        if self.type in _INT_MAX:
            low, high = self.range()
            out += _nla(4, struct.pack("=Q", low)) + _nla(5, struct.pack("=Q", high))  # MIN/MAX_VALUE_U
        elif self.type in (NlaType.STRING, NlaType.NUL_STRING, NlaType.BINARY):
            if self.ranged:
                low, high = self.range()
                if low:
                    out += _nla(6, struct.pack("=I", low))  # MIN_LENGTH
                if high < 0xFFFF:
                    out += _nla(7, struct.pack("=I", high))  # MAX_LENGTH
            elif self.len:
                out += _nla(7, struct.pack("=I", self.len))
        return out + _nla(1, struct.pack("=I", self.type.value))  # NL_POLICY_TYPE_ATTR_TYPE


_STRING = Policy(NlaType.STRING)
_U8, _U16, _U32, _U64 = Policy(NlaType.U8), Policy(NlaType.U16), Policy(NlaType.U32), Policy(NlaType.U64)

# vdpa_nl_policy (Linux 6.12); every other attribute up to VDPA_ATTR_MAX is NLA_UNSPEC.
VDPA_POLICY: dict[int, Policy] = {
    VDPA_ATTR_MGMTDEV_BUS_NAME: Policy(NlaType.NUL_STRING),
    VDPA_ATTR_MGMTDEV_DEV_NAME: _STRING,
    VDPA_ATTR_DEV_NAME: _STRING,
    VDPA_ATTR_DEV_NET_CFG_MACADDR: Policy(NlaType.BINARY, min=6, max=6),  # NLA_POLICY_ETH_ADDR
    VDPA_ATTR_DEV_NET_CFG_MAX_VQP: _U16,
    VDPA_ATTR_DEV_NET_CFG_MTU: Policy(NlaType.U16, min=68),  # virtio 1.1 §5.1.4.1
    VDPA_ATTR_DEV_QUEUE_INDEX: _U32,
    VDPA_ATTR_DEV_FEATURES: _U64,
}

# vdpasim's attributes, validated the same way; the reply-only ones are refused in requests.
EXTENSION_POLICY: dict[int, Policy] = {
    VDPASIM_ATTR_EXTENSIONS: Policy(NlaType.FLAG),
    VDPASIM_ATTR_NET_MODE: Policy(NlaType.NUL_STRING, len=15),
    VDPASIM_ATTR_NET_PEER_IP: Policy(NlaType.BINARY, min=4, max=4),
    VDPASIM_ATTR_NET_PEER_MAC: Policy(NlaType.BINARY, min=6, max=6),
    VDPASIM_ATTR_BLK_CAPACITY: _U64,
    VDPASIM_ATTR_BLK_READ_ONLY: _U8,
    VDPASIM_ATTR_BLK_PATH: Policy(NlaType.NUL_STRING, len=4095),
    VDPASIM_ATTR_BLK_CREATE: _U8,
    VDPASIM_ATTR_BLK_NUM_QUEUES: _U16,
    VDPASIM_ATTR_MAX_VQ_SIZE: _U16,
    VDPASIM_ATTR_BUSY_POLL: _U8,
    VDPASIM_ATTR_VHOST_USER_PATH: Policy(),
    VDPASIM_ATTR_VHOST_VDPA_NODE: Policy(),
    VDPASIM_ATTR_BLK_BLK_SIZE: _U32,
    VDPASIM_ATTR_BLK_SERIAL: Policy(NlaType.NUL_STRING, len=20),  # VIRTIO_BLK_ID_BYTES
}

# ctrl_policy_family: CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME (GENL_NAMSIZ - 1)
_CTRL_POLICY: dict[int, Policy] = {1: _U16, 2: Policy(NlaType.NUL_STRING, len=15)}


# ----- errors -----
@dataclass
class _Extack:
    msg: str | None = None
    bad_attr: int | None = None  # offset of the attribute from the start of its message
    policy: Policy | None = None


class _Refused(Exception):
    """A request the kernel would refuse with ``-errno`` and these extended-ack details."""

    def __init__(self, err: int, msg: str | None = None, *, bad_attr: int | None = None, policy: Policy | None = None):
        super().__init__(msg or errno.errorcode.get(err, str(err)))
        self.errno = err
        self.extack = _Extack(msg, bad_attr, policy)


# ----- attributes of a request -----
@dataclass(frozen=True)
class _Attr:
    type: int
    offset: int  # of the attribute header, from the start of the message
    payload: bytes

    def string(self) -> str:
        """nla_data as a C string: up to the first NUL."""
        return self.payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def uint(self) -> int:
        return int.from_bytes(self.payload, "little")


def _parse(
    message: bytes, start: int, maxtype: int, policy: dict[int, Policy], strict: bool, extack: _Extack
) -> dict[int, _Attr]:
    """__nla_validate_parse + validate_nla over the attributes of ``message`` from ``start``."""
    attrs: dict[int, _Attr] = {}
    offset = start
    end = len(message)
    while end - offset >= _NLA.size:
        length, raw_type = _NLA.unpack_from(message, offset)
        if length < _NLA.size or length > end - offset:
            break
        kind = raw_type & _NLA_TYPE_MASK
        payload = message[offset + _NLA.size : offset + length]
        if kind == 0 or (kind > maxtype and kind not in policy):
            if strict:
                raise _Refused(errno.EINVAL, "Unknown attribute type", bad_attr=offset)
        else:
            _validate(kind, raw_type, payload, offset, policy.get(kind, Policy()), strict)
            attrs[kind] = _Attr(kind, offset, payload)
        offset += _align(length)
    if offset < end:
        extack.msg = "bytes leftover after parsing attributes"
        if strict:
            raise _Refused(errno.EINVAL, extack.msg)
    return attrs


def _validate(kind: int, raw_type: int, payload: bytes, offset: int, pt: Policy, strict: bool) -> None:
    size = len(payload)
    exact = _EXACT_LEN.get(pt.type)
    if exact is not None and size != exact and strict:
        raise _Refused(errno.EINVAL, "invalid attribute length", bad_attr=offset, policy=pt)
    if strict and raw_type & _NLA_F_NESTED and pt.type is not NlaType.UNSPEC:
        raise _Refused(errno.EINVAL, "NLA_F_NESTED not expected", bad_attr=offset, policy=pt)

    def failed(err: int = errno.ERANGE) -> _Refused:
        return _Refused(err, "Attribute failed policy validation", bad_attr=offset, policy=pt)

    if pt.type is NlaType.FLAG:
        if size > 0:
            raise failed()
    elif pt.type in (NlaType.NUL_STRING, NlaType.STRING):
        if pt.type is NlaType.NUL_STRING:
            window = min(size, pt.len + 1) if pt.len else size
            if not window or b"\0" not in payload[:window]:
                raise failed(errno.EINVAL)
        if size < 1:
            raise failed()
        if pt.len:
            text_len = size - 1 if payload[-1] == 0 else size
            if text_len > pt.len:
                raise failed()
    elif pt.type is NlaType.BINARY:
        if pt.len and size > pt.len:
            raise failed()
    elif pt.type is NlaType.UNSPEC:
        if strict:
            raise _Refused(errno.EINVAL, "Unsupported attribute", bad_attr=offset)
    elif size < (pt.len or _EXACT_LEN[pt.type]):
        raise failed()
    if pt.ranged:
        value = size if pt.type is NlaType.BINARY else int.from_bytes(payload[: _EXACT_LEN[pt.type]], "little")
        low, high = pt.range()
        if not low <= value <= high:
            text = "binary attribute size out of range" if pt.type is NlaType.BINARY else "integer out of range"
            raise _Refused(errno.ERANGE, text, bad_attr=offset, policy=pt)


# ----- encoding -----
def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _done(seq: int, pid: int) -> bytes:
    return _HDR.pack(_HDR.size + 4, NLMSG_DONE, NLM_F_MULTI, seq, pid) + struct.pack("=i", 0)


def _ack(request: bytes, err: int, extack: _Extack | None, pid: int, *, cap_ack: bool, ext_ack: bool) -> bytes:
    """netlink_ack: NLMSG_ERROR with ``-err`` (0: success), the request echoed, the extended-ack TLVs."""
    length, _, _, seq, _ = _HDR.unpack_from(request)
    flags = 0
    if err and not cap_ack:
        echoed = request[:length] + b"\0" * (_align(length) - length)
    else:
        echoed = request[: _HDR.size]
        flags |= NLM_F_CAPPED
    tlvs = b""
    if ext_ack and extack is not None:
        if extack.msg:
            tlvs += _nla(NLMSGERR_ATTR_MSG, extack.msg.encode() + b"\0")
        if err and extack.bad_attr is not None:
            tlvs += _nla(NLMSGERR_ATTR_OFFS, struct.pack("=I", extack.bad_attr))
        if err and extack.policy is not None:
            tlvs += _nla(NLMSGERR_ATTR_POLICY | _NLA_F_NESTED, extack.policy.report())
    if tlvs:
        flags |= NLM_F_ACK_TLVS
    body = struct.pack("=i", -err) + echoed + tlvs
    return _HDR.pack(_HDR.size + len(body), NLMSG_ERROR, flags, seq, pid) + body


def _encode(
    msg_class: type, family_id: int, cmd: int, version: int, attrs: list, seq: int, pid: int, flags: int
) -> bytes:
    msg = msg_class()
    msg["cmd"] = cmd
    msg["version"] = version
    msg["reserved"] = 0
    msg["attrs"] = attrs
    msg["header"].update(type=family_id, flags=flags, sequence_number=seq, pid=pid)
    msg.encode()
    return bytes(msg.data)


# NLMSG_GOODSIZE on x86-64 with 4 KiB pages: what the kernel fills a dump datagram up to, so that a
# reader with a one-page buffer (iproute2's MNL_SOCKET_BUFFER_SIZE) never gets a truncated one.
DUMP_DATAGRAM_SIZE = 4096 - 320


def datagrams(replies: Iterable[bytes], limit: int = DUMP_DATAGRAM_SIZE) -> list[bytes]:
    """Group a reply list as the kernel queues it.

    A dump's messages share datagrams of at most ``limit`` bytes and its NLMSG_DONE comes alone in the
    next one; a doit reply and its ack, or an error, are one datagram each.
    """
    out: list[bytes] = []
    batch = b""
    for message in replies:
        _, kind, flags, _, _ = _HDR.unpack_from(message)
        if kind != NLMSG_DONE and flags & NLM_F_MULTI:
            if batch and len(batch) + len(message) > limit:
                out.append(batch)
                batch = b""
            batch += message
            continue
        if batch:
            out.append(batch)
            batch = b""
        out.append(message)
    if batch:
        out.append(batch)
    return out


# ----- families -----
@dataclass(frozen=True)
class _Op:
    cmd: int
    doit: str | None  # handler method names
    dumpit: str | None
    admin: bool = False
    policy: bool = True  # the op has a policy (reported as GENL_CMD_CAP_HASPOL)
    strict: bool = True  # doit attributes validated strictly
    parse_dump: bool = True  # dump attributes parsed (strictly when ``strict``)

    @property
    def flags(self) -> int:
        flags = _GENL_ADMIN_PERM if self.admin else 0
        flags |= _GENL_CMD_CAP_DO if self.doit else 0
        flags |= _GENL_CMD_CAP_DUMP if self.dumpit else 0
        return flags | (_GENL_CMD_CAP_HASPOL if self.policy else 0)


@dataclass(frozen=True)
class _Family:
    name: str
    id: int
    version: int
    maxattr: int
    ops: tuple[_Op, ...]
    policy: dict[int, Policy]
    resv_start_op: int
    mcast_groups: tuple[tuple[int, str], ...] = ()
    hdrsize: int = 0

    def op(self, cmd: int) -> _Op | None:
        return next((op for op in self.ops if op.cmd == cmd), None)


_CTRL = _Family(
    name="nlctrl",
    id=GENL_ID_CTRL,
    version=0x2,
    maxattr=0,  # nlctrl has no family-wide policy: its ops carry their own
    ops=(
        _Op(CTRL_CMD_GETFAMILY, "_ctrl_getfamily", "_ctrl_dumpfamily", strict=False, parse_dump=False),
        _Op(CTRL_CMD_GETPOLICY, None, "_ctrl_getpolicy"),
    ),
    policy=_CTRL_POLICY,
    resv_start_op=CTRL_CMD_GETPOLICY + 1,
    mcast_groups=((GENL_ID_CTRL, "notify"),),
)


def _vdpa_family(family_id: int) -> _Family:
    return _Family(
        name=VDPA_GENL_NAME,
        id=family_id,
        version=VDPA_GENL_VERSION,
        maxattr=VDPA_ATTR_MAX,
        ops=(
            _Op(VDPA_CMD_MGMTDEV_GET, "_mgmtdev_get", "_mgmtdev_dump"),
            _Op(VDPA_CMD_DEV_NEW, "_dev_new", None, admin=True),
            _Op(VDPA_CMD_DEV_DEL, "_dev_del", None, admin=True),
            _Op(VDPA_CMD_DEV_GET, "_dev_get", "_dev_dump"),
            _Op(VDPA_CMD_DEV_CONFIG_GET, "_config_get", "_config_dump"),
            _Op(VDPA_CMD_DEV_VSTATS_GET, "_vstats_get", None, admin=True),
            _Op(VDPA_CMD_DEV_ATTR_SET, "_attr_set", None, admin=True),
        ),
        policy={**VDPA_POLICY, **EXTENSION_POLICY},
        resv_start_op=VDPA_CMD_DEV_VSTATS_GET + 1,
    )


@dataclass
class _Request:
    """One request being answered: its bytes, header fields, parsed attributes, and what it asked for."""

    message: bytes
    seq: int
    pid: int  # the sender's port id: every reply is addressed to it
    flags: int
    attrs: dict[int, _Attr] = field(default_factory=dict)
    extack: _Extack = field(default_factory=_Extack)

    def get(self, kind: int) -> _Attr | None:
        return self.attrs.get(kind)

    def string(self, kind: int) -> str | None:
        attr = self.attrs.get(kind)
        return None if attr is None else attr.string()

    @property
    def extensions(self) -> bool:
        return VDPASIM_ATTR_EXTENSIONS in self.attrs


class VdpaNetlinkServer:
    """Answers NETLINK_GENERIC requests for the ``nlctrl`` and ``vdpa`` families over one ``Bus``."""

    def __init__(self, bus: Bus, *, family_id: int = VDPA_FAMILY_ID) -> None:
        if not NLMSG_MIN_TYPE < family_id <= 0xFFFF or family_id == GENL_ID_CTRL:
            raise ValueError(f"family id {family_id:#x} is not a free generic netlink id")
        self.bus = bus
        self.family = _vdpa_family(family_id)
        self._families = {GENL_ID_CTRL: _CTRL, family_id: self.family}

    # ----- the entry point -----
    def handle(
        self,
        request: bytes,
        *,
        sender_pid: int,
        ext_ack: bool = False,
        cap_ack: bool = False,
        admin: bool = True,
    ) -> list[bytes]:
        """The replies to the messages of one datagram, in the order the kernel queues them.

        ``sender_pid`` is the sending socket's port id (its nl_pid), ``ext_ack``/``cap_ack`` its
        NETLINK_EXT_ACK/NETLINK_CAP_ACK options, ``admin`` whether it has CAP_NET_ADMIN. Nothing a
        peer sends makes this raise.
        """
        replies: list[bytes] = []
        offset = 0
        while len(request) - offset >= _HDR.size:
            length, kind, flags, seq, _ = _HDR.unpack_from(request, offset)
            if length < _HDR.size or length > len(request) - offset:
                break  # netlink_rcv_skb drops the rest of a datagram with a bad length
            message = request[offset : offset + length]
            offset += min(_align(length), len(request) - offset)
            req = _Request(message, seq, sender_pid, flags)
            err = 0
            if flags & NLM_F_REQUEST and kind >= NLMSG_MIN_TYPE:
                try:
                    dumped = self._genl(req, kind, admin, replies)
                except _Refused as refusal:
                    err, req.extack = refusal.errno, refusal.extack
                    log.debug("request %d refused: %s", seq, refusal)
                except PeerError as error:
                    err, req.extack = error.errno, _Extack(getattr(error, "extack", None))
                    log.info("request %d refused: %s", seq, error)
                except Exception:
                    log.exception("request %d: unexpected failure", seq)
                    err = errno.EIO
                else:
                    if dumped:
                        continue  # a dump ends with NLMSG_DONE, never with an ack
            if flags & NLM_F_ACK or err:
                replies.append(_ack(message, err, req.extack, sender_pid, cap_ack=cap_ack, ext_ack=ext_ack))
        return replies

    def _genl(self, req: _Request, kind: int, admin: bool, replies: list[bytes]) -> bool:
        """genl_rcv_msg: returns True for a dump (replies complete), False for a doit (ack may follow)."""
        family = self._families.get(kind)
        if family is None:
            raise _Refused(errno.ENOENT)
        if len(req.message) < _HDR.size + _GENL_HDRLEN + family.hdrsize:
            raise _Refused(errno.EINVAL)
        cmd, _, reserved = _GENL.unpack_from(req.message, _HDR.size)
        if cmd >= family.resv_start_op:  # genl_header_check
            if reserved:
                raise _Refused(errno.EINVAL, "genlmsghdr.reserved field is not 0")
            flags = req.flags & ~NLM_F_DUMP if req.flags & NLM_F_DUMP == NLM_F_DUMP else req.flags
            if flags & ~(NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO):
                raise _Refused(errno.EINVAL, "ambiguous or reserved bits set in nlmsg_flags")
        dump = req.flags & NLM_F_DUMP == NLM_F_DUMP
        op = family.op(cmd)
        handler = None if op is None else (op.dumpit if dump else op.doit)
        if op is None or handler is None:
            raise _Refused(errno.EOPNOTSUPP)
        if op.admin and not admin:
            raise _Refused(errno.EPERM)
        if op.policy and (op.parse_dump or not dump):
            start = _HDR.size + _align(_GENL_HDRLEN + family.hdrsize)
            maxattr = family.maxattr if family is self.family else max(family.policy)
            req.attrs = _parse(req.message, start, maxattr, family.policy, op.strict, req.extack)
        replies.extend(getattr(self, handler)(req))
        if dump:
            replies.append(_done(req.seq, req.pid))
        return dump

    # ----- reply helpers -----
    def _vdpa(self, req: _Request, cmd: int, attrs: list, multi: bool) -> bytes:
        flags = NLM_F_MULTI if multi else 0
        return _encode(vdpa_msg, self.family.id, cmd, VDPA_GENL_VERSION, attrs, req.seq, req.pid, flags)

    @staticmethod
    def _bus_call(call: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        """A Bus operation; its refusal becomes the kernel's errno and extack."""
        try:
            return call(*args, **kwargs)
        except BusError as error:
            raise _Refused(error.errno, error.extack) from None

    # ----- nlctrl -----
    def _family_attrs(self, family: _Family) -> list:
        attrs: list = [
            ("CTRL_ATTR_FAMILY_NAME", family.name),
            ("CTRL_ATTR_FAMILY_ID", family.id),
            ("CTRL_ATTR_VERSION", family.version),
            ("CTRL_ATTR_HDRSIZE", family.hdrsize),
            ("CTRL_ATTR_MAXATTR", family.maxattr),
            (
                "CTRL_ATTR_OPS",
                [{"attrs": [("CTRL_ATTR_OP_ID", op.cmd), ("CTRL_ATTR_OP_FLAGS", op.flags)]} for op in family.ops],
            ),
        ]
        if family.mcast_groups:
            groups = [
                {"attrs": [("CTRL_ATTR_MCAST_GRP_ID", number), ("CTRL_ATTR_MCAST_GRP_NAME", name)]}
                for number, name in family.mcast_groups
            ]
            attrs.append(("CTRL_ATTR_MCAST_GROUPS", groups))
        return attrs

    def _ctrl(self, req: _Request, family: _Family, multi: bool) -> bytes:
        flags = NLM_F_MULTI if multi else 0
        attrs = self._family_attrs(family)
        return _encode(ctrlmsg, GENL_ID_CTRL, CTRL_CMD_NEWFAMILY, _CTRL.version, attrs, req.seq, req.pid, flags)

    def _ctrl_getfamily(self, req: _Request) -> list[bytes]:
        family: _Family | None = None
        err = errno.EINVAL
        family_id = req.get(1)
        if family_id is not None:
            family = self._families.get(family_id.uint() & 0xFFFF)
            err = errno.ENOENT
        name = req.string(2)
        if name is not None:
            family = next((f for f in self._families.values() if f.name == name), None)
            err = errno.ENOENT
        if family is None:
            raise _Refused(err)
        return [self._ctrl(req, family, multi=False)]

    def _ctrl_dumpfamily(self, req: _Request) -> list[bytes]:
        return [self._ctrl(req, family, multi=True) for _, family in sorted(self._families.items())]

    def _ctrl_getpolicy(self, req: _Request) -> list[bytes]:
        raise _Refused(errno.EOPNOTSUPP, "vdpasim: policy dumps are not served")

    # ----- vdpa: management devices -----
    @staticmethod
    def _mgmtdev_attrs(mdev: MgmtDev) -> list:
        attrs: list = [("VDPA_ATTR_MGMTDEV_BUS_NAME", mdev.bus)] if mdev.bus else []
        return [
            *attrs,
            ("VDPA_ATTR_MGMTDEV_DEV_NAME", mdev.name),
            ("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", mdev.supported_classes),
            ("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS", mdev.max_supported_vqs),
            ("VDPA_ATTR_DEV_SUPPORTED_FEATURES", mdev.supported_features),
        ]

    def _mgmtdev_get(self, req: _Request) -> list[bytes]:
        name, bus = req.string(VDPA_ATTR_MGMTDEV_DEV_NAME), req.string(VDPA_ATTR_MGMTDEV_BUS_NAME)
        mdev = self._bus_call(self.bus.mgmtdev, name, bus)
        return [self._vdpa(req, VDPA_CMD_MGMTDEV_NEW, self._mgmtdev_attrs(mdev), multi=False)]

    def _mgmtdev_dump(self, req: _Request) -> list[bytes]:
        return [self._vdpa(req, VDPA_CMD_MGMTDEV_NEW, self._mgmtdev_attrs(m), multi=True) for m in self.bus.mgmtdevs]

    # ----- vdpa: devices -----
    def _dev_attrs(self, vdev: VdpaDevice, extensions: bool) -> list:
        mdev = vdev.mgmtdev
        attrs: list = [("VDPA_ATTR_MGMTDEV_BUS_NAME", mdev.bus)] if mdev.bus else []
        attrs += [
            ("VDPA_ATTR_MGMTDEV_DEV_NAME", mdev.name),
            ("VDPA_ATTR_DEV_NAME", vdev.name),
            ("VDPA_ATTR_DEV_ID", vdev.device_id),
            ("VDPA_ATTR_DEV_VENDOR_ID", vdev.vendor_id),
            ("VDPA_ATTR_DEV_MAX_VQS", vdev.nvqs),
            ("VDPA_ATTR_DEV_MAX_VQ_SIZE", vdev.max_vq_size),
            ("VDPA_ATTR_DEV_MIN_VQ_SIZE", vdev.min_vq_size),
        ]
        if extensions:
            if vdev.vhost_user_path:
                attrs.append(("VDPASIM_ATTR_VHOST_USER_PATH", vdev.vhost_user_path))
            if vdev.vhost_vdpa_node:
                attrs.append(("VDPASIM_ATTR_VHOST_VDPA_NODE", vdev.vhost_vdpa_node))
        return attrs

    def _dev_get(self, req: _Request) -> list[bytes]:
        if req.get(VDPA_ATTR_DEV_NAME) is None:
            raise _Refused(errno.EINVAL)
        vdev = self._bus_call(self.bus.get, req.string(VDPA_ATTR_DEV_NAME))
        return [self._vdpa(req, VDPA_CMD_DEV_NEW, self._dev_attrs(vdev, req.extensions), multi=False)]

    def _dev_dump(self, req: _Request) -> list[bytes]:
        return [
            self._vdpa(req, VDPA_CMD_DEV_NEW, self._dev_attrs(vdev, req.extensions), multi=True)
            for vdev in self.bus.devices()
        ]

    def _dev_new(self, req: _Request) -> list[bytes]:
        config = self._set_config(req)
        self._bus_call(
            self.bus.add,
            req.string(VDPA_ATTR_DEV_NAME),
            req.string(VDPA_ATTR_MGMTDEV_DEV_NAME),
            config,
            bus=req.string(VDPA_ATTR_MGMTDEV_BUS_NAME),
        )
        return []

    @staticmethod
    def _set_config(req: _Request) -> DevSetConfig:
        def number(kind: int) -> int | None:
            attr = req.get(kind)
            return None if attr is None else attr.uint()

        mac = req.get(VDPA_ATTR_DEV_NET_CFG_MACADDR)
        extension: dict[str, object] = {}
        for kind, name in EXTENSION_FIELDS.items():
            attr = req.get(kind)
            if attr is None:
                continue
            if kind in (VDPASIM_ATTR_NET_MODE, VDPASIM_ATTR_BLK_PATH, VDPASIM_ATTR_BLK_SERIAL):
                extension[name] = attr.string()
            elif kind == VDPASIM_ATTR_NET_PEER_IP:
                extension[name] = str(ipaddress.IPv4Address(attr.payload))
            elif kind == VDPASIM_ATTR_NET_PEER_MAC:
                extension[name] = attr.payload
            else:
                extension[name] = attr.uint()
        return DevSetConfig(
            mac=None if mac is None else mac.payload,
            mtu=number(VDPA_ATTR_DEV_NET_CFG_MTU),
            max_vqp=number(VDPA_ATTR_DEV_NET_CFG_MAX_VQP),
            device_features=number(VDPA_ATTR_DEV_FEATURES),
            extension=extension,
        )

    def _dev_del(self, req: _Request) -> list[bytes]:
        if req.get(VDPA_ATTR_DEV_NAME) is None:
            raise _Refused(errno.EINVAL)
        self._bus_call(self.bus.delete, req.string(VDPA_ATTR_DEV_NAME))
        return []

    def _attr_set(self, req: _Request) -> list[bytes]:
        if req.get(VDPA_ATTR_DEV_NAME) is None:
            raise _Refused(errno.EINVAL)
        mac = req.get(VDPA_ATTR_DEV_NET_CFG_MACADDR)
        name = req.string(VDPA_ATTR_DEV_NAME)
        warning = self._bus_call(self.bus.set_attr, name, None if mac is None else mac.payload)
        if warning:
            req.extack.msg = warning  # the kernel's ack then carries it (iproute2 prints "Warning: ...")
        return []

    # ----- vdpa: configuration -----
    def _config_attrs(self, vdev: VdpaDevice, extensions: bool) -> list:
        device = vdev.device
        attrs: list = [("VDPA_ATTR_DEV_NAME", vdev.name), ("VDPA_ATTR_DEV_ID", vdev.device_id)]
        if device.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK:
            attrs.append(("VDPA_ATTR_DEV_NEGOTIATED_FEATURES", device.get_driver_features()))
        features = device.get_device_features()
        attrs.append(("VDPA_ATTR_DEV_FEATURES", features))

        def has(bit: int) -> bool:
            return bool(features >> bit & 1)

        if vdev.device_id == c.VIRTIO_ID_NET:
            mac, status, max_vqp, mtu = struct.unpack_from("<6sHHH", _config(device, 12))
            if has(c.VIRTIO_NET_F_MTU):
                attrs.append(("VDPA_ATTR_DEV_NET_CFG_MTU", mtu))
            if has(c.VIRTIO_NET_F_MAC):
                attrs.append(("VDPA_ATTR_DEV_NET_CFG_MACADDR", format_mac(mac)))
            if has(c.VIRTIO_NET_F_STATUS):
                attrs.append(("VDPA_ATTR_DEV_NET_STATUS", status))
            if has(c.VIRTIO_NET_F_MQ) or has(c.VIRTIO_NET_F_RSS):
                attrs.append(("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", max_vqp))
            if extensions:
                config = vdev.config
                attrs.append(("VDPASIM_ATTR_NET_MODE", config.mode))
                if config.peer_ip:
                    attrs.append(("VDPASIM_ATTR_NET_PEER_IP", config.peer_ip))
                attrs.append(("VDPASIM_ATTR_NET_PEER_MAC", format_mac(config.peer_mac)))
                attrs.append(("VDPASIM_ATTR_BUSY_POLL", int(config.busy_poll)))
        elif vdev.device_id == c.VIRTIO_ID_BLOCK:
            attrs += _blk_config_attrs(_config(device, 60), has)
            if extensions:
                if vdev.config.path:
                    attrs.append(("VDPASIM_ATTR_BLK_PATH", vdev.config.path))
                attrs.append(("VDPASIM_ATTR_BUSY_POLL", int(vdev.config.busy_poll)))
        else:
            raise _Refused(errno.EOPNOTSUPP)
        return attrs

    def _config_get(self, req: _Request) -> list[bytes]:
        if req.get(VDPA_ATTR_DEV_NAME) is None:
            raise _Refused(errno.EINVAL)
        vdev = self._bus_call(self.bus.get, req.string(VDPA_ATTR_DEV_NAME))
        return [self._vdpa(req, VDPA_CMD_DEV_CONFIG_GET, self._config_attrs(vdev, req.extensions), multi=False)]

    def _config_dump(self, req: _Request) -> list[bytes]:
        return [
            self._vdpa(req, VDPA_CMD_DEV_CONFIG_GET, self._config_attrs(vdev, req.extensions), multi=True)
            for vdev in self.bus.devices()
        ]

    # ----- vdpa: vendor statistics -----
    def _vstats_get(self, req: _Request) -> list[bytes]:
        if req.get(VDPA_ATTR_DEV_NAME) is None or req.get(VDPA_ATTR_DEV_QUEUE_INDEX) is None:
            raise _Refused(errno.EINVAL)
        qidx = req.get(VDPA_ATTR_DEV_QUEUE_INDEX).uint()  # type: ignore[union-attr]
        stats = self._bus_call(self.bus.vstats, req.string(VDPA_ATTR_DEV_NAME), qidx, any_status=req.extensions)
        vdev = stats.device
        attrs: list = [
            ("VDPA_ATTR_DEV_NAME", vdev.name),
            ("VDPA_ATTR_DEV_ID", vdev.device_id),
            ("VDPA_ATTR_DEV_NEGOTIATED_FEATURES", stats.negotiated_features),
        ]
        if stats.max_vqp is not None:
            attrs.append(("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", stats.max_vqp))
        attrs.append(("VDPA_ATTR_DEV_QUEUE_INDEX", qidx))
        for name, value in stats.values:
            attrs += [("VDPA_ATTR_DEV_VENDOR_ATTR_NAME", name), ("VDPA_ATTR_DEV_VENDOR_ATTR_VALUE", value)]
        return [self._vdpa(req, VDPA_CMD_DEV_VSTATS_GET, attrs, multi=False)]


def _config(device: SimDevice, size: int) -> bytes:
    """The first ``size`` bytes of the config space, zero-filled past its end (as the kernel's buffer is)."""
    have = min(size, device.get_config_size())
    return device.get_config(0, have) + b"\0" * (size - have)


# struct virtio_blk_config up to write_zeroes_may_unmap, little-endian (VIRTIO 1.2 §5.2.4).
_BLK_CONFIG = struct.Struct("<QII4xIBBHI4xIIIIII")


def _blk_config_attrs(raw: bytes, has: Callable[[int], bool]) -> list:
    """vdpa_dev_blk_config_fill: capacity, then each group whose feature the device offers."""
    (
        capacity,
        size_max,
        seg_max,
        blk_size,
        phy_blk_exp,
        align_offset,
        min_io_size,
        opt_io_size,
        max_discard_sec,
        max_discard_seg,
        discard_sec_align,
        max_write_zeroes_sec,
        max_write_zeroes_seg,
        _,
    ) = _BLK_CONFIG.unpack_from(raw)
    num_queues = struct.unpack_from("<H", raw, 34)[0]
    attrs: list = [("VDPA_ATTR_DEV_BLK_CFG_CAPACITY", capacity)]
    if has(c.VIRTIO_BLK_F_SIZE_MAX):
        attrs.append(("VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX", size_max))
    if has(c.VIRTIO_BLK_F_BLK_SIZE):
        attrs.append(("VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE", blk_size))
    if has(c.VIRTIO_BLK_F_SEG_MAX):
        attrs.append(("VDPA_ATTR_DEV_BLK_CFG_SEG_MAX", seg_max))
    if has(c.VIRTIO_BLK_F_MQ):
        attrs.append(("VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES", num_queues))
    if has(c.VIRTIO_BLK_F_TOPOLOGY):
        attrs += [
            ("VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP", phy_blk_exp),
            ("VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET", align_offset),
            ("VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE", min_io_size),
            ("VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE", opt_io_size),
        ]
    if has(c.VIRTIO_BLK_F_DISCARD):
        attrs += [
            ("VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC", max_discard_sec),
            ("VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG", max_discard_seg),
            ("VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN", discard_sec_align),
        ]
    if has(c.VIRTIO_BLK_F_WRITE_ZEROES):
        attrs += [
            ("VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC", max_write_zeroes_sec),
            ("VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG", max_write_zeroes_seg),
        ]
    attrs.append(("VDPA_ATTR_DEV_BLK_READ_ONLY", int(has(c.VIRTIO_BLK_F_RO))))
    attrs.append(("VDPA_ATTR_DEV_BLK_FLUSH", int(has(c.VIRTIO_BLK_F_FLUSH))))
    return attrs
