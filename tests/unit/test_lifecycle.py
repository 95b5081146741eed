"""Device life cycle through a net device: feature negotiation, the status machine, reset, NEEDS_RESET.

Exercises devices/core.py (the operations every device type shares) with real rings, eventfds and
the data-path thread, and config.py (the validated NetConfig every device is built from).
"""

from __future__ import annotations

import logging
import os
import struct

import pytest

from vdpasim.config import NET_SUPPORTED_FEATURES, NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.errors import DeviceRequestError
from vdpasim.rings.state import SplitState
from vdpasim.testing.net import NetDriver, NetHarness, ethernet
from vdpasim.virtio import constants as c

ACK, DRIVER = c.VIRTIO_CONFIG_S_ACKNOWLEDGE, c.VIRTIO_CONFIG_S_DRIVER
FEATURES_OK, DRIVER_OK = c.VIRTIO_CONFIG_S_FEATURES_OK, c.VIRTIO_CONFIG_S_DRIVER_OK
NEEDS_RESET, FAILED = c.VIRTIO_CONFIG_S_NEEDS_RESET, c.VIRTIO_CONFIG_S_FAILED
SRC = bytes.fromhex("020000000077")


@pytest.fixture
def net():
    with NetHarness() as harness:
        yield harness


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


BASIC = bits(c.VIRTIO_F_VERSION_1, c.VIRTIO_F_ACCESS_PLATFORM, c.VIRTIO_NET_F_MAC)


def negotiate(dev: NetDevice, features: int) -> int:
    dev.set_status(ACK)
    dev.set_status(ACK | DRIVER)
    dev.set_driver_features(features)
    dev.set_status(ACK | DRIVER | FEATURES_OK)
    return dev.get_status()


def frames(dev: NetDevice, count: int, tag: int = 0) -> list[bytes]:
    return [ethernet(dev.mac, SRC, 0x88B5, bytes([tag, i]) * 30) for i in range(count)]


@pytest.mark.parametrize(
    ("features", "reason"),
    [
        (BASIC | bits(c.VIRTIO_NET_F_MQ), "VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ"),
        (BASIC | bits(c.VIRTIO_NET_F_CTRL_RX), "VIRTIO_NET_F_CTRL_RX requires VIRTIO_NET_F_CTRL_VQ"),
        (BASIC | bits(c.VIRTIO_NET_F_CSUM), "driver features VIRTIO_NET_F_CSUM were not offered"),
        (BASIC & ~bits(c.VIRTIO_F_VERSION_1), "did not accept VIRTIO_F_VERSION_1"),
    ],
)
def test_features_ok_refused(net: NetHarness, caplog: pytest.LogCaptureFixture, features: int, reason: str) -> None:
    dev, _ = net.add(start=False)
    with caplog.at_level(logging.WARNING, logger="vdpasim"):
        status = negotiate(dev, features)
    assert status == ACK | DRIVER  # read back without FEATURES_OK: the driver must give up (§3.1.1)
    assert reason in caplog.text
    with pytest.raises(DeviceRequestError, match="DRIVER_OK set before FEATURES_OK"):
        dev.set_status(ACK | DRIVER | DRIVER_OK)


def test_features_ok_accepted_and_frozen(net: NetHarness) -> None:
    dev, _ = net.add(start=False)
    wanted = BASIC | bits(c.VIRTIO_NET_F_CTRL_VQ, c.VIRTIO_NET_F_MQ)
    assert negotiate(dev, wanted) == ACK | DRIVER | FEATURES_OK
    assert dev.get_driver_features() == wanted
    with pytest.raises(DeviceRequestError, match="frozen"):
        dev.set_driver_features(BASIC)
    assert dev.cvq_index == 2  # max_vqp 1: 2 * 1 either way


def test_status_bits_cannot_be_cleared_or_skipped(net: NetHarness) -> None:
    dev, _ = net.add(start=False)
    with pytest.raises(DeviceRequestError, match="DRIVER set before ACKNOWLEDGE"):
        dev.set_status(DRIVER)
    negotiate(dev, BASIC)
    with pytest.raises(DeviceRequestError, match="clears FEATURES_OK; only a write of 0 clears bits"):
        dev.set_status(ACK | DRIVER)
    assert dev.get_status() == ACK | DRIVER | FEATURES_OK


