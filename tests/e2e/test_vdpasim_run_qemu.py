"""What a user types, end to end: the real ``vdpa`` tool and an unmodified QEMU under ``vdpasim run``.

A daemon runs on a private runtime directory. ``vdpasim run -- vdpa dev add ...`` creates a net device
through the emulated vdpa netlink family; ``vdpasim -x dev show`` names its node; QEMU 7.2 started as
``vdpasim run -- qemu-system-x86_64 ... -netdev vhost-vdpa,vhostdev=/dev/vhost-vdpa-0`` boots the test
guest on it, whose loopback frames come back byte for byte; ``vdpa dev vstats show`` then reads the
device's counters, which must be the guest's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdpasim.devices.net import NetDevice
from vdpasim.guest import GuestImage, build_guest
from vdpasim.guest.qemu import GuestVM
from vdpasim.runtime import ENV_RUNTIME_DIR
from vdpasim.testing.daemon import VDPASIM, DaemonProcess, run_cli
from vdpasim.testing.vhost_user import assert_loopback, vhost_lines, vhost_vdpa_net_args, warm_up

VDPA = shutil.which("vdpa") or "/usr/sbin/vdpa"
MAC = "52:54:00:5e:00:07"


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    warm_up(NetDevice)  # the daemon's kernels then load from the warm Numba cache
    with DaemonProcess(log_level="info") as d:
        yield d


def vdpa_json(d: DaemonProcess, *args: str) -> dict:
    done = run_cli(d.runtime, "run", "--", VDPA, "-j", *args)
    return json.loads(done.stdout)


def test_vdpa_tool_and_qemu_under_vdpasim_run(daemon: DaemonProcess, tmp_path: Path) -> None:
    image: GuestImage = build_guest()
    add = run_cli(
        daemon.runtime, "run", "--", VDPA, "dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net", "mac", MAC
    )
    assert (add.returncode, add.stdout, add.stderr) == (0, "", "")
    [shown] = daemon.json("-x", "dev", "show")["dev"].values()
    node = shown["vhost_vdpa_node"]
    assert node == "/dev/vhost-vdpa-0" and not os.path.exists(node)  # this kernel has no vhost-vdpa at all

    env = {**os.environ, ENV_RUNTIME_DIR: str(daemon.runtime.path)}

    def under_vdpasim_run(argv: list[str], **popen: object) -> subprocess.Popen:
        return subprocess.Popen([*VDPASIM, "run", "--", *argv], env=env, **popen)  # type: ignore[call-overload]

    count, seed = 30, 9
    vm = GuestVM(
        image,
        "net-loopback,pause",  # the pause keeps the driver up while the host reads the counters
        {"count": count, "seed": seed, "timeout_ms": 1500, "pause_ms": 4000},
        vhost_vdpa_net_args(0, node, mac=MAC),
        log_path=tmp_path / "console.log",
        memory_mb=512,
        accel="tcg,thread=single",
        shared_memory=True,
        launcher=under_vdpasim_run,
    )
    with vm:
        assert vm.wait_for('"type":"pause"', 120), vm.console()[-3000:]
        # vstats need a driver that negotiated features, as the kernel's do: read them during the pause.
        tx = vdpa_json(daemon, "dev", "vstats", "show", "vdpa0", "qidx", "1")["vstats"]["vdpa0"]
        rx = vdpa_json(daemon, "dev", "vstats", "show", "vdpa0", "qidx", "0")["vstats"]["vdpa0"]
        ours = daemon.json("dev", "vstats", "show", "vdpa0", "qidx", "0")["vstats"]["vdpa0"]
        boot = vm.wait(timeout=150)
    boot.check()
    assert boot.returncode == 0 and vhost_lines(boot.qemu_output) == []
    assert_loopback(boot.result("net-loopback"), MAC, count, seed)

    guest = boot.result("netstats")["stats"]
    # vdpasim's CLI prints what iproute2 prints. Both say queue 0 is "control_vq": without MQ the kernel sends
    # no max_vqp, and iproute2 6.1 then takes 2 * 0 for the control queue's index: a quirk kept on purpose.
    assert rx == ours and rx["queue_type"] == "control_vq" and tx["queue_type"] == "tx"
    names = {**tx, **rx}
    assert (names["tx packets"], names["tx bytes"]) == (guest["tx_packets"], guest["tx_bytes"])
    assert (names["rx packets"], names["rx bytes"]) == (guest["rx_packets"], guest["rx_bytes"])
    assert names["rx drops"] == count // 3  # the foreign-MAC frames the device's filter dropped

    log = daemon.log()
    assert "vdpa0: added" in log and "front-end connected" in log  # the bridge's vhost-user client came and went
    assert " ERROR " not in log and " WARNING " not in log, log
