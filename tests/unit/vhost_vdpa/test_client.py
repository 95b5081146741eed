"""VhostVdpaClient over an in-process VhostVdpaServer (the same requests a real fd would get)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.client import VhostVdpaClient
from bridge.vhost_vdpa.server import VhostVdpaServer
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.errors import DeviceRequestError
from vdpasim.memory import RegionTable, anonymous_region
from vdpasim.ops import RingAddressSpace, supports
from vdpasim.testing.driver import GuestMemory
from vdpasim.testing.net import BROADCAST, NetDriver, ethernet
from vdpasim.testing.vhost_vdpa import FakeCaller, ServerTransport


class Recorder:
    """The device's operations, recording ring addresses; optional operations can be hidden."""

    def __init__(self, device: NetDevice, hide: tuple[str, ...] = ()) -> None:
        self._device = device
        self._hide = hide
        self.addresses: list[tuple[int, int, int, int]] = []

    def __getattr__(self, name: str):
        if name in self._hide:
            raise AttributeError(name)
        return getattr(self._device, name)

    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None:
        self.addresses.append((idx, desc, driver, device))
        self._device.set_vq_address(idx, desc, driver, device)


class Bench:
    def __init__(self, hide: tuple[str, ...] = ()) -> None:
        self.device = NetDevice(NetConfig(name="cli0"))
        self.ops = Recorder(self.device, hide)
        self.server = VhostVdpaServer(self.ops, name="vhost-vdpa-9")  # type: ignore[arg-type]
        self.caller = FakeCaller()
        self.client = VhostVdpaClient(transport=ServerTransport(self.server, self.caller))

    def share(self, *regions) -> None:
        for region in regions:
            self.caller.add_file_mapping(region.host_addr, region.size, region.fd)

    def close(self) -> None:
        self.client.close()
        self.device.close()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    try:
        yield b
    finally:
        b.close()


def test_open_negotiates_backend_features_and_owns(bench: Bench) -> None:
    assert bench.server.owned
    assert bench.client.backend_features == bench.server.acked_backend_features == 0x76
    assert supports(bench.client, "suspend") and supports(bench.client, "resume")
    assert bench.client.get_vq_count() == 3 and bench.client.get_device_id() == 1


def test_suspend_and_resume_absent_when_not_offered() -> None:
    b = Bench(hide=("suspend", "resume"))
    try:
        assert not supports(b.client, "suspend") and not supports(b.client, "resume")
        assert b.client.backend_features & (3 << a.VHOST_BACKEND_F_SUSPEND) == 0
    finally:
        b.close()


def test_traffic_through_client_and_server(bench: Bench) -> None:
    with GuestMemory(8 << 20) as memory:
        bench.share(memory.region)
        driver = NetDriver(bench.client, memory, queue_size=64)
        try:
            driver.initialize()
            frame = ethernet(BROADCAST, bytes.fromhex("020000000099"), 0x88B5, b"z" * 60)
            driver.post_rx(0, 2)
            driver.send(0, [frame])
            assert driver.receive(0, 1)[0].frame == frame
        finally:
            bench.client.reset()
            driver.close()


def test_set_map_replaces_the_previous_mappings_in_one_batch(bench: Bench) -> None:
    first = anonymous_region(1 << 16, guest_addr=0x10000)
    second = anonymous_region(1 << 16, guest_addr=0x10000)  # same IOVAs: needs the INVALIDATE first
    try:
        bench.share(first, second)
        bench.client.set_map(RegionTable([first]))
        commits = bench.server.stats.commits
        bench.client.set_map(RegionTable([second]))
        assert bench.server.stats.commits == commits + 1
        assert bench.server.mappings() == [(0x10000, 1 << 16, second.host_addr, a.VHOST_ACCESS_RW)]
        bench.client.set_map(RegionTable())
        assert bench.server.mappings() == []
    finally:
        first.close()
        second.close()


def test_user_ring_addresses_are_translated_even_before_memory(bench: Bench) -> None:
    region = anonymous_region(1 << 20, guest_addr=0x40000000, user_addr=0x7F1200000000)
    try:
        bench.share(region)
        user = 0x7F1200000000
        bench.client.set_vq_address(0, user + 0x1000, user + 0x2000, user + 0x3000)
        assert bench.ops.addresses == []  # no memory yet: nothing can be translated
        bench.client.set_map(RegionTable([region]), RingAddressSpace.USER)
        assert bench.ops.addresses == [(0, 0x40001000, 0x40002000, 0x40003000)]
        bench.client.set_vq_address(1, user + 0x4000, user + 0x5000, user + 0x6000)
        assert bench.ops.addresses[-1] == (1, 0x40004000, 0x40005000, 0x40006000)
        with pytest.raises(DeviceRequestError) as info:
            bench.client.set_vq_address(1, 0x1000, 0x2000, 0x3000)
        assert info.value.errno == errno.EFAULT
        bench.client.set_map(RegionTable([region]), RingAddressSpace.USER)  # same translation: not re-sent
        assert len(bench.ops.addresses) == 2
    finally:
        bench.client.set_map(RegionTable())
        region.close()


def test_guest_ring_addresses_pass_as_they_are(bench: Bench) -> None:
    bench.client.set_map(RegionTable())
    bench.client.set_vq_address(2, 0x1000, 0x2000, 0x3000)
    assert bench.ops.addresses == [(2, 0x1000, 0x2000, 0x3000)]


def test_errors_carry_the_servers_errno(bench: Bench) -> None:
    with pytest.raises(DeviceRequestError) as info:
        bench.client.set_vq_num(0, 3)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DeviceRequestError) as info:
        bench.client.get_config(0, 0)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DeviceRequestError) as info:
        bench.client.get_vq_group(0)
    assert info.value.errno == errno.EOPNOTSUPP


def test_callable_call_targets_and_config_callback(bench: Bench) -> None:
    fired = threading.Event()
    config = threading.Event()
    bench.client.set_vq_call(0, fired.set)
    bench.client.set_config_cb(config.set)
    call_fd = bench.server.fds()["call"][0]
    assert call_fd is not None
    os.eventfd_write(call_fd, 1)  # what the device does to interrupt
    assert fired.wait(5)
    bench.device.config_changed()
    assert config.wait(5)
    bench.client.set_vq_call(0, None)
    assert bench.server.fds()["call"][0] is None


def test_own_kick_eventfd(bench: Bench) -> None:
    bench.client.set_vq_kick(1, None)
    assert bench.server.fds()["kick"][1] is not None
    bench.client.kick_vq(1)  # writes our own eventfd: no error
