"""The vdpa family served in userspace: requests as iproute2 `vdpa` 6.1 encodes them, replies as Linux 6.12 sends them.

Requests are built here byte by byte the way iproute2 builds them (mnlu_msg_prepare: type = family
id, seq = time(NULL), pid 0; genlmsghdr version 1; mnl_attr_put_strz / mnl_attr_put_u16 /
mnl_attr_put), with the socket options it sets (NETLINK_CAP_ACK and NETLINK_EXT_ACK). Expected
replies are built the same independent way, in the order drivers/vdpa/vdpa.c fills them, and
compared byte for byte; they are also decoded with pyroute2 (bus/netlink.py ``vdpa_msg``) to check
the attribute set and order a pyroute2 user sees. Error replies carry the kernel's errno and
extended-ack text, offset and policy.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdpasim.bus import Bus, VdpaNetlinkServer, datagrams
from vdpasim.bus import netlink as nl
from vdpasim.bus.netlink import VdpaMarshal, vdpa_msg
from vdpasim.config import BLK_SUPPORTED_FEATURES, NET_SUPPORTED_FEATURES
from vdpasim.virtio import constants as c

FAMILY = 0x1F
SEQ = 0x65A1B2C3  # iproute2 numbers its requests with time(NULL)
PID = 0x2A5F  # the sending socket's port id, which every reply is addressed to

REQUEST, MULTI, ACK, DUMP = 0x1, 0x2, 0x4, 0x300
REQ = REQUEST | ACK  # iproute2: every request asks for an ack...
DUMP_REQ = REQ | DUMP  # ...and a listing is a dump as well
CAPPED, ACK_TLVS = 0x100, 0x200
NLMSG_ERROR, NLMSG_DONE = 2, 3
FEATURES_OK = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER | c.VIRTIO_CONFIG_S_FEATURES_OK
MAC = bytes.fromhex("525400000001")


# ----- an encoder independent of the code under test -----
def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def strz(text: str) -> bytes:
    return text.encode() + b"\0"


def u8(v: int) -> bytes:
    return struct.pack("=B", v)


def u16(v: int) -> bytes:
    return struct.pack("=H", v)


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


def request(cmd: int, flags: int, *attrs: bytes, family: int = FAMILY, version: int = 1, reserved: int = 0) -> bytes:
    body = struct.pack("=BBH", cmd, version, reserved) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), family, flags, SEQ, 0) + body


def reply(cmd: int, *attrs: bytes, flags: int = 0, family: int = FAMILY, version: int = 1) -> bytes:
    body = struct.pack("=BBH", cmd, version, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), family, flags, SEQ, PID) + body


def ack(req: bytes, err: int = 0, *tlvs: bytes, capped: bool = True) -> bytes:
    echoed = req[:16] if capped else req
    flags = (CAPPED if capped else 0) | (ACK_TLVS if tlvs else 0)
    body = struct.pack("=i", -err) + echoed + b"".join(tlvs)
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, flags, SEQ, PID) + body


def done() -> bytes:
    return struct.pack("=IHHIIi", 20, NLMSG_DONE, MULTI, SEQ, PID, 0)


def msg_tlv(text: str) -> bytes:
    return nla(1, strz(text))


def offs_tlv(offset: int) -> bytes:
    return nla(2, u32(offset))


def policy_tlv(*entries: bytes) -> bytes:
    return nla(4 | 0x8000, b"".join(entries))


# iproute2's request attributes
def mgmtdev_name(name: str) -> bytes:
    return nla(nl.VDPA_ATTR_MGMTDEV_DEV_NAME, strz(name))


def dev_name(name: str) -> bytes:
    return nla(nl.VDPA_ATTR_DEV_NAME, strz(name))


def mac_attr(mac: bytes) -> bytes:
    return nla(nl.VDPA_ATTR_DEV_NET_CFG_MACADDR, mac)


def dev_add(name: str, mgmtdev: str, *attrs: bytes) -> bytes:
    return request(nl.VDPA_CMD_DEV_NEW, REQ, mgmtdev_name(mgmtdev), dev_name(name), *attrs)


# ----- fixtures -----
@pytest.fixture
def bus():
    bus = Bus()
    yield bus
    bus.close()


@pytest.fixture
def server(bus):
    return VdpaNetlinkServer(bus, family_id=FAMILY)


def vdpa(server: VdpaNetlinkServer, req: bytes, *, admin: bool = True) -> list[bytes]:
    """The replies iproute2's socket (NETLINK_CAP_ACK + NETLINK_EXT_ACK) receives."""
    return server.handle(req, sender_pid=PID, ext_ack=True, cap_ack=True, admin=admin)


def decode(messages: list[bytes]) -> list:
    marshal = VdpaMarshal()
    marshal.msg_map[FAMILY] = vdpa_msg
    return [m for data in messages for m in marshal.parse(data)]


