"""An emulated NETLINK_GENERIC socket for a program under the supervisor (the netlink bypass).

``socket(AF_NETLINK, SOCK_RAW|SOCK_DGRAM [|flags], NETLINK_GENERIC)`` in the supervised program gets a placeholder
fd (an unconnected AF_UNIX datagram socket, so SOL_SOCKET options, fcntl and O_NONBLOCK behave as on any socket)
at a fixed number in ``FIRST_NETLINK_FD`` + [0, ``MAX_NETLINK``); the filter traps the socket calls on that range
and the supervisor hands each to the ``NetlinkSocket`` of that (tgid, fd). This module has no I/O of its own:
``NetlinkSocket`` takes the decoded syscall arguments and a memory (``TargetMemory`` in the supervisor, any
object with ``read(addr, n)``/``write(addr, data)`` raising ``PeerError(EFAULT)`` in tests) and returns the
call's result or raises ``PeerError`` with the errno Linux (net/netlink/af_netlink.c, net/socket.c) gives in
the same case. Request datagrams go to a ``transport(datagram, port_id) -> [reply datagrams]``: the daemon's
control socket in ``vdpasim run`` (``DaemonTransport``), ``VdpaNetlinkServer`` in process in the fuzz tests.

The transport answers as the kernel answers a socket with NETLINK_CAP_ACK and NETLINK_EXT_ACK set (what
iproute2 and libmnl programs set); for a socket without them, ``adjust_acks`` rewrites each NLMSG_ERROR as the
kernel would have built it: the whole failed request appended (no NLM_F_CAPPED) and/or no extended-ack TLVs.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vdpasim.errors import PeerError

__all__ = [
    "FIRST_NETLINK_FD",
    "MAX_NETLINK",
    "CONTINUE",
    "PENDING",
    "NetlinkSocket",
    "PortTable",
    "DaemonTransport",
    "adjust_acks",
    "Memory",
]

log = logging.getLogger("vdpasim.supervisor.netlink")

FIRST_NETLINK_FD = 940  # emulated netlink sockets live at 940..955 in the target, apart from the nodes' 900+
MAX_NETLINK = 16

AF_NETLINK = 16
AF_UNSPEC = 0
NETLINK_GENERIC = 16
SOL_NETLINK = 270
SOL_SOCKET = 1
SO_TYPE, SO_PROTOCOL, SO_DOMAIN = 3, 38, 39
NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP, NETLINK_PKTINFO = 1, 2, 3
NETLINK_BROADCAST_ERROR, NETLINK_NO_ENOBUFS, NETLINK_LISTEN_ALL_NSID = 4, 5, 8
NETLINK_LIST_MEMBERSHIPS, NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 9, 10, 11, 12
_FLAG_OPTIONS = (NETLINK_PKTINFO, NETLINK_BROADCAST_ERROR, NETLINK_NO_ENOBUFS, NETLINK_LISTEN_ALL_NSID,
                 NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK)  # fmt: skip
GENL_GROUPS = 32  # multicast groups a genl socket may join here (none ever delivers: no events are emulated)

MSG_OOB, MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT, MSG_ERRQUEUE = 0x1, 0x2, 0x20, 0x40, 0x2000
NLMSG_ERROR = 2
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200

SOCKADDR_NL = struct.Struct("=HHII")  # nl_family, nl_pad, nl_pid, nl_groups: 12 bytes
SOCKADDR_STORAGE = 128
UIO_MAXIOV = 1024
MAX_RW_COUNT = 0x7FFFF000
SNDBUF = 212992  # net.core.wmem_default; a datagram above SNDBUF - 32 is EMSGSIZE
MSGHDR = struct.Struct("=QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags: 56 bytes
IOVEC = struct.Struct("=QQ")
_NLMSGHDR = struct.Struct("=IHHII")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CONTINUE = _Sentinel("CONTINUE")  # let the kernel run the call on the placeholder (SOL_SOCKET options)
PENDING = _Sentinel("PENDING")  # a blocking receive on an empty queue: answer later, when a reply is queued


class Memory(Protocol):
    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


Transport = Callable[[bytes, int], list[bytes]]


def _fail(err: int, text: str) -> PeerError:
    return PeerError(text, errno=err)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _read(memory: Memory, addr: int, length: int) -> bytes:
    if length == 0:
        return b""
    if addr == 0:
        raise _fail(errno.EFAULT, "NULL pointer")
    return memory.read(addr, length)


def _write(memory: Memory, addr: int, data: bytes) -> None:
    if not data:
        return
    if addr == 0:
        raise _fail(errno.EFAULT, "NULL pointer")
    memory.write(addr, data)


def _addr_to_user(memory: Memory, addr: int, len_ptr: int, kaddr: bytes) -> None:
    """net/socket.c move_addr_to_user: at most the caller's length is copied, the full length written back."""
    ulen = _s32(struct.unpack("=I", _read(memory, len_ptr, 4))[0])
    if ulen < 0:
        raise _fail(errno.EINVAL, "negative address length")
    _write(memory, addr, kaddr[: min(ulen, len(kaddr))])
    _write(memory, len_ptr, struct.pack("=I", len(kaddr)))


