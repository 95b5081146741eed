"""Malformed and mutated vhost-user messages into the codec, the session and a live server.

The invariant (h11's, from its fuzz/afl-server.py): whatever a front-end sends, nothing but PeerError
leaves the codec or ``BackendSession.handle``; the server answers, ignores or hangs up with a logged
reason, and keeps serving. Everything is driven by a seeded random generator, so a failure replays.

What the generator sends (``Generator``):

* well-formed requests of every id (the extension's too) with hostile values: ring indexes around the
  device's queue count and past the 8-bit fd field, ring sizes that are not powers of two or too
  big, statuses and features at random, ring addresses inside, across and outside every region;
* memory tables whose regions overlap, run past the end of their memfd (which, mapped, would SIGBUS
  the daemon at the first touch), start at offsets beyond it, sit at the top of the address space;
* the same bytes mutated (flipped, cut, extended; the header's size fixed up so framing holds), unknown
  ids, bad header flags, fd counts off by one either way, payload sizes over the limit, frames cut
  short before the peer hangs up;
* bring-up sequences in random order over guest memory filled with random bytes, so the device starts
  rings on garbage descriptors.

The live test runs a victim device and a bystander device on two servers in one process; the
bystander's driver passes traffic in a thread all along and must keep making progress.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from bridge.vhost_user import messages as m
from bridge.vhost_user.backend import BackendSession
from bridge.vhost_user.client import VhostUserClient
from bridge.vhost_user.codec import Codec, expected_fds
from bridge.vhost_user.messages import FrontendRequest as F
from bridge.vhost_user.messages import Message
from bridge.vhost_user.server import VhostUserServer
from vdpasim.config import BlkConfig, NetConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.net import NetDevice
from vdpasim.errors import CodecError, PeerError
from vdpasim.testing.driver import GuestMemory
from vdpasim.testing.net import NetDriver, ethernet

HEADER = struct.Struct("<III")
MEMFD_SIZES = (0x1000, 0x10000, 0x40000)
GUEST_BASE = 0x100000
USER_BASE = 0x7F0000000000


# ----- what the fuzzer sends -----
@dataclass
class Frame:
    kind: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    hang_up: bool = False  # send it, then close the connection (a frame cut short)


class Pools:
    """fds the frames carry, made once: memfds of known sizes (guest memory filled with random bytes,
    also mapped here so a bring-up can write rings) and eventfds. Sending passes copies."""

    def __init__(self, rng: random.Random) -> None:
        self.memfds: list[tuple[int, int]] = []
        self.maps: list[mmap.mmap] = []
        for size in MEMFD_SIZES:
            fd = os.memfd_create("vdpasim-fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            view = mmap.mmap(fd, size)
            view[:] = rng.randbytes(size)
            self.memfds.append((fd, size))
            self.maps.append(view)
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
        self.pipe = os.pipe()  # an fd that cannot be mapped at all

    def any_fd(self, rng: random.Random) -> int:
        return rng.choice([*self.eventfds, *(fd for fd, _ in self.memfds), self.pipe[0]])

    def close(self) -> None:
        for view in self.maps:
            view.close()
        for fd in [*self.eventfds, *(fd for fd, _ in self.memfds), *self.pipe]:
            os.close(fd)


class Generator:
    def __init__(self, rng: random.Random, pools: Pools, vq_count: int, device_features: int) -> None:
        self.rng = rng
        self.pools = pools
        self.vq_count = vq_count
        self.device_features = device_features

    # --- values ---
    def index(self) -> int:
        return self.rng.choice([0, 1, 2, self.vq_count - 1, self.vq_count, self.vq_count + 1, 255, 256, 0xFFFFFFFF])

    def u64(self) -> int:
        return self.rng.choice(
            [0, 1, 0xFF, 0x100, 0x1000, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1, self.rng.getrandbits(64)]
        )

    def u32(self) -> int:
        return self.rng.choice([0, 1, 3, 64, 256, 257, 1024, 0x8000, 0xFFFF, 0xFFFFFFFF, self.rng.getrandbits(32)])

    def address(self) -> int:
        """Somewhere in, across or outside the regions the generator hands out."""
        base = self.rng.choice([GUEST_BASE, USER_BASE, 0, 1 << 63, (1 << 64) - 0x1000])
        return (base + self.rng.choice([0, 0x10, 0xFF8, 0x1000, 0xFFF0, 0x40000, self.rng.getrandbits(20)])) & (
            (1 << 64) - 1
        )

    def region(self) -> tuple[m.MemoryRegion, int]:
        fd, size = self.rng.choice(self.pools.memfds)
        length = self.rng.choice([size, size, 0x1000, size + 0x1000, 2 * size, 0, self.u64()])
        offset = self.rng.choice([0, 0, 0x1000, size, size - 0x800, self.u64()])
        guest = self.rng.choice([GUEST_BASE, GUEST_BASE + 0x800, 0, (1 << 63) - 0x1000, (1 << 64) - 0x1000])
        user = self.rng.choice([USER_BASE, USER_BASE, guest, 0, (1 << 64) - 0x1000])
        return m.MemoryRegion(guest, length & ((1 << 64) - 1), user, offset & ((1 << 64) - 1)), fd

    def overlapping_table(self) -> tuple[m.MemoryTable, list[int]]:
        """Two regions that map fine alone but overlap in guest or in user addresses."""
        (fd_a, size_a), (fd_b, size_b) = self.rng.sample(self.pools.memfds, 2)
        a = m.MemoryRegion(GUEST_BASE, size_a, USER_BASE, 0)
        if self.rng.random() < 0.5:
            b = m.MemoryRegion(GUEST_BASE + size_a // 2, size_b, USER_BASE + (1 << 32), 0)
        else:
            b = m.MemoryRegion(GUEST_BASE + (1 << 32), size_b, USER_BASE + size_a - 0x1000, 0)
        return m.MemoryTable((a, b)), [fd_a, fd_b]

    def payload(self, kind: type[m.Payload]) -> tuple[m.Payload, list[int]]:
        rng = self.rng
        if kind is m.Empty:
            return m.Empty(), []
        if kind is m.U64:
            value = rng.choice([self.u64(), self.index() | rng.choice([0, m.VRING_NOFD_MASK])]) & ((1 << 64) - 1)
            return m.U64(value), []
        if kind is m.VringState:
            return m.VringState(self.index(), self.u32()), []
        if kind is m.VringAddr:
            return m.VringAddr(self.index(), rng.choice([0, 1, 2]), *(self.address() for _ in range(4))), []
        if kind is m.MemoryTable:
            if rng.random() < 0.3:
                return self.overlapping_table()
            picked = [self.region() for _ in range(rng.choice([0, 1, 1, 2, 3, 8]))]
            return m.MemoryTable(tuple(r for r, _ in picked)), [fd for _, fd in picked]
        if kind is m.SingleMemoryRegion:
            region, fd = self.region()
            return m.SingleMemoryRegion(region), [fd]
        if kind is m.LogArea:
            return m.LogArea(self.u64(), self.u64()), []
        if kind is m.IotlbMsg:
            return m.IotlbMsg(self.address(), self.u64(), self.address(), rng.getrandbits(8), rng.getrandbits(8)), []
        if kind is m.ConfigSpace:
            data = rng.randbytes(rng.choice([0, 1, 6, 8, 60, 256]))
            return m.ConfigSpace(rng.choice([0, 2, 8, 11, 95, 0xFFFFFFF0]), len(data), rng.choice([0, 1]), data), []
        if kind is m.InflightInfo:
            return m.InflightInfo(self.u64(), self.u64(), rng.getrandbits(16), rng.getrandbits(16)), []
        if kind is m.DeviceStateTransfer:
            return m.DeviceStateTransfer(rng.choice([0, 1, 2]), rng.choice([0, 1])), []
        if kind is m.SharedObject:
            return m.SharedObject(rng.randbytes(16)), []
        return m.Raw(rng.randbytes(rng.choice([0, 8, 40]))), []

    # --- frames ---
    def request(self) -> Message:
        """A well-formed request of any id with hostile values, and the fds its form asks for."""
        request = self.rng.choice(list(F))
        payload, fds = self.payload(m.payload_types(request)[0])
        message = Message(request, payload, need_reply=self.rng.random() < 0.5)
        wanted = expected_fds(message)
        count = self.rng.choice([0, 1]) if wanted is None else wanted
        fds = fds[:count] + [self.pools.any_fd(self.rng) for _ in range(count - len(fds[:count]))]
        return Message(request, payload, tuple(fds), need_reply=message.need_reply)

    def frame(self) -> Frame:
        rng = self.rng
        roll = rng.random()
        if roll < 0.50:
            message = self.request()
            data, fds = Codec.encode(message)
            return Frame("request", data, list(fds))
        if roll < 0.72:
            data, fds = Codec.encode(self.request())
            payload = bytearray(data[HEADER.size :])
            how = rng.choice(["flip", "cut", "extend"])
            if how == "flip" and payload:
                for _ in range(rng.randint(1, 4)):
                    payload[rng.randrange(len(payload))] ^= rng.randint(1, 0xFF)
            elif how == "cut":
                del payload[rng.randint(0, len(payload)) :]
            else:
                payload += rng.randbytes(rng.randint(1, 48))
            code, flags, _ = HEADER.unpack_from(data)
            return Frame(f"mutated-{how}", HEADER.pack(code, flags, len(payload)) + payload, list(fds))
        if roll < 0.80:
            data, fds = Codec.encode(self.request())
            fds = list(fds)
            if fds and rng.random() < 0.5:
                fds.pop()
            else:
                fds.append(self.pools.any_fd(rng))
            return Frame("fd-count", data, fds)
        if roll < 0.86:
            code = rng.choice([0, 45, 1000, 0x7D00, 0x7D11, 0x7FFF, rng.getrandbits(32)])
            return Frame("unknown-id", HEADER.pack(code, 1, 8) + rng.randbytes(8))
        if roll < 0.92:
            data, fds = Codec.encode(self.request())
            code, _, size = HEADER.unpack_from(data)
            flags = rng.choice([0, 2, 3, 0x10, 0x101, rng.getrandbits(32)])
            return Frame("bad-flags", HEADER.pack(code, flags, size) + data[HEADER.size :], list(fds))
        if roll < 0.96:
            size = rng.choice([m.MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
            return Frame("oversized", HEADER.pack(rng.choice(list(F)), 1, size) + rng.randbytes(16))
        data, fds = Codec.encode(self.request())
        cut = rng.randint(1, max(1, len(data) - 1))
        return Frame("cut-short", data[:cut], list(fds), hang_up=True)

    def bring_up_frames(self) -> list[Frame]:
        frames = []
        for message in self.bring_up():
            data, fds = Codec.encode(message)
            frames.append(Frame("bring-up", data, list(fds)))
        return frames

    def features(self) -> int:
        """Mostly what the device offers (so FEATURES_OK sticks), sometimes a random part of it."""
        offered = self.device_features
        if self.rng.random() < 0.7:
            return offered & ~(1 << 34) | 1 << 30  # split rings; PROTOCOL_FEATURES kept
        return offered & self.rng.getrandbits(64) | 1 << 32 | 1 << 30

    def garbage_ring(self, view: mmap.mmap, desc_offset: int, num: int) -> None:
        """A split ring in the front-end's memory: random chains (addresses in and out of guest memory,
        NEXT/WRITE/INDIRECT at random), heads in and out of range, an available index a little ahead."""
        rng = self.rng
        size = len(view)
        if not 0 <= desc_offset <= size - 0x3000:
            return  # the ring is not in this memory at all: the device refuses to start it
        for i in range(num):
            addr = rng.choice([GUEST_BASE + rng.randrange(size), GUEST_BASE + size - 8, 0, rng.getrandbits(64)])
            length = rng.choice([0, 1, 14, 64, 1514, 0x10000, rng.getrandbits(32)])
            flags = rng.choice([0, 1, 2, 3, 4, 5, 6, rng.getrandbits(16)])
            struct.pack_into("<QIHH", view, desc_offset + 16 * i, addr, length, flags, rng.randrange(num + 2))
        avail = desc_offset + 0x1000
        count = rng.choice([1, 2, 4, num, num + 1])
        struct.pack_into("<HH", view, avail, 0, count & 0xFFFF)
        for i in range(min(count, num)):
            struct.pack_into("<H", view, avail + 4 + 2 * i, rng.choice([i, rng.randrange(num + 1)]))
        struct.pack_into("<HH", view, desc_offset + 0x2000, 0, 0)  # used ring: flags, idx

    def bring_up(self) -> list[Message]:
        """A plausible bring-up over memory holding garbage rings, its steps shuffled a little."""
        fd, size = self.pools.memfds[-1]
        view = self.pools.maps[-1]
        table = m.MemoryTable((m.MemoryRegion(GUEST_BASE, size, USER_BASE, 0),))
        steps = [
            Message(F.SET_FEATURES, m.U64(self.features())),
            Message(F.SET_MEM_TABLE, table, (fd,)),
        ]
        for idx in range(self.vq_count):
            offset = self.rng.choice([0, 0x4000, 0x8000, 0x20000, size - 0x100, size + 0x1000])
            num = self.rng.choice([8, 64, 256, 3])
            self.garbage_ring(view, offset, num if num != 3 else 4)
            desc = USER_BASE + offset
            steps += [
                Message(F.SET_VRING_NUM, m.VringState(idx, num)),
                Message(F.SET_VRING_ADDR, m.VringAddr(idx, 0, desc, desc + 0x2000, desc + 0x1000, 0)),
                Message(F.SET_VRING_BASE, m.VringState(idx, self.rng.getrandbits(16))),
                Message(F.SET_VRING_CALL, m.U64(idx), (self.pools.eventfds[1],)),
                Message(F.SET_VRING_KICK, m.U64(idx), (self.pools.eventfds[0],)),
                Message(F.SET_VRING_ENABLE, m.VringState(idx, 1)),
            ]
        if self.rng.random() < 0.3:
            self.rng.shuffle(steps)
        steps.append(Message(F.SET_STATUS, m.U64(0x0F)))
        return steps


# ----- the session, without sockets: the exception invariant itself -----
def _sessions() -> Iterator[tuple[str, Callable[[], object]]]:
    yield "net", lambda: NetDevice(NetConfig(name="fuzz-net"))
    yield "blk", lambda: BlkDevice(BlkConfig(name="fuzz-blk", capacity=2048))


@pytest.mark.parametrize(("kind", "make_device"), list(_sessions()), ids=["net", "blk"])
def test_only_peer_errors_leave_the_codec_and_the_session(kind: str, make_device) -> None:
    rng = random.Random(f"session-{kind}")
    pools = Pools(rng)
    device = make_device()

    def new_session() -> BackendSession:
        fresh = BackendSession(device, name=f"fuzz-{kind}")
        # Everything offered, the extension too, so every handler is reachable.
        fresh.handle(Message(F.SET_PROTOCOL_FEATURES, m.U64(fresh.offered_protocol_features)))
        return fresh

    session = new_session()
    generator = Generator(rng, pools, device.get_vq_count(), device.get_device_features())
    handled = refused = 0
    try:
        codec = Codec()
        for round_ in range(20_000):
            frames = generator.bring_up_frames() if round_ % 50 == 0 else [generator.frame()]
            for frame in frames:
                if frame.hang_up:
                    codec.close()
                    codec = Codec()  # a new connection
                    session.close()
                    session = new_session()
                    continue
                codec.receive_data(frame.data, [os.dup(fd) for fd in frame.fds])
                try:
                    message = codec.next_message()
                except CodecError:
                    refused += 1
                    if codec.closed:
                        codec = Codec()
                    continue
                assert message is not None and codec.pending_fds() == 0
                try:
                    reply = session.handle(message)
                except PeerError:
                    refused += 1
                    continue
                handled += 1
                if reply is not None:
                    Codec.encode(reply)  # every reply the session makes is well-formed
                    for fd in reply.fds:
                        os.close(fd)
        assert handled > 1000 and refused > 1000, (handled, refused)
    finally:
        session.close()
        device.close()  # type: ignore[attr-defined]
        pools.close()


# ----- the live server -----
class Connection:
    """A raw front-end: sends frames as they are and tells whether the server answered or hung up."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.sock.settimeout(30)  # a hang is a failure, not a slow test
        self.codec = Codec()
        # Everything the server offers, so every handler is reachable.
        self.send(Codec.encode(Message(F.GET_PROTOCOL_FEATURES))[0], [])
        offer = self.receive(F.GET_PROTOCOL_FEATURES)
        assert offer is not None and isinstance(offer.payload, m.U64)
        for message in (Message(F.SET_PROTOCOL_FEATURES, offer.payload), Message(F.SET_OWNER)):
            self.send(Codec.encode(message)[0], [])

    def send(self, data: bytes, fds: list[int]) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def sync(self) -> bool:
        """Send GET_FEATURES and read until its reply: True if the server is still talking to us."""
        if not self.send(Codec.encode(Message(F.GET_FEATURES))[0], []):
            return False
        return self.receive(F.GET_FEATURES) is not None

    def receive(self, request: F) -> Message | None:
        """Read replies until the one to ``request`` (None: the server hung up)."""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
            except ConnectionResetError:
                return None
            for level, kind_, payload in anc:
                if level == socket.SOL_SOCKET and kind_ == socket.SCM_RIGHTS:
                    for fd in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]):
                        os.close(fd)  # fds of replies (inflight buffers): not ours to keep
            if not data:
                return None
            self.codec.receive_data(data)
            while (reply := self.codec.next_message()) is not None:  # a malformed reply fails the test
                assert reply.reply
                if reply.request is request:
                    return reply

    def close(self) -> None:
        self.sock.close()