def attr_names(msg) -> list[str]:
    return [slot.name for slot in msg["attrs"]]


def refused(replies: list[bytes]) -> tuple[int, str | None]:
    """(errno, extack text) of a single NLMSG_ERROR reply."""
    assert len(replies) == 1
    (msg,) = decode(replies)
    assert msg["header"]["type"] == NLMSG_ERROR
    return -msg["error"], msg.get_attr("NLMSGERR_ATTR_MSG")


def add(server, name: str, mgmtdev: str, *attrs: bytes) -> None:
    req = dev_add(name, mgmtdev, *attrs)
    assert vdpa(server, req) == [ack(req)]


def negotiate(bus: Bus, name: str, features: int) -> None:
    device = bus.get(name).device
    device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)
    device.set_driver_features(features)
    device.set_status(FEATURES_OK)
    assert device.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK


# ----- resolving the family, as iproute2 does first -----
def test_getfamily_vdpa_answers_what_iproute2_needs(server):
    req = request(3, REQ, nla(2, strz("vdpa")), family=0x10)  # CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME
    ops = [(2, 0x0E), (3, 0x0B), (4, 0x0B), (5, 0x0E), (6, 0x0E), (7, 0x0B), (8, 0x0B)]
    expected = reply(
        1,  # CTRL_CMD_NEWFAMILY, from the controller (version 2)
        nla(2, strz("vdpa")),
        nla(1, u16(FAMILY)),
        nla(3, u32(1)),
        nla(4, u32(0)),
        nla(5, u32(37)),
        nla(6, b"".join(nla(i + 1, nla(1, u32(cmd)) + nla(2, u32(flags))) for i, (cmd, flags) in enumerate(ops))),
        family=0x10,
        version=2,
    )
    assert vdpa(server, req) == [expected, ack(req)]


def test_getfamily_of_an_unknown_family_is_enoent_capped(server):
    req = request(3, REQ, nla(2, strz("nosuchfamily")), family=0x10)
    assert vdpa(server, req) == [ack(req, errno.ENOENT)]


# ----- management devices -----
def mgmtdev_reply(name: str, classes: int, max_vqs: int, features: int, flags: int = 0) -> bytes:
    return reply(
        nl.VDPA_CMD_MGMTDEV_NEW,
        mgmtdev_name(name),
        nla(nl.VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES, u64(classes)),
        nla(nl.VDPA_ATTR_DEV_MGMTDEV_MAX_VQS, u32(max_vqs)),
        nla(nl.VDPA_ATTR_DEV_SUPPORTED_FEATURES, u64(features)),
        flags=flags,
    )


NET_MGMT = ("vdpasim_net", 1 << 1, 513, NET_SUPPORTED_FEATURES)
BLK_MGMT = ("vdpasim_blk", 1 << 2, 256, BLK_SUPPORTED_FEATURES | 1 << c.VIRTIO_BLK_F_RO)


def test_mgmtdev_show_is_a_dump_of_mgmtdev_new_messages(server):
    replies = vdpa(server, request(nl.VDPA_CMD_MGMTDEV_GET, DUMP_REQ))
    assert replies == [mgmtdev_reply(*NET_MGMT, flags=MULTI), mgmtdev_reply(*BLK_MGMT, flags=MULTI), done()]
    # The kernel queues the dump's messages in one datagram and NLMSG_DONE in the next.
    assert datagrams(replies) == [replies[0] + replies[1], replies[2]]
    net, blk, end = decode(replies)
    assert attr_names(net) == [
        "VDPA_ATTR_MGMTDEV_DEV_NAME",
        "VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES",
        "VDPA_ATTR_DEV_MGMTDEV_MAX_VQS",
        "VDPA_ATTR_DEV_SUPPORTED_FEATURES",
    ]
    assert (net["cmd"], blk.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME")) == (nl.VDPA_CMD_MGMTDEV_NEW, "vdpasim_blk")
    assert end["header"]["type"] == NLMSG_DONE


def test_mgmtdev_show_one_then_its_ack(server):
    req = request(nl.VDPA_CMD_MGMTDEV_GET, REQ, mgmtdev_name("vdpasim_blk"))
    assert vdpa(server, req) == [mgmtdev_reply(*BLK_MGMT), ack(req)]


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param([mgmtdev_name("vdpasim_nope")], id="unknown"),
        pytest.param([nla(nl.VDPA_ATTR_MGMTDEV_BUS_NAME, strz("pci")), mgmtdev_name("vdpasim_net")], id="bus"),
        pytest.param([], id="no-name"),
    ],
)
def test_mgmtdev_show_of_no_such_device(server, attrs):
    req = request(nl.VDPA_CMD_MGMTDEV_GET, REQ, *attrs)
    err = errno.EINVAL if not attrs else errno.ENODEV
    # The doit's own wording ("mgmt device"), not DEV_NEW's ("management device").
    assert vdpa(server, req) == [ack(req, err, msg_tlv("vdpa: Fail to find the specified mgmt device"))]


