"""One device's failure never takes down another device of the same process (issue 6, isolation).

A data-path thread that crashes (the test-only fault hook of runner.DataPath stands in for a bug) stops
its own device only: that device goes NEEDS_RESET with a log line naming the crash, the other keeps
looping frames, and a reset of the crashed one (a driver starting it again) gives it a new thread.
A bad guest (a ring outside guest memory) is the same story through the device's NEEDS_RESET path.
"""

from __future__ import annotations

import logging
import time

import pytest

from vdpasim.devices.net import NetDevice
from vdpasim.testing.net import NetDriver, NetHarness, ethernet
from vdpasim.virtio import constants as c

PEER = b"\x02\0\0\0\0\x01"


def _loops(device: NetDevice, driver: NetDriver, seq: int) -> None:
    frame = ethernet(device.mac, PEER, 0x88B5, seq.to_bytes(2, "big") + bytes(44))
    driver.post_rx(0, 1)
    driver.send(0, [frame])
    [back] = driver.receive(0, 1, timeout=60)
    assert back.frame == frame


def _wait_status(device: NetDevice, bit: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not device.get_status() & bit:
        assert time.monotonic() < deadline, f"status {device.get_status():#x} never got {bit:#x}"
        time.sleep(0.01)


def test_a_crashed_data_path_thread_stops_its_device_only(caplog: pytest.LogCaptureFixture) -> None:
    with NetHarness() as harness:
        a, driver_a = harness.add("iso-a")
        b, driver_b = harness.add("iso-b")
        _loops(a, driver_a, 0)
        _loops(b, driver_b, 0)
        with caplog.at_level(logging.ERROR, logger="vdpasim"):
            a.datapath.inject_fault = RuntimeError("injected")
            a.datapath.wake()
            _wait_status(a, c.VIRTIO_CONFIG_S_NEEDS_RESET)
        assert "data path of iso-a stopped" in caplog.text
        assert "device needs reset: data-path thread crashed: RuntimeError('injected')" in caplog.text
        assert not a.driver_ok and isinstance(a.datapath.error, RuntimeError)
        for seq in range(1, 20):  # the other device never noticed
            _loops(b, driver_b, seq)
        assert not b.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET

        # The driver resets the crashed device and starts it again: a new thread serves it.
        driver_a.close()
        again = NetDriver(a, harness.memory)
        harness.made[0] = (a, again)  # the harness closes the new driver, not the old one twice
        again.initialize()
        assert a.driver_ok and a.fault is None
        _loops(a, again, 100)
        _loops(b, driver_b, 100)


def test_a_bad_guest_sets_needs_reset_on_its_device_only(caplog: pytest.LogCaptureFixture) -> None:
    with NetHarness() as harness:
        a, driver_a = harness.add("bad-a")
        b, driver_b = harness.add("bad-b")
        with caplog.at_level(logging.ERROR, logger="vdpasim"):
            a.set_vq_address(driver_a.tx(0), 1 << 40, 1 << 40, 1 << 40)  # rings outside guest memory
            _wait_status(a, c.VIRTIO_CONFIG_S_NEEDS_RESET)
        assert "bad-a" in caplog.text and "needs reset" in caplog.text
        for seq in range(10):
            _loops(b, driver_b, seq)