class Bystander:
    """Another device on another server in the same process, passing traffic on a thread all along."""

    def __init__(self, workdir: str) -> None:
        self.device = NetDevice(NetConfig(name="bystander"))
        self.server = VhostUserServer(self.device, os.path.join(workdir, "bystander.sock"))
        self.server.start()
        self.memory = GuestMemory(2 << 20)
        self.client = VhostUserClient(self.server.path, name="bystander")
        self.driver = NetDriver(self.client, self.memory)
        self.driver.initialize()
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        mac = self.device.config.mac
        try:
            while not self._stop.is_set():
                sent = [
                    ethernet(mac, b"\x02\0\0\0\0\x09", 0x88B5, bytes([self.rounds & 0xFF, i]) * 32) for i in range(8)
                ]
                self.driver.post_rx(0, len(sent))
                self.driver.send(0, sent)
                got = [r.frame for r in self.driver.receive(0, len(sent), timeout=30)]
                self.driver.wait_used(self.driver.tx(0), len(sent), timeout=30)
                assert got == sent, "the bystander's frames came back changed"
                self.rounds += 1
        except BaseException as exc:
            self.error = exc

    def wait_for_progress(self, since: int) -> None:
        deadline = time.monotonic() + 60
        while self.rounds <= since and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.error is None, f"the bystander failed: {self.error!r}"
        assert self.rounds > since, "the bystander made no progress"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()
        self.driver.close()
        self.server.stop()
        self.device.close()
        self.memory.close()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_live_server_survives_ten_thousand_malformed_messages(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vdpasim")
    rng = random.Random("live-server")
    workdir = tempfile.mkdtemp(prefix="vdpasim-fuzz-")
    fds_before = _open_fds()
    pools = Pools(rng)
    victim = NetDevice(NetConfig(name="victim"))
    server = VhostUserServer(victim, os.path.join(workdir, "victim.sock"))
    server.start()
    bystander = Bystander(workdir)
    generator = Generator(rng, pools, victim.get_vq_count(), victim.get_device_features())
    sent = closes = answered = 0
    kinds: dict[str, int] = {}
    connection = Connection(server.path)
    try:
        checkpoint = bystander.rounds
        while sent < 10_000:
            frames = generator.bring_up_frames() if sent % 97 == 0 else [generator.frame()]
            for frame in frames:
                sent += 1
                kinds[frame.kind] = kinds.get(frame.kind, 0) + 1
                alive = connection.send(frame.data, frame.fds)
                if frame.kind == "bring-up":
                    os.eventfd_write(pools.eventfds[0], 1)  # the kick fd of every ring it starts
                if frame.hang_up:
                    alive = False
                elif alive:
                    alive = connection.sync()
                if alive:
                    answered += 1
                    continue
                closes += 1
                connection.close()
                connection = Connection(server.path)  # reconnecting always works
            if sent // 2000 != (sent - len(frames)) // 2000:
                bystander.wait_for_progress(checkpoint)
                checkpoint = bystander.rounds
        assert connection.sync()
        connection.close()

        # The server lives on; a proper front-end brings the victim up and passes traffic.
        assert server._thread is not None and server._thread.is_alive()
        with GuestMemory(2 << 20) as memory, VhostUserClient(server.path, name="after") as client:
            driver = NetDriver(client, memory)
            try:
                driver.initialize()
                frames_ = [ethernet(victim.config.mac, b"\x02\0\0\0\0\x07", 0x88B5, bytes([i]) * 50) for i in range(16)]
                driver.post_rx(0, 16)
                driver.send(0, frames_)
                assert [r.frame for r in driver.receive(0, 16)] == frames_
            finally:
                client.close()
                driver.close()
        bystander.wait_for_progress(checkpoint)
    finally:
        connection.close()
        bystander.close()
        server.stop()
        victim.close()
        pools.close()
        os.rmdir(workdir)

    records = [r for r in caplog.records if r.name.startswith("vdpasim.vhost_user.server.victim")]
    assert not [r for r in records if "internal error" in r.getMessage()], "a non-PeerError escaped the session"
    hang_ups = [
        r for r in records if "closing the connection" in r.getMessage() or "connection ended" in r.getMessage()
    ]
    # Every connection the server dropped has its logged reason (the cut-short ones end on our side).
    assert len(hang_ups) >= closes - kinds.get("cut-short", 0)
    assert closes > 100 and answered > 5000, (closes, answered, kinds)
    # Every kind of trouble the generator aims at was met, and refused for the right reason.
    said = " ".join(r.getMessage() for r in caplog.records if "victim" in r.name)
    for reason in (
        "ends past its file",  # a region beyond the end of its memfd (would SIGBUS once touched)
        "overlap",  # regions overlapping in guest or user addresses
        "no ring",  # ring indexes the device does not have
        "stray bits",  # kick/call payloads with bits beyond index and "no fd"
        "outside guest memory",  # rings and buffers outside every region: the device needs a reset
        "unknown FrontendRequest",
        "bad header flags",
        "fds, expected",  # fd counts off by one
        "exceeds",  # payload sizes over the limit
        "closed inside a message",  # frames cut short
    ):
        assert reason in said, f"the fuzzer never provoked {reason!r}"
    assert victim.datapath.error is None
    assert _open_fds() == fds_before, "fds leaked"
    print(f"live fuzz: {sent} messages, {answered} answered or ignored, {closes} connections dropped; {kinds}")