def test_offered_features_follow_the_config(net: NetHarness) -> None:
    dev, _ = net.add(start=False, max_vqp=2)
    assert dev.get_device_features() == NET_SUPPORTED_FEATURES
    assert dev.get_vq_count() == 5
    small, _ = net.add("small", start=False, device_features=BASIC)
    assert small.get_device_features() == BASIC
    assert small.get_vq_count() == 2  # no control queue offered
    assert negotiate(small, BASIC | bits(c.VIRTIO_NET_F_MTU)) == ACK | DRIVER  # MTU was not offered


def test_reset_clears_driver_state(net: NetHarness) -> None:
    dev, drv = net.add(max_vqp=2)
    configured = dev.mac
    drv.post_rx(0, 4)
    drv.send(0, frames(dev, 2))
    drv.receive(0, 2)
    assert drv.ctrl(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes.fromhex("02000000abcd")) == 0
    assert drv.ctrl(c.VIRTIO_NET_CTRL_MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == 0
    generation = dev.get_generation()

    dev.set_status(0)
    assert dev.get_status() == 0 and dev.get_driver_features() == 0
    assert dev.mac == configured and dev.get_config(0, 6) == configured
    assert dev.get_generation() == generation + 1  # the MAC in config space changed back
    assert dev.curr_queue_pairs == 1
    assert not any(dev.get_vq_ready(i) for i in range(dev.get_vq_count()))
    assert dev.get_vq_state(1) == SplitState(0)
    # vstats count for the device's lifetime, as vdpa_sim_net's do: a reset keeps them.
    assert dev.vstats(0)["rx packets"] == 2 and dev.vstats(4)["cvq requests"] == 2
    assert dev.datapath._thread is None  # data path stopped

    # A fresh driver brings it up again on new rings.
    again = NetDriver(dev, net.memory)
    try:
        again.initialize()
        again.post_rx(0, 2)
        again.send(0, frames(dev, 1, 9))
        assert again.receive(0, 1)[0].frame[14] == 9
    finally:
        dev.reset()
        again.close()


def test_failed_stops_the_data_path(net: NetHarness) -> None:
    dev, drv = net.add()
    dev.set_status(dev.get_status() | FAILED)
    assert dev.get_status() & FAILED
    assert dev.datapath._thread is None
    drv.post_rx(0, 2)
    drv.send(0, frames(dev, 1))
    assert not drv.wait_call(drv.tx(0), 0.2)
    assert drv.poll_used(drv.tx(0)) == []


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_malformed_chain_sets_needs_reset_and_spares_other_devices(
    net: NetHarness, caplog: pytest.LogCaptureFixture, packed: bool
) -> None:
    bad, bad_drv = net.add("bad", packed=packed)
    good, good_drv = net.add("good", packed=packed)
    config_event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        bad.set_config_cb(config_event)
        tx = bad_drv.queues[bad_drv.tx(0)]
        with caplog.at_level(logging.ERROR, logger="vdpasim"):
            # A descriptor whose buffer lies far outside guest memory.
            head = tx.next_avail if packed else 0
            tx.write_desc(head, 0x7000_0000_0000, 64, 0, 0)
            tx.publish(head)
            bad_drv.kick(bad_drv.tx(0), force=True)
            good_drv.post_rx(0, 4)
            good_drv.send(0, frames(good, 3))
            assert [r.frame for r in good_drv.receive(0, 3)] == frames(good, 3)
            for _ in range(200):
                if bad.get_status() & NEEDS_RESET:
                    break
                good_drv.wait_call(good_drv.rx(0), 0.01)
        assert bad.get_status() & NEEDS_RESET
        assert "bad" in caplog.text and "needs reset" in caplog.text
        assert "vq 1: address outside guest memory" in caplog.text
        assert "0x700000000000" in caplog.text
        assert os.eventfd_read(config_event) >= 1  # the driver is told through a config interrupt
        assert not good.get_status() & NEEDS_RESET
        # The broken device serves nothing more until reset; the good one carries on.
        bad_drv.post_rx(0, 2)
        assert bad_drv.poll_used(bad_drv.rx(0)) == []
        good_drv.send(0, frames(good, 1, 5))
        assert good_drv.receive(0, 1)[0].frame[14] == 5
        # A reset clears the condition and the fault.
        bad.reset()
        assert bad.get_status() == 0 and bad.fault is None
    finally:
        os.close(config_event)


def test_suspend_is_idempotent_and_reset_resumes(net: NetHarness) -> None:
    dev, drv = net.add()
    dev.suspend()
    dev.suspend()
    assert dev.suspended
    drv.post_rx(0, 2)
    drv.send(0, frames(dev, 1))
    assert not drv.wait_call(drv.rx(0), 0.2)  # the kick waits in its eventfd
    dev.resume()
    assert not dev.suspended
    assert drv.receive(0, 1)[0].frame == frames(dev, 1)[0]
    dev.suspend()
    dev.reset()  # a reset device is not suspended any more
    assert not dev.suspended
    again = NetDriver(dev, net.memory)
    try:
        again.initialize()
        again.post_rx(0, 2)
        again.send(0, frames(dev, 1, 3))
        assert again.receive(0, 1)[0].frame[14] == 3
    finally:
        dev.reset()
        again.close()


def test_config_validation() -> None:
    cfg = NetConfig.from_mapping({"name": "n1", "mac": "02:00:00:00:00:01", "mtu": "9000", "max_vqp": "4"})
    assert (cfg.mac, cfg.mtu, cfg.max_vqp) == (bytes.fromhex("020000000001"), 9000, 4)
    assert NetConfig.from_mapping(cfg.to_mapping()) == cfg
    assert NetConfig("n1", mac=bytes.fromhex("020000000001"), mtu=9000, max_vqp=4) == cfg  # netlink-style values
    assert NetConfig("x").mac == NetConfig("x").mac != NetConfig("y").mac  # stable derived MACs
    assert NetConfig("x").mac[0] == 0x02  # locally administered unicast
    bad = [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "n", "mac": "01:00:5e:00:00:01"}, "mac: 01:00:5e:00:00:01 is a multicast address"),
        ({"name": "n", "mac": "02:00:00:00:00"}, "is not a MAC address"),
        ({"name": "n", "mac": b"\x02\x00"}, "mac: 2 bytes, a MAC address has 6"),
        ({"name": "n", "mtu": 67}, "mtu: 67 is outside 68..65535"),
        ({"name": "n", "max_vqp": 0}, "max_vqp: 0 is outside"),
        ({"name": "n", "max_queue_size": 100}, "max_queue_size: 100 is not a power of two"),
        ({"name": "n", "mode": "bridge"}, "mode: 'bridge' is not one of loopback, responder"),
        ({"name": "n", "mode": "responder"}, "responder mode needs the peer's IPv4 address"),
        ({"name": "n", "peer_ip": "10.0.0.300"}, "peer_ip: '10.0.0.300' is not an IPv4 address"),
        ({"name": "n", "device_features": 1 << 0}, "VIRTIO_NET_F_CSUM not supported"),
        ({"name": "n", "device_features": BASIC & ~bits(c.VIRTIO_F_VERSION_1)}, "VIRTIO_F_VERSION_1 is required"),
        ({"name": "n", "device_features": BASIC | bits(c.VIRTIO_NET_F_MQ)}, "MQ requires VIRTIO_NET_F_CTRL_VQ"),
        ({"name": "n", "max_vqp": 2, "device_features": BASIC}, "2 queue pairs need VIRTIO_NET_F_MQ"),
        ({"name": "n", "busy_poll": "maybe"}, "busy_poll: 'maybe' is not a boolean"),
        ({"name": "n", "colour": "blue"}, "unknown field(s) colour"),
    ]
    for values, message in bad:
        with pytest.raises(DeviceRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            NetConfig.from_mapping(values)
