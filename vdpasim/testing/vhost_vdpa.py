"""Test kit for the vhost-vdpa char-device server: a fake calling process and an in-process transport.

* ``FakeCaller``: what ``VhostVdpaServer`` sees of the process making ioctls, without a process. Its memory is
  a bytearray at fake addresses (``alloc``/``poke``/``peek``; anything else is EFAULT); ``take_fd`` dups a
  real fd of this process (EBADF if there is none); ``map_file`` resolves ranges registered with
  ``add_file_mapping`` (real memfds, e.g. the guest RAM of ``driver.GuestMemory`` at its host address) to
  (a dup of the fd, file offset), EFAULT elsewhere.
* ``ServerTransport``: the ``bridge.vhost_vdpa.client.Transport`` that hands a ``VhostVdpaClient``'s
  ioctls and writes to a server in this process through a FakeCaller, answering errors as OSError the
  way the kernel does, so the same client runs over the real char device and over the server.
* ``VdpaEnv``: a NetDevice behind a server with guest RAM the fake caller maps; ``qemu_start()`` replays
  QEMU 7.2's vhost-vdpa start sequence (shared/reference/qemu-observed.md, "vhost-vdpa path") and returns
  a ``NetDriver`` whose rings live in memory mapped through IOTLB UPDATEs, ``qemu_stop()`` the stop
  sequence, ``check_usable()`` proves the device still passes a frame after whatever came before.
* ``Vmm``: raw requests on a server, one method per argument layout (what QEMU does by hand), each
  returning the value read back; a refused request raises the server's PeerError.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.iotlb import IotlbMessage, encode
from bridge.vhost_vdpa.server import VhostVdpaServer

from ..config import NetConfig
from ..devices.net import NetDevice
from ..errors import PeerError
from ..virtio import constants as c
from .driver import DriverQueue, GuestMemory
from .net import BROADCAST, NetDriver, ethernet

__all__ = ["FakeCaller", "ServerTransport", "Vmm", "VdpaEnv", "FAKE_BASE", "errno_of", "fd_is_open"]

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


ACK_DRIVER = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
MAC = bytes.fromhex("020000c0ffee")
GUEST_RAM = 0x100000
RAM_SIZE = 8 << 20
HOLE = 4 << 20  # QEMU sends one UPDATE per RAM section: two here, split at 4 MiB
QUEUE_SIZE = 64
DATA_VQS = (0, 1)
# What QEMU 7.2 acks for a guest that takes neither MQ nor the control queue: MAC dropped, ACCESS_PLATFORM forced.
DRIVER_FEATURES = sum(
    1 << bit
    for bit in (
        c.VIRTIO_F_VERSION_1,
        c.VIRTIO_F_ACCESS_PLATFORM,
        c.VIRTIO_NET_F_MTU,
        c.VIRTIO_NET_F_STATUS,
        c.VIRTIO_NET_F_MRG_RXBUF,
    )
)
V2_BATCH = 1 << a.VHOST_BACKEND_F_IOTLB_MSG_V2 | 1 << a.VHOST_BACKEND_F_IOTLB_BATCH


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno of the PeerError that ``call`` raised (AssertionError if it returned)."""
    try:
        call(*args, **kwargs)
    except PeerError as exc:
        return exc.errno
    raise AssertionError(f"{call} returned instead of failing")


