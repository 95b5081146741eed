"""Malformed socket calls against the emulated NETLINK_GENERIC socket (bridge/supervisor/netlink.py).

* sans-I/O: thousands of seeded random calls (bad pointers, lengths, addresses, flags, garbage and mutated
  datagrams) on ``NetlinkSocket`` over a bounded memory and an in-process ``VdpaNetlinkServer``: each ends in
  a result or a ``PeerError`` with an errno, never another exception, and a correct request works after;
* kernel parity: the option, address and send-refusal calls give the same result or errno on an emulated
  socket (through /proc/self/mem) as on a real NETLINK_GENERIC socket of this kernel;
* a real supervised program making a few hundred malformed calls: an errno each time, no crash, a correct
  request still answered.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from bridge.supervisor.netlink import (
    CONTINUE,
    PENDING,
    SOL_NETLINK,
    NetlinkBypass,
    NetlinkSocket,
    PortTable,
)
from bridge.supervisor.supervisor import Supervisor, TargetMemory
from vdpasim.bus.model import Bus
from vdpasim.bus.server import VDPA_FAMILY_ID, VdpaNetlinkServer, datagrams
from vdpasim.errors import PeerError

BASE, SIZE = 0x10000, 0x10000


class BufferMemory:
    """A target address space of one mapping [BASE, BASE + SIZE); anything else faults (EFAULT)."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)

    def _check(self, addr: int, length: int) -> int:
        if addr < BASE or addr + length > BASE + SIZE or length < 0:
            raise PeerError(f"fault at {addr:#x}+{length}", errno=errno.EFAULT)
        return addr - BASE

    def read(self, addr: int, length: int) -> bytes:
        off = self._check(addr, length)
        return bytes(self.data[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        off = self._check(addr, len(data))
        self.data[off : off + len(data)] = data


def in_process_transport():
    server = VdpaNetlinkServer(Bus())

    def transport(datagram: bytes, port_id: int) -> list[bytes]:
        return datagrams(server.handle(datagram, sender_pid=port_id, ext_ack=True, cap_ack=True))

    return transport


def getfamily(seq: int, name: bytes = b"vdpa") -> bytes:
    attr = struct.pack("=HH", 4 + len(name) + 1, 2) + name + b"\0"
    attr += b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHIIBBH", 20 + len(attr), 16, 5, seq, 0, 3, 1, 0) + attr


ERRNOS = {errno.EFAULT, errno.EINVAL, errno.ENOPROTOOPT, errno.EAGAIN, errno.EOPNOTSUPP, errno.EMSGSIZE,
          errno.EPERM, errno.ECONNREFUSED, errno.EADDRINUSE, errno.ENOBUFS}  # fmt: skip


def pointer(rng: random.Random) -> int:
    return rng.choice([0, 16, BASE - 8, BASE + SIZE - rng.randrange(1, 64), 1 << 47, (1 << 64) - 1,
                       BASE + rng.randrange(0, SIZE - 256), BASE + rng.randrange(0, SIZE - 256)])  # fmt: skip


def length(rng: random.Random) -> int:
    return rng.choice([0, 1, 3, 4, 11, 12, 16, 56, 127, 128, 129, 4096, 1 << 31, (1 << 32) - 1, (1 << 64) - 1,
                       rng.randrange(0, 300)])  # fmt: skip


def fill_random(rng: random.Random, mem: BufferMemory) -> None:
    """Random bytes, sockaddrs, msghdrs and netlink messages scattered over the buffer."""
    for _ in range(40):
        off = rng.randrange(0, SIZE - 256)
        kind = rng.randrange(5)
        if kind == 0:
            blob = rng.randbytes(rng.randrange(1, 200))
        elif kind == 1:
            blob = struct.pack("=HHII", rng.choice([16, 16, 0, 1]), 0, rng.choice([0, 0, 1, 77]), rng.choice([0, 1]))
        elif kind == 2:
            iov = BASE + rng.randrange(0, SIZE - 256)
            blob = struct.pack("=QI4xQQQQi4x", pointer(rng), length(rng) & 0xFFFFFFFF, iov, rng.randrange(0, 3),
                               pointer(rng), rng.choice([0, 0, 16, 24, 7]), 0)  # fmt: skip
            mem.write(iov, struct.pack("=QQ", pointer(rng), rng.randrange(0, 300)))
        elif kind == 3:
            msg = bytearray(getfamily(rng.randrange(1 << 32), rng.choice([b"vdpa", b"nlctrl", b"x" * 30])))
            for _ in range(rng.randrange(0, 4)):
                msg[rng.randrange(len(msg))] = rng.randrange(256)
            blob = bytes(msg)
        else:
            blob = struct.pack("=i", rng.choice([0, 1, -1, 12, 4]))
        mem.write(BASE + off, blob)


def one_call(rng: random.Random, sock: NetlinkSocket, mem: BufferMemory) -> object:
    call = rng.randrange(12)
    p, n = pointer(rng), length(rng)
    flags = rng.choice([0, 0, 0x40, 0x2, 0x20, 0x22, 0x1, 0x2000, rng.randrange(1 << 32)])
    if call == 0:
        return sock.setsockopt(rng.choice([SOL_NETLINK, SOL_NETLINK, 1, 0, -1]), rng.randrange(-1, 14), p, n, mem)
    if call == 1:
        level = rng.choice([SOL_NETLINK, SOL_NETLINK, 1, 6])
        return sock.getsockopt(level, rng.randrange(-1, 40), p, pointer(rng), mem)
    if call == 2:
        return sock.bind(p, n, mem)
    if call == 3:
        return sock.connect(p, n, mem)
    if call == 4:
        return sock.getsockname(p, pointer(rng), mem)
    if call == 5:
        return sock.getpeername(p, pointer(rng), mem)
    if call == 6:
        return sock.sendto(p, n, flags, rng.choice([0, pointer(rng)]), length(rng), mem)
    if call == 7:
        return sock.sendmsg(p, flags, mem)
    if call == 8:
        return sock.write(p, n, mem)
    if call == 9:
        return sock.recvmsg(p, flags | 0x40, mem, nonblocking=rng.random() < 0.5)
    if call == 10:
        return sock.recvfrom(p, n, flags | 0x40, rng.choice([0, pointer(rng)]), pointer(rng), mem, nonblocking=True)
    return sock.read(p, n, mem, nonblocking=True)


def assert_still_works(sock: NetlinkSocket, mem: BufferMemory) -> None:
    sock.queue.clear()
    sock.options[10] = sock.options[11] = True
    request = getfamily(4242)
    mem.write(BASE, request)
    mem.write(BASE + 0x400, struct.pack("=HHII", 16, 0, 0, 0))  # to the kernel, whatever connect() said
    assert sock.sendto(BASE, len(request), 0, BASE + 0x400, 12, mem) == len(request)
    mem.write(BASE + 0x100, struct.pack("=QQ", BASE + 0x1000, 4096))
    mem.write(BASE + 0x200, struct.pack("=QI4xQQQQi4x", BASE + 0x300, 12, BASE + 0x100, 1, 0, 0, 0))
    got = sock.recvmsg(BASE + 0x200, 0, mem, nonblocking=True)
    assert isinstance(got, int) and got > 20
    length_, kind, _, seq, pid = struct.unpack_from("=IHHII", mem.read(BASE + 0x1000, 16))
    assert (length_, kind, seq, pid) == (got, 16, 4242, sock.port_id)  # GENL_ID_CTRL reply, to our port id
    assert struct.unpack("=HHII", mem.read(BASE + 0x300, 12)) == (16, 0, 0, 0)


@pytest.mark.parametrize("seed", range(8))
def test_random_calls_on_the_sans_io_socket(seed: int) -> None:
    rng = random.Random(seed)
    ports = PortTable(privileged=bool(seed % 2))
    transport = in_process_transport()
    for round_ in range(5):
        mem = BufferMemory()
        sock = NetlinkSocket(1000 + round_, 3, ports, transport)
        for _ in range(100):
            fill_random(rng, mem)
            try:
                result = one_call(rng, sock, mem)
            except PeerError as exc:
                assert exc.errno in ERRNOS, (exc.errno, exc)
            else:
                assert result is CONTINUE or result is PENDING or isinstance(result, int)
        assert_still_works(sock, mem)
        sock.close()


@pytest.mark.parametrize("seed", range(4))
def test_garbage_and_mutated_datagrams(seed: int) -> None:
    rng = random.Random(1000 + seed)
    mem = BufferMemory()
    sock = NetlinkSocket(77, 3, PortTable(), in_process_transport())
    sock.options[10] = rng.random() < 0.5
    sock.options[11] = rng.random() < 0.5
    for i in range(500):
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randrange(0, 200))
        else:
            msgs = [bytearray(getfamily(i, rng.choice([b"vdpa", b"nlctrl"]))) for _ in range(rng.randrange(1, 4))]
            data = bytearray(b"".join(msgs))
            for _ in range(rng.randrange(0, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.2 else data)
        mem.write(BASE, data)
        assert sock.sendto(BASE, len(data), 0, 0, 0, mem) == len(data)
        while sock.queue:
            datagram = sock.queue.popleft()
            offset = 0
            while offset < len(datagram):  # every reply datagram is whole messages, addressed to us
                size, _, _, _, pid = struct.unpack_from("=IHHII", datagram, offset)
                assert size >= 16 and offset + size <= len(datagram) and pid == sock.port_id
                offset += (size + 3) & ~3
    assert_still_works(sock, mem)


def test_acks_follow_the_sockets_cap_ack_and_ext_ack() -> None:
    mem = BufferMemory()
    # MGMTDEV_GET of an unknown management device: ENODEV with an extack message
    attr = struct.pack("=HH", 9, 2) + b"nope\0\0\0\0"
    request = struct.pack("=IHHIIBBH", 20 + len(attr), VDPA_FAMILY_ID, 5, 9, 0, 2, 1, 0) + attr
    for cap, ext in ((True, True), (False, True), (True, False), (False, False)):
        sock = NetlinkSocket(5, 3, PortTable(), in_process_transport())
        sock.options[10], sock.options[11] = cap, ext
        mem.write(BASE, request)
        sock.sendto(BASE, len(request), 0, 0, 0, mem)
        reply = sock.queue.popleft()
        size, kind, flags, _, _ = struct.unpack_from("=IHHII", reply)
        assert kind == 2 and struct.unpack_from("=i", reply, 16)[0] == -errno.ENODEV
        assert bool(flags & 0x100) == cap  # NLM_F_CAPPED
        assert bool(flags & 0x200) == ext  # NLM_F_ACK_TLVS
        embedded = reply[20 : 20 + (16 if cap else len(request))]
        assert embedded == (request[:16] if cap else request)[: len(embedded)]
        assert size == len(reply)
        if not ext:
            assert size == 20 + (16 if cap else len(request))


# ----- parity with the running kernel's NETLINK_GENERIC socket -----
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def raw(nr: int, *args: int) -> int:
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) for a in args))
    return -ctypes.get_errno() if result < 0 else result


