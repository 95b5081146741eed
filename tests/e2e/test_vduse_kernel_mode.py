"""Kernel mode end to end: inside the 6.12 test guest, vdpasim serves devices through the real VDUSE.

The host has no VDUSE, so the test boots Debian's 6.12 kernel under TCG with the host root shared
over 9p and runs ``vduse_guest/check.py`` there (workload ``script``), chrooted into the host root so
the venv, the sources and iproute2's ``vdpa`` keep their paths. The guest then does for real what a
user on a VDUSE kernel would: lists the management devices with iproute2, creates the devices through
/dev/vduse/control, adds them with the real ``vdpa`` netlink family, and drives them through the
kernel's virtio_vdpa (a net interface, a disk) and vhost_vdpa drivers.

Numba compiles slowly under TCG, so the host first fills a cache built for LLVM's ``generic`` CPU
(``NUMBA_CPU_NAME=generic``: no host-specific instructions, so the guest's ``-cpu max`` may load it);
the guest copies it into a tmpfs (the 9p share is read-only, and Numba wants a writable cache).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from vdpasim.bus import Bus, VdpaNetlinkServer, VdpaSocket, datagrams
from vdpasim.cli_dev import format_error
from vdpasim.guest import GuestImage, GuestVM, build_guest
from vdpasim.jit import CACHE_DIR

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "vduse_guest" / "run.sh"
GENERIC_CACHE = Path(CACHE_DIR + "-generic")
MAC = "02:5e:00:00:00:10"

_WARM = (
    "from vdpasim.devices.blk import BlkDevice\n"
    "from vdpasim.devices.net import NetDevice\n"
    "from vdpasim.testing.vhost_user import warm_up\n"
    "warm_up(NetDevice); warm_up(BlkDevice)\n"
)


# The same invalid requests as vduse_guest/check.py makes to the kernel, made to vdpasim's userspace
# server. vduse has no config attribute mask (and is multi-class: net and block), so where the mask is
# what refuses the request the userspace twin is vdpasim_blk (mask 0 too); requests refused before the
# management device is looked at go to vdpasim_net.
USERSPACE_TWIN = {
    "unknown_mgmtdev": {"name": "bad0", "mgmtdev": "vdpasim_nope"},
    "duplicate_name": {"name": "knet0", "mgmtdev": "vdpasim_net"},
    "bad_mac": {"name": "bad0", "mgmtdev": "vdpasim_blk", "mac": "01:00:00:00:00:01"},
    "mtu_below_68": {"name": "bad0", "mgmtdev": "vdpasim_net", "mtu": 60},
    "max_vqp_0": {"name": "bad0", "mgmtdev": "vdpasim_net", "max_vqp": 0},
    "attr_outside_mask": {"name": "bad0", "mgmtdev": "vdpasim_blk", "mtu": 1500},
    "net_attr_on_non_net": {"name": "bad0", "mgmtdev": "vdpasim_blk", "mac": "02:00:00:00:00:01"},
    "del_unknown": {"del": "ghost"},
}


def _userspace_answers(requests: dict[str, dict]) -> dict[str, dict]:
    """errno + extack of each request, from vdpasim's server over a socketpair (knet0 exists on it)."""
    bus = Bus()
    client, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = VdpaNetlinkServer(bus)

    def serve() -> None:
        while data := peer.recv(1 << 16):
            for datagram in datagrams(server.handle(data, sender_pid=1, ext_ack=True)):
                peer.send(datagram)

    thread = threading.Thread(target=serve)
    thread.start()
    answers: dict[str, dict] = {}
    try:
        with VdpaSocket(use_socket=client) as sock:
            sock.dev("add", name="knet0", mgmtdev="vdpasim_net")
            for case, request in requests.items():
                try:
                    if "del" in request:
                        sock.dev("del", name=request["del"])
                    else:
                        sock.dev("add", **request)
                    answers[case] = {"errno": 0, "extack": None}
                except NetlinkError as exc:
                    answers[case] = {"errno": abs(exc.code), "extack": exc.args[1] if len(exc.args) > 1 else None}
    finally:
        client.send(b"")
        thread.join(timeout=30)
        client.close()
        peer.close()
        bus.close()
    return answers


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


