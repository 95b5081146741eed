"""Malformed vhost-vdpa ioctls and IOTLB writes from a real program, through the supervisor and the bridge.

An unmodified-style program (plain Python with ctypes, no vdpasim code in its fuzz loop) opens the bypass's
/dev/vhost-vdpa-0 — a vhost-vdpa server on a vhost-user client of a real NetDevice's socket — and makes
10,000 ioctls and 2,500 writes with random requests, indexes, sizes and pointers: unmapped, misaligned,
kernel-half and wrapping addresses, garbage and structured IOTLB messages (overlapping, wrapping, zero-size,
private or unmapped memory, wrong order of batch markers). Every call must come back with a result or an
errno (never ENOSYS, which means a dead supervisor, nor EIO, its internal-error answer), nothing may be
logged as an exception, and afterwards the same program drives the device with the vhost-vdpa client and
gets its frames back: the device survived and a reset made it usable.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from bridge.bypass import VhostVdpaNode
from bridge.supervisor.supervisor import Supervisor
from bridge.vhost_user.server import VhostUserServer
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent(
    """
    import ctypes, errno, json, mmap, os, random, struct, sys
    seed, ioctls, writes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    libc.ioctl.restype, libc.write.restype = ctypes.c_int, ctypes.c_ssize_t

    fd = os.open("/dev/vhost-vdpa-0", os.O_RDWR)
    scratch = ctypes.create_string_buffer(4096)  # the only memory a GET may write into
    base = ctypes.addressof(scratch)
    ram_fd = os.memfd_create("fuzz-ram")
    os.ftruncate(ram_fd, 1 << 20)
    ram = mmap.mmap(ram_fd, 1 << 20, flags=mmap.MAP_SHARED)
    ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    private = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE)
    private_addr = ctypes.addressof(ctypes.c_char.from_buffer(private))
    events = [os.eventfd(0) for _ in range(2)]
    guarded = mmap.mmap(-1, 8192)  # a page, then an inaccessible one: a struct straddling them faults
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    guard = ctypes.addressof(ctypes.c_char.from_buffer(guarded)) + 4096
    assert libc.mprotect(guard, 4096, 0) == 0
    BAD = [0, 1, 0xDEAD0000, 0xFFFF800000000000, 0xFFFFFFFFFFFFFFFF, guard - 3, guard, 0x7FFFFFFFF000]

    def ioc(d, nr, size):
        return d << 30 | size << 16 | 0xAF << 8 | nr

    REQUESTS = [ioc(d, nr, size) for d, nr, size in (
        (2, 0, 8), (1, 0, 8), (0, 1, 0), (0, 2, 0), (1, 3, 8), (1, 4, 8), (1, 7, 4), (1, 0x10, 8), (1, 0x11, 40),
        (1, 0x12, 8), (3, 0x12, 8), (1, 0x20, 8), (1, 0x21, 8), (1, 0x22, 8), (1, 0x25, 8), (2, 0x26, 8),
        (2, 0x70, 4), (2, 0x71, 1), (1, 0x72, 1), (2, 0x73, 8), (1, 0x74, 8), (1, 0x75, 8), (2, 0x76, 2),
        (1, 0x77, 4), (2, 0x78, 16), (2, 0x79, 4), (2, 0x7A, 4), (3, 0x7B, 8), (1, 0x7C, 8), (0, 0x7D, 0),
        (0, 0x7E, 0), (3, 0x7F, 8), (2, 0x80, 4), (2, 0x81, 4), (3, 0x82, 8))]

    def small():
        return rng.choice([0, 1, 2, 3, 7, 255, 256, 0xFFFF, 0x10000, 0xFFFFFFFF, rng.getrandbits(32)])

    def fill():
        kind = rng.random()
        if kind < 0.4:  # a plausible struct: index, then a value or an fd or an address
            words = [small(), rng.choice([small(), events[0], events[1], -1 & 0xFFFFFFFF, 1, 900])]
            words += [rng.choice([0, ram_addr, 0x1000, rng.getrandbits(64)]) for _ in range(5)]
            data = struct.pack("<II5Q", *words)
        else:
            data = rng.randbytes(64)
        ctypes.memmove(base, data, len(data))
        return base

    def iotlb():
        kind = rng.choice([1, 2, 2, 2, 3, 5, 6, rng.getrandbits(8)])
        iova = rng.choice([0, 0x1000, 0x10000, 0xFFFFFFFFFFFFF000, rng.getrandbits(64) & ~0xFFF, 0x10000 + 0x800])
        size = rng.choice([0, 1, 0x1000, 0x10000, 1 << 20, 0xFFFFFFFFFFFFFFFF, rng.getrandbits(20)])
        uaddr = rng.choice([ram_addr, ram_addr + 0x8000, private_addr, 0, 0xDEAD0000, rng.getrandbits(64)])
        perm = rng.choice([0, 1, 2, 3, 4, 0xFF])
        version = rng.choice([1, 2, 2, 3])
        body = struct.pack("<QQQBB6x", iova, size, uaddr, perm, kind)
        if version == 2:
            return struct.pack("<II", 2, rng.choice([0, 0, 1, 7])) + body + bytes(32)
        return struct.pack("<i4x", version) + body + bytes(32)

    seen = {}
    calls = 0
    def record(result):
        global calls
        calls += 1
        code = ctypes.get_errno() if result < 0 else 0
        seen[code] = seen.get(code, 0) + 1

    for _ in range(ioctls):
        if rng.random() < 0.9:
            request = rng.choice(REQUESTS)
        else:
            request = ioc(rng.randint(0, 3), rng.getrandbits(8), rng.getrandbits(14))
        arg = rng.choice(BAD) if rng.random() < 0.25 else fill()
        record(libc.ioctl(fd, request, arg))
    for _ in range(writes):
        if rng.random() < 0.2:
            record(libc.write(fd, rng.choice(BAD), rng.choice([0, 8, 72, 4096])))
            continue
        message = iotlb() if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 100))
        ctypes.memmove(base, message, len(message))
        record(libc.write(fd, base, rng.choice([len(message)] * 4 + [0, 1, 40, 71, 72, 73])))
    os.close(fd)

    # The device after all that: the real client opens the node again (a reset) and passes frames.
    from bridge.vhost_vdpa.client import VhostVdpaClient
    from vdpasim.testing.driver import GuestMemory
    from vdpasim.testing.net import BROADCAST, NetDriver, ethernet
    client = VhostVdpaClient("/dev/vhost-vdpa-0")
    memory = GuestMemory(8 << 20)
    driver = NetDriver(client, memory, queue_size=64)
    driver.initialize()
    frames = [ethernet(BROADCAST, bytes.fromhex("020000000099"), 0x88B5, bytes([i]) * 60) for i in range(4)]
    driver.post_rx(0, 8)
    driver.send(0, frames)
    ok = [r.frame for r in driver.receive(0, 4, timeout=120)] == frames
    client.reset()
    client.close()
    driver.close()
    memory.close()
    print(json.dumps({"calls": calls, "errnos": seen, "frames_ok": ok}), flush=True)
    """
)


class _Exceptions(logging.Handler):
    """Logged exceptions (a bug answering a call); a device going to NEEDS_RESET with an ERROR line is the
    intended answer to a bad ring, not one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.records.append(self.format(record))