def test_errnos_match_a_real_netlink_generic_socket() -> None:
    rng = random.Random(7)
    buf = ctypes.create_string_buffer(4096)
    base = ctypes.addressof(buf)
    mem = TargetMemory(os.getpid())
    ptrs = [0, 16, base, base + 1024, base + 4090, 1 << 47]
    checked = 0
    for _ in range(400):
        real = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
        ours = NetlinkSocket(os.getpid(), 3, PortTable(), lambda d, p: [])
        try:
            call = rng.randrange(5)
            for off in range(0, 4096, 64):  # addresses and option values, some valid
                kernel = struct.pack("=HHII", 16, 0, 0, 0)
                other = struct.pack("=HHII", rng.choice([0, 1, 16]), 0, 0, rng.choice([0, 1]))
                value = struct.pack("=ii", rng.choice([0, 1, 2, 12, -1]), 4)
                piece = rng.choice([kernel, kernel, other, value, rng.randbytes(64)])
                ctypes.memmove(base + off, piece, len(piece))
            p = rng.choice(ptrs) + rng.choice([0, 0, 64, 128])
            n = rng.choice([0, 1, 2, 4, 8, 11, 12, 16, 128, 129, -1])
            if call == 0:
                level, name = rng.choice([SOL_NETLINK, SOL_NETLINK, 6]), rng.choice([3, 4, 5, 9, 10, 11, 12, 13, 0, 6])
                want = raw(54, real.fileno(), level, name, p, n)
                got = _emulated(ours.setsockopt, level, name, p, n, mem)
            elif call == 1:
                level, name = rng.choice([SOL_NETLINK, 6]), rng.choice([3, 4, 10, 11, 12, 13, 0])
                lenval = struct.pack("=i", rng.choice([0, 2, 4, 8, -1]))
                lp = rng.choice([base + 2048, base + 2048, 0, 16])
                ctypes.memmove(base + 2048, lenval, 4)
                want = raw(55, real.fileno(), level, name, base + 1024, lp)
                kernel_wrote = bytes(buf[1024:1028] + buf[2048:2052])
                ctypes.memmove(base + 2048, lenval, 4)
                got = _emulated(ours.getsockopt, level, name, base + 1024, lp, mem)
                assert bytes(buf[1024:1028] + buf[2048:2052]) == kernel_wrote
            elif call == 2:
                want = raw(49, real.fileno(), p, n)
                got = _emulated(ours.bind, p, n, mem)
            elif call == 3:
                want = raw(42, real.fileno(), p, n)
                got = _emulated(ours.connect, p, n, mem)
            else:
                flags = rng.choice([0, 1])
                # only refusals are compared: a name that is not the kernel, a bad address or MSG_OOB
                ctypes.memmove(base + 3000, struct.pack("=HHII", rng.choice([0, 1, 16]), 0, 0, 0), 12)
                alen = rng.choice([1, 11, 12, 129, -1])
                want = raw(44, real.fileno(), base, 16, flags, base + 3000, alen)
                got = _emulated(ours.sendto, base, 16, flags, base + 3000, alen, mem)
                if want >= 0:
                    continue
            assert got == want, (call, p - base if p >= base else p, n, got, want)
            checked += 1
        finally:
            real.close()
    assert checked > 250