def _addr_from_user(memory: Memory, addr: int, length: int) -> bytes:
    """net/socket.c move_addr_to_kernel."""
    length = _s32(length)
    if length < 0 or length > SOCKADDR_STORAGE:
        raise _fail(errno.EINVAL, f"address length {length}")
    return _read(memory, addr, length)


@dataclass
class PortTable:
    """Port ids of the emulated netlink sockets (the kernel's per-protocol table), with its autobind rule:
    the caller's tgid if free, else negative ids counting down from -4096."""

    privileged: bool = field(default_factory=lambda: os.geteuid() == 0)
    bound: set[int] = field(default_factory=set)
    rover: int = -4096

    def autobind(self, tgid: int) -> int:
        port = tgid
        while port in self.bound or port == 0:
            port = self.rover
            self.rover -= 1
            if self.rover > -4096:
                self.rover = -4096
        self.bound.add(port)
        return port

    def claim(self, port: int) -> None:
        if port in self.bound:
            raise _fail(errno.EADDRINUSE, f"port id {port} is taken")
        self.bound.add(port)

    def release(self, port: int) -> None:
        self.bound.discard(port)


def adjust_acks(replies: list[bytes], request: bytes, *, cap_ack: bool, ext_ack: bool) -> list[bytes]:
    """Rewrite NLMSG_ERRORs built for a CAP_ACK+EXT_ACK socket as the kernel builds them for this socket's options."""
    if cap_ack and ext_ack:
        return replies
    originals: list[tuple[bytes, bytes]] = []  # (header, whole message) of each request message, in order
    offset = 0
    while offset + 16 <= len(request):
        length = struct.unpack_from("=I", request, offset)[0]
        if length < 16 or offset + length > len(request):
            break
        originals.append((request[offset : offset + 16], request[offset : offset + length]))
        offset += (length + 3) & ~3
    out = []
    for datagram in replies:
        messages = []
        offset = 0
        while offset + 16 <= len(datagram):
            length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(datagram, offset)
            if length < 16 or offset + length > len(datagram):
                messages.append(datagram[offset:])
                offset = len(datagram)
                break
            message = datagram[offset : offset + length]
            offset += (length + 3) & ~3
            if kind == NLMSG_ERROR and length >= 36 and flags & NLM_F_CAPPED:
                err = struct.unpack_from("=i", message, 16)[0]
                embedded = message[20:36]
                tlvs = message[36:]
                body = embedded
                original = next((whole for header, whole in originals if header == embedded), None)
                if original is not None:
                    originals.remove(next(o for o in originals if o[0] == embedded))
                if err and not cap_ack and original is not None:
                    body = original + b"\0" * (-len(original) % 4)
                    flags &= ~NLM_F_CAPPED
                if not ext_ack:
                    tlvs = b""
                    flags &= ~NLM_F_ACK_TLVS
                payload = message[16:20] + body + tlvs
                message = _NLMSGHDR.pack(16 + len(payload), kind, flags, seq, pid) + payload
            messages.append(message + b"\0" * (-len(message) % 4))
        messages.append(datagram[offset:])
        out.append(b"".join(messages))
    return out