@pytest.mark.parametrize("seed", [1, 2])
def test_malformed_ioctls_and_iotlb_writes_through_the_supervisor(seed: int) -> None:
    device = NetDevice(NetConfig(name=f"fuzz-sup{seed}", mac=bytes.fromhex("02000000aa02")))
    workdir = Path(tempfile.mkdtemp(prefix="vdpasim-fuzz-"))
    server = VhostUserServer(device, str(workdir / "net.sock"), name=device.name)
    server.start()
    node = VhostVdpaNode(device.name, server.path)
    errors = _Exceptions()
    logging.getLogger().addHandler(errors)
    supervisor = Supervisor(
        [sys.executable, "-c", PROGRAM, str(seed), "10000", "2500"],
        {"/dev/vhost-vdpa-0": node},
        stdout=-1,
        stderr=-1,
        cwd=str(ROOT),
    )
    try:
        out, err = supervisor.process.communicate(timeout=600)
        assert supervisor.process.returncode == 0, err.decode()[-3000:]
    finally:
        supervisor.close()
        logging.getLogger().removeHandler(errors)
        server.stop()
        device.close()
        workdir.rmdir()
    result = json.loads(out.decode().splitlines()[-1])
    errnos = {int(code): n for code, n in result["errnos"].items()}
    assert result["calls"] == 12_500 and result["frames_ok"] is True
    assert errno.ENOSYS not in errnos and errno.EIO not in errnos, errnos
    assert errnos.get(0, 0) > 500 and len(errnos) >= 6  # both answers and refusals, of several kinds
    assert errors.records == []  # no exception in the supervisor, the bridge or the device
    assert node.opens == 2 and all(s.closed for s in node.servers)
    fuzzed = node.servers[0].stats
    assert fuzzed.ioctls + fuzzed.writes >= 10_000