def _emulated(call, *args) -> int:
    try:
        result = call(*args)
    except PeerError as exc:
        return -exc.errno
    assert isinstance(result, int)
    return result


# ----- through a real supervised program -----
PROGRAM = textwrap.dedent(
    """
    import ctypes, errno, fcntl, os, random, socket, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def raw(nr, *args):
        r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
        return -ctypes.get_errno() if r < 0 else r
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    fd = s.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    buf = ctypes.create_string_buffer(8192)
    base = ctypes.addressof(buf)
    rng = random.Random(int(sys.argv[1]))
    errnos = {}
    for i in range(int(sys.argv[2])):
        ctypes.memmove(base + rng.randrange(0, 8000), rng.randbytes(64), 64)
        ptr = rng.choice([0, 16, base, base + 512, base + 8180, 1 << 47])
        n = rng.choice([0, 4, 12, 16, 56, 129, 1 << 31, -1])
        nr = rng.choice([54, 55, 49, 42, 51, 52, 44, 46, 45, 47, 0, 1, 19, 20, 48, 50, 43, 288, 299, 307])
        if nr == 44:
            r = raw(nr, fd, ptr, n, rng.choice([0, 1, 0x40]), rng.choice([0, ptr]), rng.choice([0, 12, 129]))
        elif nr in (45, 47):
            r = raw(nr, fd, ptr, n, 0x40, rng.choice([0, base + 4096]), base + 4200)
        else:
            r = raw(nr, fd, rng.choice([0, 1, 270]), rng.choice([ptr, 10, 11]), ptr, n)
        if r < 0:
            errnos[-r] = errnos.get(-r, 0) + 1
    print(sorted(errnos.items()), flush=True)
    while True:  # drain what the random sends queued
        try:
            s.recv(65536)
        except BlockingIOError:
            break
    req = struct.pack("=IHHIIBBH", 32, 16, 5, 99, 0, 3, 1, 0) + struct.pack("=HH", 9, 2) + b"vdpa\\0\\0\\0\\0"
    s.setsockopt(270, 10, 1)
    s.setsockopt(270, 11, 1)
    s.send(req)
    s.setblocking(True)
    data = s.recv(65536)
    print("reply", struct.unpack_from("=IHHII", data)[1:2], struct.unpack_from("=I", data, 8)[0], flush=True)
    """
)


@pytest.mark.parametrize("seed", range(3))
def test_malformed_calls_from_a_supervised_program(seed: int) -> None:
    bypass = NetlinkBypass(in_process_transport())
    supervisor = Supervisor(
        [sys.executable, "-c", PROGRAM, str(seed), "150"], {}, netlink=bypass, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE
    )  # fmt: skip
    try:
        out, err = supervisor.process.communicate(timeout=120)
    finally:
        supervisor.close()
    assert supervisor.process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    seen = dict(eval(lines[0]))  # our own program's list of (errno, count)
    assert errno.EIO not in seen and errno.ENOSYS not in seen, seen  # no supervisor bug, no dead supervisor
    assert seen  # the calls were refused, each with an errno
    assert lines[1] == "reply (16,) 99"