# ----- devices -----
def dev_reply(name: str, mgmtdev: str, device_id: int, max_vqs: int, flags: int = 0, *extra: bytes) -> bytes:
    return reply(
        nl.VDPA_CMD_DEV_NEW,  # the reply command of DEV_GET
        mgmtdev_name(mgmtdev),
        dev_name(name),
        nla(nl.VDPA_ATTR_DEV_ID, u32(device_id)),
        nla(nl.VDPA_ATTR_DEV_VENDOR_ID, u32(0)),
        nla(nl.VDPA_ATTR_DEV_MAX_VQS, u32(max_vqs)),
        nla(nl.VDPA_ATTR_DEV_MAX_VQ_SIZE, u16(256)),
        nla(nl.VDPA_ATTR_DEV_MIN_VQ_SIZE, u16(1)),
        *extra,
        flags=flags,
    )


def test_dev_add_show_del_round_trip(server, bus):
    assert vdpa(server, request(nl.VDPA_CMD_DEV_GET, DUMP_REQ)) == [done()]  # an empty bus
    add(server, "vdpa0", "vdpasim_net", mac_attr(MAC), nla(nl.VDPA_ATTR_DEV_NET_CFG_MTU, u16(9000)))
    add(server, "blk0", "vdpasim_blk")
    dump = vdpa(server, request(nl.VDPA_CMD_DEV_GET, DUMP_REQ))
    assert dump == [
        dev_reply("vdpa0", "vdpasim_net", c.VIRTIO_ID_NET, 3, MULTI),  # rx, tx and the control queue
        dev_reply("blk0", "vdpasim_blk", c.VIRTIO_ID_BLOCK, 1, MULTI),
        done(),
    ]
    req = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("blk0"))
    assert vdpa(server, req) == [dev_reply("blk0", "vdpasim_blk", c.VIRTIO_ID_BLOCK, 1), ack(req)]
    (msg,) = decode(vdpa(server, request(nl.VDPA_CMD_DEV_GET, REQUEST, dev_name("vdpa0"))))
    assert attr_names(msg) == [
        "VDPA_ATTR_MGMTDEV_DEV_NAME",
        "VDPA_ATTR_DEV_NAME",
        "VDPA_ATTR_DEV_ID",
        "VDPA_ATTR_DEV_VENDOR_ID",
        "VDPA_ATTR_DEV_MAX_VQS",
        "VDPA_ATTR_DEV_MAX_VQ_SIZE",
        "VDPA_ATTR_DEV_MIN_VQ_SIZE",
    ]
    assert msg["cmd"] == nl.VDPA_CMD_DEV_NEW and msg.get_attr("VDPA_ATTR_DEV_MAX_VQS") == 3
    assert bus.get("vdpa0").device.mac == MAC
    req = request(nl.VDPA_CMD_DEV_DEL, REQ, dev_name("vdpa0"))
    assert vdpa(server, req) == [ack(req)]
    assert [v.name for v in bus.devices()] == ["blk0"]


def test_dev_add_with_max_vqp_and_features(server, bus):
    features = NET_SUPPORTED_FEATURES & ~(1 << c.VIRTIO_NET_F_MRG_RXBUF)
    add(
        server,
        "mq0",
        "vdpasim_net",
        mac_attr(MAC),
        nla(nl.VDPA_ATTR_DEV_NET_CFG_MAX_VQP, u16(4)),
        nla(nl.VDPA_ATTR_DEV_FEATURES, u64(features)),  # newer iproute2 puts device_features last
    )
    device = bus.get("mq0").device
    assert (device.get_vq_count(), device.get_device_features()) == (9, features)


# ----- configuration -----
def net_config(name: str, *, features: int, mtu: int, mac: bytes, max_vqp: int | None, negotiated=None) -> bytes:
    attrs = [dev_name(name), nla(nl.VDPA_ATTR_DEV_ID, u32(c.VIRTIO_ID_NET))]
    if negotiated is not None:
        attrs.append(nla(nl.VDPA_ATTR_DEV_NEGOTIATED_FEATURES, u64(negotiated)))
    attrs += [
        nla(nl.VDPA_ATTR_DEV_FEATURES, u64(features)),
        nla(nl.VDPA_ATTR_DEV_NET_CFG_MTU, u16(mtu)),
        mac_attr(mac),
        nla(nl.VDPA_ATTR_DEV_NET_STATUS, u16(c.VIRTIO_NET_S_LINK_UP)),  # u16, whatever the header says
    ]
    if max_vqp is not None:
        attrs.append(nla(nl.VDPA_ATTR_DEV_NET_CFG_MAX_VQP, u16(max_vqp)))
    return reply(nl.VDPA_CMD_DEV_CONFIG_GET, *attrs)


