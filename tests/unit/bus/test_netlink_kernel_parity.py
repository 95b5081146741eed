"""The generic-netlink machinery of the userspace server, byte for byte against the running kernel.

The host kernel is a real peer for everything that is not the vdpa family itself: the controller
(nlctrl), the message walk, the generic-netlink header checks, attribute validation and the
NLMSG_ERROR format under every combination of NETLINK_CAP_ACK and NETLINK_EXT_ACK. Each test sends
the same datagram to the kernel (a NETLINK_GENERIC socket, no privilege needed) and to
``VdpaNetlinkServer.handle`` with that socket's port id and options, and compares every reply.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from vdpasim.bus import Bus, VdpaNetlinkServer

SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
UNUSED_FAMILY = 0x3FF  # GENL_MAX_ID: never handed out on a normal system
REQUEST, MULTI, ACK, DUMP = 0x1, 0x2, 0x4, 0x300
SEQ = 4242


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(family: int, flags: int, cmd: int, *attrs: bytes, version: int = 1, reserved: int = 0) -> bytes:
    body = struct.pack("=BBH", cmd, version, reserved) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), family, flags, SEQ, 0) + body


def getfamily(*attrs: bytes, flags: int = REQUEST | ACK) -> bytes:
    return message(GENL_ID_CTRL, flags, 3, *attrs)


def name(text: bytes) -> bytes:
    return nla(2, text)


@contextlib.contextmanager
def kernel_socket(cap_ack: bool, ext_ack: bool) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        if cap_ack:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        if ext_ack:
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(5)
        yield sock
    finally:
        sock.close()


def split(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        out.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return out


def kernel_replies(sock: socket.socket, datagram: bytes, expected: int) -> list[bytes]:
    """Send, then read until ``expected`` messages came back, then check nothing else is queued."""
    sock.send(datagram)
    replies: list[bytes] = []
    while len(replies) < expected:
        replies += split(sock.recv(1 << 16))
    assert not pending(sock)
    return replies


def pending(sock: socket.socket) -> bool:
    """Anything queued? The kernel answers inside send(), so "nothing now" means "nothing"."""
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture
def server():
    bus = Bus()
    yield VdpaNetlinkServer(bus)
    bus.close()


MODES = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="cap"),
    pytest.param(False, True, id="ext"),
    pytest.param(True, True, id="cap+ext(iproute2)"),
]

CASES = [
    pytest.param(getfamily(name(b"nlctrl\0")), id="getfamily-nlctrl"),
    pytest.param(getfamily(nla(1, struct.pack("=H", GENL_ID_CTRL))), id="getfamily-by-id"),
    pytest.param(getfamily(nla(1, struct.pack("=I", GENL_ID_CTRL))), id="getfamily-by-id-liberal-u32"),
    pytest.param(getfamily(name(b"x" * 20)), id="name-too-long"),
    pytest.param(getfamily(name(b"abcd")), id="name-unterminated"),
    pytest.param(getfamily(nla(1, b"\x10")), id="id-too-short"),
    pytest.param(getfamily(name(b"no-such-family\0")), id="unknown-name"),
    pytest.param(getfamily(nla(1, struct.pack("=H", UNUSED_FAMILY))), id="unknown-id"),
    pytest.param(getfamily(), id="no-attributes"),
    pytest.param(getfamily(name(b"nlctrl\0"), nla(9, b"junk")), id="liberal-ignores-unknown"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK, 3, name(b"nlctrl\0"), b"\x07\x00"), id="liberal-trailing-warns"),
    pytest.param(getfamily(name(b"nlctrl\0")) + b"\x07\x00", id="bytes-after-the-last-message"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK, 10), id="getpolicy-has-no-doit"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK, 11, reserved=1), id="reserved-checked-from-resv-start-op"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK | 0x400, 11), id="flags-checked-from-resv-start-op"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK, 11), id="unknown-command"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK | 0x400, 3, name(b"nlctrl\0"), reserved=7), id="old-cmd-lax"),
    pytest.param(message(UNUSED_FAMILY, REQUEST | ACK, 1), id="unknown-family"),
    pytest.param(message(GENL_ID_CTRL, REQUEST | ACK, 3)[:18], id="short-genl-header"),
    pytest.param(message(GENL_ID_CTRL, ACK, 3), id="not-a-request"),
    pytest.param(struct.pack("=IHHII", 16, 1, REQUEST | ACK, SEQ, 0), id="control-message"),
    pytest.param(getfamily(name(b"nlctrl\0"), flags=REQUEST), id="no-ack-asked"),
    pytest.param(getfamily(name(b"nlctrl\0")) + getfamily(name(b"nope\0")), id="two-in-one-datagram"),
]


def fix_length(datagram: bytes) -> bytes:
    """Cases cut short keep a header length that matches what is left (18 bytes: no room for genlmsghdr)."""
    if len(datagram) == 18:
        return struct.pack("=I", 18) + datagram[4:]
    return datagram


@pytest.mark.parametrize(("cap_ack", "ext_ack"), MODES)
@pytest.mark.parametrize("datagram", CASES)
def test_same_replies_as_the_kernel(server, cap_ack, ext_ack, datagram):
    datagram = fix_length(datagram)
    with kernel_socket(cap_ack, ext_ack) as sock:
        pid = sock.getsockname()[0]
        ours = server.handle(datagram, sender_pid=pid, ext_ack=ext_ack, cap_ack=cap_ack)
        assert kernel_replies(sock, datagram, len(ours)) == ours


def test_truncated_message_is_dropped_like_the_kernel_does(server):
    whole = getfamily(name(b"nlctrl\0"))
    cut = whole[:-4]  # nlmsg_len now points past the end of the datagram
    assert server.handle(cut, sender_pid=1) == []
    with kernel_socket(True, True) as sock:
        sock.send(cut)
        assert not pending(sock)


def test_dump_format_matches_the_kernel(server):
    """A GETFAMILY dump: the kernel lists every family; the first (nlctrl) and the NLMSG_DONE must match ours."""
    dump = getfamily(flags=REQUEST | ACK | DUMP)
    with kernel_socket(True, True) as sock:
        pid = sock.getsockname()[0]
        ours = server.handle(dump, sender_pid=pid, ext_ack=True, cap_ack=True)
        sock.send(dump)
        theirs: list[bytes] = []
        while not theirs or struct.unpack_from("=H", theirs[-1], 4)[0] != 3:
            theirs += split(sock.recv(1 << 16))
    assert [struct.unpack_from("=H", m, 6)[0] for m in ours[:-1]] == [MULTI, MULTI]
    assert ours[0] == theirs[0]  # nlctrl, NLM_F_MULTI
    assert ours[-1] == theirs[-1]  # NLMSG_DONE: NLM_F_MULTI, error 0, no ack after it
    assert struct.unpack_from("=i", ours[-1], 16)[0] == 0


def test_what_iproute2_vdpa_sees_first_from_this_kernel():
    """GETFAMILY "vdpa" as iproute2 sends it: ENOENT (capped, no text) unless the kernel has the family."""
    request = getfamily(name(b"vdpa\0"))
    with kernel_socket(True, True) as sock:
        reply = kernel_replies(sock, request, 1)[0]
    kind, flags = struct.unpack_from("=HH", reply, 4)
    if kind == GENL_ID_CTRL:  # a kernel with vdpa loaded: its NEWFAMILY reply (the ack follows)
        assert name(b"vdpa\0") in reply
    else:
        assert (kind, flags, -struct.unpack_from("=i", reply, 16)[0]) == (2, 0x100, errno.ENOENT)
