"""VhostUserClient against VhostUserServer over a real UNIX socket, with real devices behind it.

The client is the DeviceOps the driver kit drives (vdpasim/testing/net.py, driver.py), so every ring
lives in memfd guest memory that reaches the server only through SET_MEM_TABLE fds, and every kick
and call is an eventfd passed with SCM_RIGHTS. Covered: the DeviceOps conformance suite on the device
models and through the socket; net and blk traffic; GET_VRING_BASE stopping a ring and a kick fd
starting it again; reset; a front-end leaving (device reset, guest memory unmapped, fds closed) and
a new one arriving; the vDPA extension, and plain vhost-user without it; the server's failure
answers, seen by a raw front-end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator

import pytest

from bridge.vhost_user import messages as m
from bridge.vhost_user.backend import protocol_features_for
from bridge.vhost_user.client import IOVA_FULL_RANGE, VhostUserClient
from bridge.vhost_user.messages import FrontendRequest as F
from bridge.vhost_user.messages import Message
from bridge.vhost_user.messages import ProtocolFeature as P
from bridge.vhost_user.server import VhostUserServer
from bridge.vhost_user.transport import MessageStream
from vdpasim.config import BlkConfig, NetConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.net import NetDevice
from vdpasim.errors import DeviceRequestError, PeerError, SessionError
from vdpasim.ops import DeviceOps, supports
from vdpasim.rings.state import SplitState
from vdpasim.testing.conformance import CHECKS, Maker
from vdpasim.testing.driver import DriverQueue, GuestMemory
from vdpasim.testing.net import NetDriver, ethernet
from vdpasim.virtio import constants as c

PEER_MAC = b"\x02\x00\x00\x00\x00\x01"


# ----- plumbing -----
@contextlib.contextmanager
def served(device: DeviceOps, **server_args: object) -> Iterator[VhostUserServer]:
    """``device`` on a vhost-user socket in a private directory, removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="vdpasim-vu-")
    os.chmod(workdir, 0o700)
    server = VhostUserServer(device, os.path.join(workdir, "dev.sock"), **server_args)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        os.rmdir(workdir)


@contextlib.contextmanager
def net_device(**config: object) -> Iterator[NetDevice]:
    device = NetDevice(NetConfig.from_mapping({"name": "vu-net", **config}))
    try:
        yield device
    finally:
        device.close()


@contextlib.contextmanager
def blk_device() -> Iterator[BlkDevice]:
    device = BlkDevice(BlkConfig(name="vu-blk", capacity=4096))
    try:
        yield device
    finally:
        device.close()


def over_vhost_user(inner: Maker) -> Maker:
    @contextlib.contextmanager
    def make() -> Iterator[DeviceOps]:
        with inner() as device, served(device) as server, VhostUserClient(server.path) as client:
            yield client

    return make


