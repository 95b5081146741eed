"""``vdpasim dev``/``mgmtdev`` (cli_dev.VdpaCli) against vdpasim's netlink server: iproute2 6.1 ``vdpa`` output.

The server answers on the far end of a SOCK_SEQPACKET socketpair, as the daemon does on its control
socket, so every request and reply crosses a real socket; the devices are driven to FEATURES_OK
directly on the bus where a test needs a driver (vstats, negotiated features).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdpasim.bus import Bus, VdpaNetlinkServer, VdpaSocket, datagrams
from vdpasim.cli_dev import CliFailure, VdpaCli
from vdpasim.virtio import constants as c


@contextlib.contextmanager
def served(bus: Bus) -> Iterator[socket.socket]:
    client, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = VdpaNetlinkServer(bus)

    def serve() -> None:
        while data := peer.recv(1 << 16):
            for datagram in datagrams(server.handle(data, sender_pid=7, ext_ack=True, cap_ack=True)):
                peer.send(datagram)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield client
    finally:
        client.send(b"")
        thread.join(timeout=30)
        client.close()
        peer.close()


class Run:
    def __init__(self, vdpa: VdpaSocket) -> None:
        self.vdpa = vdpa

    def __call__(self, *words: str, json_out: bool = False, pretty: bool = False, ext: bool = False):
        out, err = io.StringIO(), io.StringIO()
        cli = VdpaCli(self.vdpa, json_out=json_out, pretty=pretty, extensions=ext, stdout=out, stderr=err)
        rc = cli.mgmtdev(list(words[1:])) if words[0] == "mgmtdev" else cli.dev(list(words[1:]))
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *words: str, **kw) -> str:
        rc, out, err = self(*words, **kw)
        assert rc == 0, err
        assert err == ""
        return out

    def json(self, *words: str) -> dict:
        return json.loads(self.ok(*words, json_out=True))


@pytest.fixture
def bus() -> Iterator[Bus]:
    bus = Bus()
    yield bus
    bus.close()


@pytest.fixture
def run(bus: Bus) -> Iterator[Run]:
    with served(bus) as sock:
        vdpa = VdpaSocket(use_socket=sock)
        try:
            yield Run(vdpa)
        finally:
            vdpa.close()


def negotiate(bus: Bus, name: str, features: int) -> None:
    device = bus.get(name).device
    device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
    device.set_driver_features(features)
    device.set_status(device.get_status() | c.VIRTIO_CONFIG_S_FEATURES_OK)


F = lambda *bits: sum(1 << b for b in bits)  # noqa: E731


def test_mgmtdev_show(run: Run) -> None:
    text = run.ok("mgmtdev", "show")
    assert text.startswith("vdpasim_net: \n  supported_classes net\n  max_supported_vqs 513\n  dev_features MTU MAC ")
    assert "vdpasim_blk: \n  supported_classes block\n  max_supported_vqs 256\n  dev_features bit_1 " in text
    one = run.ok("mgmtdev", "show", "vdpasim_blk", json_out=True)
    assert one.startswith('{"mgmtdev":{"vdpasim_blk":{"supported_classes":["block"],"max_supported_vqs":256,')
    assert one.endswith("}}}\n")


def test_net_round_trip(run: Run, bus: Bus) -> None:
    assert run.ok("dev", "add", "name", "net0", "mgmtdev", "vdpasim_net", "mac", "02:11:22:33:44:55", "mtu", "9000",
                  "max_vqp", "2") == ""  # fmt: skip
    assert run("dev", "add", "name", "n1", "mgmtdev", "vdpasim_net", json_out=True) == (0, "\n", "")
    assert run.ok("dev", "show") == (
        "net0: type network mgmtdev vdpasim_net vendor_id 0 max_vqs 5 max_vq_size 256\n"
        "n1: type network mgmtdev vdpasim_net vendor_id 0 max_vqs 3 max_vq_size 256\n"
    )
    assert run.ok("dev", "show", "net0", json_out=True) == (
        '{"dev":{"net0":{"type":"network","mgmtdev":"vdpasim_net","vendor_id":0,"max_vqs":5,"max_vq_size":256}}}\n'
    )
    assert run.ok("dev", "show", "net0", json_out=True, pretty=True) == json.dumps(
        {"dev": {"net0": {"type": "network", "mgmtdev": "vdpasim_net", "vendor_id": 0, "max_vqs": 5,
                          "max_vq_size": 256}}}, indent=4) + "\n"  # fmt: skip
    assert run.ok("dev", "config", "show", "net0") == (
        "net0: mac 02:11:22:33:44:55 link up link_announce false max_vq_pairs 2 mtu 9000 \n"
    )
    negotiate(bus, "net0", F(c.VIRTIO_NET_F_MAC, c.VIRTIO_NET_F_MQ, c.VIRTIO_NET_F_CTRL_VQ, c.VIRTIO_F_VERSION_1))
    assert run.ok("dev", "config", "show", "net0") == (
        "net0: mac 02:11:22:33:44:55 link up link_announce false max_vq_pairs 2 mtu 9000 \n"
        "  negotiated_features MAC CTRL_VQ MQ VERSION_1\n"
    )
    assert run.json("dev", "config", "show", "net0") == {"config": {"net0": {
        "mac": "02:11:22:33:44:55", "link ": "up", "link_announce ": False, "max_vq_pairs": 2, "mtu": 9000,
        "negotiated_features": ["MAC", "CTRL_VQ", "MQ", "VERSION_1"]}}}  # fmt: skip
    assert run.ok("dev", "vstats", "show", "net0", "qidx", "1") == (
        "net0: queue_type tx tx packets 0 tx bytes 0 tx errors 0 tx drops 0 \n"
    )
    assert run.json("dev", "vstats", "show", "net0", "qidx", "4")["vstats"]["net0"]["queue_type"] == "control_vq"
    rx = {"queue_type": "rx", "rx packets": 0, "rx bytes": 0, "rx errors": 0, "rx overruns": 0, "rx drops": 0}
    assert run.json("dev", "vstats", "show", "net0", "qidx", "0") == {"vstats": {"net0": rx}}
    assert run.ok("dev", "set", "name", "net0", "mac", "02:00:00:00:00:09") == ""
    assert run.json("dev", "config", "show", "net0")["config"]["net0"]["mac"] == "02:00:00:00:00:09"
    assert run.ok("dev", "del", "net0") == ""
    assert run.ok("dev", "del", "n1") == ""
    assert run.ok("dev", "show") == ""
    assert run.ok("dev", "show", json_out=True) == '{"dev":{}}\n'


def test_blk_round_trip(run: Run, bus: Bus, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    run.ok("dev", "add", "name", "blk0", "mgmtdev", "vdpasim_blk", "capacity", "2M", "file", str(image), "create")
    run.ok("dev", "add", "name", "blk1", "mgmtdev", "vdpasim_blk", "file", str(image), "read_only")
    assert image.stat().st_size == 2 << 20
    assert bus.get("blk0").device.capacity == 4096
    assert bus.get("blk1").config.read_only is True
    assert (
        run.ok("dev", "show", "blk0") == "blk0: type block mgmtdev vdpasim_blk vendor_id 0 max_vqs 1 max_vq_size 256\n"
    )
    assert run.ok("dev", "config", "show") == "blk0: \nblk1: \n"  # iproute2 6.1 prints no block fields
    assert run.json("dev", "config", "show", "blk0") == {"config": {"blk0": {}}}
    rc, out, err = run("dev", "vstats", "show", "blk0", "qidx", "0")
    assert (rc, out, err) == (1, "", "kernel answers: Operation not supported\n")  # net only, as the kernel
    rc, out, err = run("dev", "set", "name", "blk0", "mac", "02:00:00:00:00:01")
    assert rc == 0  # the kernel acks with a warning
    run.ok("dev", "del", "blk0")
    run.ok("dev", "del", "blk1")
    assert run.json("dev", "show") == {"dev": {}}


def test_extension_fields_only_when_asked(run: Run, bus: Bus) -> None:
    run.ok("dev", "add", "name", "v0", "mgmtdev", "vdpasim_net")
    bus.get("v0").vhost_user_path = "/run/x/v0.vhost-user.sock"
    bus.get("v0").vhost_vdpa_node = "/dev/vhost-vdpa-0"
    plain = run.json("dev", "show")["dev"]["v0"]
    assert "vhost_user_socket" not in plain and "vhost_vdpa_node" not in plain
    ext = json.loads(run.ok("dev", "show", json_out=True, ext=True))["dev"]["v0"]
    assert ext == {**plain, "vhost_user_socket": "/run/x/v0.vhost-user.sock", "vhost_vdpa_node": "/dev/vhost-vdpa-0"}
    assert run.ok("dev", "show", "v0", ext=True).endswith(
        " vhost_user_socket /run/x/v0.vhost-user.sock vhost_vdpa_node /dev/vhost-vdpa-0\n"
    )


@pytest.mark.parametrize(
    ("words", "stderr"),
    [
        (["add", "name", "x", "mgmtdev", "vdpasim_nope"],
         "Error: vdpa: Fail to find the specified management device.\nkernel answers: No such device\n"),
        (["add", "name", "keep", "mgmtdev", "vdpasim_net"], "kernel answers: File exists\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "mac", "01:00:00:00:00:01"],
         "Error: vdpasim_net: mac: 01:00:00:00:00:01 is a multicast address.\nkernel answers: Invalid argument\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "mtu", "60"],
         "Error: integer out of range.\nkernel answers: Numerical result out of range\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "max_vqp", "0"],
         "Error: vdpa: At least one pair of VQs is required.\nkernel answers: Invalid argument\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "max_vqp", "2", "device_features", "100000000"],
         "Error: vdpa: Missing features 0x400000 for provided attributes.\nkernel answers: Invalid argument\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_blk", "mac", "02:00:00:00:00:01"],
         "Error: vdpa: Some provided attributes are not supported: 0x400.\nkernel answers: Operation not supported\n"),
        (["add", "name", "x", "mgmtdev", "vdpasim_blk", "mtu", "1500"],
         "Error: vdpa: Some provided attributes are not supported: 0x2000.\nkernel answers: Operation not supported\n"),
        (["del", "ghost"], "Error: vdpa: device not found.\nkernel answers: No such device\n"),
        (["set", "name", "keep", "mac", "01:00:00:00:00:02"],
         "Error: vdpa: Invalid MAC address.\nkernel answers: Operation not supported\n"),
        (["vstats", "show", "keep", "qidx", "0"],
         "Error: vdpa: feature negotiation not complete.\nkernel answers: Resource temporarily unavailable\n"),
    ],
)  # fmt: skip
def test_refusals_print_what_iproute2_prints(run: Run, bus: Bus, words: list[str], stderr: str) -> None:
    run.ok("dev", "add", "name", "keep", "mgmtdev", "vdpasim_net")
    assert run("dev", *words) == (1, "", stderr)
    assert [v.name for v in bus.devices()] == ["keep"]


def test_show_of_an_unknown_device_prints_the_empty_section(run: Run) -> None:
    assert run("dev", "show", "ghost", json_out=True) == (
        1, '{"dev":{}}\n', "Error: vdpa: device not found.\nkernel answers: No such device\n",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "mac", "02:00:zz:00:00:01"], '"02:00:zz:00:00:01" is invalid'),
        (["add", "mgmtdev", "vdpasim_net"], "device name is not set."),
        (["add", "name", "x"], "management device handle not set."),
        (["add", "name", "x", "mgmtdev", "vdpasim_net", "colour", "red"], 'Unknown option "colour"'),
        (["add", "name", "x", "mgmtdev"], "String parameter expected"),
        (["frobnicate"], 'Command "frobnicate" not found'),
    ],
)
def test_command_line_errors(run: Run, words: list[str], message: str) -> None:
    with pytest.raises(CliFailure, match=message):
        run("dev", *words)


def test_config_extension_fields_only_when_asked(run: Run, tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    run.ok("dev", "add", "name", "n0", "mgmtdev", "vdpasim_net", "mac", "02:00:00:00:00:05", "mode", "responder",
           "peer_ip", "10.0.0.2")  # fmt: skip
    image.write_bytes(bytes(1 << 20))
    run.ok("dev", "add", "name", "b0", "mgmtdev", "vdpasim_blk", "file", str(image), "read_only")
    assert run.ok("dev", "config", "show") == (
        "n0: mac 02:00:00:00:00:05 link up link_announce false max_vq_pairs 1 mtu 1500 \nb0: \n"
    )
    assert run.ok("dev", "config", "show", ext=True) == (
        "n0: mac 02:00:00:00:00:05 link up link_announce false max_vq_pairs 1 mtu 1500 \n"
        "  vdpasim mode responder peer_ip 10.0.0.2 peer_mac 02:00:00:00:00:01 busy_poll false\n"
        f"b0: \n  vdpasim capacity 2048 num_queues 1 read_only true file {image} busy_poll false\n"
    )
    config = json.loads(run.ok("dev", "config", "show", "b0", json_out=True, ext=True))["config"]["b0"]
    assert config == {"capacity": 2048, "num_queues": 1, "read_only": True, "file": str(image), "busy_poll": False}


def test_blk_size_and_serial(run: Run, bus: Bus) -> None:
    run.ok("dev", "add", "name", "b0", "mgmtdev", "vdpasim_blk", "blk_size", "4096", "serial", "disk-7")
    assert (bus.get("b0").config.blk_size, bus.get("b0").config.serial) == (4096, "disk-7")
    rc, _, err = run("dev", "add", "name", "b1", "mgmtdev", "vdpasim_blk", "serial", "s" * 21)
    assert (rc, err) == (1, "Error: Attribute failed policy validation.\nkernel answers: Invalid argument\n")
    rc, _, err = run("dev", "add", "name", "b1", "mgmtdev", "vdpasim_blk", "blk_size", "1000")
    assert rc == 1 and "blk_size: 1000 is not a power of two" in err


def test_vstats_at_any_status_only_when_asked(run: Run) -> None:
    run.ok("dev", "add", "name", "n0", "mgmtdev", "vdpasim_net")
    assert run("dev", "vstats", "show", "n0", "qidx", "0")[0] == 1
    assert run.ok("dev", "vstats", "show", "n0", "qidx", "1", ext=True) == (
        "n0: queue_type tx tx packets 0 tx bytes 0 tx errors 0 tx drops 0 \n"
    )


def test_a_successful_ack_with_a_message_is_a_warning(run: Run) -> None:
    run.ok("dev", "add", "name", "b0", "mgmtdev", "vdpasim_blk")
    assert run("dev", "set", "name", "b0", "mac", "02:00:00:00:00:01") == (
        0, "", "Warning: vdpa: b0 device not supported.\n",
    )  # fmt: skip
