"""The vhost-user features that reach into the data path, against the real back-end.

A raw front-end (the codec over a real UNIX socket, requests built here as QEMU builds them) drives a
``VhostUserServer`` with a real device; the guest side is the driver kit's rings in a memfd whose fd
goes over the socket with SET_MEM_TABLE, ring addresses in the front-end's "user" address space. The
session rules that need no socket are checked on a ``BackendSession`` directly (sans-IO: back-end
requests land in its outbox).

Covered: what is offered (VHOST_F_LOG_ALL, LOG_SHMFD, INFLIGHT_SHMFD for blk only, GET_QUEUE_NUM),
started-but-disabled rings (net drops TX and writes no RX buffer, blk leaves requests queued), rings
enabled at once without PROTOCOL_FEATURES, dirty logging through SET_LOG_BASE / SET_FEATURES(LOG_ALL) /
SET_VRING_ADDR(VHOST_VRING_F_LOG), GET/SET_INFLIGHT_FD across a back-end restart, back-end config-change
messages (acked, unacked, deferred while suspended) and the suspended state.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bridge.vhost_user.backend import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG, BackendSession, protocol_features_for
from bridge.vhost_user.messages import (
    U64,
    Empty,
    InflightInfo,
    LogArea,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    VringAddr,
    VringState,
)
from bridge.vhost_user.messages import BackendRequest as B
from bridge.vhost_user.messages import FrontendRequest as F
from bridge.vhost_user.server import BackendChannel, VhostUserServer
from bridge.vhost_user.transport import MessageStream
from vdpasim.config import BlkConfig, NetConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.inflight import queue_region_size, split_region
from vdpasim.devices.net import NetDevice
from vdpasim.errors import SessionError
from vdpasim.jit.log import VHOST_LOG_PAGE
from vdpasim.rings.state import PackedState
from vdpasim.testing.driver import DriverQueue, GuestMemory, UsedBuffer
from vdpasim.testing.net import VNET_HDR, ethernet
from vdpasim.virtio import constants as c

P = ProtocolFeature
GPA = 0x100000
USER = 0x7F0000000000  # where the front-end has guest memory mapped: ring addresses are given in it
MEMORY = 4 << 20
QSIZE = 32
PROTOCOL_FEATURES = 1 << c.VHOST_USER_F_PROTOCOL_FEATURES
LOG_BYTES = (GPA + MEMORY) // VHOST_LOG_PAGE // 8


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.01)
    return result


class Frontend:
    """The front-end of one connection, as raw as QEMU: each request built here, each reply read back."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        sock.settimeout(20)
        self.stream = MessageStream(sock)
        self.fds: list[int] = []  # eventfds this side made, closed at the end

    def send(self, request: F, payload=None, fds: tuple[int, ...] = (), *, need_reply: bool = False) -> None:
        self.stream.send(Message(request, Empty() if payload is None else payload, fds, need_reply=need_reply))

    def call(self, request: F, payload=None, fds: tuple[int, ...] = (), *, need_reply: bool = False) -> Message:
        self.send(request, payload, fds, need_reply=need_reply)
        reply = self.stream.receive()
        assert reply is not None and reply.reply and reply.request == request, reply
        return reply

    def ack(self, request: F, payload=None, fds: tuple[int, ...] = ()) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated) and return the ack: also a sync point."""
        reply = self.call(request, payload, fds, need_reply=True)
        assert isinstance(reply.payload, U64)
        return reply.payload.value

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        self.stream.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class Rig:
    """A server with one device on a socket in ``tmp_path``, guest memory, and the front-end's rings."""

    def __init__(self, device, tmp_path: Path, *, packed: bool = False) -> None:
        self.device = device
        self.server = VhostUserServer(device, str(tmp_path / "dev.sock"))
        self.server.start()
        self.memory = GuestMemory(MEMORY, GPA, user_addr=USER)
        self.packed = packed
        self.queues: dict[int, DriverQueue] = {}
        self.kicks: dict[int, int] = {}
        self.front = Frontend(self.server.path)
        self.negotiated = 0

    def handshake(self, protocol: int | None = None, *, features: int | None = None) -> int:
        """GET_FEATURES ... SET_FEATURES and SET_MEM_TABLE; returns the protocol features negotiated."""
        front = self.front
        offered = front.call(F.GET_FEATURES).payload.value
        assert offered >> c.VHOST_USER_F_PROTOCOL_FEATURES & 1
        offered_protocol = front.call(F.GET_PROTOCOL_FEATURES).payload.value
        # What QEMU 7.2 would take: everything offered but the vDPA extension it does not know.
        chosen = offered_protocol & ~(1 << P.VDPA) if protocol is None else protocol
        self.negotiated = chosen
        front.send(F.SET_PROTOCOL_FEATURES, U64(chosen))
        front.send(F.SET_OWNER)
        if features is None:
            device = self.device.get_device_features()
            layout = 1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX | 1 << c.VIRTIO_F_IN_ORDER
            features = device & ~layout | self.packed << c.VIRTIO_F_RING_PACKED | PROTOCOL_FEATURES
        front.send(F.SET_FEATURES, U64(features))
        region = MemoryRegion(GPA, MEMORY, USER, 0)
        front.send(F.SET_MEM_TABLE, MemoryTable((region,)), (self.memory.region.fd,))
        front.call(F.GET_FEATURES)  # a round trip: everything above is applied
        return chosen

    def user(self, gpa: int) -> int:
        return gpa - GPA + USER

    def start_ring(self, index: int, *, log: int | None = None, base: int | None = None) -> DriverQueue:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK: the ring is started (and still disabled with PROTOCOL_FEATURES)."""
        front = self.front
        dq = self.queues.get(index) or DriverQueue(self.memory, QSIZE, packed=self.packed)
        self.queues[index] = dq
        front.send(F.SET_VRING_NUM, VringState(index, QSIZE))
        if base is None:
            base = 1 << 15 | 1 << 31 if self.packed else 0
        front.send(F.SET_VRING_BASE, VringState(index, base))
        self.set_addr(index, log=log)
        front.send(F.SET_VRING_CALL, U64(index), (front.eventfd(),))
        self.kicks[index] = front.eventfd()
        front.send(F.SET_VRING_KICK, U64(index), (self.kicks[index],))
        if self.negotiated >> P.STATUS & 1:
            front.send(F.SET_STATUS, U64(0xF))  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        front.call(F.GET_FEATURES)
        return dq

    def set_addr(self, index: int, *, log: int | None = None) -> None:
        dq = self.queues[index]
        flags = 0 if log is None else 1 << VHOST_VRING_F_LOG
        addr = VringAddr(
            index, flags, self.user(dq.desc_addr), self.user(dq.device_addr), self.user(dq.driver_addr), log or 0
        )
        self.front.send(F.SET_VRING_ADDR, addr)

    def enable(self, index: int, on: bool = True) -> None:
        self.front.send(F.SET_VRING_ENABLE, VringState(index, int(on)))
        self.front.call(F.GET_FEATURES)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def used(self, index: int, count: int) -> list[UsedBuffer]:
        got: list[UsedBuffer] = []
        dq = self.queues[index]

        def enough() -> bool:
            got.extend(dq.used())
            if len(got) < count:
                self.kick(index)
            return len(got) >= count

        wait_for(enough, what=f"{count} used buffers on ring {index}")
        return got

    def close(self) -> None:
        self.front.close()
        self.server.stop()
        self.device.close()
        self.memory.close()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(NetDevice(NetConfig("vu-net", max_vqp=2)), tmp_path)
    yield rig
    rig.close()


@pytest.fixture
def blk(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(BlkDevice(BlkConfig("vu-blk", capacity=256, num_queues=2)), tmp_path)
    yield rig
    rig.close()


def frame_to(device: NetDevice, payload: bytes = bytes(100)) -> bytes:
    return ethernet(device.mac, b"\x02\0\0\0\0\x01", 0x88B5, payload)


# ----- what is offered -----


def test_offers_logging_everywhere_and_inflight_tracking_for_blk() -> None:
    net = NetDevice(NetConfig("offer-net", max_vqp=3))
    blk = BlkDevice(BlkConfig("offer-blk", capacity=8, num_queues=4))
    try:
        for device in (net, blk):
            session = BackendSession(device)
            features = session.handle(Message(F.GET_FEATURES)).payload.value
            assert features >> VHOST_F_LOG_ALL & 1 and features >> c.VHOST_USER_F_PROTOCOL_FEATURES & 1
            offered = session.handle(Message(F.GET_PROTOCOL_FEATURES)).payload.value
            assert offered == protocol_features_for(device)
            assert offered >> P.LOG_SHMFD & 1 and offered >> P.BACKEND_REQ & 1 and offered >> P.MQ & 1
            assert bool(offered >> P.INFLIGHT_SHMFD & 1) == (device is blk)
            assert bool(offered >> P.CONFIG & 1) == (device is blk)
            session.handle(Message(F.SET_PROTOCOL_FEATURES, U64(offered)))
            # GET_QUEUE_NUM: queue pairs for net (QEMU compares it with -netdev queues=N), queues for blk.
            assert session.handle(Message(F.GET_QUEUE_NUM)).payload.value == (3 if device is net else 4)
            session.close()
        single = NetDevice(NetConfig("offer-one", max_vqp=1))
        try:
            assert BackendSession(single).queue_num == 1
        finally:
            single.close()
    finally:
        net.close()
        blk.close()


# ----- SET_VRING_ENABLE -----


def test_net_started_but_disabled_rings_drop_tx_and_deliver_no_rx(net: Rig) -> None:
    net.handshake()
    rx, tx = net.start_ring(0), net.start_ring(1)
    device = net.device
    rx.add([], [2048])
    before = bytes(net.memory.read(rx.device_addr, 4 + 8 * QSIZE))
    # Both started, both disabled (PROTOCOL_FEATURES negotiated): TX is consumed and dropped.
    tx.add([VNET_HDR + frame_to(device)], [])
    net.kick(1)
    assert [u.len for u in net.used(1, 1)] == [0]
    assert device.vstats(1)["tx drops"] == 1 and device.vstats(1)["tx packets"] == 0
    # TX enabled, RX still disabled: sent, but nothing delivered (and the RX ring untouched).
    net.enable(1)
    tx.add([VNET_HDR + frame_to(device)], [])
    net.kick(1)
    net.used(1, 1)
    assert device.vstats(1)["tx packets"] == 1 and device.vstats(0)["rx drops"] == 1
    assert net.memory.read(rx.device_addr, 4 + 8 * QSIZE) == before
    assert rx.used() == []
    # Both enabled: delivered.
    net.enable(0)
    frame = frame_to(device, b"hello" * 20)
    tx.add([VNET_HDR + frame], [])
    net.kick(1)
    (got,) = net.used(0, 1)
    assert got.data[c.VIRTIO_NET_HDR_LEN :] == frame
    assert device.vstats(0)["rx packets"] == 1
    net.used(1, 1)
    # Disabled again: the next frame is dropped.
    net.enable(1, False)
    tx.add([VNET_HDR + frame], [])
    net.kick(1)
    net.used(1, 1)
    assert device.vstats(1)["tx drops"] == 2 and device.vstats(0)["rx packets"] == 1


def test_packed_base_with_only_the_avail_half_starts_the_used_side_there_too(tmp_path: Path) -> None:
    """DPDK's virtio_user sends SET_VRING_BASE 0x8000 for a new packed ring (no used half): the used wrap
    counter must start at 1 too, or the driver never sees a used descriptor."""
    rig = Rig(NetDevice(NetConfig("vu-packed-base")), tmp_path, packed=True)
    try:
        rig.handshake()
        rx, tx = rig.start_ring(0, base=1 << 15), rig.start_ring(1, base=1 << 15)
        rig.enable(0)
        rig.enable(1)
        assert rig.device.get_vq_state(1) == PackedState(0, 1, 0, 1)
        rx.add([], [2048])
        frame = frame_to(rig.device, b"packed" * 10)
        tx.add([VNET_HDR + frame], [])
        rig.kick(1)
        (got,) = rig.used(0, 1)
        assert got.data[c.VIRTIO_NET_HDR_LEN :] == frame
        assert [u.len for u in rig.used(1, 1)] == [0]
    finally:
        rig.close()


def test_rings_are_enabled_at_once_without_protocol_features(net: Rig) -> None:
    device = net.device
    features = device.get_device_features() & ~(1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX)
    net.handshake(protocol=0, features=features)  # no PROTOCOL_FEATURES: no SET_VRING_ENABLE will come
    rx, tx = net.start_ring(0), net.start_ring(1)
    rx.add([], [2048])
    frame = frame_to(device)
    tx.add([VNET_HDR + frame], [])
    net.kick(1)
    (got,) = net.used(0, 1)
    assert got.data[c.VIRTIO_NET_HDR_LEN :] == frame


def test_blk_disabled_ring_leaves_requests_queued(blk: Rig) -> None:
    blk.handshake()
    dq = blk.start_ring(0)
    device = blk.device
    header = blk.memory.alloc(16)
    blk.memory.write(header, struct.pack("<IIQ", c.VIRTIO_BLK_T_GET_ID, 0, 0))
    ident = dq.add_segments([(header, 16, False), (blk.memory.alloc(20), 20, True), (blk.memory.alloc(1), 1, True)])
    blk.kick(0)
    # Deterministic: with the data-path thread parked, serve the queue from here: nothing is taken.
    with device.datapath.paused():
        assert device.process(0) is False
    assert dq.used() == [] and device.vqs[0].counters()["requests"] == 0
    assert device.vqs[0].counters()["packets"] == 0
    blk.enable(0)
    (done,) = blk.used(0, 1)
    assert done.id == ident and done.data[:12] == b"vdpa_blk_sim"


# ----- dirty logging -----


def _log_memfd(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def _dirty(log: mmap.mmap) -> set[int]:
    bitmap = np.frombuffer(log, dtype=np.uint8).copy()
    return {int(byte) * 8 + bit for byte in np.flatnonzero(bitmap) for bit in range(8) if bitmap[byte] >> bit & 1}


def _pages(addr: int, length: int) -> set[int]:
    return set(range(addr // VHOST_LOG_PAGE, (addr + length - 1) // VHOST_LOG_PAGE + 1))


def test_dirty_log_through_set_log_base_and_log_all(net: Rig) -> None:
    """QEMU's migration sequence: SET_LOG_BASE (the log memfd, a reply), SET_FEATURES with VHOST_F_LOG_ALL
    (acked), SET_VRING_ADDR with VHOST_VRING_F_LOG on the running rings; later a bigger log, then off."""
    negotiated = net.handshake()
    assert negotiated >> P.LOG_SHMFD & 1 and negotiated >> P.REPLY_ACK & 1
    device = net.device
    rx, tx = net.start_ring(0), net.start_ring(1)
    net.enable(0)
    net.enable(1)
    front = net.front
    fd, log = _log_memfd(LOG_BYTES)
    try:
        reply = front.call(F.SET_LOG_BASE, LogArea(LOG_BYTES, 0), (fd,))
        assert reply.payload == U64(0)
        features = device.get_driver_features() | PROTOCOL_FEATURES
        assert front.ack(F.SET_FEATURES, U64(features | 1 << VHOST_F_LOG_ALL)) == 0
        for index, dq in ((0, rx), (1, tx)):
            net.set_addr(index, log=dq.device_addr)  # log_guest_addr: the used ring's GPA, as QEMU sends it
        front.call(F.GET_FEATURES)
        buffer = net.memory.alloc(2 * VHOST_LOG_PAGE, VHOST_LOG_PAGE)
        rx.add_segments([(buffer + 100, 2048, True)])
        frame = frame_to(device, bytes(range(200)) * 4)
        tx.add([VNET_HDR + frame], [])
        net.kick(1)
        (got,) = net.used(0, 1)
        # The RX buffer's bytes, and the used rings' flags, index and first element (logged at log_guest_addr).
        wanted = _pages(buffer + 100, got.len) | _pages(rx.device_addr, 12) | _pages(tx.device_addr, 12)
        wait_for(lambda: _dirty(log) >= wanted, what="the writes logged")
        assert _dirty(log) == wanted
        # QEMU grows the log while the guest runs: the next writes land in the new one.
        fd2, log2 = _log_memfd(2 * LOG_BYTES)
        try:
            assert front.call(F.SET_LOG_BASE, LogArea(2 * LOG_BYTES, 0), (fd2,)).payload == U64(0)
            log[:] = bytes(LOG_BYTES)
            rx.add_segments([(buffer + 100, 2048, True)])
            tx.add([VNET_HDR + frame], [])
            net.kick(1)
            net.used(0, 1)
            assert wait_for(lambda: _dirty(log2) >= _pages(buffer + 100, got.len), what="logged in the new log")
            assert not _dirty(log)
            # Migration over (or cancelled): SET_FEATURES without VHOST_F_LOG_ALL stops logging.
            assert front.ack(F.SET_FEATURES, U64(features)) == 0
            log2[:] = bytes(2 * LOG_BYTES)
            rx.add_segments([(buffer + 100, 2048, True)])
            tx.add([VNET_HDR + frame], [])
            net.kick(1)
            net.used(0, 1)
            net.used(1, 3)
            assert not _dirty(log2)
        finally:
            log2.close()
            os.close(fd2)
    finally:
        log.close()
        os.close(fd)


def test_a_log_beyond_its_file_is_refused_and_the_server_carries_on(net: Rig) -> None:
    net.handshake()
    fd, log = _log_memfd(VHOST_LOG_PAGE)
    try:
        net.front.send(F.SET_LOG_BASE, LogArea(1 << 20, 0), (fd,))  # 1 MiB of log in a 4 KiB file
        assert net.front.stream.receive() is None  # no reply can carry the failure: the back-end hangs up
    finally:
        log.close()
        os.close(fd)
    net.front.close()
    net.front = Frontend(net.server.path)  # the next front-end is served
    assert net.front.call(F.GET_FEATURES).payload.value >> VHOST_F_LOG_ALL & 1


# ----- inflight tracking -----


def test_inflight_buffer_survives_a_back_end_restart(blk: Rig, tmp_path: Path) -> None:
    blk.handshake()
    front = blk.front
    reply = front.call(F.GET_INFLIGHT_FD, InflightInfo(0, 0, 2, QSIZE))
    per_queue = queue_region_size(QSIZE, packed=False)
    assert reply.payload == InflightInfo(2 * per_queue, 0, 2, QSIZE)
    assert per_queue == 576  # QueueRegionSplit (16) + DescStateSplit[32] (512), rounded up to 64
    (fd,) = reply.fds
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        assert os.fstat(fd).st_size == 2 * per_queue
        assert front.ack(F.SET_INFLIGHT_FD, InflightInfo(2 * per_queue, 0, 2, QSIZE), (fd,)) == 0
        dq = blk.start_ring(0)
        blk.enable(0)
        header = blk.memory.alloc(16)
        blk.memory.write(header, struct.pack("<IIQ", c.VIRTIO_BLK_T_OUT, 0, 3))
        data = blk.memory.alloc(512)
        blk.memory.write(data, b"\x77" * 512)
        for _ in range(5):
            dq.add_segments([(header, 16, False), (data, 512, False), (blk.memory.alloc(1), 1, True)])
        blk.kick(0)
        blk.used(0, 5)
        with mmap.mmap(fd, 2 * per_queue) as shared:
            region = np.frombuffer(shared, dtype=np.uint8, count=per_queue).copy()
        hdr, entries = split_region(region, QSIZE)
        assert (int(hdr["version"][0]), int(hdr["desc_num"][0]), int(hdr["used_idx"][0])) == (1, QSIZE, 5)
        assert not entries["inflight"].any() and sorted(entries["counter"])[-5:] == [1, 2, 3, 4, 5]
        # The back-end "restarts": the connection goes, a new one gets the same buffer back.
        blk.front.close()
        blk.front = Frontend(blk.server.path)
        blk.handshake()
        assert blk.front.ack(F.SET_INFLIGHT_FD, InflightInfo(2 * per_queue, 0, 2, QSIZE), (fd,)) == 0
        blk.start_ring(0, base=5)  # the next available index, as GET_VRING_BASE gave it to QEMU
        blk.enable(0)
        dq.add_segments([(header, 16, False), (data, 512, False), (blk.memory.alloc(1), 1, True)])
        blk.kick(0)
        assert len(blk.used(0, 1)) == 1
        assert blk.device.vqs[0].counters()["successes"] == 6  # nothing was served twice
    finally:
        os.close(fd)


def test_inflight_requests_are_refused_with_bad_geometry_and_for_net(blk: Rig, tmp_path: Path) -> None:
    blk.handshake()
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64)
        # The buffer is too small for the queues it claims: refused, the connection stays.
        assert blk.front.ack(F.SET_INFLIGHT_FD, InflightInfo(64, 0, 1, QSIZE), (fd,)) != 0
        assert blk.front.ack(F.SET_INFLIGHT_FD, InflightInfo(1 << 20, 0, 1, QSIZE), (fd,)) != 0  # beyond the file
        assert blk.front.ack(F.SET_INFLIGHT_FD, InflightInfo(64, 0, 0, QSIZE), (fd,)) != 0
    finally:
        os.close(fd)
    net = NetDevice(NetConfig("no-inflight"))
    try:
        session = BackendSession(net)
        session.handle(Message(F.SET_PROTOCOL_FEATURES, U64(protocol_features_for(net) & ~(1 << P.VDPA))))
        with pytest.raises(SessionError, match="INFLIGHT_SHMFD"):
            session.handle(Message(F.GET_INFLIGHT_FD, InflightInfo(0, 0, 2, QSIZE)))
        session.close()
    finally:
        net.close()


# ----- back-end requests and the suspended state -----


def test_config_change_reaches_the_front_end_and_is_acked(blk: Rig) -> None:
    """A device fault (NEEDS_RESET) is a config change: BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY."""
    blk.handshake()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        assert blk.front.ack(F.SET_BACKEND_REQ_FD, None, (theirs.fileno(),)) == 0
        theirs.close()
        dq = blk.start_ring(0)
        blk.enable(0)
        dq.write_desc(0, GPA + MEMORY + 0x1000, 16, 0, 0)  # a buffer outside guest memory
        dq.publish(0)
        blk.kick(0)
        ours.settimeout(20)
        channel = MessageStream(ours, backend_channel=True)
        message = channel.receive()
        assert message is not None and message.request is B.CONFIG_CHANGE_MSG and message.need_reply
        assert blk.device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
        channel.send(Message(B.CONFIG_CHANGE_MSG, U64(0), reply=True))
        sender = blk.server.session.backend_channel
        assert isinstance(sender, BackendChannel)
        wait_for(lambda: sender.acked == 1, what="the ack")
        # The front-end re-reads the config space; the device still answers.
        config = blk.front.call(F.GET_CONFIG, _config_request(8)).payload
        assert struct.unpack("<Q", config.data)[0] == 256
    finally:
        ours.close()


def _config_request(size: int):
    from bridge.vhost_user.messages import ConfigSpace

    return ConfigSpace(0, size, 0, bytes(size))


def test_an_unanswered_config_change_never_blocks_the_device(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    channel = BackendChannel(os.dup(theirs.fileno()), name="silent", timeout=0.2)
    theirs.close()
    try:
        for _ in range(3):
            channel.send(Message(B.CONFIG_CHANGE_MSG, Empty(), need_reply=True))  # queued: nobody waits here
        wait_for(lambda: channel.broken, what="the channel giving up")  # after one timeout, logged
        assert channel.sent == 1 and channel.acked == 0  # the rest were dropped, not queued forever
        assert any("CONFIG_CHANGE_MSG not delivered" in r.getMessage() for r in caplog.records)
        channel.send(Message(B.CONFIG_CHANGE_MSG, Empty(), need_reply=True))  # dropped: no thread waits
    finally:
        channel.close()
        ours.close()
    with pytest.raises(OSError):
        fd = os.eventfd(0)
        try:
            BackendChannel(fd)
        finally:
            os.close(fd)


def _started_session(device, features: int) -> BackendSession:
    session = BackendSession(device)
    session.handle(Message(F.SET_PROTOCOL_FEATURES, U64(features)))
    ours, theirs = socket.socketpair()
    session.handle(Message(F.SET_BACKEND_REQ_FD, Empty(), (os.dup(theirs.fileno()),)))
    ours.close()
    theirs.close()
    return session


def _start(session: BackendSession, index: int) -> int:
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    session.handle(Message(F.SET_VRING_KICK, U64(index), (kick,)))
    return kick


def test_suspended_sends_nothing_and_still_answers(caplog: pytest.LogCaptureFixture) -> None:
    """Every ring stopped (GET_VRING_BASE on all), or VDPA_SUSPEND: a config change waits until it ends."""
    device = BlkDevice(BlkConfig("susp", capacity=8))
    offered = protocol_features_for(device)
    session = _started_session(device, offered & ~(1 << P.VDPA) | 1 << P.CONFIG)
    outbox = session.backend_channel.messages  # type: ignore[union-attr]
    try:
        assert session.suspended  # no ring started yet
        device.config_changed()
        assert outbox == []
        _start(session, 0)
        assert not session.suspended
        assert [m.request for m in outbox] == [B.CONFIG_CHANGE_MSG]  # delivered once the device runs
        assert outbox[0].need_reply  # REPLY_ACK negotiated
        session.handle(Message(F.GET_VRING_BASE, VringState(0, 0)))
        assert session.suspended
        device.config_changed()
        device.config_changed()
        assert len(outbox) == 1
        # Requests are still answered.
        assert session.handle(Message(F.GET_FEATURES)).payload.value >> VHOST_F_LOG_ALL & 1
        assert session.handle(Message(F.GET_STATUS)).payload.value == device.get_status()
        _start(session, 0)
        assert len(outbox) == 2  # one message for however many changes
    finally:
        session.close()
        device.close()


def test_vdpa_suspend_is_the_same_state() -> None:
    device = NetDevice(NetConfig("vdpa-susp"))
    session = _started_session(device, protocol_features_for(device))
    outbox = session.backend_channel.messages  # type: ignore[union-attr]
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        session.handle(Message(F.VDPA_SET_CONFIG_CALL, U64(0), (os.dup(call),)))
        _start(session, 0)
        device.config_changed()
        assert len(outbox) == 1 and os.eventfd_read(call) == 1  # with the extension, net has a config too
        session.handle(Message(F.VDPA_SUSPEND))
        assert session.suspended and device.suspended
        device.config_changed()
        assert len(outbox) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)
        session.handle(Message(F.VDPA_RESUME))
        assert not session.suspended and not device.suspended
        assert len(outbox) == 2 and os.eventfd_read(call) == 1
    finally:
        session.close()
        device.close()
        os.close(call)


def test_no_config_messages_without_config_or_the_extension() -> None:
    """The spec sends BACKEND_CONFIG_CHANGE_MSG only with CONFIG negotiated (QEMU's net takes no config)."""
    device = NetDevice(NetConfig("no-config"))
    session = _started_session(device, protocol_features_for(device) & ~(1 << P.VDPA))
    try:
        _start(session, 0)
        device.config_changed()
        assert session.backend_channel.messages == []  # type: ignore[union-attr]
    finally:
        session.close()
        device.close()


def test_stopped_rings_are_left_alone_and_requests_still_answered(net: Rig) -> None:
    """GET_VRING_BASE on every ring: suspended. Nothing more is written to guest memory or signalled."""
    net.handshake()
    device = net.device
    rx, tx = net.start_ring(0), net.start_ring(1)
    net.enable(0)
    net.enable(1)
    rx.add([], [2048])
    tx.add([VNET_HDR + frame_to(device)], [])
    net.kick(1)
    net.used(0, 1)
    net.used(1, 1)
    bases = [net.front.call(F.GET_VRING_BASE, VringState(i, 0)).payload for i in (0, 1)]
    assert bases == [VringState(0, 1), VringState(1, 1)]
    assert net.server.session.suspended
    calls = net.front.fds[0::2][:2]  # the call eventfds of rings 0 and 1 (each ring made call, then kick)
    for fd in calls:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
    buffer = net.memory.alloc(2048)
    rx.add_segments([(buffer, 2048, True)])
    tx.add([VNET_HDR + frame_to(device)], [])
    device_areas = [(rx.device_addr, 4 + 8 * QSIZE), (tx.device_addr, 4 + 8 * QSIZE), (buffer, 2048)]
    before = [net.memory.read(addr, n) for addr, n in device_areas]
    with device.datapath.paused():  # the data-path thread parked: serve from here, deterministically
        assert device.process(0) is False and device.process(1) is False
    assert [net.memory.read(addr, n) for addr, n in device_areas] == before
    for fd in calls:
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    # Still answered while suspended.
    assert net.front.call(F.GET_FEATURES).payload.value >> VHOST_F_LOG_ALL & 1
    assert net.front.call(F.GET_QUEUE_NUM).payload == U64(2)


def test_log_fd_must_be_an_eventfd_and_is_signalled(net: Rig, caplog: pytest.LogCaptureFixture) -> None:
    net.handshake()
    device = net.device
    memfd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    try:
        assert net.front.ack(F.SET_LOG_FD, None, (memfd,)) != 0  # refused: a file must never be written to
    finally:
        os.close(memfd)
    log_call = net.front.eventfd()
    assert net.front.ack(F.SET_LOG_FD, None, (log_call,)) == 0
    fd, log = _log_memfd(LOG_BYTES)
    try:
        assert net.front.call(F.SET_LOG_BASE, LogArea(LOG_BYTES, 0), (fd,)).payload == U64(0)
        features = device.get_driver_features() | PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL
        assert net.front.ack(F.SET_FEATURES, U64(features)) == 0
        rx, tx = net.start_ring(0), net.start_ring(1)
        net.enable(0)
        net.enable(1)
        rx.add([], [2048])
        tx.add([VNET_HDR + frame_to(device)], [])
        net.kick(1)
        net.used(0, 1)
        wait_for(lambda: _dirty(log), what="a logged page")
        wait_for(lambda: select.select([log_call], [], [], 0)[0], what="the log eventfd")
    finally:
        log.close()
        os.close(fd)


def test_ring_geometry_changed_under_a_running_ring_is_checked_again(tmp_path: Path) -> None:
    """SET_VRING_BASE/NUM on a started ring: the device checks the ring again, as at its start; packed
    positions past the ring's end are a device fault (NEEDS_RESET), never a read outside the ring."""
    rig = Rig(NetDevice(NetConfig("vu-geometry")), tmp_path, packed=True)
    try:
        rig.handshake()
        rig.start_ring(0)
        rig.start_ring(1)
        device = rig.device
        assert device.vqs[0].attached and device.fault is None
        rig.front.send(F.SET_VRING_NUM, VringState(1, QSIZE // 2))  # smaller: still a valid ring
        rig.front.call(F.GET_FEATURES)
        assert device.vqs[1].attached and device.vqs[1].size == QSIZE // 2
        rig.front.send(F.SET_VRING_BASE, VringState(0, 0x7FFF | 1 << 15 | 1 << 31))  # position 32767 of 32
        rig.front.call(F.GET_FEATURES)
        assert device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
        assert device.fault is not None and "outside a ring of 32" in str(device.fault)
        assert device.datapath.error is None
    finally:
        rig.close()


def test_ring_positions_survive_the_reset_qemu_sends_before_get_vring_base(net: Rig) -> None:
    """QEMU 7.2 stops a device with STATUS as SET_STATUS(0) first, then GET_VRING_BASE per ring: the bases it
    reads must be where the rings were, or a stop/cont would replay the rings from 0."""
    net.handshake()
    rx, tx = net.start_ring(0), net.start_ring(1)
    net.enable(0)
    net.enable(1)
    for n in range(3):
        rx.add([], [2048])
        tx.add([VNET_HDR + frame_to(net.device, bytes([n]) * 64)], [])
        net.kick(1)
        net.used(1, 1)
    net.used(0, 3)
    net.front.send(F.SET_STATUS, U64(0))
    assert net.front.call(F.GET_VRING_BASE, VringState(1, 0)).payload == VringState(1, 3)
    assert net.front.call(F.GET_VRING_BASE, VringState(0, 0)).payload == VringState(0, 3)
    # Read once: a ring read again after its base was handed out reports the device's (reset) state.
    assert net.front.call(F.GET_VRING_BASE, VringState(1, 0)).payload == VringState(1, 0)