def _memfd_maps() -> int:
    """Mappings of test guest memory in this process (the driver's own plus the server's)."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:vdpasim-guest" in line for line in maps)


def _memfd_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:vdpasim-guest")
    return count


def frames(device: NetDevice, count: int, tag: int = 0) -> list[bytes]:
    return [ethernet(device.config.mac, PEER_MAC, 0x88B5, bytes([tag, i]) * 40) for i in range(count)]


def loop_through(driver: NetDriver, sent: list[bytes]) -> list[bytes]:
    driver.post_rx(0, len(sent))
    driver.send(0, sent)
    received = [r.frame for r in driver.receive(0, len(sent))]
    driver.wait_used(driver.tx(0), len(sent))
    return received


# ----- the DeviceOps contract, natively and through the socket -----
IMPLEMENTATIONS = {
    "net": net_device,
    "blk": blk_device,
    "net-over-vhost-user": over_vhost_user(net_device),
    "blk-over-vhost-user": over_vhost_user(blk_device),
}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_device_ops_conformance(implementation: str, check: str) -> None:
    CHECKS[check](IMPLEMENTATIONS[implementation])


# ----- net traffic -----
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_loopback_through_the_socket(packed: bool) -> None:
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(8 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        driver = NetDriver(client, memory, packed=packed, event_idx=True)
        try:
            driver.initialize()
            assert device.get_status() & c.VIRTIO_CONFIG_S_DRIVER_OK
            assert device.get_driver_features() == driver.features
            sent = frames(device, 200)
            for start in range(0, len(sent), 50):
                assert loop_through(driver, sent[start : start + 50]) == sent[start : start + 50]
            assert device.vstats(1)["tx packets"] == device.vstats(0)["rx packets"] == 200
            # The device reads the very pages the driver wrote: one memfd, two mappings.
            assert len(device.memory) == 1
            assert device.memory.regions[0].data.ctypes.data != memory.region.data.ctypes.data
        finally:
            client.close()
            driver.close()


def test_get_vring_base_stops_a_ring_and_a_kick_fd_starts_it_again() -> None:
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(4 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        driver = NetDriver(client, memory, features=_plain_features(device))
        try:
            driver.initialize()
            tx = driver.tx(0)
            first = frames(device, 4, tag=1)
            assert loop_through(driver, first) == first
            assert client.stop_vq(tx) == SplitState(4)
            assert not device.get_vq_ready(tx)
            # Buffers made available while the ring is stopped stay where they are.
            later = frames(device, 3, tag=2)
            driver.post_rx(0, 3)
            driver.send(0, later)
            assert client.stop_vq(tx) == SplitState(4)
            assert device.vstats(tx)["tx packets"] == 4
            # A kick fd starts it again, from where it stopped; the pending kick is served.
            client.set_vq_kick(tx, driver.kick_fds[tx])
            assert device.get_vq_ready(tx)
            assert [r.frame for r in driver.receive(0, 3)] == later
            driver.wait_used(tx, 3)
            # Reading the base through the DeviceOps interface leaves the ring running.
            assert client.get_vq_state(tx) == SplitState(7)
            assert device.get_vq_ready(tx)
            last = frames(device, 2, tag=3)
            assert loop_through(driver, last) == last
        finally:
            client.close()
            driver.close()


def test_reset_through_the_client_and_a_second_bring_up() -> None:
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(4 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        driver = NetDriver(client, memory, event_idx=True)
        try:
            driver.initialize()
            assert loop_through(driver, frames(device, 5)) == frames(device, 5)
            client.reset()
            assert device.get_status() == 0 and client.get_status() == 0
            assert not any(device.get_vq_ready(i) for i in range(device.get_vq_count()))
            driver.close()
            driver.initialize()  # new rings, new eventfds, the same memory table
            again = frames(device, 5, tag=9)
            assert loop_through(driver, again) == again
        finally:
            client.close()
            driver.close()


def test_a_front_end_leaving_resets_the_device_and_releases_memory_then_another_connects() -> None:
    with net_device() as device, served(device) as server, GuestMemory(4 << 20) as memory:
        maps_before, fds_before = _memfd_maps(), _memfd_fds()
        first = VhostUserClient(server.path, name="first")
        driver = NetDriver(first, memory)
        try:
            driver.initialize()
            assert loop_through(driver, frames(device, 3)) == frames(device, 3)
            assert _memfd_maps() > maps_before  # the server mapped the region too
        finally:
            first.close()
            driver.close()
        # One front-end at a time: the second handshake is served only once the first session closed.
        with VhostUserClient(server.path, name="second") as second:
            assert server.connections == 2
            assert device.get_status() == 0
            assert device.memory is not None and len(device.memory) == 0
            assert (_memfd_maps(), _memfd_fds()) == (maps_before, fds_before)
            driver = NetDriver(second, memory)
            try:
                driver.initialize()
                again = frames(device, 3, tag=5)
                assert loop_through(driver, again) == again
            finally:
                second.close()
                driver.close()


# ----- blk traffic -----
def _plain_features(device: DeviceOps) -> int:
    """Offered features but the packed layout and EVENT_IDX: a split ring that always notifies."""
    return device.get_device_features() & ~(1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX)


def _wait_used(dq: DriverQueue, call_fd: int, count: int) -> list:
    got: list = []
    while len(got) < count:
        got += dq.used()
        if len(got) < count:
            select.select([call_fd], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(call_fd)
    return got


@contextlib.contextmanager
def blk_queue(
    client: VhostUserClient, device: DeviceOps, memory: GuestMemory
) -> Iterator[tuple[DriverQueue, int, int]]:
    """Bring a blk device up through ``client`` with one split queue: (queue, kick fd, call fd)."""
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        up = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
        client.set_status(0)
        client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        client.set_status(up)
        client.set_driver_features(_plain_features(device))
        client.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK)
        client.set_map(memory.table)
        dq = DriverQueue(memory, 64)
        client.set_vq_num(0, 64)
        client.set_vq_address(0, dq.desc_addr, dq.driver_addr, dq.device_addr)
        client.set_vq_kick(0, kick)
        client.set_vq_call(0, call)
        client.set_vq_ready(0, True)
        client.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
        yield dq, kick, call
    finally:
        client.close()  # before the eventfds go: the server stops using them when the session ends
        os.close(kick)
        os.close(call)


def test_blk_write_flush_read_through_the_socket() -> None:
    with (
        blk_device() as device,
        served(device) as server,
        GuestMemory(4 << 20) as memory,
        VhostUserClient(server.path) as client,
        blk_queue(client, device, memory) as (dq, kick, call),
    ):
        capacity = struct.unpack_from("<Q", client.get_config(0, 8))[0]
        assert capacity == 4096

        pattern = random.Random(3).randbytes(8 * 512)
        write = struct.pack("<IIQ", c.VIRTIO_BLK_T_OUT, 0, 16)
        flush = struct.pack("<IIQ", c.VIRTIO_BLK_T_FLUSH, 0, 0)
        read = struct.pack("<IIQ", c.VIRTIO_BLK_T_IN, 0, 16)
        dq.add([write, pattern], [1])
        dq.add([flush], [1])
        os.eventfd_write(kick, 1)
        statuses = [u.data for u in _wait_used(dq, call, 2)]
        assert statuses == [bytes([c.VIRTIO_BLK_S_OK])] * 2
        dq.add([read], [len(pattern), 1])
        os.eventfd_write(kick, 1)
        (done,) = _wait_used(dq, call, 1)
        assert done.data == pattern + bytes([c.VIRTIO_BLK_S_OK])
        assert device.read_disk(16 * 512, len(pattern)) == pattern


def test_config_change_messages_on_the_backend_channel_without_the_extension() -> None:
    """Plain vhost-user: BACKEND_CONFIG_CHANGE_MSG on the channel of SET_BACKEND_REQ_FD, acked (REPLY_ACK)."""
    with (
        blk_device() as device,
        served(device, protocol_features=protocol_features_for(device) & ~(1 << P.VDPA)) as server,
        GuestMemory(1 << 20) as memory,
        VhostUserClient(server.path) as client,
        blk_queue(client, device, memory),
    ):
        assert client.negotiated(P.BACKEND_REQ) and not client.negotiated(P.VDPA)
        fired = threading.Event()
        client.set_config_cb(fired.set)
        before = client.get_generation()
        device.config_changed()
        assert fired.wait(10)
        assert client.get_generation() == before + 1


# ----- the vDPA extension -----
@pytest.mark.parametrize("kind", ["net", "blk"])
def test_the_extension_reports_what_the_device_says(kind: str) -> None:
    make = net_device if kind == "net" else blk_device
    with make() as device, served(device) as server, VhostUserClient(server.path) as client:
        assert client.negotiated(P.VDPA)
        assert client.get_device_id() == device.get_device_id()
        assert client.get_vendor_id() == device.get_vendor_id()
        assert client.get_vq_count() == device.get_vq_count()
        assert client.get_vq_num_max() == device.get_vq_num_max()
        assert client.get_config_size() == device.get_config_size()
        assert client.get_config(0, device.get_config_size()) == device.get_config(0, device.get_config_size())
        assert client.get_iova_range() == device.get_iova_range()
        assert client.get_generation() == device.get_generation()
        assert client.get_group_num() == 1 and client.get_as_num() == 1
        assert [client.get_vq_group(i) for i in range(device.get_vq_count())] == [0] * device.get_vq_count()
        assert client.get_vq_size(0) == device.get_vq_num_max()
        client.set_group_asid(0, 0)
        with pytest.raises(DeviceRequestError):
            client.set_group_asid(0, 1)  # one address space only
        backend_features = client.get_backend_features()
        assert backend_features == (1 << m.VHOST_BACKEND_F_SUSPEND | 1 << m.VHOST_BACKEND_F_RESUME) | (
            1 << m.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
        )
        assert supports(client, "suspend") and supports(client, "resume") and supports(client, "set_config_cb")


def test_config_change_bumps_the_generation_and_signals_the_config_eventfd() -> None:
    # Started rings: a vhost-user back-end with every ring stopped is suspended and holds config changes.
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(1 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        config_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        driver = NetDriver(client, memory)
        try:
            driver.initialize()
            client.set_config_cb(config_call)
            before = client.get_generation()
            device.set_mac("02:11:22:33:44:55")
            assert select.select([config_call], [], [], 10)[0] == [config_call]
            assert os.eventfd_read(config_call) == 1
            assert client.get_generation() == before + 1
            assert client.get_config(0, 6) == bytes.fromhex("021122334455")
            client.set_config_cb(None)  # unbinds: the server closes its copy
        finally:
            client.close()
            driver.close()
            os.close(config_call)


def test_config_callback_may_be_a_python_callable() -> None:
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(1 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        driver = NetDriver(client, memory)
        try:
            driver.initialize()
            fired = threading.Event()
            client.set_config_cb(fired.set)
            device.set_mac("02:11:22:33:44:66")
            assert fired.wait(10)
        finally:
            client.close()
            driver.close()


def test_suspend_holds_the_rings_and_resume_serves_what_came_meanwhile() -> None:
    with (
        net_device() as device,
        served(device) as server,
        GuestMemory(4 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        driver = NetDriver(client, memory, features=_plain_features(device))
        try:
            driver.initialize()
            assert loop_through(driver, frames(device, 2)) == frames(device, 2)
            client.suspend()
            meanwhile = frames(device, 4, tag=7)
            driver.post_rx(0, 4)
            driver.send(0, meanwhile)
            assert client.get_vq_state(driver.tx(0)) == SplitState(2)  # nothing served while suspended
            client.resume()
            assert [r.frame for r in driver.receive(0, 4)] == meanwhile
        finally:
            client.close()
            driver.close()


def test_plain_vhost_user_without_the_extension() -> None:
    with (
        net_device() as device,
        served(device, protocol_features=protocol_features_for(device) & ~(1 << P.VDPA)) as server,
        GuestMemory(4 << 20) as memory,
        VhostUserClient(server.path) as client,
    ):
        assert not client.negotiated(P.VDPA)
        for operation in (
            client.get_device_id,
            client.get_vendor_id,
            client.get_vq_num_max,
            client.get_config_size,
            client.get_vq_count,
        ):
            with pytest.raises(SessionError) as refused:
                operation()
            assert refused.value.errno == errno.EOPNOTSUPP
        with pytest.raises(SessionError) as refused:
            client.get_config(0, 6)  # vhost-user-net has no CONFIG, and no extension stands in for it
        assert refused.value.errno == errno.EOPNOTSUPP
        assert not supports(client, "suspend") and not supports(client, "resume")
        assert supports(client, "set_config_cb")  # through the back-end request channel
        assert client.get_iova_range() == IOVA_FULL_RANGE
        assert client.get_queue_num() == 1  # vhost-user-net answers queue pairs
        driver = NetDriver(client, memory, features=1 << c.VIRTIO_F_VERSION_1)
        try:
            driver.initialize()
            assert device.get_status() & c.VIRTIO_CONFIG_S_DRIVER_OK
            assert loop_through(driver, frames(device, 6)) == frames(device, 6)
        finally:
            client.close()
            driver.close()


def test_a_refused_feature_set_leaves_features_ok_unset_through_the_socket() -> None:
    with net_device() as device, served(device) as server, VhostUserClient(server.path) as client:
        client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
        client.set_driver_features(1 << c.VIRTIO_NET_F_MAC)  # no VERSION_1
        client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER | c.VIRTIO_CONFIG_S_FEATURES_OK)
        assert client.get_status() == c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
        assert device.get_status() == client.get_status()


# ----- the server's failure answers, seen by a raw front-end -----
class RawFrontend:
    """A front-end that sends exactly what it is given and reads exactly one answer."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        sock.settimeout(30)
        self.stream = MessageStream(sock)

    def ask(self, request: F, payload: m.Payload | None = None, fds: tuple[int, ...] = (), **flags: bool) -> Message:
        self.stream.send(Message(request, payload or m.Empty(), fds, **flags))
        reply = self.stream.receive()
        assert reply is not None, f"the server hung up on {request.name}"
        return reply

    def negotiate(self, protocol_features: int) -> None:
        self.stream.send(Message(F.SET_PROTOCOL_FEATURES, m.U64(protocol_features)))
        self.stream.send(Message(F.SET_OWNER))

    def close(self) -> None:
        self.stream.close()