class NetlinkSocket:
    """One emulated NETLINK_GENERIC socket: options, port id, destination, the queue of reply datagrams."""

    def __init__(self, tgid: int, sock_type: int, ports: PortTable, transport: Transport) -> None:
        self.tgid = tgid
        self.sock_type = sock_type & 0xF
        self.ports = ports
        self.transport = transport
        self.port_id = 0  # 0: not bound yet
        self.groups = 0  # bind()'s nl_groups bitmap (the first 32 groups)
        self.memberships: set[int] = set()
        self.dst_port = 0
        self.dst_group = 0
        self.options: dict[int, bool] = dict.fromkeys(_FLAG_OPTIONS, False)
        self.queue: deque[bytes] = deque()
        self.closed = False

    # ----- life cycle -----
    def close(self) -> None:
        if self.port_id:
            self.ports.release(self.port_id)
        self.port_id = 0
        self.queue.clear()
        self.closed = True

    def _autobind(self) -> None:
        if not self.port_id:
            self.port_id = self.ports.autobind(self.tgid)

    def _sockaddr(self, port: int, groups: int) -> bytes:
        return SOCKADDR_NL.pack(AF_NETLINK, 0, port & 0xFFFFFFFF, groups & 0xFFFFFFFF)

    # ----- options -----
    def setsockopt(self, level: int, name: int, optval: int, optlen: int, memory: Memory) -> int | _Sentinel:
        level, name, optlen = _s32(level), _s32(name), _s32(optlen)
        if optlen < 0:
            raise _fail(errno.EINVAL, "negative option length")  # net/socket.c __sys_setsockopt, checked first
        if level == SOL_SOCKET:
            return CONTINUE
        if level != SOL_NETLINK:
            raise _fail(errno.ENOPROTOOPT, f"setsockopt level {level}")
        val = struct.unpack("=I", _read(memory, optval, 4))[0] if optlen >= 4 else 0
        if name in (NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP):
            if not val or val - 1 >= GENL_GROUPS:
                raise _fail(errno.EINVAL, f"multicast group {val}")
            if name == NETLINK_ADD_MEMBERSHIP:
                self._autobind()
                self.memberships.add(val)
            else:
                self.memberships.discard(val)
            return 0
        if name == NETLINK_LISTEN_ALL_NSID and not self.ports.privileged:
            raise _fail(errno.EPERM, "NETLINK_LISTEN_ALL_NSID needs CAP_NET_BROADCAST")
        if name not in _FLAG_OPTIONS:
            raise _fail(errno.ENOPROTOOPT, f"netlink option {name}")
        self.options[name] = bool(val)
        return 0

    def getsockopt(self, level: int, name: int, optval: int, optlen_ptr: int, memory: Memory) -> int | _Sentinel:
        level, name = _s32(level), _s32(name)
        if level == SOL_SOCKET:
            if name not in (SO_TYPE, SO_PROTOCOL, SO_DOMAIN):
                return CONTINUE
            length = _s32(struct.unpack("=I", _read(memory, optlen_ptr, 4))[0])
            if length < 0:
                raise _fail(errno.EINVAL, "negative option length")
            value = {SO_TYPE: self.sock_type, SO_PROTOCOL: NETLINK_GENERIC, SO_DOMAIN: AF_NETLINK}[name]
            length = min(length, 4)
            _write(memory, optval, struct.pack("=i", value)[:length])
            _write(memory, optlen_ptr, struct.pack("=I", length))
            return 0
        if level != SOL_NETLINK:
            raise _fail(errno.ENOPROTOOPT, f"getsockopt level {level}")
        length = _s32(struct.unpack("=I", _read(memory, optlen_ptr, 4))[0])
        if length < 0:
            raise _fail(errno.EINVAL, "negative option length")
        if name == NETLINK_LIST_MEMBERSHIPS:
            bitmap = sum(1 << (g - 1) for g in self.memberships) | self.groups
            data = struct.pack("=I", bitmap & 0xFFFFFFFF)
            _write(memory, optval, data[: min(length, len(data)) & ~3])
            _write(memory, optlen_ptr, struct.pack("=I", len(data)))
            return 0
        if name not in _FLAG_OPTIONS:
            raise _fail(errno.ENOPROTOOPT, f"netlink option {name}")
        if length < 4:
            raise _fail(errno.EINVAL, "option buffer below an int")
        _write(memory, optlen_ptr, struct.pack("=I", 4))
        _write(memory, optval, struct.pack("=i", int(self.options[name])))
        return 0

    # ----- addresses -----
    def bind(self, addr: int, addrlen: int, memory: Memory) -> int:
        data = _addr_from_user(memory, addr, addrlen)
        if len(data) < SOCKADDR_NL.size:
            raise _fail(errno.EINVAL, "address shorter than sockaddr_nl")
        family, _, pid, groups = SOCKADDR_NL.unpack_from(data)
        if family != AF_NETLINK:
            raise _fail(errno.EINVAL, f"address family {family}")
        pid = _s32(pid)
        if self.port_id and pid != self.port_id:
            raise _fail(errno.EINVAL, f"already bound to {self.port_id}")
        if not self.port_id:
            if pid:
                self.ports.claim(pid)
                self.port_id = pid
            else:
                self._autobind()
        self.groups = groups
        return 0

    def connect(self, addr: int, addrlen: int, memory: Memory) -> int:
        data = _addr_from_user(memory, addr, addrlen)
        if len(data) < 2:
            raise _fail(errno.EINVAL, "address without a family")
        family = struct.unpack_from("=H", data)[0]
        if family == AF_UNSPEC:
            self.dst_port = self.dst_group = 0
            return 0
        if family != AF_NETLINK:
            raise _fail(errno.EINVAL, f"address family {family}")
        if len(data) < SOCKADDR_NL.size:
            raise _fail(errno.EINVAL, "address shorter than sockaddr_nl")
        _, _, pid, groups = SOCKADDR_NL.unpack_from(data)
        if (pid or groups) and not self.ports.privileged:
            raise _fail(errno.EPERM, "only the kernel may be a destination without CAP_NET_ADMIN")
        self._autobind()
        self.dst_port = _s32(pid)
        self.dst_group = (groups & -groups).bit_length()  # ffs(), as the kernel keeps one group
        return 0

    def getsockname(self, addr: int, len_ptr: int, memory: Memory) -> int:
        _addr_to_user(memory, addr, len_ptr, self._sockaddr(self.port_id, self.groups))
        return 0

    def getpeername(self, addr: int, len_ptr: int, memory: Memory) -> int:
        group = 1 << (self.dst_group - 1) if self.dst_group else 0
        _addr_to_user(memory, addr, len_ptr, self._sockaddr(self.dst_port, group))
        return 0

    # ----- sending -----
    def sendto(self, buf: int, length: int, flags: int, addr: int, addrlen: int, memory: Memory) -> int:
        length = min(length, 0x7FFFFFFF)  # __sys_sendto caps the length at INT_MAX
        name = _addr_from_user(memory, addr, addrlen) if addr else b""
        return self._send([(buf, length)], flags, name, memory)

    def write(self, buf: int, length: int, memory: Memory) -> int:
        return self._send([(buf, min(length, MAX_RW_COUNT))], 0, b"", memory)

    def sendmsg(self, msg: int, flags: int, memory: Memory) -> int:
        name_ptr, namelen, iov_ptr, iovlen, control, controllen, _ = MSGHDR.unpack(_read(memory, msg, MSGHDR.size))
        namelen = _s32(namelen)
        if namelen < 0:
            raise _fail(errno.EINVAL, "negative msg_namelen")
        namelen = min(namelen, SOCKADDR_STORAGE)
        name = _read(memory, name_ptr, namelen) if name_ptr and namelen else b""
        iovs = self._iovecs(iov_ptr, iovlen, memory)
        if controllen > 0x7FFFFFFF:
            raise _fail(errno.ENOBUFS, "msg_controllen above INT_MAX")
        if controllen:
            self._check_control(_read(memory, control, controllen) if controllen >= 16 else b"", controllen)
        return self._send(iovs, flags, name, memory)

    def _check_control(self, data: bytes, controllen: int) -> None:
        """The cmsg walk of __scm_send: each header at least 16 bytes and inside the buffer (contents ignored:
        netlink takes no ancillary data it could act on here)."""
        if controllen < 16:
            return  # CMSG_FIRSTHDR is NULL: no control message at all
        offset = 0
        while offset + 16 <= len(data):
            cmsg_len = struct.unpack_from("=Q", data, offset)[0]
            if cmsg_len < 16 or cmsg_len > len(data) - offset:
                raise _fail(errno.EINVAL, "malformed control message")
            offset += (cmsg_len + 7) & ~7

    def _iovecs(
        self, iov_ptr: int, iovlen: int, memory: Memory, too_many: int = errno.EMSGSIZE
    ) -> list[tuple[int, int]]:
        if iovlen > UIO_MAXIOV:
            raise _fail(too_many, f"{iovlen} iovecs")  # EMSGSIZE for sendmsg/recvmsg, EINVAL for readv/writev
        raw = _read(memory, iov_ptr, IOVEC.size * iovlen)
        iovs = []
        total = 0
        for i in range(iovlen):
            base, length = IOVEC.unpack_from(raw, i * IOVEC.size)
            if length > 0x7FFFFFFFFFFFFFFF:
                raise _fail(errno.EINVAL, "negative iov_len")
            length = min(length, MAX_RW_COUNT - total)
            total += length
            iovs.append((base, length))
        return iovs

    def _send(self, iovs: list[tuple[int, int]], flags: int, name: bytes, memory: Memory) -> int:
        if flags & MSG_OOB:
            raise _fail(errno.EOPNOTSUPP, "MSG_OOB")
        dst_port, dst_group = self.dst_port, self.dst_group
        if name:
            if len(name) < SOCKADDR_NL.size:
                raise _fail(errno.EINVAL, "destination shorter than sockaddr_nl")
            family, _, pid, groups = SOCKADDR_NL.unpack_from(name)
            if family != AF_NETLINK:
                raise _fail(errno.EINVAL, f"destination family {family}")
            dst_port, dst_group = _s32(pid), (groups & -groups).bit_length()
            if (dst_port or dst_group) and not self.ports.privileged:
                raise _fail(errno.EPERM, "only the kernel may be a destination without CAP_NET_ADMIN")
        self._autobind()
        length = sum(n for _, n in iovs)
        if length > SNDBUF - 32:
            raise _fail(errno.EMSGSIZE, f"datagram of {length} bytes")
        data = b"".join(_read(memory, base, n) for base, n in iovs)
        if dst_group:
            return length  # a multicast send: no other emulated listener, nothing delivered
        if dst_port:
            raise _fail(errno.ECONNREFUSED, f"no netlink socket with port id {dst_port} is emulated")
        self.deliver_request(data)
        return length

    def deliver_request(self, data: bytes) -> None:
        """The kernel's netlink_rcv_skb: a datagram that does not start with a whole message is dropped
        silently; anything else is the family's to answer."""
        if len(data) < 16:
            return
        first = struct.unpack_from("=I", data)[0]
        if first < 16 or first > len(data):
            return
        replies = self.transport(data, self.port_id)
        replies = adjust_acks(
            replies, data, cap_ack=self.options[NETLINK_CAP_ACK], ext_ack=self.options[NETLINK_EXT_ACK]
        )
        self.queue.extend(replies)

    # ----- receiving -----
    def read(self, buf: int, length: int, memory: Memory, *, nonblocking: bool) -> int | _Sentinel:
        if length == 0:
            return 0  # sock_read_iter: an empty read returns at once, nothing dequeued
        return self._receive([(buf, min(length, MAX_RW_COUNT))], 0, memory, nonblocking=nonblocking)[0]

    def readv(self, iov: int, iovcnt: int, memory: Memory, *, nonblocking: bool) -> int | _Sentinel:
        iovs = self._iovecs(iov, iovcnt & 0xFFFFFFFF, memory, errno.EINVAL)
        if not sum(n for _, n in iovs):
            return 0
        return self._receive(iovs, 0, memory, nonblocking=nonblocking)[0]

    def writev(self, iov: int, iovcnt: int, memory: Memory) -> int:
        return self._send(self._iovecs(iov, iovcnt & 0xFFFFFFFF, memory, errno.EINVAL), 0, b"", memory)

    def recvfrom(
        self, buf: int, length: int, flags: int, addr: int, len_ptr: int, memory: Memory, *, nonblocking: bool
    ) -> int | _Sentinel:
        length = min(length, 0x7FFFFFFF)
        result, kaddr, _ = self._receive([(buf, length)], flags, memory, nonblocking=nonblocking)
        if result is not PENDING and addr and kaddr:
            _addr_to_user(memory, addr, len_ptr, kaddr)
        return result

    def recvmsg(self, msg: int, flags: int, memory: Memory, *, nonblocking: bool) -> int | _Sentinel:
        name_ptr, namelen, iov_ptr, iovlen, _, _, _ = MSGHDR.unpack(_read(memory, msg, MSGHDR.size))
        if _s32(namelen) < 0:
            raise _fail(errno.EINVAL, "negative msg_namelen")
        iovs = self._iovecs(iov_ptr, iovlen, memory)
        result, kaddr, msg_flags = self._receive(iovs, flags, memory, nonblocking=nonblocking)
        if result is PENDING:
            return result
        if name_ptr:
            _addr_to_user(memory, name_ptr, msg + 8, kaddr)
        # msg_controllen: nothing was put (no NETLINK_PKTINFO data, no credentials); then msg_flags
        _write(memory, msg + 40, struct.pack("=Q", 0))
        _write(memory, msg + 48, struct.pack("=i", msg_flags))
        return result

    def _receive(
        self, iovs: list[tuple[int, int]], flags: int, memory: Memory, *, nonblocking: bool
    ) -> tuple[int | _Sentinel, bytes, int]:
        if flags & MSG_OOB:
            raise _fail(errno.EOPNOTSUPP, "MSG_OOB")
        if flags & MSG_ERRQUEUE or not self.queue:
            if flags & MSG_ERRQUEUE or nonblocking or flags & MSG_DONTWAIT:
                raise _fail(errno.EAGAIN, "nothing queued")
            return PENDING, b"", 0
        datagram = self.queue[0] if flags & MSG_PEEK else self.queue.popleft()
        room = sum(n for _, n in iovs)
        copied = datagram[:room]
        msg_flags = MSG_TRUNC if len(datagram) > room else 0
        offset = 0
        for base, n in iovs:
            piece = copied[offset : offset + n]
            _write(memory, base, piece)
            offset += len(piece)
            if offset >= len(copied):
                break
        result = len(datagram) if flags & MSG_TRUNC else len(copied)
        return result, self._sockaddr(0, 0), msg_flags

    @property
    def readable(self) -> bool:
        return bool(self.queue)