class VdpaEnv:
    def __init__(self, ops: object = None) -> None:
        self.device = NetDevice(NetConfig(name="vdpa0", mac=MAC))
        self.server = VhostVdpaServer(ops if ops is not None else self.device, name="vhost-vdpa-0")  # type: ignore[arg-type]
        self.caller = FakeCaller()
        self.vmm = Vmm(self.server, self.caller)
        self.memory = GuestMemory(RAM_SIZE, GUEST_RAM)
        self.host = self.memory.region.host_addr
        self.caller.add_file_mapping(self.host, RAM_SIZE, self.memory.region.fd)
        self.drivers: list[NetDriver] = []
        self.started = 0

    def close(self) -> None:
        self.server.close()
        self.device.close()
        for driver in self.drivers:
            driver.close()
        self.memory.close()

    # ----- QEMU 7.2 -----
    def qemu_init(self) -> None:
        """netdev init and virtio-net realize: what QEMU sends before the guest driver starts."""
        vmm = self.vmm
        vmm.get(a.VHOST_GET_FEATURES, "<Q")
        vmm.call(a.VHOST_VDPA_GET_IOVA_RANGE, bytes(16))
        vmm.get(a.VHOST_VDPA_GET_STATUS, "<B")
        vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", ACK_DRIVER)
        assert vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") == ACK_DRIVER
        if not self.server.owned:
            vmm.call(a.VHOST_SET_OWNER)
        vmm.get(a.VHOST_GET_FEATURES, "<Q")
        for idx in DATA_VQS:
            vmm.vring_file(a.VHOST_SET_VRING_CALL, idx, a.VHOST_FILE_UNBIND)
        assert vmm.get(a.VHOST_VDPA_GET_DEVICE_ID, "<I") == 1
        vmm.set_config(0, MAC)
        for _ in range(3):
            assert vmm.get_config(0, 8)[:6] == MAC

    def qemu_start(self) -> NetDriver:
        """The guest sets DRIVER_OK: QEMU 7.2's vhost_net_start, ioctl by ioctl; returns the guest's driver."""
        self.qemu_init()
        vmm = self.vmm
        driver = NetDriver(self.device, self.memory, features=DRIVER_FEATURES, queue_size=QUEUE_SIZE)
        self.drivers.append(driver)
        for idx in DATA_VQS:
            driver.call_fds[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            driver.kick_fds[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            driver.calls[idx] = 0
            driver._pending[idx] = []
            vmm.vring_file(a.VHOST_SET_VRING_CALL, idx, driver.call_fds[idx])
        vmm.put(a.VHOST_SET_FEATURES, "<Q", DRIVER_FEATURES)
        status = vmm.get(a.VHOST_VDPA_GET_STATUS, "<B")
        vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", status | c.VIRTIO_CONFIG_S_FEATURES_OK)
        assert vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") & c.VIRTIO_CONFIG_S_FEATURES_OK
        assert vmm.get(a.VHOST_GET_BACKEND_FEATURES, "<Q") & V2_BATCH == V2_BATCH
        vmm.put(a.VHOST_SET_BACKEND_FEATURES, "<Q", V2_BATCH)
        for idx in DATA_VQS:
            dq = DriverQueue(self.memory, QUEUE_SIZE, packed=False, event_idx=False, indirect=False)
            driver.queues[idx] = dq
            vmm.put(a.VHOST_SET_VRING_NUM, "<II", idx, QUEUE_SIZE)
            vmm.put(a.VHOST_SET_VRING_BASE, "<II", idx, 0)
            vmm.vring_addr(idx, dq.desc_addr, dq.driver_addr, dq.device_addr)
            vmm.vring_file(a.VHOST_SET_VRING_KICK, idx, driver.kick_fds[idx])
        for idx in DATA_VQS:
            vmm.put(a.VHOST_VDPA_SET_VRING_ENABLE, "<II", idx, 1)
        assert vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN) == 72
        vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, HOLE, self.host, a.VHOST_ACCESS_RW)
        vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM + HOLE, RAM_SIZE - HOLE, self.host + HOLE, a.VHOST_ACCESS_RW)
        vmm.iotlb(a.VHOST_IOTLB_BATCH_END)
        status = vmm.get(a.VHOST_VDPA_GET_STATUS, "<B")
        vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", status | c.VIRTIO_CONFIG_S_DRIVER_OK)
        assert vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") & c.VIRTIO_CONFIG_S_DRIVER_OK
        self.started += 1
        return driver

    def qemu_stop(self) -> list[int]:
        """vhost_dev_stop as 7.2 orders it: reset, status back to ACK|DRIVER, INVALIDATEs, then the bases."""
        vmm = self.vmm
        vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", 0)
        vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", ACK_DRIVER)
        vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN)
        for iova, size, _, _ in self.server.mappings():
            vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, iova, size)
        vmm.iotlb(a.VHOST_IOTLB_BATCH_END)
        return [vmm.vring(a.VHOST_GET_VRING_BASE, idx) for idx in DATA_VQS]

    def ping(self, driver: NetDriver, tag: int = 7) -> None:
        frame = ethernet(BROADCAST, bytes.fromhex("020000000099"), 0x88B5, bytes([tag]) * 50)
        driver.post_rx(0, 2)
        driver.send(0, [frame])
        assert driver.wait_used(1, 1)[0].len == 0
        assert driver.receive(0, 1)[0].frame == frame

    def check_usable(self) -> None:
        """Whatever came before: a reset, a fresh start and one frame there and back."""
        self.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", 0)
        if self.server.mappings():
            self.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, 0, 0)  # size 0 at iova 0: the whole space
        self.vmm.put(a.VHOST_SET_BACKEND_FEATURES, "<Q", 0)
        driver = self.qemu_start()
        self.ping(driver)
        self.qemu_stop()
        assert not self.server.mappings()


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True
