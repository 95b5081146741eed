"""Malformed ioctls and IOTLB writes at the vhost-vdpa char-device server, from a seeded generator.

The invariant: whatever a trapped program asks of its /dev/vhost-vdpa-N fd, the server answers with a
result or a PeerError carrying an errno -- nothing else leaves it -- and after a reset the device still
passes traffic. No fd taken from the caller and no memory mapping outlives the open.

What the generator sends (``Generator``), about 12,000 requests a run:

* every request abi.py names, with hostile values: ring indexes around the queue count and at 2**32-1,
  ring sizes that are not powers of two, bases over 16 bits, misaligned or flagged ring addresses,
  statuses and features at random (DRIVER_OK on garbage rings included), config offsets and lengths
  around the config size, fds that are eventfds, not eventfds, unbinding, closed or negative, backend
  feature words at random;
* arguments that point nowhere (0, unmapped, straddling the end of the caller's memory);
* request numbers at random, with and without the vhost type byte;
* IOTLB writes: both framings and unknown ones, short and long writes, every message type and unknown
  ones, asids, UPDATEs inside, overlapping, adjacent to, wrapping around and outside the IOVA range,
  backed and not backed by a shared file, permissions at random, INVALIDATEs of random ranges, batches
  opened and never closed, closed twice, interleaved with everything else.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import time

import pytest

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.server import VHOST_GET_VRING_BUSYLOOP_TIMEOUT, VHOST_SET_VRING_BUSYLOOP_TIMEOUT
from vdpasim.errors import PeerError
from vdpasim.testing.vhost_vdpa import GUEST_RAM, RAM_SIZE, FakeCaller, VdpaEnv

REQUESTS = sorted(
    {value for name, value in vars(a).items() if isinstance(value, int) and value >> 8 & 0xFF == 0xAF}
    | {VHOST_SET_VRING_BUSYLOOP_TIMEOUT, VHOST_GET_VRING_BUSYLOOP_TIMEOUT}
)
OPERATIONS = 12_000
U64 = (1 << 64) - 1


class FuzzCaller(FakeCaller):
    """A FakeCaller whose fd table leaves out the fds open before it (pytest's, the device's)."""

    def __init__(self) -> None:
        super().__init__(1 << 16)
        self.forbidden = open_fds()

    def take_fd(self, number: int) -> int:
        if number in self.forbidden:
            raise PeerError(f"no fd {number}", errno=errno.EBADF)
        return super().take_fd(number)


class Generator:
    def __init__(self, rng: random.Random, env: VdpaEnv, caller: FuzzCaller) -> None:
        self.rng = rng
        self.env = env
        self.caller = caller
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
        self.null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.outcomes: dict[str, int] = {}

    def close(self) -> None:
        for fd in (*self.eventfds, self.null):
            os.close(fd)

    # ----- values -----
    def index(self) -> int:
        return self.rng.choice([0, 1, 2, 2, 3, 4, 255, 0xFFFF, 0x10000, 0xFFFFFFFF])

    def u32(self) -> int:
        return self.rng.choice([0, 1, 2, 3, 64, 100, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0xFFFFFFFF])

    def fd(self) -> int:
        return self.rng.choice([*self.eventfds, self.null, -1, -1, -2, 0x7FFFFFFF, 12345])

    def u64(self) -> int:
        return self.rng.choice([0, U64, 1 << 63, self.rng.getrandbits(64), self.rng.getrandbits(40)])

    def iova(self) -> int:
        return self.rng.choice(
            [
                GUEST_RAM,
                GUEST_RAM + self.rng.randrange(0, RAM_SIZE, 0x1000),
                0,
                (1 << 63) - 0x1000,
                1 << 63,
                U64 - 0xFFF,
                self.rng.getrandbits(64),
            ]
        )

    def size(self) -> int:
        return self.rng.choice([0, 1, 0x1000, 0x10000, RAM_SIZE, 0x1000 * self.rng.randrange(1, 64), U64, 1 << 63])

    def uaddr(self) -> int:
        host = self.env.host
        return self.rng.choice([host, host + self.rng.randrange(0, RAM_SIZE, 0x1000), 0, 0x5000, U64, host - 0x1000])

    def bad_pointer(self) -> int:
        end = self.caller.base + len(self.caller.memory)
        return self.rng.choice([0, 0x10, end - 2, end, U64, 1 << 47])

    # ----- requests -----
    def payload(self, request: int) -> bytes:
        r = self.rng
        if request in (a.VHOST_SET_VRING_KICK, a.VHOST_SET_VRING_CALL, a.VHOST_SET_VRING_ERR):
            return struct.pack("<Ii", self.index(), self.fd())
        if request == a.VHOST_VDPA_SET_CONFIG_CALL:
            return struct.pack("<i", self.fd())
        if request == a.VHOST_SET_VRING_ADDR:
            values = [r.choice([0x101000, 0x102000, r.getrandbits(64), 1, 2, 3]) for _ in range(4)]
            return struct.pack("<IIQQQQ", self.index(), r.choice([0, 1, 2, 0xFFFFFFFF]), *values)
        if request in (a.VHOST_VDPA_GET_CONFIG, a.VHOST_VDPA_SET_CONFIG):
            offset, length = r.choice([0, 1, 6, 8, 11, 12, 13, 0xFFFFFFFF]), r.choice([0, 1, 2, 6, 12, 13, 64])
            return struct.pack("<II", offset, length) + r.randbytes(r.choice([0, length, 64]))
        if request == a.VHOST_VDPA_SET_STATUS:
            return bytes([r.choice([0, 1, 3, 11, 15, 0x40, 0x80, r.getrandbits(8)])])
        if request in (a.VHOST_SET_FEATURES, a.VHOST_SET_BACKEND_FEATURES, a.VHOST_SET_LOG_BASE):
            return struct.pack("<Q", self.u64() if r.random() < 0.5 else r.getrandbits(9))
        if request == a.VHOST_SET_MEM_TABLE:
            count = r.choice([0, 1, 2, 65, 0xFFFFFFFF])
            regions = b"".join(
                struct.pack("<QQQQ", self.iova(), self.size(), self.uaddr(), 0) for _ in range(min(count, 3))
            )
            return struct.pack("<II", count, r.choice([0, 0, 1])) + regions
        if request >> 30 or r.random() < 0.3:  # vring_state-shaped, or anything
            return struct.pack("<II", self.index(), self.u32()) + r.randbytes(r.choice([0, 8, 32]))
        return b""

    def ioctl(self) -> None:
        r = self.rng
        roll = r.random()
        if roll < 0.8:
            request = r.choice(REQUESTS)
        elif roll < 0.9:
            request = 0xAF << 8 | r.getrandbits(8) | r.getrandbits(2) << 30 | r.choice([0, 4, 8, 16, 40]) << 16
        else:
            request = r.getrandbits(32)
        if r.random() < 0.1:
            arg = self.bad_pointer()
        else:
            data = self.payload(request)
            arg = self.caller.poke(data + bytes(48)) if data or r.random() < 0.5 else 0
        self.record(lambda: self.env.server.ioctl(request, arg, self.caller))

    def iotlb_message(self) -> bytes:
        r = self.rng
        framing = r.choice([1, 2, 2, 2, 0, 3, -1])
        kind = r.choice([2, 2, 2, 3, 3, 5, 6, 1, 4, 0, 7, 255])
        head = struct.pack("<iI", framing, r.choice([0, 0, 0, 1, 2, 0xFFFFFFFF]))
        perm = r.choice([1, 2, 3, 3, 3, 0, 4, 0xFF])
        body = a.VHOST_IOTLB_MSG.pack(self.iova(), self.size(), self.uaddr(), perm, kind)
        data = head + body + bytes(32)
        cut = r.random()
        if cut < 0.05:
            return data[: r.randrange(0, 40)]
        if cut < 0.1:
            return data + r.randbytes(r.randrange(0, 64))
        return data

    def write(self) -> None:
        r = self.rng
        if r.random() < 0.05:
            addr, length = self.bad_pointer(), r.choice([0, 40, 72, 1 << 20])
        else:
            data = self.iotlb_message()
            addr, length = self.caller.poke(data), len(data)
        self.record(lambda: self.env.server.write(addr, length, self.caller))

    def record(self, call) -> None:
        try:
            result = call()
        except PeerError as exc:
            assert isinstance(exc.errno, int) and exc.errno > 0, exc
            name = errno.errorcode.get(exc.errno, str(exc.errno))
        else:
            assert isinstance(result, int) and result >= 0
            name = "ok"
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.6:
            self.ioctl()
        elif roll < 0.97:
            self.write()
        else:  # sequences a VMM makes, in the middle of the noise
            self.record(lambda: self.env.vmm.call(a.VHOST_SET_OWNER))
            self.record(lambda: self.env.vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN))


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_malformed_requests_get_errnos_and_the_device_survives(seed: int) -> None:
    before = open_fds()
    env = VdpaEnv()
    caller = FuzzCaller()
    env.caller = caller
    env.vmm.caller = caller
    caller.add_file_mapping(env.host, RAM_SIZE, env.memory.region.fd)
    generator = Generator(random.Random(seed), env, caller)
    start = time.monotonic()
    try:
        env.check_usable()  # compile the data path before the clock matters
        for i in range(OPERATIONS):
            generator.step()
            if i % 4000 == 3999:
                env.check_usable()
        env.check_usable()
        server = env.server
        assert server.stats.ioctls + server.stats.writes >= 10_000
        # The generator reached the interesting answers, not just one errno.
        for number in (errno.EINVAL, errno.EFAULT, errno.ENOBUFS, errno.ENOTTY, errno.EBADF, errno.EOPNOTSUPP):
            assert generator.outcomes.get(errno.errorcode[number], 0) > 10, generator.outcomes
        assert generator.outcomes["ok"] > 1000
        assert server.stats.updates > 100 and server.stats.commits > 10
    finally:
        generator.close()
        env.close()
    assert open_fds() <= before  # every taken fd and region fd closed
    assert time.monotonic() - start < 60
