"""DaemonBus and its state files, in process: what a restarted daemon re-creates, and what it keeps.

Each "restart" here is a DaemonBus closed (its last checkpoint written, as a killed daemon's last
checkpoint would be) and a new DaemonBus on the same runtime directory calling ``restore()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpasim.bus.model import DevSetConfig
from vdpasim.daemon import DaemonBus
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.net import NetDevice
from vdpasim.rings.state import SplitState
from vdpasim.runtime import RuntimeDir
from vdpasim.state import read_state
from vdpasim.testing.driver import GuestMemory
from vdpasim.testing.net import NetDriver, ethernet
from vdpasim.virtio import constants as c


@pytest.fixture
def runtime(tmp_path: Path) -> RuntimeDir:
    # Short: socket paths must fit sockaddr_un.
    rt = RuntimeDir(Path("/tmp") / f"vds-u-{tmp_path.name[-12:]}")
    rt.ensure()
    yield rt
    for p in rt.path.iterdir():
        p.unlink()
    rt.path.rmdir()


def _restart(bus: DaemonBus, runtime: RuntimeDir) -> tuple[DaemonBus, list[str]]:
    bus.close()
    again = DaemonBus(runtime)
    return again, again.restore()


def test_a_net_device_comes_back_with_its_counters_and_counts_the_gap(runtime: RuntimeDir) -> None:
    bus = DaemonBus(runtime)
    vdev = bus.add("n0", "vdpasim_net", DevSetConfig(mac=bytes.fromhex("020000000007")))
    device = vdev.device
    assert isinstance(device, NetDevice)
    memory = GuestMemory(4 << 20)
    driver = NetDriver(device, memory)
    try:
        driver.initialize()
        for seq in range(5):
            frame = ethernet(device.mac, b"\x02\0\0\0\0\x01", 0x88B5, bytes([seq]) + bytes(45))
            driver.post_rx(0, 1)
            driver.send(0, [frame])
            driver.receive(0, 1, timeout=60)
        bus.checkpoint()
        saved = read_state(runtime.path / "n0.state", runtime_dir=runtime.path)
        assert saved.status & c.VIRTIO_CONFIG_S_DRIVER_OK and saved.mac == "02:00:00:00:00:07"
        assert saved.queues[1]["packets"] == 5 and saved.queues[1]["last_avail"] == 5
        bus.close()  # a dead daemon's last checkpoint
    finally:
        driver.close()
        memory.close()

    # Restarted twice before any front-end came back: the second daemon still knows where the rings were.
    bus = DaemonBus(runtime)
    assert bus.restore() == ["n0"]
    bus, restored = _restart(bus, runtime)
    assert restored == ["n0"]
    state = read_state(runtime.path / "n0.state")
    assert state.restarts == 2 and state.status & c.VIRTIO_CONFIG_S_DRIVER_OK and state.queues[1]["last_avail"] == 5
    vdev = bus.get("n0")
    assert vdev.vhost_vdpa_node == "/dev/vhost-vdpa-0" and vdev.vhost_user_path.endswith("n0.vhost-user.sock")
    device = vdev.device
    assert isinstance(device, NetDevice) and device.mac == bytes.fromhex("020000000007")
    assert bus.vstats("n0", 1, any_status=True).values == (
        ("tx packets", 5), ("tx bytes", 5 * 60), ("tx errors", 0), ("tx drops", 0), ("tx restart drops", 0),
    )  # fmt: skip
    # The front-end reconnects: its TX ring is 3 frames further on than the state file says.
    device.set_vq_state(1, SplitState(8))
    device.set_vq_state(1, SplitState(9))  # only the first SET_VRING_BASE after the restart counts
    stats = dict(bus.vstats("n0", 1, any_status=True).values)
    assert (stats["tx restart drops"], stats["tx drops"], stats["tx packets"]) == (3, 3, 5)
    bus.checkpoint()
    assert read_state(runtime.path / "n0.state").queues[1]["restart_drops"] == 3
    bus.delete("n0")
    assert not (runtime.path / "n0.state").exists()
    bus.close()


def test_a_ram_disk_keeps_its_bytes(runtime: RuntimeDir) -> None:
    bus = DaemonBus(runtime)
    vdev = bus.add("b0", "vdpasim_blk", DevSetConfig(extension={"capacity": 2048}))
    assert isinstance(vdev.device, BlkDevice)
    vdev.device.write_disk(4096, b"kept across restarts")
    assert (runtime.path / "b0.ramdisk").stat().st_size == 2048 * 512
    bus, restored = _restart(bus, runtime)
    assert restored == ["b0"]
    device = bus.get("b0").device
    assert isinstance(device, BlkDevice) and device.read_disk(4096, 20) == b"kept across restarts"
    bus.delete("b0")
    assert not (runtime.path / "b0.ramdisk").exists()
    bus.add("b0", "vdpasim_blk", DevSetConfig(extension={"capacity": 2048}))  # a new disk starts zeroed
    assert bus.get("b0").device.read_disk(4096, 20) == bytes(20)  # type: ignore[attr-defined]
    bus.close()


def test_a_device_whose_disk_is_gone_is_refused_and_the_others_come_back(
    runtime: RuntimeDir, caplog: pytest.LogCaptureFixture
) -> None:
    bus = DaemonBus(runtime)
    bus.add("b1", "vdpasim_blk", DevSetConfig(extension={"capacity": 64}))
    bus.add("n1", "vdpasim_net")
    bus.close()
    (runtime.path / "b1.ramdisk").unlink()
    again = DaemonBus(runtime)
    assert again.restore() == ["n1"]
    assert "state file" in caplog.text and "cannot re-create device 'b1'" in caplog.text
    assert "b1.ramdisk: No such file or directory" in caplog.text
    assert (runtime.path / "b1.state.refused").exists()
    again.close()
