"""ReplayingClient: a driver keeps its device across back-end restarts (kill -9 shape) on the same socket.

In-process: NetDriver -> ReplayingClient -> socket -> VhostUserServer -> NetDevice (loopback), the server
crashed and a fresh device started on the same path between bursts of frames. No supervisor here; the
supervised path (a real program on /dev/vhost-vdpa-0) is tests/integration/test_vhost_vdpa_supervised.py.
"""

from __future__ import annotations

import errno
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.vhost_user.replay import ReplayingClient, packed_used_position, split_ring_indexes
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.errors import PeerError
from vdpasim.memory import RegionTable
from vdpasim.ops import RingAddressSpace
from vdpasim.testing.driver import GuestMemory
from vdpasim.testing.net import BROADCAST, NetDriver, ethernet
from vdpasim.testing.restart import RestartingBackend
from vdpasim.testing.vhost_user import warm_up
from vdpasim.virtio import constants as c

MAC = bytes.fromhex("02000000bb01")


def _frames(tag: int, count: int = 4) -> list[bytes]:
    return [ethernet(BROADCAST, bytes.fromhex("020000000077"), 0x88B5, bytes([tag, i]) * 30) for i in range(count)]


@pytest.fixture
def backend() -> Iterator[RestartingBackend]:
    warm_up(NetDevice)
    directory = Path(tempfile.mkdtemp(prefix="vdpasim-replay-"))
    backend = RestartingBackend(lambda: NetDevice(NetConfig(name="replay0", mac=MAC)), str(directory / "net.sock"))
    backend.start()
    try:
        yield backend
    finally:
        backend.close()
        shutil.rmtree(directory, ignore_errors=True)


def _wait(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frames_flow_across_five_restarts(backend: RestartingBackend, packed: bool) -> None:
    memory = GuestMemory(8 << 20)
    client = ReplayingClient(backend.path, name="replay0", reconnect_seconds=10)
    driver = NetDriver(client, memory, packed=packed, event_idx=True, queue_size=64)
    try:
        driver.initialize()
        driver.post_rx(0, 32)
        driver.send(0, _frames(0))
        assert [r.frame for r in driver.receive(0, 4, timeout=60)] == _frames(0)
        for cycle in range(1, 6):
            backend.restart(down_seconds=0.05)
            _wait(lambda cycle=cycle: client.stats.replays == cycle)
            assert client.get_status() == 0xF and backend.device is not None
            assert backend.device.get_status() == 0xF  # the new device was brought up by the replay
            driver.post_rx(0, 4)
            driver.send(0, _frames(cycle))
            assert [r.frame for r in driver.receive(0, 4, timeout=30)] == _frames(cycle)
        assert client.stats.outages == 5 and client.stats.failed_replays == 0
        assert len(client.stats.pauses) == 5 and max(client.stats.pauses) < 5
        assert client.get_config(0, 6) == MAC
    finally:
        client.close()
        driver.close()
        memory.close()


def test_frames_queued_while_the_backend_is_away_are_sent_after(backend: RestartingBackend) -> None:
    """The guest keeps transmitting into a dead device: the new one takes the frames from used->idx on."""
    memory = GuestMemory(8 << 20)
    client = ReplayingClient(backend.path, name="replay0", reconnect_seconds=10)
    driver = NetDriver(client, memory, event_idx=False, queue_size=64)
    try:
        driver.initialize()
        driver.post_rx(0, 16)
        backend.crash()
        _wait(lambda: not client.connected)
        # The node answers from its record meanwhile, as the kernel's char device would.
        assert client.get_status() == 0xF and client.get_config(0, 6) == MAC
        assert client.get_vq_ready(1) and client.get_driver_features() == driver.features
        assert client.get_vq_state(1).last_avail == 0  # read from the used ring in guest memory
        driver.send(0, _frames(7))
        client.set_vq_call(0, driver.call_fds[0])  # QEMU re-sends calls when vectors are unmasked: recorded
        time.sleep(0.2)
        assert client.get_vq_state(1).last_avail == 0
        backend.start()
        _wait(lambda: client.stats.replays == 1)
        assert [r.frame for r in driver.receive(0, 4, timeout=30)] == _frames(7)
        assert client.stats.requeued >= 4  # 4 frames and 16 receive buffers waited in the rings
    finally:
        client.close()
        driver.close()
        memory.close()


def test_no_backend_for_too_long_means_needs_reset(backend: RestartingBackend) -> None:
    memory = GuestMemory(4 << 20)
    client = ReplayingClient(backend.path, name="replay0", reconnect_seconds=0.3, wait_seconds=0.1)
    driver = NetDriver(client, memory, queue_size=16)
    try:
        driver.initialize()
        backend.crash()
        _wait(lambda: client.stats.gave_up)
        assert client.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
        with pytest.raises(PeerError) as refused:
            client.get_vq_size(0)  # nothing recorded to answer from: the back-end is gone
        assert refused.value.errno == errno.EIO
    finally:
        client.close()
        driver.close()
        memory.close()


def test_ring_positions_from_guest_memory() -> None:
    memory = GuestMemory(1 << 20)
    try:
        table: RegionTable = memory.table
        base = memory.region.guest_addr
        memory.table.write(base + 2, struct.pack("<H", 7))  # avail->idx
        memory.table.write(base + 0x102, struct.pack("<H", 5))  # used->idx
        assert split_ring_indexes(table, RingAddressSpace.GUEST, base, base + 0x100) == (7, 5)
        desc = base + 0x1000
        assert packed_used_position(table, RingAddressSpace.GUEST, desc, 8) == (0, 1)  # untouched ring
        used_flag = struct.pack("<H", 1 << 7 | 1 << 15)
        for i in range(3):  # three used in the first lap
            memory.table.write(desc + 16 * i + 14, used_flag)
        assert packed_used_position(table, RingAddressSpace.GUEST, desc, 8) == (3, 1)
        for i in range(3, 8):  # the whole first lap used: position 0 of the second lap (wrap 0)
            memory.table.write(desc + 16 * i + 14, used_flag)
        assert packed_used_position(table, RingAddressSpace.GUEST, desc, 8) == (0, 0)
        for i in range(2):  # two used in the second lap: USED flags cleared (wrap counter 0)
            memory.table.write(desc + 16 * i + 14, struct.pack("<H", 0))
        assert packed_used_position(table, RingAddressSpace.GUEST, desc, 8) == (2, 0)
    finally:
        memory.close()
