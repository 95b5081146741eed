"""The pyroute2 client, ``VdpaSocket``, against vdpasim's server over real sockets and against the real kernel.

The server runs on the far end of a UNIX socketpair (SOCK_SEQPACKET, as the daemon's control socket
is, and SOCK_DGRAM), answering each datagram with ``VdpaNetlinkServer.handle`` as a transport would.
The client's requests are compared with the bytes iproute2 `vdpa` sends, and its views of the
replies with what `vdpa -j` prints.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from vdpasim.bus import Bus, VdpaNetlinkServer, VdpaSocket, datagrams, vdpa_msg
from vdpasim.bus import netlink as nl
from vdpasim.config import NET_SUPPORTED_FEATURES
from vdpasim.virtio import constants as c

PID = 0x1234


@contextlib.contextmanager
def served(bus: Bus, kind: int = socket.SOCK_SEQPACKET) -> Iterator[tuple[socket.socket, list[bytes]]]:
    """A client socket whose peer is the server; yields it and the list of requests the server saw."""
    client, peer = socket.socketpair(socket.AF_UNIX, kind)
    server = VdpaNetlinkServer(bus)
    seen: list[bytes] = []

    def serve() -> None:
        while data := peer.recv(1 << 16):  # an empty datagram is the stop signal
            seen.append(data)
            for datagram in datagrams(server.handle(data, sender_pid=PID, ext_ack=True)):
                peer.send(datagram)

    thread = threading.Thread(target=serve, name="vdpa-netlink-test-server")
    thread.start()
    try:
        yield client, seen
    finally:
        client.send(b"")
        thread.join(timeout=30)
        client.close()
        peer.close()
    assert not thread.is_alive()


@pytest.fixture
def bus():
    bus = Bus()
    yield bus
    bus.close()


@pytest.fixture(params=[socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"])
def vdpa(request, bus):
    with served(bus, request.param) as (client, seen):
        sock = VdpaSocket(use_socket=client)
        sock.seen = seen
        try:
            yield sock
        finally:
            sock.close()


def negotiate(bus: Bus, name: str, features: int) -> None:
    device = bus.get(name).device
    device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
    device.set_driver_features(features)
    device.set_status(device.get_status() | c.VIRTIO_CONFIG_S_FEATURES_OK)


def test_net_round_trip(vdpa, bus):
    assert vdpa.prid == 0x1F  # the family id, resolved by name through nlctrl
    mgmt = nl.mgmtdev_view(vdpa.mgmtdev("show"))["mgmtdev"]
    assert list(mgmt) == ["vdpasim_net", "vdpasim_blk"]
    assert mgmt["vdpasim_net"]["supported_classes"] == ["net"]
    assert "MQ" in mgmt["vdpasim_net"]["dev_features"] and "VERSION_1" in mgmt["vdpasim_net"]["dev_features"]
    assert nl.mgmtdev_view(vdpa.mgmtdev("show", "vdpasim_blk"))["mgmtdev"]["vdpasim_blk"]["max_supported_vqs"] == 256

    (ack,) = vdpa.dev("add", name="vdpa0", mgmtdev="vdpasim_net", mac="52:54:00:00:00:01", mtu=9000, max_vqp=2)
    assert ack["header"]["type"] == 2 and ack["error"] == 0
    expected_dev = {"type": "network", "mgmtdev": "vdpasim_net", "vendor_id": 0, "max_vqs": 5, "max_vq_size": 256}
    assert nl.dev_view(vdpa.dev("show")) == {"dev": {"vdpa0": expected_dev}}
    assert nl.dev_view(vdpa.dev("show", "vdpa0")) == {"dev": {"vdpa0": expected_dev}}
    config = {"mac": "52:54:00:00:00:01", "link ": "up", "link_announce ": False, "max_vq_pairs": 2, "mtu": 9000}
    assert nl.config_view(vdpa.config("show")) == {"config": {"vdpa0": config}}

    mq = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_NET_F_MAC | 1 << c.VIRTIO_NET_F_CTRL_VQ | 1 << c.VIRTIO_NET_F_MQ
    negotiate(bus, "vdpa0", mq)
    config["negotiated_features"] = ["MAC", "CTRL_VQ", "MQ", "VERSION_1"]
    assert nl.config_view(vdpa.config("show", "vdpa0")) == {"config": {"vdpa0": config}}
    rx = {"queue_type": "rx", "rx packets": 0, "rx bytes": 0, "rx errors": 0, "rx overruns": 0, "rx drops": 0}
    assert nl.vstats_view(vdpa.vstats("show", "vdpa0", qidx=0)) == {"vstats": {"vdpa0": rx}}
    assert nl.vstats_view(vdpa.vstats("show", "vdpa0", qidx=3))["vstats"]["vdpa0"]["queue_type"] == "tx"
    cvq = {"queue_type": "control_vq", "cvq requests": 0, "cvq successes": 0, "cvq errors": 0}
    assert nl.vstats_view(vdpa.vstats("show", "vdpa0", qidx=4)) == {"vstats": {"vdpa0": cvq}}  # 2 * max_vqp

    vdpa.dev("set", "vdpa0", mac="52:54:00:00:00:02")
    assert nl.config_view(vdpa.config("show", "vdpa0"))["config"]["vdpa0"]["mac"] == "52:54:00:00:00:02"
    vdpa.dev("del", "vdpa0")
    assert nl.dev_view(vdpa.dev("show")) == {"dev": {}}
    assert bus.devices() == []


def test_blk_round_trip_with_extensions(vdpa, bus, tmp_path):
    image = tmp_path / "disk.img"
    vdpa.dev("add", "blk0", mgmtdev="vdpasim_blk", capacity=4096, path=str(image), create=True)
    vdpa.dev("add", "ro0", mgmtdev="vdpasim_blk", read_only=True, num_queues=2)
    assert nl.dev_view(vdpa.dev("show", "ro0"))["dev"]["ro0"]["type"] == "block"
    assert nl.config_view(vdpa.config("show")) == {"config": {"blk0": {}, "ro0": {}}}  # iproute2 6.1 prints no blk
    blk, ro = vdpa.config("show", extensions=True)
    assert (blk.get_attr("VDPA_ATTR_DEV_BLK_CFG_CAPACITY"), blk.get_attr("blk_path")) == (4096, str(image))
    assert (ro.get_attr("VDPA_ATTR_DEV_BLK_READ_ONLY"), ro.get_attr("VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES")) == (1, 2)
    bus.get("blk0").vhost_user_path = "/run/vdpasim/blk0.vhost-user.sock"
    (shown,) = vdpa.dev("show", "blk0", extensions=True)
    assert shown.get_attr("VDPASIM_ATTR_VHOST_USER_PATH") == "/run/vdpasim/blk0.vhost-user.sock"
    with pytest.raises(NetlinkError) as refused:
        vdpa.vstats("show", "blk0", qidx=0)
    assert refused.value.code == errno.EOPNOTSUPP
    vdpa.dev("del", "blk0")
    vdpa.dev("del", "ro0")
    assert image.exists() and bus.devices() == []


def test_responder_mode_through_extension_attributes(vdpa, bus):
    vdpa.dev("add", "resp0", mgmtdev="vdpasim_net", mode="responder", peer_ip="10.0.2.2", peer_mac="02:00:00:00:00:05")
    (msg,) = vdpa.config("show", "resp0", extensions=True)
    assert (msg.get_attr("net_mode"), msg.get_attr("net_peer_ip")) == ("responder", "10.0.2.2")
    assert msg.get_attr("VDPASIM_ATTR_NET_PEER_MAC") == "02:00:00:00:00:05"
    assert bus.get("resp0").config.peer_mac == bytes.fromhex("020000000005")


@pytest.mark.parametrize(
    ("call", "code", "text"),
    [
        (dict(name="x", mgmtdev="nope"), errno.ENODEV, "vdpa: Fail to find the specified management device"),
        (dict(name="x", mgmtdev="vdpasim_net", mtu=67), errno.ERANGE, "integer out of range"),
        (dict(name="x", mgmtdev="vdpasim_net", max_vqp=0), errno.EINVAL, "vdpa: At least one pair of VQs is required"),
        (
            dict(name="x", mgmtdev="vdpasim_blk", device_features=1 << 32),
            errno.EOPNOTSUPP,
            "vdpa: Some provided attributes are not supported: 0x100000",
        ),
    ],
)
def test_refusals_raise_with_the_kernels_text(vdpa, call, code, text):
    with pytest.raises(NetlinkError) as refused:
        vdpa.dev("add", **call)
    assert (refused.value.code, refused.value.args[1]) == (code, text)


def test_duplicate_and_unknown_devices(vdpa):
    vdpa.dev("add", "vdpa0", mgmtdev="vdpasim_net")
    with pytest.raises(NetlinkError) as duplicate:
        vdpa.dev("add", "vdpa0", mgmtdev="vdpasim_net")
    assert duplicate.value.code == errno.EEXIST
    with pytest.raises(NetlinkError) as unknown:
        vdpa.dev("del", "ghost")
    assert (unknown.value.code, unknown.value.args[1]) == (errno.ENODEV, "vdpa: device not found")
    with pytest.raises(NetlinkError) as early:
        vdpa.vstats("show", "vdpa0", qidx=0)
    assert (early.value.code, early.value.args[1]) == (errno.EAGAIN, "vdpa: feature negotiation not complete")


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def test_requests_are_the_bytes_iproute2_sends(vdpa):
    features = NET_SUPPORTED_FEATURES
    vdpa.dev(
        "add", "vdpa0", mgmtdev="vdpasim_net", mac="52:54:00:00:00:01", mtu=1500, max_vqp=1, device_features=features
    )
    sent = vdpa.seen[-1]
    _, family, flags, seq, pid = struct.unpack_from("=IHHII", sent)
    body = struct.pack("=BBH", nl.VDPA_CMD_DEV_NEW, 1, 0) + b"".join(
        [
            nla(2, b"vdpasim_net\0"),
            nla(4, b"vdpa0\0"),
            nla(10, bytes.fromhex("525400000001")),
            nla(13, struct.pack("=H", 1500)),
            nla(12, struct.pack("=H", 1)),
            nla(20, struct.pack("=Q", features)),
        ]
    )
    assert (family, flags) == (0x1F, 0x5)  # NLM_F_REQUEST | NLM_F_ACK, as iproute2
    assert sent == struct.pack("=IHHII", 16 + len(body), family, flags, seq, pid) + body
    vdpa.dev("show")
    assert struct.unpack_from("=HH", vdpa.seen[-1], 4) == (0x1F, 0x305)  # a dump that also asks for an ack
    assert len(vdpa.seen[-1]) == 20


def kernel_has_vdpa() -> bool:
    """Ask the kernel's nlctrl directly (a raw GETFAMILY "vdpa"), independently of the client under test."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16) as raw:
        raw.bind((0, 0))
        body = struct.pack("=BBH", 3, 1, 0) + nla(2, b"vdpa\0")
        raw.send(struct.pack("=IHHII", 16 + len(body), 0x10, 0x1, 1, 0) + body)
        reply = raw.recv(1 << 16)
    return struct.unpack_from("=H", reply, 4)[0] == 0x10  # NEWFAMILY, not NLMSG_ERROR


