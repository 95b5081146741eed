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


def test_target_fds_and_shared_file_mappings_are_reachable() -> None:
    """take_fd and map_file, what a vhost-vdpa server needs of its caller, on this very process."""
    import ctypes
    import mmap
    import os

    memory = TargetMemory(os.getpid())
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    shared = mmap.mmap(ram, 1 << 20, flags=mmap.MAP_SHARED)
    private = mmap.mmap(-1, 8192, flags=mmap.MAP_PRIVATE)
    events = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        shared[8192:8196] = b"ring"
        fd, offset = memory.map_file(base + 8192, 4096)
        try:
            assert offset == 8192 and os.pread(fd, 4, offset) == b"ring"
        finally:
            os.close(fd)
        for addr, length in ((base, 2 << 20), (ctypes.addressof(ctypes.c_char.from_buffer(private)), 16), (8, 8)):
            try:
                memory.map_file(addr, length)
                raise AssertionError("mapped")
            except PeerError as exc:
                assert exc.errno == errno.EFAULT
        copy = memory.take_fd(events)
        os.eventfd_write(copy, 5)
        os.close(copy)
        assert os.eventfd_read(events) == 5
        try:
            memory.take_fd(1000)
            raise AssertionError("took a closed fd")
        except PeerError as exc:
            assert exc.errno == errno.EBADF
    finally:
        os.close(events)
        shared.close()
        private.close()
        os.close(ram)


def test_a_node_held_by_a_dying_process_is_released() -> None:
    """A process that exits (or is killed) closes no fd by syscall: the supervisor still releases its node,
    while a sibling in the same tree keeps running."""
    node = ToyNode()
    before = ToyNode.closed
    program = textwrap.dedent(
        """
        import os, subprocess, sys, time
        opener = "import os; os.open('/dev/vhost-vdpa-0', os.O_RDWR); os._exit(3)"
        child = subprocess.Popen([sys.executable, "-c", opener])
        print("child", child.wait(), flush=True)
        time.sleep(0.5)
        fd = os.open("/dev/vhost-vdpa-0", os.O_RDWR)  # free again: not EBUSY
        print("reopened", fd, flush=True)
        """
    )
    supervisor = Supervisor([sys.executable, "-c", program], {"/dev/vhost-vdpa-0": node}, stdout=-1, stderr=-1)
    try:
        out, err = supervisor.process.communicate(timeout=60)
        assert supervisor.process.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["child 3", f"reopened {FIRST_NODE_FD}"]
        supervisor.wait(10)
        assert ToyNode.closed - before == 2  # the dead child's open, then the parent's at its exit
    finally:
        supervisor.close()


def test_only_opens_for_writing_are_trapped() -> None:
    """The filter traps openat only with O_WRONLY or O_RDWR: a program's read-only opens (its libraries, its
    imports) never wait for the supervisor, and a node opened read-only is simply not there."""
    node = ToyNode()
    program = textwrap.dedent(
        """
        import os
        for _ in range(20):
            os.close(os.open("/proc/self/comm", os.O_RDONLY | os.O_CLOEXEC))
        try:
            os.open("/dev/vhost-vdpa-0", os.O_RDONLY)
        except FileNotFoundError:
            print("read-only: not found", flush=True)
        fd = os.open("/dev/vhost-vdpa-0", os.O_RDWR)
        print("read-write", fd, flush=True)
        os.close(os.open("/dev/null", os.O_WRONLY))
        """
    )
    supervisor = Supervisor([sys.executable, "-c", program], {"/dev/vhost-vdpa-0": node}, stdout=-1, stderr=-1)
    try:
        out, err = supervisor.process.communicate(timeout=60)
        assert supervisor.process.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["read-only: not found", f"read-write {FIRST_NODE_FD}"]
        supervisor.wait(10)
        # the node's open and /dev/null's (passed on); none of the interpreter's many read-only opens
        assert supervisor.calls_by_syscall["openat"] == 2
        assert supervisor.passed >= 1
    finally:
        supervisor.close()