def test_config_show_net_before_and_after_feature_negotiation(server, bus):
    add(server, "vdpa0", "vdpasim_net", mac_attr(MAC))
    req = request(nl.VDPA_CMD_DEV_CONFIG_GET, REQ, dev_name("vdpa0"))
    expected = net_config("vdpa0", features=NET_SUPPORTED_FEATURES, mtu=1500, mac=MAC, max_vqp=1)
    assert vdpa(server, req) == [expected, ack(req)]
    negotiated = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_NET_F_MAC | 1 << c.VIRTIO_NET_F_STATUS
    negotiate(bus, "vdpa0", negotiated)
    (msg,) = decode(vdpa(server, request(nl.VDPA_CMD_DEV_CONFIG_GET, REQUEST, dev_name("vdpa0"))))
    assert attr_names(msg) == [
        "VDPA_ATTR_DEV_NAME",
        "VDPA_ATTR_DEV_ID",
        "VDPA_ATTR_DEV_NEGOTIATED_FEATURES",
        "VDPA_ATTR_DEV_FEATURES",
        "VDPA_ATTR_DEV_NET_CFG_MTU",
        "VDPA_ATTR_DEV_NET_CFG_MACADDR",
        "VDPA_ATTR_DEV_NET_STATUS",
        "VDPA_ATTR_DEV_NET_CFG_MAX_VQP",
    ]
    assert msg.get_attr("VDPA_ATTR_DEV_NEGOTIATED_FEATURES") == negotiated
    assert msg.get_attr("VDPA_ATTR_DEV_NET_CFG_MACADDR") == "52:54:00:00:00:01"


def test_config_show_without_optional_features_omits_their_attributes(server):
    features = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_F_ACCESS_PLATFORM
    add(server, "bare", "vdpasim_net", nla(nl.VDPA_ATTR_DEV_FEATURES, u64(features)))
    req = request(nl.VDPA_CMD_DEV_CONFIG_GET, REQ, dev_name("bare"))
    expected = reply(
        nl.VDPA_CMD_DEV_CONFIG_GET,
        dev_name("bare"),
        nla(nl.VDPA_ATTR_DEV_ID, u32(c.VIRTIO_ID_NET)),
        nla(nl.VDPA_ATTR_DEV_FEATURES, u64(features)),
    )
    assert vdpa(server, req) == [expected, ack(req)]


def test_config_show_blk_has_the_kernels_blk_attributes(server):
    add(server, "blk0", "vdpasim_blk")
    replies = vdpa(server, request(nl.VDPA_CMD_DEV_CONFIG_GET, DUMP_REQ))
    (msg, end) = decode(replies)
    assert end["header"]["type"] == NLMSG_DONE and msg["header"]["flags"] == MULTI
    assert attr_names(msg) == [
        "VDPA_ATTR_DEV_NAME",
        "VDPA_ATTR_DEV_ID",
        "VDPA_ATTR_DEV_FEATURES",
        "VDPA_ATTR_DEV_BLK_CFG_CAPACITY",
        "VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX",
        "VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE",
        "VDPA_ATTR_DEV_BLK_CFG_SEG_MAX",
        "VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES",
        "VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP",
        "VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET",
        "VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE",
        "VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE",
        "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC",
        "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG",
        "VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN",
        "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC",
        "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG",
        "VDPA_ATTR_DEV_BLK_READ_ONLY",
        "VDPA_ATTR_DEV_BLK_FLUSH",
    ]
    values = {slot.name: slot.value for slot in msg["attrs"]}
    assert values["VDPA_ATTR_DEV_BLK_CFG_CAPACITY"] == 0x40000  # vdpa_sim_blk's 128 MiB
    assert (values["VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX"], values["VDPA_ATTR_DEV_BLK_CFG_SEG_MAX"]) == (4096, 32)
    assert (values["VDPA_ATTR_DEV_BLK_READ_ONLY"], values["VDPA_ATTR_DEV_BLK_FLUSH"]) == (0, 1)
    # u8 attributes are one byte long: PHY_BLK_EXP is the 4-byte-aligned 5-byte TLV 05 00 1a 00 00.
    assert nla(nl.VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP, u8(0)) in replies[0]


