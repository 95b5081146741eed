"""The VDUSE uapi as the 6.12 kernel encodes it, and the kernel's limits checked before any ioctl.

The host has no VDUSE: the ioctl numbers and struct sizes are pinned here against the values the
kernel's headers produce (protocols.md §3), and the kernel-mode path itself runs in the guest
(tests/e2e/test_vduse_kernel_mode.py).
"""

from __future__ import annotations

import ctypes

import pytest

from vdpasim.config import NetConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.net import NetDevice
from vdpasim.errors import UsageError
from vdpasim.vduse import abi
from vdpasim.vduse.device import VDUSE_NET_UNSUPPORTED, VduseDevice, vduse_features, vduse_net_config
from vdpasim.virtio import constants as c

IOCTLS = {
    "VDUSE_GET_API_VERSION": 0x80088100,
    "VDUSE_SET_API_VERSION": 0x40088101,
    "VDUSE_CREATE_DEV": 0x41508102,
    "VDUSE_DESTROY_DEV": 0x41008103,
    "VDUSE_IOTLB_GET_FD": 0xC0208110,
    "VDUSE_DEV_GET_FEATURES": 0x80088111,
    "VDUSE_DEV_SET_CONFIG": 0x40088112,
    "VDUSE_DEV_INJECT_CONFIG_IRQ": 0x00008113,
    "VDUSE_VQ_SETUP": 0x40208114,
    "VDUSE_VQ_GET_INFO": 0xC0308115,
    "VDUSE_VQ_SETUP_KICKFD": 0x40088116,
    "VDUSE_VQ_INJECT_IRQ": 0x40048117,
    "VDUSE_IOTLB_REG_UMEM": 0x40308118,
    "VDUSE_IOTLB_DEREG_UMEM": 0x40308119,
    "VDUSE_IOTLB_GET_INFO": 0xC030811A,
}


@pytest.mark.parametrize(("name", "number"), IOCTLS.items())
def test_ioctl_numbers_match_the_kernel_headers(name: str, number: int) -> None:
    assert getattr(abi, name) == number


def test_struct_layouts_match_the_kernel() -> None:
    sizes = {
        abi.vduse_dev_config: 336,
        abi.vduse_vq_config: 32,
        abi.vduse_vq_info: 48,
        abi.vduse_iotlb_entry: 32,
        abi.vduse_iova_umem: 48,
        abi.vduse_iova_info: 48,
        abi.vduse_vq_state: 12,
        abi.vduse_dev_request: 152,
        abi.vduse_dev_response: 152,
    }
    assert {cls.__name__: ctypes.sizeof(cls) for cls in sizes} == {cls.__name__: n for cls, n in sizes.items()}
    assert abi.vduse_dev_config.config_size.offset == 332
    assert abi.vduse_vq_info.ready.offset == 40
    assert abi.vduse_dev_request.u.offset == 24 and abi.vduse_dev_response.u.offset == 24


def test_create_request_carries_the_config_space_after_the_header() -> None:
    raw = abi.config_request(
        "vd0", device_id=1, vendor_id=0, features=1 << 32, vq_num=2, vq_align=4096, config=b"\x02" * 6
    )
    head = abi.vduse_dev_config.from_buffer_copy(raw)
    assert (head.name, head.device_id, head.vq_num, head.config_size) == (b"vd0", 1, 2, 6)
    assert list(head.reserved) == [0] * 13
    assert raw[336:] == b"\x02" * 6
    with pytest.raises(ValueError):
        abi.config_request("", device_id=1, vendor_id=0, features=0, vq_num=1, vq_align=4096, config=b"")


def test_a_request_decodes_and_a_response_encodes_by_field() -> None:
    request = abi.vduse_dev_request(type=abi.VDUSE_SET_STATUS, request_id=7)
    request.s.status = 0x0F
    decoded = abi.vduse_dev_request.from_buffer_copy(bytes(request))
    assert (decoded.type, decoded.request_id, decoded.s.status) == (1, 7, 0x0F)
    response = abi.vduse_dev_response(request_id=7)
    response.vq_state.index = 1
    response.vq_state.split.avail_index = 0x1234
    assert bytes(response)[:8] == b"\x07\0\0\0\0\0\0\0" and bytes(response)[24:30] == b"\x01\0\0\0\x34\x12"


def test_the_kernel_limits_are_explained_before_anything_is_created() -> None:
    with pytest.raises(UsageError, match="CTRL_VQ"):
        vduse_features(NetDevice(NetConfig(name="full")))
    no_platform = NetConfig(name="np", device_features=(1 << c.VIRTIO_F_VERSION_1) | (1 << c.VIRTIO_NET_F_MAC))
    with pytest.raises(UsageError, match="ACCESS_PLATFORM"):
        VduseDevice(NetDevice(no_platform))
    device = NetDevice(vduse_net_config("vd0", mac="02:00:00:00:00:01"))
    features = vduse_features(device)
    assert not features & VDUSE_NET_UNSUPPORTED
    assert features >> c.VIRTIO_F_VERSION_1 & 1 and features >> c.VIRTIO_F_ACCESS_PLATFORM & 1
    assert device.get_vq_count() == 2  # no control queue


def test_a_blk_device_passes_as_the_model_offers_it() -> None:
    from vdpasim.config import BlkConfig

    device = BlkDevice(BlkConfig(name="vb0", capacity=8))
    try:
        assert not vduse_features(device) >> c.VIRTIO_BLK_F_CONFIG_WCE & 1
    finally:
        device.close()


def _request(kind: int, request_id: int = 1) -> abi.vduse_dev_request:
    return abi.vduse_dev_request(type=kind, request_id=request_id)


def test_messages_that_need_no_kernel_are_answered_from_the_model() -> None:
    device = NetDevice(vduse_net_config("vd1"))
    vduse = VduseDevice(device)  # not created: only the message handler is exercised
    try:
        status = _request(abi.VDUSE_SET_STATUS, 5)
        status.s.status = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
        reply = vduse.handle(status)
        assert (reply.request_id, reply.result) == (5, abi.VDUSE_REQ_RESULT_OK)
        assert device.get_status() == c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER

        state = _request(abi.VDUSE_GET_VQ_STATE, 6)
        state.vq_state.index = 1
        reply = vduse.handle(state)
        assert (reply.result, reply.vq_state.index, reply.vq_state.split.avail_index) == (0, 1, 0)

        state.vq_state.index = 9  # no such queue: the kernel hears FAILED, the loop carries on
        assert vduse.handle(state).result == abi.VDUSE_REQ_RESULT_FAILED
        assert vduse.handle(_request(7)).result == abi.VDUSE_REQ_RESULT_FAILED

        reset = _request(abi.VDUSE_SET_STATUS, 8)
        assert vduse.handle(reset).result == abi.VDUSE_REQ_RESULT_OK
        assert device.get_status() == 0
        assert vduse.messages == {"SET_STATUS": 2, "GET_VQ_STATE": 2, "UPDATE_IOTLB": 0, "failed": 2}
    finally:
        device.close()
