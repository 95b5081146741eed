"""One device's failure never takes down another device of the same daemon (issue 6, isolation).

One daemon, two devices, one QEMU 7.2 guest using both: a vhost-user-blk disk and a vhost-user-net NIC
pinging the daemon's responder. While the guest pings, the blk device's data-path thread is made to
crash (the daemon's test-only ``test_fault`` operation, enabled by VDPASIM_TEST_FAULTS=1): the blk
device goes NEEDS_RESET with a log line, and the net device keeps answering every ping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdpasim.control import ControlClient, ControlError
from vdpasim.guest import GuestImage, GuestVM, build_guest
from vdpasim.testing.daemon import DaemonProcess

PEER_IP = "10.0.0.2"
MAC = "02:00:00:00:10:09"
PINGS = 60


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    monkeypatch.setenv("VDPASIM_TEST_FAULTS", "1")  # DaemonProcess passes our environment on
    with DaemonProcess(log_level="info") as d:
        yield d


def test_a_crashed_blk_data_path_leaves_the_net_device_serving(
    image: GuestImage, daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.cli("dev", "add", "name", "iso-blk", "mgmtdev", "vdpasim_blk", "capacity", "8M")
    daemon.cli(
        "dev", "add", "name", "iso-net", "mgmtdev", "vdpasim_net", "mac", MAC, "mode", "responder", "peer_ip", PEER_IP,
    )  # fmt: skip
    run = daemon.runtime.path
    args = [
        "-chardev", f"socket,id=vu0,path={run / 'iso-blk.vhost-user.sock'}",
        "-device", "vhost-user-blk-pci,id=disk0,chardev=vu0,num-queues=1",
        "-chardev", f"socket,id=vu1,path={run / 'iso-net.vhost-user.sock'}",
        "-netdev", "vhost-user,id=net0,chardev=vu1,queues=1",
        "-device", f"virtio-net-pci,netdev=net0,mac={MAC},romfile=,vectors=0",
    ]  # fmt: skip
    vm = GuestVM(
        image,
        "ping",
        {"peer": PEER_IP, "addr": "10.0.0.1/24", "count": PINGS, "interval": 0.1},
        args,
        shared_memory=True,
        memory_mb=512,
        accel="tcg,thread=single",
        log_path=tmp_path / "console.log",
        timeout=120,
    )
    with vm:
        deadline = time.monotonic() + 60
        while "features VIRTIO_NET" not in daemon.log() or "VIRTIO_BLK_F_FLUSH" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        time.sleep(2.0)  # the guest pings
        with ControlClient(daemon.runtime.control_socket) as client:
            assert client.request("test_fault", device="iso-blk") == {"device": "iso-blk"}
        result = vm.wait()
    result.check()
    ping = result.result("ping")
    assert (ping["transmitted"], ping["received"]) == (PINGS, PINGS)
    log = daemon.log()
    assert "data path of iso-blk stopped" in log
    assert "vdpasim.device.iso-blk: device needs reset: data-path thread crashed: RuntimeError" in log
    assert "iso-net: device needs reset" not in log and "data path of iso-net" not in log


def test_the_fault_hook_is_off_without_the_environment_variable() -> None:
    env = os.environ.pop("VDPASIM_TEST_FAULTS", None)
    try:
        with DaemonProcess(log_level="info") as d, ControlClient(d.runtime.control_socket) as client:
            d.cli("dev", "add", "name", "x0", "mgmtdev", "vdpasim_net")
            with pytest.raises(ControlError, match="unknown operation 'test_fault'"):
                client.request("test_fault", device="x0")
    finally:
        if env is not None:
            os.environ["VDPASIM_TEST_FAULTS"] = env
