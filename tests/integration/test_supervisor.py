"""The seccomp supervisor against unmodified programs: a simulated char device on a kernel that has none.

A small program (plain Python, no knowledge of vdpasim) opens /dev/vhost-vdpa-0, issues vhost ioctls,
writes to it, closes and reopens it; the supervisor serves the node with a toy handler. Everything else
the program does (other files, other ioctls) runs untouched.
"""

from __future__ import annotations

import errno
import struct
import sys
import textwrap

from bridge.supervisor.supervisor import FIRST_NODE_FD, Supervisor, TargetMemory
from vdpasim.errors import PeerError

VHOST_GET_FEATURES = 0x8008AF00
VHOST_SET_FEATURES = 0x4008AF00


class ToyNode:
    """Answers VHOST_GET/SET_FEATURES and counts writes: enough to see every path of the supervisor."""

    opened = 0
    closed = 0

    def __init__(self) -> None:
        self.features = 0x1_0000_0000
        self.written: list[bytes] = []

    def open(self, flags: int) -> ToyNode:
        ToyNode.opened += 1
        return self

    def ioctl(self, request: int, arg: int, memory: TargetMemory) -> int:
        if request == VHOST_GET_FEATURES:
            memory.write(arg, struct.pack("<Q", self.features))
            return 0
        if request == VHOST_SET_FEATURES:
            self.features = struct.unpack("<Q", memory.read(arg, 8))[0]
            return 0
        raise PeerError(f"ioctl {request:#x}", errno=errno.ENOTTY)

    def write(self, addr: int, length: int, memory: TargetMemory) -> int:
        self.written.append(memory.read(addr, length))
        return length

    def close(self) -> None:
        ToyNode.closed += 1


PROGRAM = textwrap.dedent(
    """
    import fcntl, os, struct, sys
    print(open("/proc/self/comm").read().strip() != "", flush=True)   # an ordinary open still works
    fd = os.open("/dev/vhost-vdpa-0", os.O_RDWR)
    print("fd", fd, flush=True)
    buf = bytearray(8)
    fcntl.ioctl(fd, 0x8008AF00, buf)
    print("features", hex(struct.unpack("<Q", buf)[0]), flush=True)
    fcntl.ioctl(fd, 0x4008AF00, struct.pack("<Q", 0x300000000))
    fcntl.ioctl(fd, 0x8008AF00, buf)
    print("features", hex(struct.unpack("<Q", buf)[0]), flush=True)
    print("written", os.write(fd, b"x" * 72), flush=True)
    try:
        fcntl.ioctl(fd, 0x8008AF00, 16)  # a pointer into nothing: the supervisor must answer EFAULT, not crash
    except OSError as e:
        print("bad pointer", e.errno, flush=True)
    try:
        fcntl.ioctl(fd, 0x8008AF01, buf)
    except OSError as e:
        print("errno", e.errno, flush=True)
    try:
        os.open("/dev/vhost-vdpa-0", os.O_RDWR)
    except OSError as e:
        print("second open", e.errno, flush=True)
    os.close(fd)
    fd = os.open("/dev/vhost-vdpa-0", os.O_RDWR)
    print("reopened", fd, flush=True)
    """
)


def test_an_unmodified_program_talks_to_a_simulated_node() -> None:
    node = ToyNode()
    supervisor = Supervisor([sys.executable, "-c", PROGRAM], {"/dev/vhost-vdpa-0": node}, stdout=-1, stderr=-1)
    try:
        out, err = supervisor.process.communicate(timeout=60)
    finally:
        supervisor.close()
    lines = out.decode().splitlines()
    assert supervisor.process.returncode == 0, err.decode()
    assert lines == [
        "True",
        f"fd {FIRST_NODE_FD}",
        "features 0x100000000",
        "features 0x300000000",
        "written 72",
        f"bad pointer {errno.EFAULT}",
        f"errno {errno.ENOTTY}",
        f"second open {errno.EBUSY}",
        f"reopened {FIRST_NODE_FD}",
    ]
    assert node.written == [b"x" * 72]
    assert ToyNode.opened == 2 and ToyNode.closed == 2  # the reopen, then close() at the end
