"""A real QEMU 7.2 guest pings a device that the ``vdpasim`` command created through the daemon.

The whole user path: ``vdpasim dev add ... mode responder`` (a daemon process of its own, as users
run it), QEMU's vhost-user-net on the socket ``dev show`` names, the guest's virtio_net driver, then
``vdpasim -x dev vstats show`` compared with the counters the guest's kernel kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from vdpasim.guest import GuestImage, GuestVM, build_guest
from vdpasim.guest.qemu import vhost_user_net_args
from vdpasim.testing.daemon import DaemonProcess

PEER_IP = "10.0.0.2"
GUEST_ADDR = "10.0.0.1/24"
PINGS = 20
MAC = "02:00:00:00:10:01"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess(log_level="info") as d:
        yield d


def test_guest_pings_a_responder_made_with_the_cli(image: GuestImage, daemon: DaemonProcess, tmp_path) -> None:
    daemon.cli(
        "dev", "add", "name", "vu0", "mgmtdev", "vdpasim_net", "mac", MAC,
        "mode", "responder", "peer_ip", PEER_IP,
    )  # fmt: skip
    socket_path = daemon.json("-x", "dev", "show", "vu0")["dev"]["vu0"]["vhost_user_socket"]
    assert socket_path == str(daemon.runtime.path / "vu0.vhost-user.sock")

    vm = GuestVM(
        image,
        "ping",
        {"peer": PEER_IP, "count": PINGS, "addr": GUEST_ADDR},
        vhost_user_net_args(socket_path, mac=MAC),  # QEMU's vhost-user-net takes no MAC from a back-end
        shared_memory=True,
        log_path=tmp_path / "console.log",
        timeout=150,
    )
    with vm:
        result = vm.wait()
    result.check()

    ping = result.result("ping")
    assert (ping["transmitted"], ping["received"], ping["loss_pct"]) == (PINGS, PINGS, 0), result.tail()
    guest = result.result("netstats")
    assert guest["address"] == MAC

    # QEMU left: the session reset the device, so vendor statistics are refused as the kernel
    # refuses them before FEATURES_OK; the daemon logged the departure under the device's name.
    vstats = daemon.cli("dev", "vstats", "show", "vu0", "qidx", "0", check=False)
    assert vstats.returncode == 1 and "feature negotiation not complete" in vstats.stderr
    # The counters outlive the front-end: vdpasim's extension (-x) reads them at any status.
    rx = daemon.json("-x", "dev", "vstats", "show", "vu0", "qidx", "0")["vstats"]["vu0"]
    tx = daemon.json("-x", "dev", "vstats", "show", "vu0", "qidx", "1")["vstats"]["vu0"]
    assert (rx["queue_type"], tx["queue_type"]) == ("rx", "tx")
    assert tx["tx packets"] == guest["stats"]["tx_packets"] >= PINGS
    assert rx["rx packets"] == guest["stats"]["rx_packets"] >= PINGS
    assert tx["tx bytes"] == guest["stats"]["tx_bytes"]
    assert rx["rx bytes"] == guest["stats"]["rx_bytes"]
    assert tx["tx errors"] == rx["rx errors"] == rx["rx drops"] == 0
    assert "negotiated_features" not in daemon.json("dev", "config", "show", "vu0")["config"]["vu0"]
    assert daemon.json("daemon", "status")["daemon"]["connections"] == {"vu0": 1}
    log = daemon.log()
    assert re.search(r"vdpasim\.vhost_user\.server\.vu0: front-end left after \d+ requests", log), log
    assert "Traceback" not in log and " ERROR " not in log
    vhost_errors = [line for line in result.qemu_output.splitlines() if "vhost" in line.lower()]
    assert vhost_errors == [], result.qemu_output

    daemon.cli("dev", "del", "vu0")
    assert daemon.json("dev", "show") == {"dev": {}}