def test_against_the_real_kernel():
    """Kernel mode talks to the kernel's nlctrl: the same verbs on the real bus, or ENOENT without vDPA."""
    fds = set(os.listdir("/proc/self/fd"))
    if kernel_has_vdpa():
        with VdpaSocket() as sock:
            assert all(isinstance(m, vdpa_msg) for m in sock.mgmtdev("show"))
    else:
        with pytest.raises(NetlinkError) as missing:
            VdpaSocket()
        assert missing.value.code == errno.ENOENT
    assert set(os.listdir("/proc/self/fd")) == fds  # a failed lookup leaves no socket behind


def test_attribute_21_is_named_after_the_device():
    def config_reply(device_id: int) -> bytes:
        attrs = nla(4, b"d0\0") + nla(5, struct.pack("=I", device_id)) + nla(21, struct.pack("=Q", 0x1234))
        body = struct.pack("=BBH", nl.VDPA_CMD_DEV_CONFIG_GET, 1, 0) + attrs
        return struct.pack("=IHHII", 16 + len(body), 0x1F, 0, 1, 0) + body

    net = vdpa_msg(config_reply(c.VIRTIO_ID_NET))
    net.decode()
    assert net.get_attr("VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES") == 0x1234  # what a 6.0 kernel meant
    assert net.get_attr("VDPA_ATTR_DEV_BLK_CFG_CAPACITY") is None
    blk = vdpa_msg(config_reply(c.VIRTIO_ID_BLOCK))
    blk.decode()
    assert blk.get_attr("VDPA_ATTR_DEV_BLK_CFG_CAPACITY") == 0x1234
    for name in ("VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES", "VDPA_ATTR_DEV_BLK_CFG_CAPACITY"):
        msg = vdpa_msg()
        msg["attrs"] = [(name, 7)]
        msg.encode()
        assert bytes(msg.data)[20:] == nla(21, struct.pack("=Q", 7))
    status = vdpa_msg()
    status["attrs"] = [("VDPA_ATTR_DEV_NET_STATUS", 1)]
    status.encode()
    assert bytes(status.data)[20:] == nla(11, struct.pack("=H", 1))  # u16, not the header's u8
