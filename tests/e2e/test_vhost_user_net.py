"""A real QEMU 7.2 (TCG) guest drives simulated virtio-net devices over vhost-user.

Each test is one boot of the test guest (vdpasim/guest) with one net device served in this process
(vdpasim.testing.vhost_user): the guest's own virtio_net driver and QEMU's vhost-user front-end on one
side, the vdpasim back-end and device model on the other. What the guest reports (ping replies,
frames that came back, its interface counters) is compared with what the device counted, exactly.
Every run must also leave QEMU's log free of vhost errors and the back-end's log free of warnings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpasim.config import NetConfig
from vdpasim.guest import GuestImage, build_guest
from vdpasim.testing.vhost_user import VhostUserRig, assert_counters_agree, assert_loopback
from vdpasim.virtio import constants as c

MAC = "52:54:00:5e:00:01"  # QEMU's NIC and the device's receive filter must agree (docs/vhost-user.md)
PEER_IP = "10.0.0.2"
GUEST_ADDR = "10.0.0.1/24"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


def _has(features: str, bit: int) -> bool:
    """Whether the guest negotiated ``bit``: sysfs shows a virtio device's features as '0'/'1', bit 0 first."""
    return features[bit] == "1"


def test_guest_pings_the_responder(image: GuestImage, tmp_path: Path) -> None:
    count = 20
    with VhostUserRig(image, tmp_path) as rig:
        rig.add_net(NetConfig(name="vu-ping", mode="responder", peer_ip=PEER_IP, mac=MAC))
        run = rig.run("ping", {"peer": PEER_IP, "addr": GUEST_ADDR, "count": count, "interval": 0.1})
    run.check()

    ping = run.result("ping")
    assert (ping["transmitted"], ping["received"], ping["loss_pct"], ping["rc"]) == (count, count, 0, 0)
    netstats = run.result("netstats")
    assert netstats["carrier"] == 1 and netstats["address"] == MAC  # the link came up with QEMU's MAC
    assert netstats["rx_queues"] == netstats["tx_queues"] == 1
    stats = netstats["stats"]
    assert stats["tx_packets"] >= count + 1  # the echo requests and at least one ARP request
    assert_counters_agree(run, "vu-ping", stats)
    assert run.vstats["vu-ping"][0]["rx drops"] == 0  # every frame from the peer was for the guest
    assert run.vhost_lines == [] and run.backend_log == []


# (ring layout, EVENT_IDX): every combination the device and QEMU 7.2 can negotiate.
LAYOUTS = [
    pytest.param(False, True, id="split-event_idx"),
    pytest.param(False, False, id="split-no_event_idx"),
    pytest.param(True, True, id="packed-event_idx"),
    pytest.param(True, False, id="packed-no_event_idx"),
]


@pytest.mark.parametrize(("packed", "event_idx"), LAYOUTS)
def test_loopback_returns_exactly_the_frames_the_filter_passes(
    image: GuestImage, tmp_path: Path, packed: bool, event_idx: bool
) -> None:
    count, seed = 30, 7 + 2 * packed + event_idx
    with VhostUserRig(image, tmp_path) as rig:
        rig.add_net(NetConfig(name="vu-loop", mac=MAC), packed=packed, event_idx=event_idx)
        # Foreign-MAC frames never come back: the workload waits its timeout for them, keep it short.
        run = rig.run("net-loopback", {"count": count, "seed": seed, "timeout_ms": 1500})
    run.check()

    netstats = run.result("netstats")
    features = netstats["features"]
    assert _has(features, c.VIRTIO_F_RING_PACKED) is packed
    assert _has(features, c.VIRTIO_RING_F_EVENT_IDX) is event_idx
    loop = run.result("net-loopback")
    assert_loopback(loop, MAC, count, seed)
    assert_counters_agree(run, "vu-loop", netstats["stats"])
    vstats = run.vstats["vu-loop"]
    assert vstats[0]["rx drops"] == count // 3  # the device's filter dropped the foreign-MAC frames
    assert run.vhost_lines == [] and run.backend_log == []


def test_two_queue_pairs_chosen_through_the_control_queue(image: GuestImage, tmp_path: Path) -> None:
    """MQ: QEMU runs the control queue; the guest's pair count reaches the back-end as SET_VRING_ENABLE.

    The guest sets 2 combined channels (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on QEMU's control queue) and
    sends from CPU 1, which XPS maps to transmit queue 1: every frame must travel on pair 1, which the
    back-end serves only once QEMU has enabled its rings.
    """
    count, seed = 30, 11
    with VhostUserRig(image, tmp_path) as rig:
        rig.add_net(NetConfig(name="vu-mq", mac=MAC, max_vqp=2))
        run = rig.run("net-loopback", {"count": count, "seed": seed, "timeout_ms": 1500, "queues": 2, "cpu": 1})
    run.check()

    channels = run.result("channels")
    assert (channels["max_combined"], channels["combined"]) == (2, 2)
    netstats = run.result("netstats")
    assert netstats["rx_queues"] == netstats["tx_queues"] == 2
    assert _has(netstats["features"], c.VIRTIO_NET_F_MQ) and _has(netstats["features"], c.VIRTIO_NET_F_CTRL_VQ)
    assert_loopback(run.result("net-loopback"), MAC, count, seed)
    assert_counters_agree(run, "vu-mq", netstats["stats"])
    vstats = run.vstats["vu-mq"]
    assert vstats[3]["tx packets"] == count and vstats[1]["tx packets"] == 0
    assert vstats[2]["rx packets"] == count - count // 3 and vstats[0]["rx packets"] == 0
    assert vstats[4]["cvq requests"] == 0  # the device's own control queue stays unused (QEMU runs it)
    assert run.vhost_lines == [] and run.backend_log == []
