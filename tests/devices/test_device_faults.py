"""Every malformed-chain case, fed to a running device: NEEDS_RESET, a log line naming the problem, and life goes on.

The layouts are the ones of tests/unit/test_malformed_chains.py, placed on the transmit queue of a
virtio-net device whose data-path thread serves real eventfd kicks. The device must stop serving,
set NEEDS_RESET, signal a config change, log what was wrong, keep its thread alive, and work again
after a reset; a second device beside it never notices.
"""

from __future__ import annotations

import logging
import os
import select
import time

import pytest

from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.testing.driver import DriverQueue, GuestMemory
from vdpasim.testing.malformed import CASES, MEM, RO, SIZE, Case, Setup
from vdpasim.testing.net import NetHarness, ethernet
from vdpasim.virtio import constants as c

UP = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER


def _start(device: NetDevice, memory: GuestMemory, queues: list[DriverQueue], features: int) -> list[int]:
    device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    device.set_status(UP)
    device.set_driver_features(features)
    device.set_status(UP | c.VIRTIO_CONFIG_S_FEATURES_OK)
    device.set_map(memory.table)
    kicks = []
    for idx, dq in enumerate(queues):
        kicks.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        device.set_vq_num(idx, dq.size)
        device.set_vq_address(idx, dq.desc_addr, dq.driver_addr, dq.device_addr)
        device.set_vq_kick(idx, kicks[-1])
        device.set_vq_ready(idx, True)
    device.set_status(UP | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
    return kicks


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_chain_puts_the_device_in_needs_reset(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="vdpasim.device")
    memory = GuestMemory(MEM, case.guest_addr, extra_regions=[(RO, 0x1000, False)])
    rx = DriverQueue(memory, SIZE, packed=case.packed, indirect=case.indirect)
    tx = DriverQueue(memory, SIZE, packed=case.packed, indirect=case.indirect)
    status, index, addr = case.build(Setup(memory, tx))
    device = NetDevice(NetConfig(name="bad"))
    config_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    device.set_config_cb(config_call)
    kicks: list[int] = []
    with NetHarness() as others:
        good, driver = others.add("good")
        try:
            kicks = _start(device, memory, [rx, tx], tx.features)
            os.eventfd_write(kicks[1], 1)

            deadline = time.monotonic() + 30
            while not device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET and time.monotonic() < deadline:
                time.sleep(0.01)

            assert device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
            expected = f"vq 1: {status.description} (descriptor {index}, address {addr:#x})"
            assert str(device.fault) == expected
            assert f"device needs reset: {expected}" in caplog.text
            assert select.select([config_call], [], [], 5)[0], "no config-change interrupt"
            assert device.datapath.error is None  # the thread lives on
            assert device.vstats(1)["tx packets"] == 0  # nothing was consumed

            # The other device never noticed.
            frame = ethernet(good.config.mac, b"\x02\0\0\0\0\x09", 0x88B5, b"still here" * 8)
            driver.post_rx(0, 1)
            driver.send(0, [frame])
            assert [r.frame for r in driver.receive(0, 1)] == [frame]

            # A reset clears the condition.
            device.reset()
            assert device.get_status() == 0 and device.fault is None
        finally:
            device.close()
            for fd in (*kicks, config_call):
                os.close(fd)
            memory.close()
