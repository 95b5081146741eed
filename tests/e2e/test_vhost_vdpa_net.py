"""A real QEMU 7.2 (TCG) guest drives a simulated virtio-net device over vhost-vdpa, kernel bypassed.

QEMU runs under the seccomp supervisor with ``-netdev vhost-vdpa,vhostdev=/dev/vhost-vdpa-N``; every
ioctl and IOTLB write it makes on that node is answered by VhostVdpaServer (the kernel's semantics)
stacked on a vhost-user client of the device's socket (bridge/bypass.py). The guest's own virtio_net
driver pings the device's responder; QEMU's log must stay free of vhost errors (a refused IOTLB UPDATE
of its ROMs, say, would show there) and the bridge must have refused nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpasim.config import NetConfig
from vdpasim.guest import GuestImage, build_guest
from vdpasim.testing.vhost_user import VhostUserRig, assert_counters_agree

MAC = "52:54:00:5e:00:01"
PEER_IP = "10.0.0.2"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


def test_guest_pings_the_responder_over_vhost_vdpa(image: GuestImage, tmp_path: Path) -> None:
    count = 10
    with VhostUserRig(image, tmp_path, transport="vhost-vdpa") as rig:
        rig.add_net(NetConfig(name="vv-ping", mode="responder", peer_ip=PEER_IP, mac=MAC))
        run = rig.run("ping", {"peer": PEER_IP, "addr": "10.0.0.1/24", "count": count, "interval": 0.1})
        servers = [server for node in rig.nodes.values() for server in node.servers]
    run.check()

    ping = run.result("ping")
    assert (ping["transmitted"], ping["received"], ping["rc"]) == (count, count, 0)
    assert_counters_agree(run, "vv-ping", run.result("netstats")["stats"])
    assert run.vhost_lines == [] and run.backend_log == []
    (server,) = servers
    stats = server.stats
    assert stats.failures == 0 and server.closed
    assert stats.updates >= 2 and stats.commits >= 1  # QEMU's IOTLB batch reached the device
    assert stats.requests["SET_VRING_KICK"] >= 2 and stats.requests["VDPA_SET_STATUS"] >= 3