# ======================================================================================================
# The transport to a vdpasim daemon's control socket
# ======================================================================================================
_BARRIER_SEQ = 0x7FFFFFFF


class DaemonTransport:
    """Forwards request datagrams to the daemon's control socket (started as ``vdpasim dev add`` starts one,
    on first use) and collects its reply datagrams. The daemon answers a control connection as the kernel
    answers a socket with CAP_ACK and EXT_ACK, its replies addressed to the connecting process: the
    supervisor; each reply's nlmsg_pid is set to the emulated socket's port id, as the kernel would have
    addressed it. A JSON ``daemon_get`` sent after each request marks the end of its replies (a request may
    have none)."""

    def __init__(self, runtime: object | None = None) -> None:
        from vdpasim.runtime import runtime_dir

        self.runtime = runtime or runtime_dir()
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        from vdpasim.daemon import spawn_daemon

        sock = self.runtime.connect_control()  # type: ignore[attr-defined]
        if sock is None:
            pid = spawn_daemon(self.runtime)  # type: ignore[arg-type]
            log.info("started a daemon (pid %d) in %s", pid, self.runtime.path)  # type: ignore[attr-defined]
            sock = self.runtime.connect_control()  # type: ignore[attr-defined]
            if sock is None:
                raise _fail(errno.ECONNREFUSED, "the daemon does not answer")
        sock.settimeout(60.0)
        self.sock = sock
        return sock

    def __call__(self, datagram: bytes, port_id: int) -> list[bytes]:
        from vdpasim.control import MAX_MESSAGE, Request, decode_response, encode_request

        if len(datagram) > MAX_MESSAGE:
            log.warning("a %d-byte netlink request exceeds the daemon's %d: dropped", len(datagram), MAX_MESSAGE)
            return []
        try:
            sock = self._connect()
            sock.send(datagram)
            sock.send(encode_request(Request("daemon_get", {}, _BARRIER_SEQ)))
            replies = []
            while True:
                data = sock.recv(MAX_MESSAGE + 1)
                if not data:
                    raise OSError(errno.ECONNRESET, "the daemon closed the control connection")
                if data.startswith(b"{"):
                    if decode_response(data).seq == _BARRIER_SEQ:
                        return [_readdress(reply, port_id) for reply in replies]
                    continue
                replies.append(data)
        except OSError as exc:
            self.close()
            log.error("the vdpasim daemon's control socket failed: %s", exc)
            raise _fail(errno.ECONNREFUSED, f"daemon: {exc}") from None
        except Exception as exc:  # a malformed answer: the kernel has no equivalent; fail this send loudly
            self.close()
            log.error("the vdpasim daemon answered something unexpected: %s", exc)
            raise _fail(errno.EIO, f"daemon: {exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _readdress(datagram: bytes, port_id: int) -> bytes:
    out = bytearray(datagram)
    offset = 0
    while offset + 16 <= len(out):
        length = struct.unpack_from("=I", out, offset)[0]
        if length < 16:
            break
        struct.pack_into("=I", out, offset + 12, port_id & 0xFFFFFFFF)
        offset += (length + 3) & ~3
    return bytes(out)


# ======================================================================================================
# The supervisor side: which trapped calls are ours, the placeholders, the receives left waiting
# ======================================================================================================
SOCK_DGRAM, SOCK_RAW = 2, 3
SOCK_NONBLOCK, SOCK_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_FD_CALLS = ("read", "write", "readv", "writev", "close", "connect", "accept", "accept4", "sendto", "recvfrom",
             "sendmsg", "recvmsg", "shutdown", "bind", "listen", "getsockname", "getpeername", "setsockopt",
             "getsockopt", "recvmmsg", "sendmmsg")  # fmt: skip
_NOT_SUPPORTED = ("accept", "accept4", "listen", "shutdown")  # sock_no_*: EOPNOTSUPP, as the kernel's netlink
_NOT_EMULATED = ("recvmmsg", "sendmmsg")


@dataclass
class _Waiting:
    ident: int
    tid: int
    name: str
    args: tuple[int, ...]


class NetlinkBypass:
    """The netlink part of a ``Supervisor``: its filter rules and its answers to the calls they trap."""

    def __init__(self, transport: Transport | None = None, ports: PortTable | None = None) -> None:
        self.transport: Transport = transport if transport is not None else DaemonTransport()
        self.ports = ports or PortTable()
        self.sockets: dict[tuple[int, int], NetlinkSocket] = {}
        self.placeholders: dict[tuple[int, int], socket.socket] = {}
        self.waiting: dict[tuple[int, int], list[_Waiting]] = {}

    def rules(self) -> list:
        from . import seccomp

        fds = (FIRST_NETLINK_FD, FIRST_NETLINK_FD + MAX_NETLINK)
        rules = [seccomp.Rule("socket", args_low=((0, AF_NETLINK), (2, NETLINK_GENERIC)))]
        return rules + [seccomp.Rule(call, arg0_range=fds) for call in _FD_CALLS]

    def owns(self, name: str | None, args: tuple[int, ...]) -> bool:
        if name == "socket":
            return args[0] & 0xFFFFFFFF == AF_NETLINK and args[2] & 0xFFFFFFFF == NETLINK_GENERIC
        return name in _FD_CALLS and FIRST_NETLINK_FD <= args[0] & 0xFFFFFFFF < FIRST_NETLINK_FD + MAX_NETLINK

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        for placeholder in self.placeholders.values():
            placeholder.close()
        self.sockets.clear()
        self.placeholders.clear()
        self.waiting.clear()
        closer = getattr(self.transport, "close", None)
        if closer is not None:
            closer()

    # ----- answering -----
    def answer(self, listener: int, n: object, name: str, memory: object, tgid: int) -> None:
        """Answer one trapped call (``n`` a seccomp.Notification) with its result, errno, or CONTINUE."""
        from . import seccomp

        args: tuple[int, ...] = n.args  # type: ignore[attr-defined]
        ident: int = n.id  # type: ignore[attr-defined]
        if name == "socket":
            self._socket(listener, ident, tgid, args)
            return
        key = (tgid, args[0] & 0xFFFFFFFF)
        sock = self.sockets.get(key)
        if sock is not None and not self._still_ours(key):
            self._forget(key)
            sock = None
        if sock is None:
            seccomp.respond_continue(listener, ident)  # not an emulated socket (another process's, or none)
            return
        if name == "close":
            self._forget(key)
            seccomp.respond_continue(listener, ident)  # the kernel closes the placeholder
            return
        try:
            result = self._call(sock, key, name, args, memory)
        except PeerError as exc:
            log.info("%s on emulated netlink fd %d of %d: %s", name, key[1], tgid, exc)
            seccomp.respond(listener, ident, error=exc.errno or errno.EIO)
            return
        if result is CONTINUE:
            seccomp.respond_continue(listener, ident)
        elif result is PENDING:
            log.warning(
                "%s on emulated netlink fd %d of %d: nothing queued and the socket blocks; the call waits, as the "
                "kernel's would, until a request on this socket is answered",
                name,
                key[1],
                tgid,
            )
            self.waiting.setdefault(key, []).append(_Waiting(ident, n.pid, name, args))  # type: ignore[attr-defined]
        else:
            seccomp.respond(listener, ident, int(result))  # type: ignore[call-overload]
        if name in ("sendto", "sendmsg", "write", "writev") and sock.readable and self.waiting.get(key):
            self._wake(listener, key, sock)

    def _wake(self, listener: int, key: tuple[int, int], sock: NetlinkSocket) -> None:
        from . import seccomp
        from .supervisor import TargetMemory

        queue = self.waiting.get(key, [])
        while queue and sock.readable:
            waiting = queue.pop(0)
            if not seccomp.id_valid(listener, waiting.ident):
                continue  # the waiting thread was killed: nothing to dequeue for it
            try:
                result = self._call(sock, key, waiting.name, waiting.args, TargetMemory(waiting.tid), wake=True)
            except PeerError as exc:
                seccomp.respond(listener, waiting.ident, error=exc.errno or errno.EIO)
                continue
            seccomp.respond(listener, waiting.ident, int(result))  # type: ignore[call-overload]

    def _call(
        self, sock: NetlinkSocket, key: tuple[int, int], name: str, a: tuple[int, ...], memory: object, *,
        wake: bool = False
    ) -> int | _Sentinel:  # fmt: skip
        mem: Memory = memory  # type: ignore[assignment]
        nonblocking = bool(_flags_of(self.placeholders[key]) & os.O_NONBLOCK) and not wake
        if name in _NOT_SUPPORTED:
            raise _fail(errno.EOPNOTSUPP, f"{name} on a netlink socket")
        if name in _NOT_EMULATED:
            log.warning("%s on an emulated netlink socket is not emulated: EOPNOTSUPP", name)
            raise _fail(errno.EOPNOTSUPP, f"{name} is not emulated")
        if name == "setsockopt":
            return sock.setsockopt(a[1], a[2], a[3], a[4], mem)
        if name == "getsockopt":
            return sock.getsockopt(a[1], a[2], a[3], a[4], mem)
        if name == "bind":
            return sock.bind(a[1], a[2], mem)
        if name == "connect":
            return sock.connect(a[1], a[2], mem)
        if name == "getsockname":
            return sock.getsockname(a[1], a[2], mem)
        if name == "getpeername":
            return sock.getpeername(a[1], a[2], mem)
        if name == "sendto":
            return sock.sendto(a[1], a[2], a[3] & 0xFFFFFFFF, a[4], a[5], mem)
        if name == "sendmsg":
            return sock.sendmsg(a[1], a[2] & 0xFFFFFFFF, mem)
        if name == "write":
            return sock.write(a[1], a[2], mem)
        if name == "writev":
            return sock.writev(a[1], a[2], mem)
        if name == "recvfrom":
            return sock.recvfrom(a[1], a[2], a[3] & 0xFFFFFFFF, a[4], a[5], mem, nonblocking=nonblocking)
        if name == "recvmsg":
            return sock.recvmsg(a[1], a[2] & 0xFFFFFFFF, mem, nonblocking=nonblocking)
        if name == "read":
            return sock.read(a[1], a[2], mem, nonblocking=nonblocking)
        if name == "readv":
            return sock.readv(a[1], a[2], mem, nonblocking=nonblocking)
        raise _fail(errno.ENOSYS, f"{name} is not handled")

    def _socket(self, listener: int, ident: int, tgid: int, args: tuple[int, ...]) -> None:
        from . import seccomp

        kind = args[1] & 0xFFFFFFFF
        if kind & ~0xF & ~(SOCK_NONBLOCK | SOCK_CLOEXEC) or kind & 0xF not in (SOCK_RAW, SOCK_DGRAM):
            seccomp.respond_continue(listener, ident)  # the kernel refuses it (EINVAL / ESOCKTNOSUPPORT)
            return
        for number in range(FIRST_NETLINK_FD, FIRST_NETLINK_FD + MAX_NETLINK):
            key = (tgid, number)
            if key in self.sockets and not self._still_ours(key):
                self._forget(key)
            if key not in self.sockets and not os.path.lexists(f"/proc/{tgid}/fd/{number}"):
                break
        else:
            log.warning("process %d has %d emulated netlink sockets open: EMFILE", tgid, MAX_NETLINK)
            seccomp.respond(listener, ident, error=errno.EMFILE)
            return
        placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if kind & SOCK_NONBLOCK:
            placeholder.setblocking(False)
        self.sockets[key] = NetlinkSocket(tgid, kind, self.ports, self.transport)
        self.placeholders[key] = placeholder
        try:
            seccomp.add_fd(
                listener, ident, placeholder.fileno(), target_fd=number, send=True, cloexec=bool(kind & SOCK_CLOEXEC)
            )
        except OSError as exc:
            self._forget(key)
            if exc.errno != errno.ENOENT:  # ENOENT: the caller went away meanwhile
                raise
            return
        log.info("process %d: emulated NETLINK_GENERIC socket at fd %d", tgid, number)

    def _still_ours(self, key: tuple[int, int]) -> bool:
        """Whether the target's fd is still our placeholder (not closed by an exec, not replaced by a dup2)."""
        try:
            return os.stat(f"/proc/{key[0]}/fd/{key[1]}").st_ino == os.fstat(self.placeholders[key].fileno()).st_ino
        except OSError:
            return False

    def _forget(self, key: tuple[int, int]) -> None:
        sock = self.sockets.pop(key, None)
        if sock is not None:
            sock.close()
        placeholder = self.placeholders.pop(key, None)
        if placeholder is not None:
            placeholder.close()
        self.waiting.pop(key, None)


def _flags_of(placeholder: socket.socket) -> int:
    import fcntl

    return fcntl.fcntl(placeholder.fileno(), fcntl.F_GETFL)
