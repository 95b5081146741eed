"""virtio-net device: loopback filter, mergeable RX, overruns, responder, MQ, config space and vstats.

Every case drives a real NetDevice through the device operations: rings in one memfd, the device's
data-path thread woken by kick eventfds, the test as the driver reading call eventfds.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
import time

import pytest

from vdpasim.config import NET_SUPPORTED_FEATURES
from vdpasim.devices.net import NET_CONFIG_SIZE
from vdpasim.errors import DeviceRequestError
from vdpasim.testing.net import BROADCAST, NetHarness, arp_request, ethernet, icmp_echo_request, inet_checksum
from vdpasim.virtio import constants as c

OTHER = bytes.fromhex("020000000099")  # a unicast MAC that is not the device's
GUEST_IP = ipaddress.IPv4Address("10.0.0.2").packed
PEER_IP = "10.0.0.1"
PEER_MAC = bytes.fromhex("02aabbccddee")
LAYOUTS = [
    pytest.param(False, False, id="split"),
    pytest.param(False, True, id="split-event_idx"),
    pytest.param(True, False, id="packed"),
    pytest.param(True, True, id="packed-event_idx"),
]


@pytest.fixture
def net():
    with NetHarness() as harness:
        yield harness


def frame_to(dst: bytes, tag: int, size: int = 60) -> bytes:
    return ethernet(dst, OTHER, 0x88B5, bytes([tag]) * (size - 14))


def without(*bits: int) -> int:
    return NET_SUPPORTED_FEATURES & ~sum(1 << b for b in (*bits, c.VIRTIO_F_RING_PACKED, c.VIRTIO_RING_F_EVENT_IDX))


def test_config_space_layout(net: NetHarness) -> None:
    dev, _ = net.add(mac="02:12:34:56:78:9a", mtu=9000, max_vqp=4)
    assert dev.get_config_size() == NET_CONFIG_SIZE == 12
    mac, status, pairs, mtu = struct.unpack("<6sHHH", dev.get_config(0, 12))
    assert (mac, status, pairs, mtu) == (bytes.fromhex("02123456789a"), c.VIRTIO_NET_S_LINK_UP, 4, 9000)
    assert dev.get_config(10, 2) == struct.pack("<H", 9000)
    with pytest.raises(DeviceRequestError, match="outside the 12-byte config space"):
        dev.get_config(8, 6)


def test_config_write_sets_only_the_mac(net: NetHarness) -> None:
    """Legacy drivers and QEMU's vhost-vdpa write the MAC into config space; the rest is read-only."""
    dev, drv = net.add()
    generation = dev.get_generation()
    dev.set_config(0, bytes.fromhex("020000c0ffee") + struct.pack("<HHH", 0, 7, 100))
    assert dev.get_config(0, 12) == bytes.fromhex("020000c0ffee") + struct.pack("<HHH", 1, 1, 1500)
    assert dev.get_generation() == generation + 1
    dev.set_config(6, b"\0\0")  # same MAC: nothing changes
    assert dev.get_generation() == generation + 1
    drv.post_rx(0, 2)
    drv.send(0, [frame_to(bytes.fromhex("020000c0ffee"), 5)])
    assert drv.receive(0, 1)[0].frame[14] == 5
    with pytest.raises(DeviceRequestError, match="config write 10\\+4 is outside the 12-byte config space"):
        dev.set_config(10, b"abcd")


