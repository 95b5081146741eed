"""An unmodified QEMU 7.2 attaches to simulated virtio-net devices through vhost-vdpa, on a kernel without vDPA.

QEMU runs under the bypass supervisor with the command line one would use on a real vDPA kernel
(``-netdev vhost-vdpa,vhostdev=/dev/vhost-vdpa-N``); each open of the node is a vhost-vdpa server bridged to
the device's vhost-user socket (bridge/bypass.py). The guest's results and the device's counters must be what
the vhost-user door gives (tests/e2e/test_vhost_user_net.py asserts the same things), and the device must
survive what a VMM does to it: stop/cont, system_reset, and a new QEMU process on the same node.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bridge.bypass import VhostVdpaNode
from bridge.supervisor.supervisor import Supervisor
from bridge.vhost_user.server import VhostUserServer
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.guest import GuestImage, build_guest
from vdpasim.guest.qemu import GuestVM
from vdpasim.testing.vhost_user import (
    VhostUserRig,
    assert_counters_agree,
    assert_loopback,
    vhost_lines,
    vhost_vdpa_net_args,
    warm_up,
)
from vdpasim.virtio import constants as c

MAC = "52:54:00:5e:00:02"
PEER_IP = "10.0.0.2"
GUEST_ADDR = "10.0.0.1/24"
NODE = "/dev/vhost-vdpa-0"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


def test_guest_pings_the_responder_over_vhost_vdpa(image: GuestImage, tmp_path: Path) -> None:
    count = 20
    with VhostUserRig(image, tmp_path, transport="vhost-vdpa") as rig:
        rig.add_net(NetConfig(name="vdpa-ping", mode="responder", peer_ip=PEER_IP, mac=MAC))
        run = rig.run("ping", {"peer": PEER_IP, "addr": GUEST_ADDR, "count": count, "interval": 0.1})
        node = rig.nodes[NODE]
        assert rig.supervisor is not None
        traps = rig.supervisor.calls
    run.check()

    ping = run.result("ping")
    assert (ping["transmitted"], ping["received"], ping["loss_pct"], ping["rc"]) == (count, count, 0, 0)
    netstats = run.result("netstats")
    assert netstats["carrier"] == 1 and netstats["address"] == MAC  # QEMU read the MAC from the device
    assert_counters_agree(run, "vdpa-ping", netstats["stats"])
    # Every ioctl QEMU made went through the server (QEMU opened the node once, and released it), the bridge
    # refused nothing, and the data path did not pass through it: a ping run's frames would be hundreds of traps.
    (server,) = node.servers
    stats = server.stats
    assert node.opens == 1 and server.closed and stats.failures == 0
    assert stats.updates >= 2 and stats.commits >= 1  # QEMU's IOTLB batch reached the device
    assert stats.requests["SET_VRING_KICK"] >= 2 and stats.requests["VDPA_SET_STATUS"] >= 3
    assert stats.ioctls >= 30 and traps < 400
    assert run.vhost_lines == [] and run.backend_log == []


@pytest.mark.parametrize(("packed", "event_idx"), [(False, True), (True, False)], ids=["split", "packed-no_event_idx"])
def test_loopback_over_vhost_vdpa(image: GuestImage, tmp_path: Path, packed: bool, event_idx: bool) -> None:
    count, seed = 30, 21 + packed
    with VhostUserRig(image, tmp_path, transport="vhost-vdpa") as rig:
        rig.add_net(NetConfig(name="vdpa-loop", mac=MAC), packed=packed, event_idx=event_idx)
        run = rig.run("net-loopback", {"count": count, "seed": seed, "timeout_ms": 1500})
    run.check()

    netstats = run.result("netstats")
    assert (netstats["features"][c.VIRTIO_F_RING_PACKED] == "1") is packed
    assert (netstats["features"][c.VIRTIO_RING_F_EVENT_IDX] == "1") is event_idx
    assert_loopback(run.result("net-loopback"), MAC, count, seed)
    assert_counters_agree(run, "vdpa-loop", netstats["stats"])
    assert run.vstats["vdpa-loop"][0]["rx drops"] == count // 3
    assert run.vhost_lines == [] and run.backend_log == []


def test_two_queue_pairs_and_the_devices_own_control_queue(image: GuestImage, tmp_path: Path) -> None:
    """MQ over vhost-vdpa: unlike vhost-user, QEMU passes the control queue through to the device, whose CVQ
    sets the pair count; XPS sends from CPU 1 on pair 1, which must carry every frame."""
    count, seed = 30, 13
    with VhostUserRig(image, tmp_path, transport="vhost-vdpa") as rig:
        rig.add_net(NetConfig(name="vdpa-mq", mac=MAC, max_vqp=2))
        run = rig.run("net-loopback", {"count": count, "seed": seed, "timeout_ms": 1500, "queues": 2, "cpu": 1})
    run.check()

    channels = run.result("channels")
    assert (channels["max_combined"], channels["combined"]) == (2, 2)
    assert_loopback(run.result("net-loopback"), MAC, count, seed)
    vstats = run.vstats["vdpa-mq"]
    assert vstats[3]["tx packets"] == count and vstats[1]["tx packets"] == 0
    assert vstats[2]["rx packets"] == count - count // 3 and vstats[0]["rx packets"] == 0
    assert vstats[4]["cvq requests"] == vstats[4]["cvq successes"] >= 1  # MQ_VQ_PAIRS_SET reached the device
    assert run.vhost_lines == [] and run.backend_log == []


def test_stop_cont_system_reset_and_a_new_qemu(image: GuestImage, tmp_path: Path) -> None:
    """QMP stop/cont (QEMU stops the device and restarts it from the ring bases it read), system_reset (the
    guest driver starts over: status 0, a new IOTLB, new rings), then QEMU exits and a second QEMU opens the
    same node: every ping of every phase is answered."""
    warm_up(NetDevice)
    device = NetDevice(NetConfig(name="vdpa-cycles", mode="responder", peer_ip=PEER_IP, mac=MAC))
    socket_dir = Path(tempfile.mkdtemp(prefix="vdpasim-e2e-"))
    server = VhostUserServer(device, str(socket_dir / "net.sock"), name=device.name)
    server.start()
    node = VhostVdpaNode(device.name, server.path)
    pings = {"peer": PEER_IP, "addr": GUEST_ADDR, "count": 5, "interval": 0.1}
    first = second = None
    try:
        # QEMU 1: ping, pause (stop + cont), ping, pause (system_reset) | reboot: ping, pause, ping, pause, off.
        first = _Supervised(image, node, tmp_path / "first", "ping,pause,ping,pause", {**pings, "pause_ms": 3000})
        with first.vm:
            assert first.vm.wait_for('"type":"pause"', 90), first.vm.console()[-3000:]
            first.vm.qmp("stop")
            assert first.vm.qmp("query-status")["status"] == "paused"  # type: ignore[index]
            first.vm.qmp("cont")
            assert first.vm.wait_for('"type":"pause"', 60, count=2)
            first.vm.qmp("system_reset")
            boot = first.vm.wait(timeout=120)
        first.close()
        pings_seen = boot.of_type("ping")
        assert [p["received"] for p in pings_seen] == [5, 5, 5, 5], boot.tail()
        assert boot.console.count("VDPASIM-DONE rc=0") == 1  # the first boot never finished: it was reset
        assert vhost_lines(boot.qemu_output) == []
        assert node.opens == 1  # one QEMU, one open: stop and reset are the device's business, not the node's

        # QEMU 2 on the same node: the release reset the device, which starts from scratch again.
        second = _Supervised(image, node, tmp_path / "second", "ping", pings)
        with second.vm:
            boot = second.vm.wait(timeout=120)
        second.close()
        assert boot.result("ping")["received"] == 5 and boot.returncode == 0, boot.tail()
        assert vhost_lines(boot.qemu_output) == []
        assert node.opens == 2
        assert device.get_status() == 0  # released: reset, as the kernel's vhost-vdpa release does
    finally:
        for guest in (first, second):
            if guest is not None:
                guest.close()
        server.stop()
        device.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


class _Supervised:
    """A guest whose QEMU runs under a supervisor serving ``node``, with a QMP socket next to its logs."""

    def __init__(self, image: GuestImage, node: VhostVdpaNode, log_dir: Path, workload: str, params: dict) -> None:
        log_dir.mkdir(parents=True)
        self.supervisor: Supervisor | None = None

        def launch(argv: list[str], **popen: object) -> subprocess.Popen:
            self.supervisor = Supervisor(argv, {NODE: node}, **popen)
            return self.supervisor.process

        self.vm = GuestVM(
            image,
            workload,
            params,
            vhost_vdpa_net_args(0, NODE),
            log_path=log_dir / "console.log",
            timeout=150,
            memory_mb=512,
            accel="tcg,thread=single",
            shared_memory=True,
            no_reboot=False,  # system_reset reboots the guest
            qmp_path=Path(tempfile.mkdtemp(prefix="vdpasim-qmp-")) / "qmp.sock",  # short: sun_path is 108 bytes
            launcher=launch,
        )

    def close(self) -> None:
        """Stop QEMU (by PID) and the supervisor (releasing the node); remove the QMP socket's directory."""
        self.vm.stop()
        if self.supervisor is not None:
            self.supervisor.close()
        assert self.vm.qmp_path is not None
        shutil.rmtree(self.vm.qmp_path.parent, ignore_errors=True)