@pytest.fixture(scope="module")
def generic_cache() -> Path:
    """Numba's cache for a generic x86-64 target, filled on the host (fast: no TCG)."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(GENERIC_CACHE))
    subprocess.run([sys.executable, "-c", _WARM], env=env, check=True, timeout=900)
    return GENERIC_CACHE


def test_vduse_kernel_mode_net_vhost_and_blk(image: GuestImage, generic_cache: Path, tmp_path: Path) -> None:
    vm = GuestVM(
        image,
        "script",
        {"script": str(SCRIPT), "numba_cache": str(generic_cache)},
        host_root=True,
        log_path=tmp_path / "console.log",
        timeout=280,
    )
    with vm:
        result = vm.wait()
    print(result.tail(60))
    result.check()
    assert result.of_type("error") == [], result.of_type("error")

    # iproute2's own view and ours, through the guest kernel's real vdpa family.
    mgmtdev = result.result("mgmtdev")
    assert mgmtdev["rc"] == 0
    assert "vduse" in mgmtdev["iproute2"]["mgmtdev"]
    assert mgmtdev["iproute2"]["mgmtdev"]["vduse"]["supported_classes"] == ["net", "block"]
    assert mgmtdev["pyroute2"] == mgmtdev["iproute2"]

    jit = result.result("jit")
    assert jit["cache_files"] > 0
    print(
        f"guest JIT (generic-CPU cache): import {jit['import_ms']} ms, net {jit['net_ms']} ms, blk {jit['blk_ms']} ms"
    )

    net = result.result("vduse-net")
    assert net["address"] == MAC
    assert net["driver"] == "virtio_vdpa"  # the guest binds new devices to vhost_vdpa first: rebound
    assert net["sent"] == net["received"] == net["intact"] == 20
    assert net["tx_packets"] >= 20 and net["rx_packets"] >= 20
    assert net["device_tx_packets"] == net["tx_packets"] and net["device_rx_packets"] == net["rx_packets"]
    assert net["messages"]["failed"] == 0 and net["messages"]["SET_STATUS"] > 0

    # Our pyroute2 client and iproute2 see the same device through the kernel's family.
    parity = result.result("vduse-parity")
    assert parity["pyroute2_dev"] == parity["iproute2_dev"]
    assert parity["iproute2_dev"]["dev"]["vduse-net0"]["mgmtdev"] == "vduse"
    assert parity["iproute2_dev"]["dev"]["vduse-net0"]["max_vqs"] == 2  # no control queue under VDUSE
    assert parity["pyroute2_config"] == parity["iproute2_config"]
    config = parity["iproute2_config"]["config"]["vduse-net0"]
    assert config["mac"] == MAC and "CTRL_VQ" not in config["negotiated_features"]

    vhost = result.result("vduse-vhost")
    assert vhost["node"].startswith("/dev/vhost-vdpa-")
    assert vhost["device_id"] == 1
    assert vhost["features"] == vhost["offered"]
    assert vhost["mac"] == MAC

    removed = result.result("vduse-net-removed")
    assert removed == {"type": "vduse-net-removed", "vdpa_gone": True, "node_gone": True}

    blk = result.result("vduse-blk")
    assert blk["size_bytes"] == 8 << 20
    assert blk["pattern_sha256"] == blk["readback_sha256"] == blk["backing_sha256"]
    assert blk["messages"]["failed"] == 0

    # The daemon in kernel mode (chosen by itself: VDUSE and the family exist), driven by the vdpasim CLI.
    kd = result.result("daemon-kernel")
    assert kd["mgmtdev"]["mode"] == "kernel"
    assert "vduse" in kd["mgmtdev"]["mgmtdev"]  # the kernel's management devices, from its family
    assert kd["mgmtdev_text_last"] == ["mode kernel"]
    assert kd["add_rc"] == 0, kd["add_stderr"]
    assert kd["on_bus"]
    assert kd["real_dev"]["dev"]["knet0"]["mgmtdev"] == "vduse"
    assert kd["real_config"]["config"]["knet0"]["mac"] == "02:5e:00:00:00:20"
    assert kd["del_rc"] == 0 and kd["gone"]
    assert result.result("daemon-kernel-exit")["rc"] == 0

    # Invalid requests: the real kernel's errno and extack (our VdpaSocket in the guest) equal vdpasim's
    # userspace server's for the same request on a management device with the same semantics.
    kernel = kd["invalid"]["pyroute2"]
    print("kernel answers to invalid requests:", kernel)
    assert set(kernel) == set(USERSPACE_TWIN)
    assert all(answer["errno"] != 0 for answer in kernel.values()), kernel
    userspace = _userspace_answers(USERSPACE_TWIN)
    assert kernel == userspace
    # ... and iproute2 reports them as our CLI does (format_error is what `vdpasim` prints).
    for case, shown in kd["invalid"]["iproute2"].items():
        assert shown["rc"] == 1
        assert shown["stderr"] == format_error(NetlinkError(kernel[case]["errno"], kernel[case]["extack"])), case
    # Where the buses differ legitimately: vdpasim_net takes a MAC and its model refuses a multicast
    # one, whereas vduse takes no MAC attribute at all (the MAC comes from the VDUSE config space).
    net_mac = _userspace_answers({"m": {"name": "bad0", "mgmtdev": "vdpasim_net", "mac": "01:00:00:00:00:01"}})["m"]
    assert net_mac["errno"] == 22 and kernel["bad_mac"]["errno"] == 95  # EINVAL (model) vs EOPNOTSUPP (mask)