# ----- vendor statistics -----
def test_vstats_after_feature_negotiation(server, bus):
    add(server, "vdpa0", "vdpasim_net")
    negotiated = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_NET_F_CTRL_VQ | 1 << c.VIRTIO_NET_F_MQ
    negotiate(bus, "vdpa0", negotiated)
    req = request(nl.VDPA_CMD_DEV_VSTATS_GET, REQ, dev_name("vdpa0"), nla(nl.VDPA_ATTR_DEV_QUEUE_INDEX, u32(1)))
    pairs = [("tx packets", 0), ("tx bytes", 0), ("tx errors", 0), ("tx drops", 0)]
    expected = reply(
        nl.VDPA_CMD_DEV_VSTATS_GET,
        dev_name("vdpa0"),
        nla(nl.VDPA_ATTR_DEV_ID, u32(c.VIRTIO_ID_NET)),
        nla(nl.VDPA_ATTR_DEV_NEGOTIATED_FEATURES, u64(negotiated)),
        nla(nl.VDPA_ATTR_DEV_NET_CFG_MAX_VQP, u16(1)),  # MQ negotiated
        nla(nl.VDPA_ATTR_DEV_QUEUE_INDEX, u32(1)),
        *(nla(18, strz(n)) + nla(19, u64(v)) for n, v in pairs),
    )
    assert vdpa(server, req) == [expected, ack(req)]
    (msg,) = decode(vdpa(server, request(nl.VDPA_CMD_DEV_VSTATS_GET, REQUEST, dev_name("vdpa0"), nla(17, u32(2)))))
    assert nl.vstats_view([msg]) == {
        "vstats": {"vdpa0": {"queue_type": "control_vq", "cvq requests": 0, "cvq successes": 0, "cvq errors": 0}}
    }


# ----- the validation the issue lists, each with the kernel's errno and extended ack -----
def test_dev_add_unknown_mgmtdev(server):
    req = dev_add("vdpa0", "vdpasim_nope")
    text = "vdpa: Fail to find the specified management device"
    assert vdpa(server, req) == [ack(req, errno.ENODEV, msg_tlv(text))]


def test_dev_add_duplicate_name_is_eexist_without_text(server):
    add(server, "vdpa0", "vdpasim_net")
    req = dev_add("vdpa0", "vdpasim_blk")
    assert vdpa(server, req) == [ack(req, errno.EEXIST)]  # the kernel's vdpa core says nothing more


def test_dev_add_mac_of_the_wrong_length_fails_the_policy(server):
    req = dev_add("vdpa0", "vdpasim_net", mac_attr(MAC[:5]))
    # NLA_POLICY_ETH_ADDR: binary of exactly 6 bytes; reported with the attribute's offset and policy.
    expected = ack(
        req,
        errno.ERANGE,
        msg_tlv("binary attribute size out of range"),
        offs_tlv(48),
        policy_tlv(nla(6, u32(6)), nla(7, u32(6)), nla(1, u32(10))),
    )
    assert vdpa(server, req) == [expected]


def test_dev_add_multicast_mac_is_refused_by_the_model(server):
    req = dev_add("vdpa0", "vdpasim_net", mac_attr(bytes.fromhex("010000000001")))
    assert refused(vdpa(server, req)) == (errno.EINVAL, "vdpasim_net: mac: 01:00:00:00:00:01 is a multicast address")


def test_dev_add_mtu_below_68_fails_the_policy(server):
    req = dev_add("vdpa0", "vdpasim_net", nla(nl.VDPA_ATTR_DEV_NET_CFG_MTU, u16(67)))
    expected = ack(
        req,
        errno.ERANGE,
        msg_tlv("integer out of range"),
        offs_tlv(48),
        policy_tlv(nla(4, u64(68)), nla(5, u64(0xFFFF)), nla(1, u32(3))),  # MIN/MAX_VALUE_U, TYPE U16
    )
    assert vdpa(server, req) == [expected]
    # Without NETLINK_CAP_ACK the request comes back whole; without NETLINK_EXT_ACK no attributes follow.
    plain = server.handle(req, sender_pid=PID)
    assert plain == [ack(req, errno.ERANGE, capped=False)]


def test_dev_add_max_vqp_zero(server):
    req = dev_add("vdpa0", "vdpasim_net", nla(nl.VDPA_ATTR_DEV_NET_CFG_MAX_VQP, u16(0)))
    assert vdpa(server, req) == [ack(req, errno.EINVAL, msg_tlv("vdpa: At least one pair of VQs is required"))]


@pytest.mark.parametrize(
    ("attr", "mask"),
    [
        pytest.param(nla(nl.VDPA_ATTR_DEV_FEATURES, u64(1 << 32)), 1 << 20, id="device_features"),
        pytest.param(mac_attr(MAC), 1 << 10, id="mac"),  # a net attribute: the mask is checked first
        pytest.param(nla(nl.VDPA_ATTR_DEV_NET_CFG_MTU, u16(1500)), 1 << 13, id="mtu"),
    ],
)
def test_dev_add_attribute_outside_the_mgmtdev_mask(server, attr, mask):
    req = dev_add("blk0", "vdpasim_blk", attr)
    text = f"vdpa: Some provided attributes are not supported: 0x{mask:x}"
    assert vdpa(server, req) == [ack(req, errno.EOPNOTSUPP, msg_tlv(text))]


def test_dev_add_missing_features_for_provided_attributes(server):
    features = 1 << c.VIRTIO_F_VERSION_1
    req = dev_add("vdpa0", "vdpasim_net", mac_attr(MAC), nla(nl.VDPA_ATTR_DEV_FEATURES, u64(features)))
    text = "vdpa: Missing features 0x20 for provided attributes"
    assert vdpa(server, req) == [ack(req, errno.EINVAL, msg_tlv(text))]