@pytest.mark.parametrize(("packed", "event_idx"), LAYOUTS)
def test_loopback_filter_and_vstats(net: NetHarness, packed: bool, event_idx: bool) -> None:
    dev, drv = net.add(packed=packed, event_idx=event_idx)
    drv.post_rx(0, 8)
    multicast = bytes.fromhex("01005e000001")
    passing = [frame_to(dev.mac, 1), frame_to(BROADCAST, 2, 100), frame_to(multicast, 3, 1514)]
    dropped = frame_to(OTHER, 4)
    runt = dev.mac + OTHER[:4]  # shorter than an Ethernet header
    drv.send(0, [passing[0], dropped, passing[1], runt, passing[2]])

    used = drv.wait_used(drv.tx(0), 5)
    assert sorted(u.id for u in used) == sorted(set(u.id for u in used))  # each TX buffer once
    assert all(u.len == 0 for u in used)
    received = drv.receive(0, 3)
    assert [r.frame for r in received] == passing  # byte for byte, in order
    assert all(r.header == bytes(10) + b"\x01\x00" for r in received)  # v1 header, num_buffers 1
    assert drv.poll_used(drv.rx(0)) == []
    assert dev.vstats(0) == {
        "rx packets": 3,
        "rx bytes": sum(map(len, passing)),
        "rx errors": 0,
        "rx overruns": 0,
        "rx drops": 1,
    }
    assert dev.vstats(1) == {
        "tx packets": 4,
        "tx bytes": sum(map(len, passing)) + len(dropped),
        "tx errors": 1,
        "tx drops": 0,
    }
    assert dev.vstats(2) == {"cvq requests": 0, "cvq successes": 0, "cvq errors": 0}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_mergeable_rx_buffers(net: NetHarness, packed: bool) -> None:
    dev, drv = net.add(packed=packed)
    assert drv.has(c.VIRTIO_NET_F_MRG_RXBUF)
    drv.post_rx(0, 16, size=128)
    frame = ethernet(dev.mac, OTHER, 0x88B5, bytes(range(256)) * 4)[:1000]
    drv.send(0, [frame])
    (got,) = drv.receive(0, 1)
    assert got.frame == frame
    assert got.num_buffers == -(-(1000 + 12) // 128) == 8
    assert dev.vstats(0)["rx packets"] == 1
    assert dev.vstats(0)["rx bytes"] == 1000


def test_without_mergeable_rx_a_large_frame_is_truncated(net: NetHarness) -> None:
    dev, drv = net.add(features=without(c.VIRTIO_NET_F_MRG_RXBUF))
    drv.post_rx(0, 4, size=128)
    frame = frame_to(dev.mac, 7, 1000)
    drv.send(0, [frame])
    (got,) = drv.receive(0, 1)
    assert got.frame == frame[: 128 - 12]
    assert got.num_buffers == 1
    assert dev.vstats(0)["rx errors"] == 1


def test_rx_header_spanning_descriptors(net: NetHarness) -> None:
    """num_buffers lands in the right bytes when the header is split over two writable descriptors."""
    dev, drv = net.add()
    drv.post_rx(0, 4, segments=(6, 6, 100))
    frame = frame_to(dev.mac, 9, 200)  # 212 bytes with the header: two chains of 112
    drv.send(0, [frame])
    (got,) = drv.receive(0, 1)
    assert got.num_buffers == 2
    assert got.header == bytes(10) + b"\x02\x00"
    assert got.frame == frame


def test_tx_frame_in_indirect_and_split_descriptors(net: NetHarness) -> None:
    dev, drv = net.add()
    drv.post_rx(0, 4)
    frames = [frame_to(dev.mac, 1), frame_to(dev.mac, 2, 300)]
    drv.send(0, frames[:1], indirect=True)
    drv.send(0, frames[1:], split_header=True)
    assert [r.frame for r in drv.receive(0, 2)] == frames


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_overrun_without_rx_buffers_then_recovery(net: NetHarness, packed: bool) -> None:
    dev, drv = net.add(packed=packed)
    frames = [frame_to(dev.mac, i) for i in range(3)]
    drv.send(0, frames)
    drv.wait_used(drv.tx(0), 1)  # the first frame found no RX buffer: dropped, its TX buffer returned
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # let the device settle: it must stop, not spin on the overrun
        time.sleep(0.05)
    overruns = dev.vstats(0)["rx overruns"]
    assert overruns >= 1
    assert len(drv.poll_used(drv.tx(0))) == overruns - 1  # one TX buffer back per overrun, no more
    drv.post_rx(0, 4)  # the RX kick restarts the pair
    delivered = drv.receive(0, 3 - overruns)
    assert [r.frame for r in delivered] == frames[overruns:]
    drv.wait_used(drv.tx(0), 3 - overruns)
    assert dev.vstats(0)["rx packets"] == 3 - overruns
    assert dev.vstats(1)["tx packets"] == 3


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_responder_answers_arp_and_ping(net: NetHarness, packed: bool) -> None:
    dev, drv = net.add(packed=packed, mode="responder", peer_ip=PEER_IP, peer_mac=PEER_MAC.hex(":"))
    guest = dev.mac
    peer_ip = ipaddress.IPv4Address(PEER_IP).packed
    drv.post_rx(0, 8)
    payload = bytes(range(56))
    bad_ping = bytearray(icmp_echo_request(guest, PEER_MAC, GUEST_IP, peer_ip, 7, 2, payload))
    bad_ping[-1] ^= 0xFF  # ICMP checksum no longer matches
    drv.send(
        0,
        [
            arp_request(guest, GUEST_IP, bytes([10, 0, 0, 9])),  # someone else: no answer
            arp_request(guest, GUEST_IP, peer_ip),
            bytes(bad_ping),
            icmp_echo_request(guest, PEER_MAC, GUEST_IP, peer_ip, 0x4242, 1, payload),
        ],
    )
    arp, pong = (r.frame for r in drv.receive(0, 2))

    # ARP reply (RFC 826): to the guest, from the peer, "PEER_IP is at PEER_MAC".
    assert arp[:6] == guest and arp[6:12] == PEER_MAC and arp[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", arp[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert arp[22:28] == PEER_MAC and arp[28:32] == peer_ip
    assert arp[32:38] == guest and arp[38:42] == GUEST_IP

    # ICMP echo reply: addresses swapped, checksums valid, identifier, sequence and data echoed.
    assert pong[:6] == guest and pong[6:12] == PEER_MAC and pong[12:14] == b"\x08\x00"
    ip = pong[14:34]
    version_ihl, _, total_len, _, _, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
    assert (version_ihl, proto, src, dst) == (0x45, 1, peer_ip, GUEST_IP)
    assert total_len == 20 + 8 + len(payload) == len(pong) - 14
    assert ttl > 0
    assert inet_checksum(ip) == 0
    icmp = pong[34:]
    assert icmp[0] == 0 and icmp[1] == 0  # echo reply
    assert struct.unpack("!HH", icmp[4:8]) == (0x4242, 1)
    assert icmp[8:] == payload
    assert inet_checksum(icmp) == 0

    drv.wait_used(drv.tx(0), 4)
    assert dev.vstats(1)["tx packets"] == 4
    assert dev.vstats(0)["rx packets"] == 2
    assert drv.poll_used(drv.rx(0)) == []


def test_multiqueue_after_vq_pairs_set(net: NetHarness) -> None:
    dev, drv = net.add(max_vqp=2)
    assert drv.pairs == 2 and drv.cvq == 4
    for pair in (0, 1):
        drv.post_rx(pair, 4)
    early = frame_to(dev.mac, 1)
    drv.send(1, [early])
    time.sleep(0.2)
    assert drv.poll_used(drv.tx(1)) == []  # only pair 0 is served until the driver asks for more (§5.1.6.5.5)

    assert drv.ctrl(c.VIRTIO_NET_CTRL_MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == c.VIRTIO_NET_OK
    assert [r.frame for r in drv.receive(1, 1)] == [early]
    drv.send(0, [frame_to(dev.mac, 2)])
    drv.send(1, [frame_to(dev.mac, 3)])
    assert drv.receive(0, 1)[0].frame[14] == 2
    assert drv.receive(1, 1)[0].frame[14] == 3
    assert dev.vstats(2)["rx packets"] == 2 and dev.vstats(3)["tx packets"] == 2
    assert dev.vstats(0)["rx packets"] == 1 and dev.vstats(1)["tx packets"] == 1
    assert dev.vstats(4) == {"cvq requests": 1, "cvq successes": 1, "cvq errors": 0}
    assert len(drv.wait_used(drv.tx(1), 2)) == 2

    for bad in (0, 3):
        assert drv.ctrl(c.VIRTIO_NET_CTRL_MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", bad)) == 1
    assert drv.ctrl(c.VIRTIO_NET_CTRL_MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == 0
    drv.send(1, [frame_to(dev.mac, 4)])
    time.sleep(0.2)
    assert drv.poll_used(drv.tx(1)) == []  # pair 1 is no longer served
    assert dev.vstats(4) == {"cvq requests": 4, "cvq successes": 2, "cvq errors": 2}


def test_control_queue_is_queue_two_without_mq(net: NetHarness) -> None:
    dev, drv = net.add(max_vqp=2, features=without(c.VIRTIO_NET_F_MQ))
    assert drv.cvq == 2
    assert dev.cvq_index == 2 and dev.queue_role(2) == "cvq" and dev.queue_role(3) == "tx"
    assert drv.ctrl(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER) == c.VIRTIO_NET_OK
    assert dev.vstats(2) == {"cvq requests": 1, "cvq successes": 1, "cvq errors": 0}
    with pytest.raises(DeviceRequestError) as info:
        dev.vstats(4)
    assert info.value.errno == errno.EINVAL


def test_vstats_bad_index_is_einval(net: NetHarness) -> None:
    dev, _ = net.add(start=False)
    for qidx in (-1, 3, 1000):
        with pytest.raises(DeviceRequestError, match=f"no queue {qidx}") as info:
            dev.vstats(qidx)
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_event_idx_kicks_and_interrupts(net: NetHarness, packed: bool) -> None:
    dev, drv = net.add(packed=packed, event_idx=True)
    rx = drv.queues[drv.rx(0)]
    drv.post_rx(0, 8)
    drv.send(0, [frame_to(dev.mac, 1)])
    assert drv.wait_call(drv.rx(0), 10)  # the first used buffer interrupts
    drv.receive(0, 1)
    drv.wait_used(drv.tx(0), 1)
    # The device asked to be kicked at its next available position (avail_event / off_wrap).
    deadline = time.monotonic() + 5
    tx = drv.queues[drv.tx(0)]
    want = tx.avail_idx if not packed else tx.next_avail | tx.avail_wrap << 15
    while tx.avail_event() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tx.avail_event() == want

    # The driver asks for an interrupt only after two more RX buffers are used.
    if packed:
        rx.set_used_event(rx.next_used + 1, rx.used_wrap)
    else:
        rx.set_used_event(rx.last_used + 1)
    drv.send(0, [frame_to(dev.mac, 2)])
    drv.wait_used(drv.tx(0), 1)
    assert not drv.wait_call(drv.rx(0), 0.2)  # suppressed
    drv.send(0, [frame_to(dev.mac, 3)])
    assert drv.wait_call(drv.rx(0), 10)
    assert [r.frame[14] for r in drv.receive(0, 2)] == [2, 3]


def test_management_set_mac(net: NetHarness) -> None:
    dev, drv = net.add()
    config_call = drv.call_fds[drv.rx(0)]  # any eventfd: only its counter matters here
    dev.set_config_cb(config_call)
    generation = dev.get_generation()
    old = dev.mac
    new = bytes.fromhex("02feedc0ffee")
    dev.set_mac("02:fe:ed:c0:ff:ee")
    assert dev.get_config(0, 6) == new and dev.mac == new
    assert dev.get_generation() == generation + 1
    assert drv.wait_call(drv.rx(0), 1)
    drv.post_rx(0, 4)
    drv.send(0, [frame_to(old, 1), frame_to(new, 2)])
    assert [r.frame[14] for r in drv.receive(0, 1)] == [2]
    assert dev.vstats(0)["rx drops"] == 1
    with pytest.raises(DeviceRequestError, match="multicast"):
        dev.set_mac("03:00:00:00:00:01")
    dev.reset()
    assert dev.mac == new  # the management MAC survives a reset
