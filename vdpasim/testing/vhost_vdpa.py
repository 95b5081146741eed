"""Test kit for the vhost-vdpa char-device server: a fake calling process and an in-process transport.

* ``FakeCaller``: what ``VhostVdpaServer`` sees of the process making ioctls, without a process. Its memory is
  a bytearray at fake addresses (``alloc``/``poke``/``peek``; anything else is EFAULT); ``take_fd`` dups a
  real fd of this process (EBADF if there is none); ``map_file`` resolves ranges registered with
  ``add_file_mapping`` (real memfds, e.g. the guest RAM of ``driver.GuestMemory`` at its host address) to
  (a dup of the fd, file offset), EFAULT elsewhere.
* ``ServerTransport``: the ``bridge.vhost_vdpa.client.Transport`` that hands a ``VhostVdpaClient``'s
  ioctls and writes to a server in this process through a FakeCaller, answering errors as OSError the
  way the kernel does, so the same client runs over the real char device and over the server.
* ``Vmm``: raw requests on a server, one method per argument layout (what QEMU does by hand), each
  returning the value read back; a refused request raises the server's PeerError.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.iotlb import IotlbMessage, encode
from bridge.vhost_vdpa.server import VhostVdpaServer

from ..errors import PeerError

__all__ = ["FakeCaller", "ServerTransport", "Vmm", "FAKE_BASE"]

FAKE_BASE = 0x7F00_0000_0000


@dataclass
class _FileMapping:
    uaddr: int
    size: int
    fd: int
    offset: int


class FakeCaller:
    """A calling process made of a bytearray and a table of file mappings; see the module docstring."""

    def __init__(self, size: int = 1 << 20, base: int = FAKE_BASE) -> None:
        self.base = base
        self.memory = bytearray(size)
        self._next = base
        self.files: list[_FileMapping] = []
        self.taken = 0  # fds handed out by take_fd and map_file

    # ----- the Caller protocol -----
    def read(self, addr: int, length: int) -> bytes:
        start = self._offset(addr, length)
        return bytes(self.memory[start : start + length])

    def write(self, addr: int, data: bytes) -> None:
        start = self._offset(addr, len(data))
        self.memory[start : start + len(data)] = data

    def take_fd(self, number: int) -> int:
        try:
            fd = os.dup(number)
        except (OSError, OverflowError) as exc:
            raise PeerError(f"no fd {number} in the caller", errno=errno.EBADF) from exc
        self.taken += 1
        return fd

    def map_file(self, uaddr: int, size: int) -> tuple[int, int]:
        for f in self.files:
            if f.uaddr <= uaddr and uaddr + size <= f.uaddr + f.size and size > 0:
                self.taken += 1
                return os.dup(f.fd), f.offset + uaddr - f.uaddr
        raise PeerError(f"no shared file mapping covers {uaddr:#x}+{size:#x}", errno=errno.EFAULT)

    # ----- set-up -----
    def _offset(self, addr: int, length: int) -> int:
        start = addr - self.base
        if length < 0 or start < 0 or start + length > len(self.memory):
            raise PeerError(f"bad address {addr:#x}+{length:#x}", errno=errno.EFAULT)
        return start

    def alloc(self, size: int, align: int = 8) -> int:
        addr = (self._next + align - 1) // align * align
        if addr + size > self.base + len(self.memory):
            self._next = self.base  # wrap around: tests only keep a few buffers alive at once
            addr = self.base
        self._next = addr + size
        return addr

    def poke(self, data: bytes) -> int:
        addr = self.alloc(max(len(data), 1))
        self.write(addr, data)
        return addr

    def peek(self, addr: int, length: int) -> bytes:
        return self.read(addr, length)

    def add_file_mapping(self, uaddr: int, size: int, fd: int, offset: int = 0) -> None:
        """Say that [uaddr, uaddr+size) of the caller maps ``fd`` (not taken over) from ``offset``."""
        self.files.append(_FileMapping(uaddr, size, fd, offset))


class ServerTransport:
    """Requests of a VhostVdpaClient straight into a VhostVdpaServer (see the module docstring)."""

    def __init__(self, server: VhostVdpaServer, caller: FakeCaller) -> None:
        self.server = server
        self.caller = caller

    def ioctl(self, request: int, buffer: bytearray | None) -> None:
        addr = self.caller.poke(bytes(buffer)) if buffer is not None else 0
        try:
            self.server.ioctl(request, addr, self.caller)
        except PeerError as exc:
            raise OSError(exc.errno, str(exc)) from exc
        if buffer is not None:
            buffer[:] = self.caller.peek(addr, len(buffer))

    def write(self, data: bytes) -> int:
        addr = self.caller.poke(data)
        try:
            return self.server.write(addr, len(data), self.caller)
        except PeerError as exc:
            raise OSError(exc.errno, str(exc)) from exc

    def close(self) -> None:
        self.server.close()


class Vmm:
    """Raw ioctls and IOTLB writes on a server, as QEMU makes them (see the module docstring)."""

    def __init__(self, server: VhostVdpaServer, caller: FakeCaller | None = None) -> None:
        self.server = server
        self.caller = caller or FakeCaller()

    def call(self, request: int, payload: bytes = b"", *, arg: int | None = None) -> bytes:
        """Make ``request`` with ``payload`` at a fresh address (or at ``arg``); the bytes there after."""
        if arg is None:
            arg = self.caller.poke(payload) if payload else 0
        self.server.ioctl(request, arg, self.caller)
        return self.caller.peek(arg, len(payload)) if payload else b""

    def get(self, request: int, fmt: str, *prefix: int) -> int:
        layout = struct.Struct(fmt)
        values = (*prefix, *([0] * (len(layout.unpack(bytes(layout.size))) - len(prefix))))
        return layout.unpack(self.call(request, layout.pack(*values)))[-1]

    def put(self, request: int, fmt: str, *values: int) -> None:
        self.call(request, struct.pack(fmt, *values))

    def vring(self, request: int, index: int, num: int = 0) -> int:
        return a.VHOST_VRING_STATE.unpack(self.call(request, a.VHOST_VRING_STATE.pack(index, num)))[1]

    def vring_file(self, request: int, index: int, fd: int) -> None:
        self.call(request, a.VHOST_VRING_FILE.pack(index, fd))

    def vring_addr(self, index: int, desc: int, avail: int, used: int, flags: int = 0, log: int = 0) -> None:
        self.call(a.VHOST_SET_VRING_ADDR, a.VHOST_VRING_ADDR.pack(index, flags, desc, used, avail, log))

    def get_config(self, offset: int, length: int) -> bytes:
        return self.call(a.VHOST_VDPA_GET_CONFIG, a.VHOST_VDPA_CONFIG.pack(offset, length) + bytes(length))[8:]

    def set_config(self, offset: int, data: bytes) -> None:
        self.call(a.VHOST_VDPA_SET_CONFIG, a.VHOST_VDPA_CONFIG.pack(offset, len(data)) + data)

    def iotlb(
        self, type: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, *, asid: int = 0, v2: bool = True
    ) -> int:
        data = encode(IotlbMessage(type, asid, iova, size, uaddr, perm), v2)
        return self.write(data)

    def write(self, data: bytes) -> int:
        return self.server.write(self.caller.poke(data), len(data), self.caller)