def test_dev_add_unsupported_device_features_is_the_models_einval(server):
    req = dev_add("vdpa0", "vdpasim_net", nla(nl.VDPA_ATTR_DEV_FEATURES, u64(1 << c.VIRTIO_F_VERSION_1 | 1 << 0)))
    err, text = refused(vdpa(server, req))
    assert err == errno.EINVAL and text.startswith("vdpasim_net: device_features: VIRTIO_NET_F_CSUM")


def test_admin_commands_need_cap_net_admin(server):
    req = dev_add("vdpa0", "vdpasim_net")
    assert vdpa(server, req, admin=False) == [ack(req, errno.EPERM)]
    assert decode(vdpa(server, request(nl.VDPA_CMD_DEV_GET, DUMP_REQ), admin=False))[-1]["header"]["type"] == 3


@pytest.mark.parametrize(
    "cmd",
    [nl.VDPA_CMD_DEV_NEW, nl.VDPA_CMD_DEV_DEL, nl.VDPA_CMD_DEV_GET, nl.VDPA_CMD_DEV_CONFIG_GET],
)
def test_missing_dev_name_is_einval_without_text(server, cmd):
    req = request(cmd, REQ, mgmtdev_name("vdpasim_net"))
    assert vdpa(server, req) == [ack(req, errno.EINVAL)]


@pytest.mark.parametrize("cmd", [nl.VDPA_CMD_DEV_DEL, nl.VDPA_CMD_DEV_GET, nl.VDPA_CMD_DEV_CONFIG_GET])
def test_unknown_device(server, cmd):
    req = request(cmd, REQ, dev_name("ghost"))
    assert vdpa(server, req) == [ack(req, errno.ENODEV, msg_tlv("vdpa: device not found"))]


def test_vstats_refusals(server, bus):
    add(server, "vdpa0", "vdpasim_net")
    add(server, "blk0", "vdpasim_blk")

    def vstats(name: str, *qidx: int) -> tuple[int, str | None]:
        attrs = [nla(nl.VDPA_ATTR_DEV_QUEUE_INDEX, u32(q)) for q in qidx]
        return refused(vdpa(server, request(nl.VDPA_CMD_DEV_VSTATS_GET, REQ, dev_name(name), *attrs)))

    assert vstats("vdpa0") == (errno.EINVAL, None)  # no queue index
    assert vstats("ghost", 0) == (errno.ENODEV, "vdpa: device not found")
    assert vstats("vdpa0", 0) == (errno.EAGAIN, "vdpa: feature negotiation not complete")
    assert vstats("blk0", 0) == (errno.EOPNOTSUPP, None)  # net only
    assert vstats("vdpa0", 0x8001) == (errno.ERANGE, "vdpa: queue index exceeds max value")
    negotiate(bus, "vdpa0", 1 << c.VIRTIO_F_VERSION_1)
    err, text = vstats("vdpa0", 7)  # one pair, no control queue negotiated: queue 7 has no role
    assert err == errno.EINVAL and text.startswith("vdpasim_net: vdpa0: no queue 7")


def test_dev_set_mac(server, bus):
    add(server, "vdpa0", "vdpasim_net", mac_attr(MAC))
    new = bytes.fromhex("525400000002")
    req = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("vdpa0"), mac_attr(new))
    assert vdpa(server, req) == [ack(req)]
    (msg,) = decode(vdpa(server, request(nl.VDPA_CMD_DEV_CONFIG_GET, REQUEST, dev_name("vdpa0"))))
    assert msg.get_attr("VDPA_ATTR_DEV_NET_CFG_MACADDR") == "52:54:00:00:00:02"
    assert bus.get("vdpa0").device.mac == new


def test_dev_set_refusals(server):
    add(server, "vdpa0", "vdpasim_net")
    add(server, "blk0", "vdpasim_blk")
    bad = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("vdpa0"), mac_attr(bytes.fromhex("ff0000000001")))
    assert vdpa(server, bad) == [ack(bad, errno.EOPNOTSUPP, msg_tlv("vdpa: Invalid MAC address"))]
    zero = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("vdpa0"), mac_attr(bytes(6)))
    assert refused(vdpa(server, zero)) == (errno.EOPNOTSUPP, "vdpa: Invalid MAC address")
    nothing = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("vdpa0"))
    assert vdpa(server, nothing) == [ack(nothing, errno.EOPNOTSUPP)]
    unnamed = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, mac_attr(MAC))
    assert vdpa(server, unnamed) == [ack(unnamed, errno.EINVAL)]
    # A block device: the kernel answers success and says why nothing happened (a warning).
    blk = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("blk0"), mac_attr(MAC))
    assert vdpa(server, blk) == [ack(blk, 0, msg_tlv("vdpa: blk0 device not supported"))]