@contextlib.contextmanager
def raw_frontend(device: DeviceOps, protocol_features: int) -> Iterator[RawFrontend]:
    with served(device) as server:
        frontend = RawFrontend(server.path)
        try:
            frontend.negotiate(protocol_features)
            yield frontend
        finally:
            frontend.close()


VDPA_ACK = 1 << P.VDPA | 1 << P.REPLY_ACK


def test_a_failed_getter_gets_the_extension_error_reply() -> None:
    with net_device() as device, raw_frontend(device, VDPA_ACK) as frontend:
        reply = frontend.ask(F.GET_VRING_BASE, m.VringState(99, 0))
        assert reply.payload == m.ErrorReply(errno.ENOBUFS)
        reply = frontend.ask(F.GET_CONFIG, m.ConfigSpace(10, 8, 0, bytes(8)))
        assert reply.payload == m.ErrorReply(errno.EINVAL)
        assert frontend.ask(F.VDPA_GET_DEVICE_ID).payload == m.U64(c.VIRTIO_ID_NET)  # still serving


def test_without_the_extension_get_config_fails_with_an_empty_config_and_getters_hang_up() -> None:
    with blk_device() as device, raw_frontend(device, 1 << P.CONFIG | 1 << P.REPLY_ACK) as frontend:
        reply = frontend.ask(F.GET_CONFIG, m.ConfigSpace(90, 8, 0, bytes(8)))
        assert reply.payload == m.ConfigSpace(0, 0, 0)
        assert frontend.ask(F.SET_VRING_NUM, m.VringState(99, 64), need_reply=True).payload == m.U64(errno.ENOBUFS)
        frontend.stream.send(Message(F.GET_VRING_BASE, m.VringState(99, 0)))
        assert frontend.stream.receive() is None  # no reply could say it failed: the server hung up


