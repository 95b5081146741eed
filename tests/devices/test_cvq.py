"""virtio-net control queue: command parsing (table-driven and fuzzed) and its effects through real rings."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpasim.config import NET_SUPPORTED_FEATURES
from vdpasim.devices.cvq import (
    MAX_REQUEST_BYTES,
    CtrlError,
    MacAddrSet,
    MacTableSet,
    RxFilter,
    RxModeSet,
    VqPairsSet,
    parse_ctrl,
)
from vdpasim.testing.net import NetHarness, ethernet
from vdpasim.virtio import constants as c

ALL = NET_SUPPORTED_FEATURES
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
MCAST = bytes.fromhex("01005e000001")
MCAST_OTHER = bytes.fromhex("3333000000fb")
SRC = bytes.fromhex("020000000077")
MAC, RX, MQ = c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_MQ


def table(*macs: bytes) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


def request(klass: int, command: int, data: bytes = b"") -> bytes:
    return bytes([klass, command]) + data


def without(*bits: int) -> int:
    return ALL & ~sum(1 << b for b in bits)


# ----- parsing -----
@pytest.mark.parametrize(
    ("raw", "command"),
    [
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A), MacAddrSet(MAC_A)),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table(MAC_A, MAC_B) + table(MCAST)), None),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + table()), MacTableSet((), ())),
        (request(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01"), RxModeSet(c.VIRTIO_NET_CTRL_RX_PROMISC, True)),
        (request(RX, c.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x00"), RxModeSet(c.VIRTIO_NET_CTRL_RX_ALLMULTI, False)),
        (request(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x04\x00"), VqPairsSet(4)),
    ],
)
def test_parse_valid_commands(raw: bytes, command: object) -> None:
    parsed = parse_ctrl(raw, ALL, 4)
    if command is None:
        assert parsed == MacTableSet((MAC_A, MAC_B), (MCAST,))
    else:
        assert parsed == command


@pytest.mark.parametrize(
    ("raw", "features", "message"),
    [
        (b"", ALL, "request of 0 bytes has no class and command"),
        (b"\x01", ALL, "request of 1 bytes has no class and command"),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A[:5]), ALL, "MAC_ADDR_SET: 5 data bytes, expected 6"),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A + b"\0"), ALL, "MAC_ADDR_SET: 7 data bytes"),
        (
            request(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A),
            without(c.VIRTIO_NET_F_CTRL_MAC_ADDR),
            "MAC_ADDR_SET needs VIRTIO_NET_F_CTRL_MAC_ADDR, which was not negotiated",
        ),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\x01\0"), ALL, "unicast table has no entry count"),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table()), ALL, "multicast table has no entry count"),
        (
            request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 3) + MAC_A + table()),
            ALL,
            "unicast table claims 3 entries, the request is too short",
        ),
        (
            request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + struct.pack("<I", 0xFFFFFFFF)),
            ALL,
            "multicast table claims 4294967295 entries",
        ),
        (request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + table() + b"x"), ALL, "1 bytes after the multicast"),
        (
            request(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + table()),
            without(c.VIRTIO_NET_F_CTRL_RX),
            "MAC_TABLE_SET needs VIRTIO_NET_F_CTRL_RX",
        ),
        (request(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b""), ALL, "RX PROMISC: 0 data bytes, expected 1"),
        (request(RX, c.VIRTIO_NET_CTRL_RX_ALLUNI, b"\x01"), ALL, "unsupported control command class 0 command 2"),
        (
            request(RX, c.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01"),
            without(c.VIRTIO_NET_F_CTRL_RX),
            "needs VIRTIO_NET_F_CTRL",
        ),
        (request(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x00\x00"), ALL, "0 pairs, the device has 1..4"),
        (request(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x05\x00"), ALL, "5 pairs, the device has 1..4"),
        (request(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01"), ALL, "MQ_VQ_PAIRS_SET: 1 data bytes, expected 2"),
        (
            request(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01\x00"),
            without(c.VIRTIO_NET_F_MQ),
            "MQ_VQ_PAIRS_SET needs VIRTIO_NET_F_MQ",
        ),
        (request(2, 0, b"\0\0"), ALL, "unsupported control command class 2 command 0"),  # VLAN: not offered
        (request(MQ, 1, b"\0"), ALL, "unsupported control command class 4 command 1"),  # RSS_CONFIG
    ],
)
def test_parse_refusals(raw: bytes, features: int, message: str) -> None:
    with pytest.raises(CtrlError, match=message.replace(".", r"\.")):
        parse_ctrl(raw, features, 4)


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=64), features=st.integers(0, (1 << 64) - 1), max_vqp=st.integers(1, 8))
def test_parse_fuzz_only_ctrl_errors(raw: bytes, features: int, max_vqp: int) -> None:
    try:
        command = parse_ctrl(raw, features, max_vqp)
    except CtrlError:
        return
    assert isinstance(command, MacAddrSet | MacTableSet | RxModeSet | VqPairsSet)
    if isinstance(command, VqPairsSet):
        assert 1 <= command.pairs <= max_vqp


@settings(max_examples=200, deadline=None)
@given(
    klass=st.sampled_from([MAC, RX, MQ]),
    command=st.integers(0, 6),
    body=st.binary(max_size=40),
)
def test_parse_fuzz_plausible_headers(klass: int, command: int, body: bytes) -> None:
    try:
        parse_ctrl(request(klass, command, body), ALL, 2)
    except CtrlError as error:
        assert str(error)


def test_rx_filter_apply() -> None:
    rx = RxFilter(MAC_A)
    assert (rx.promisc, rx.allmulti) == (False, True)  # vdpa_sim_net's default: every multicast passes
    rx.apply(RxModeSet(c.VIRTIO_NET_CTRL_RX_PROMISC, True))
    rx.apply(RxModeSet(c.VIRTIO_NET_CTRL_RX_ALLMULTI, False))
    rx.apply(MacTableSet((MAC_B,), (MCAST,)))
    rx.apply(MacAddrSet(MAC_B))
    assert rx == RxFilter(MAC_B, True, False, (MAC_B,), (MCAST,))


# ----- through the device -----
@pytest.fixture
def net():
    with NetHarness() as harness:
        yield harness


def frames_to(*dsts: bytes) -> list[bytes]:
    return [ethernet(dst, SRC, 0x88B5, bytes([i]) * 46) for i, dst in enumerate(dsts)]


def delivered(dev, drv, dsts: list[bytes]) -> list[bytes]:
    """Send one frame to each destination; the destinations the device delivered, in order."""
    before = dev.vstats(0)
    drv.send(0, frames_to(*dsts))
    drv.wait_used(drv.tx(0), len(dsts))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = dev.vstats(0)
        handled = after["rx packets"] + after["rx drops"] - before["rx packets"] - before["rx drops"]
        if handled == len(dsts):
            break
        time.sleep(0.005)
    count = dev.vstats(0)["rx packets"] - before["rx packets"]
    return [r.frame[:6] for r in drv.receive(0, count)]


def test_mac_addr_set_moves_filter_and_config(net: NetHarness) -> None:
    dev, drv = net.add()
    drv.post_rx(0, 16)
    old = dev.mac
    generation = dev.get_generation()
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A) == c.VIRTIO_NET_OK
    assert dev.get_config(0, 6) == MAC_A
    assert dev.get_generation() == generation + 1
    assert delivered(dev, drv, [old, MAC_A]) == [MAC_A]
    dev.reset()
    assert dev.mac == old  # a reset brings back the configured MAC


def test_mac_table_allmulti_and_promisc(net: NetHarness) -> None:
    dev, drv = net.add()
    drv.post_rx(0, 32)
    everyone = [dev.mac, MAC_A, MAC_B, MCAST, MCAST_OTHER, b"\xff" * 6]
    assert delivered(dev, drv, everyone) == [dev.mac, MCAST, MCAST_OTHER, b"\xff" * 6]

    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table(MAC_A) + table(MCAST)) == c.VIRTIO_NET_OK
    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x00") == c.VIRTIO_NET_OK
    assert delivered(dev, drv, everyone) == [dev.mac, MAC_A, MCAST, b"\xff" * 6]

    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == c.VIRTIO_NET_OK
    assert delivered(dev, drv, everyone) == everyone

    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00") == c.VIRTIO_NET_OK
    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01") == c.VIRTIO_NET_OK
    assert delivered(dev, drv, everyone) == [dev.mac, MAC_A, MCAST, MCAST_OTHER, b"\xff" * 6]
    assert dev.vstats(2) == {"cvq requests": 5, "cvq successes": 5, "cvq errors": 0}


def test_oversized_mac_table_receives_everything(net: NetHarness) -> None:
    dev, drv = net.add()
    drv.post_rx(0, 8)
    many = [bytes([2, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(100)]
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, table(*many) + table()) == c.VIRTIO_NET_OK
    assert delivered(dev, drv, [MAC_B]) == [MAC_B]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_bad_commands_get_err_and_are_counted(net: NetHarness, packed: bool) -> None:
    dev, drv = net.add(packed=packed)
    generation = dev.get_generation()
    assert drv.ctrl(9, 9) == c.VIRTIO_NET_ERR
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A[:3]) == c.VIRTIO_NET_ERR
    assert drv.ctrl(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02\x00") == c.VIRTIO_NET_ERR  # max_vqp is 1
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A, ack_bytes=0) is None  # nowhere to ack: not applied
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\0" * (MAX_REQUEST_BYTES + 1)) == c.VIRTIO_NET_ERR
    assert dev.vstats(2) == {"cvq requests": 5, "cvq successes": 0, "cvq errors": 5}
    assert dev.get_generation() == generation and dev.mac != MAC_A
    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == c.VIRTIO_NET_OK  # still serving
    assert dev.vstats(2)["cvq successes"] == 1
    assert not dev.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET


def test_commands_not_negotiated_are_refused(net: NetHarness) -> None:
    layout = (c.VIRTIO_F_RING_PACKED, c.VIRTIO_RING_F_EVENT_IDX)
    dev, drv = net.add(features=without(c.VIRTIO_NET_F_CTRL_RX, c.VIRTIO_NET_F_CTRL_MAC_ADDR, *layout))
    assert drv.ctrl(MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC_A) == c.VIRTIO_NET_ERR
    assert drv.ctrl(RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == c.VIRTIO_NET_ERR
    assert drv.ctrl(MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01\x00") == c.VIRTIO_NET_OK
    assert dev.vstats(2) == {"cvq requests": 3, "cvq successes": 1, "cvq errors": 2}


@settings(max_examples=60, deadline=None)
@given(bodies=st.lists(st.binary(min_size=0, max_size=24), min_size=1, max_size=6))
def test_fuzzed_requests_never_break_the_queue(bodies: list[bytes]) -> None:
    """Random request bytes: every one is acked OK or ERR, counted once, and the device stays healthy."""
    with NetHarness(4 << 20) as net:
        dev, drv = net.add(max_vqp=2)
        acks = [drv.ctrl(body[0] % 6 if body else 0, body[1] % 3 if len(body) > 1 else 0, body[2:]) for body in bodies]
        assert all(ack in (c.VIRTIO_NET_OK, c.VIRTIO_NET_ERR) for ack in acks)
        stats = dev.vstats(drv.cvq)
        assert stats["cvq requests"] == len(bodies)
        assert stats["cvq successes"] == acks.count(c.VIRTIO_NET_OK)
        assert stats["cvq errors"] == acks.count(c.VIRTIO_NET_ERR)
        assert not dev.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