# ----- strict validation (every vdpa op since Linux 6.5) and the generic-netlink header -----
def test_strict_attribute_validation(server):
    unknown = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("x"), nla(0x3000, u32(1)))
    assert vdpa(server, unknown) == [ack(unknown, errno.EINVAL, msg_tlv("Unknown attribute type"), offs_tlv(28))]
    unspec = request(nl.VDPA_CMD_DEV_GET, REQ, nla(nl.VDPA_ATTR_DEV_ID, u32(1)))
    assert vdpa(server, unspec) == [ack(unspec, errno.EINVAL, msg_tlv("Unsupported attribute"), offs_tlv(20))]
    wide = dev_add("vdpa0", "vdpasim_net", nla(nl.VDPA_ATTR_DEV_NET_CFG_MTU, u32(1500)))
    policy = policy_tlv(nla(4, u64(68)), nla(5, u64(0xFFFF)), nla(1, u32(3)))
    assert vdpa(server, wide) == [ack(wide, errno.EINVAL, msg_tlv("invalid attribute length"), offs_tlv(48), policy)]
    empty = request(nl.VDPA_CMD_DEV_GET, REQ, nla(nl.VDPA_ATTR_DEV_NAME, b""))
    text = "Attribute failed policy validation"
    string_policy = policy_tlv(nla(1, u32(11)))  # NL_ATTR_TYPE_STRING, no length limit
    assert vdpa(server, empty) == [ack(empty, errno.ERANGE, msg_tlv(text), offs_tlv(20), string_policy)]
    trailing = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("x"), b"\x01\x00")  # two bytes: no attribute fits
    text = "bytes leftover after parsing attributes"
    assert vdpa(server, trailing) == [ack(trailing, errno.EINVAL, msg_tlv(text))]


def test_genl_header_checks(server):
    # Only commands from the family's resv_start_op (8, DEV_ATTR_SET) have their header checked.
    reserved = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ, dev_name("x"), reserved=1)
    assert vdpa(server, reserved) == [ack(reserved, errno.EINVAL, msg_tlv("genlmsghdr.reserved field is not 0"))]
    create = request(nl.VDPA_CMD_DEV_ATTR_SET, REQ | 0x400, dev_name("x"))
    text = "ambiguous or reserved bits set in nlmsg_flags"
    assert vdpa(server, create) == [ack(create, errno.EINVAL, msg_tlv(text))]
    old = request(nl.VDPA_CMD_DEV_GET, REQ | 0x400, dev_name("x"), reserved=1)
    assert refused(vdpa(server, old)) == (errno.ENODEV, "vdpa: device not found")
    no_dump = request(nl.VDPA_CMD_DEV_NEW, DUMP_REQ)
    assert vdpa(server, no_dump) == [ack(no_dump, errno.EOPNOTSUPP)]
    unknown_cmd = request(42, REQ)
    assert vdpa(server, unknown_cmd) == [ack(unknown_cmd, errno.EOPNOTSUPP)]
    short = request(nl.VDPA_CMD_DEV_GET, REQ)[:18]
    short = struct.pack("=I", 18) + short[4:]
    assert vdpa(server, short) == [ack(short, errno.EINVAL)]
    other_family = request(nl.VDPA_CMD_DEV_GET, REQ, family=0x3FF)
    assert vdpa(server, other_family) == [ack(other_family, errno.ENOENT)]


# ----- vdpasim's extension attributes -----
def test_extensions_appear_only_when_asked(server, bus):
    add(
        server,
        "resp0",
        "vdpasim_net",
        nla(nl.VDPASIM_ATTR_NET_MODE, strz("responder")),
        nla(nl.VDPASIM_ATTR_NET_PEER_IP, bytes([10, 0, 2, 2])),
    )
    vdev = bus.get("resp0")
    assert (vdev.config.mode, vdev.config.peer_ip) == ("responder", "10.0.2.2")
    vdev.vhost_user_path = "/run/vdpasim/resp0.vhost-user.sock"
    plain = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("resp0"))
    assert vdpa(server, plain)[0] == dev_reply("resp0", "vdpasim_net", c.VIRTIO_ID_NET, 3)
    asked = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("resp0"), nla(nl.VDPASIM_ATTR_EXTENSIONS, b""))
    door = nla(nl.VDPASIM_ATTR_VHOST_USER_PATH, strz(vdev.vhost_user_path))
    assert vdpa(server, asked)[0] == dev_reply("resp0", "vdpasim_net", c.VIRTIO_ID_NET, 3, 0, door)
    config = request(nl.VDPA_CMD_DEV_CONFIG_GET, REQUEST, dev_name("resp0"), nla(nl.VDPASIM_ATTR_EXTENSIONS, b""))
    (msg,) = decode(vdpa(server, config))
    assert msg.get_attr("VDPASIM_ATTR_NET_MODE") == "responder"
    assert msg.get_attr("VDPASIM_ATTR_NET_PEER_IP") == "10.0.2.2"
    assert attr_names(msg)[-4:] == [
        "VDPASIM_ATTR_NET_MODE",
        "VDPASIM_ATTR_NET_PEER_IP",
        "VDPASIM_ATTR_NET_PEER_MAC",
        "VDPASIM_ATTR_BUSY_POLL",
    ]