def test_a_memory_region_past_the_end_of_its_file_is_refused_and_nothing_is_mapped() -> None:
    with net_device() as device, raw_frontend(device, VDPA_ACK) as frontend:
        fd = os.memfd_create("vdpasim-guest", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 0x10000)
            maps_before = _memfd_maps()
            past = m.MemoryTable((m.MemoryRegion(0, 0x20000, 0x7F0000000000, 0),))
            reply = frontend.ask(F.SET_MEM_TABLE, past, (fd,), need_reply=True)
            assert reply.payload == m.U64(errno.EINVAL)
            offset_past = m.MemoryTable((m.MemoryRegion(0, 0x10000, 0x7F0000000000, 0x1000),))
            assert frontend.ask(F.SET_MEM_TABLE, offset_past, (fd,), need_reply=True).payload == m.U64(errno.EINVAL)
            fits = m.MemoryTable((m.MemoryRegion(0, 0x10000, 0x7F0000000000, 0),))
            assert frontend.ask(F.SET_MEM_TABLE, fits, (fd,), need_reply=True).payload == m.U64(0)
            assert _memfd_maps() == maps_before + 1 and len(device.memory) == 1
        finally:
            os.close(fd)


def test_peer_errors_are_the_only_refusals_the_client_raises() -> None:
    with net_device() as device, served(device) as server, VhostUserClient(server.path) as client:
        for operation in (
            lambda: client.set_vq_num(0, 3),
            lambda: client.set_vq_num(7, 64),
            lambda: client.get_config(100, 1),
            lambda: client.set_status(c.VIRTIO_CONFIG_S_DRIVER_OK),
            lambda: client.get_vq_size(50),
        ):
            with pytest.raises(PeerError):
                operation()
        assert client.get_status() == 0  # and the connection is still good