def test_blk_extensions_capacity_read_only_and_backing_file(server, bus, tmp_path):
    image = tmp_path / "disk.img"
    add(
        server,
        "blk0",
        "vdpasim_blk",
        nla(nl.VDPASIM_ATTR_BLK_CAPACITY, u64(2048)),
        nla(nl.VDPASIM_ATTR_BLK_PATH, strz(str(image))),
        nla(nl.VDPASIM_ATTR_BLK_CREATE, u8(1)),
    )
    assert image.stat().st_size == 2048 * 512
    add(server, "ro0", "vdpasim_blk", nla(nl.VDPASIM_ATTR_BLK_READ_ONLY, u8(1)))
    replies = vdpa(server, request(nl.VDPA_CMD_DEV_CONFIG_GET, DUMP_REQ, nla(nl.VDPASIM_ATTR_EXTENSIONS, b"")))
    blk, ro, _ = decode(replies)
    assert blk.get_attr("VDPA_ATTR_DEV_BLK_CFG_CAPACITY") == 2048
    assert blk.get_attr("VDPASIM_ATTR_BLK_PATH") == str(image)
    assert (ro.get_attr("VDPA_ATTR_DEV_BLK_READ_ONLY"), ro.get_attr("VDPASIM_ATTR_BLK_PATH")) == (1, None)
    missing = dev_add("blk1", "vdpasim_blk", nla(nl.VDPASIM_ATTR_BLK_PATH, strz(str(tmp_path / "absent.img"))))
    err, text = refused(vdpa(server, missing))
    assert err == errno.ENOENT and text.startswith("vdpasim_blk: ") and "absent.img" in text


def test_extension_on_the_wrong_mgmtdev_and_reply_only_extensions(server):
    wrong = dev_add("blk0", "vdpasim_blk", nla(nl.VDPASIM_ATTR_NET_MODE, strz("loopback")))
    assert refused(vdpa(server, wrong)) == (errno.EOPNOTSUPP, "vdpasim: vdpasim_blk does not take mode")
    reply_only = dev_add("vdpa0", "vdpasim_net", nla(nl.VDPASIM_ATTR_VHOST_USER_PATH, strz("/tmp/x")))
    assert refused(vdpa(server, reply_only)) == (errno.EINVAL, "Unsupported attribute")


# ----- the message walk -----
def test_a_long_dump_is_split_into_datagrams_a_one_page_reader_can_take(server):
    for i in range(60):
        add(server, f"vdpa{i}", "vdpasim_net")
    replies = vdpa(server, request(nl.VDPA_CMD_DEV_GET, DUMP_REQ))
    assert len(replies) == 61 and replies[-1] == done()
    grouped = datagrams(replies)
    assert b"".join(grouped) == b"".join(replies) and grouped[-1] == done()
    assert len(grouped) >= 3 and all(len(d) <= 4096 for d in grouped)


def test_several_requests_in_one_datagram_and_non_requests(server):
    first = request(nl.VDPA_CMD_MGMTDEV_GET, REQ, mgmtdev_name("vdpasim_net"))
    second = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("ghost"))
    replies = vdpa(server, first + second)
    assert replies == [
        mgmtdev_reply(*NET_MGMT),
        ack(first),
        ack(second, errno.ENODEV, msg_tlv("vdpa: device not found")),
    ]
    not_a_request = request(nl.VDPA_CMD_DEV_GET, ACK)
    assert vdpa(server, not_a_request) == [ack(not_a_request)]
    control = struct.pack("=IHHII", 16, 1, REQ, SEQ, 0)  # NLMSG_NOOP asked to be acked
    assert vdpa(server, control) == [ack(control)]
    truncated = request(nl.VDPA_CMD_DEV_GET, REQ, dev_name("ghost"))
    assert vdpa(server, truncated[:-4]) == []  # a length past the datagram's end: dropped silently


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda cmd, flags, payload: request(cmd, flags, payload),
            st.integers(0, 12),
            st.sampled_from([REQ, DUMP_REQ, REQUEST, REQ | 0x400]),
            st.binary(max_size=120),
        ),
    )
)
def test_any_bytes_get_well_formed_answers(server, data):
    for reply_bytes in server.handle(data, sender_pid=PID, ext_ack=True):
        length, kind, _, _, pid = struct.unpack_from("=IHHII", reply_bytes)
        assert (length, pid) == (len(reply_bytes), PID)
        assert kind in (NLMSG_ERROR, NLMSG_DONE, FAMILY, 0x10)
