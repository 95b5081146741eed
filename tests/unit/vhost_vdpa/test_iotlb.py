"""The IOTLB message codec against vhost_chr_write_iter's reading rules (drivers/vhost/vhost.c)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.iotlb import MESSAGE_SIZE, NEEDED_BYTES, IotlbMessage, encode, parse
from vdpasim.errors import CodecError

U64 = st.integers(0, (1 << 64) - 1)


@given(
    kind=st.integers(0, 255), asid=st.integers(0, 0xFFFFFFFF), iova=U64, size=U64, uaddr=U64, perm=st.integers(0, 255)
)
def test_v2_round_trip(kind: int, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
    message = IotlbMessage(kind, asid, iova, size, uaddr, perm, 2)
    data = encode(message, True)
    assert len(data) == MESSAGE_SIZE == 72
    if kind == a.VHOST_IOTLB_UPDATE and size == 0:
        with pytest.raises(CodecError):
            parse(data, True)
        return
    assert parse(data, True) == message
    assert parse(data, False) == IotlbMessage(kind, 0, iova, size, uaddr, perm, 2)  # asid not read without ASID


def test_v1_layout_and_round_trip() -> None:
    message = IotlbMessage(a.VHOST_IOTLB_UPDATE, 0, 0x1000, 0x2000, 0x7F0000001000, a.VHOST_ACCESS_RW, 1)
    data = encode(message, False)
    assert struct.unpack_from("<i", data)[0] == 1 and data[4:8] == bytes(4)
    assert a.VHOST_IOTLB_MSG.unpack_from(data, 8) == (0x1000, 0x2000, 0x7F0000001000, 3, 2)
    assert parse(data, True) == message  # v1 is accepted whatever was negotiated; it has no asid
    with pytest.raises(CodecError):
        encode(IotlbMessage(a.VHOST_IOTLB_UPDATE, asid=1), False)


@pytest.mark.parametrize("length", [0, 3, 4, 7, 8, 39])
def test_short_writes_are_einval(length: int) -> None:
    data = encode(IotlbMessage(a.VHOST_IOTLB_INVALIDATE, 0, 0, 4096), True)
    with pytest.raises(CodecError) as info:
        parse(data[:length], True)
    assert info.value.errno == errno.EINVAL


def test_forty_bytes_are_enough_and_the_rest_is_ignored() -> None:
    data = encode(IotlbMessage(a.VHOST_IOTLB_INVALIDATE, 0, 0, 4096), True)
    assert NEEDED_BYTES == 40
    assert parse(data[:40], False) == parse(data + b"junk", False) == IotlbMessage(3, 0, 0, 4096, 0, 0, 2)


@pytest.mark.parametrize("framing", [0, 3, -1, 0x7FFFFFFF])
def test_unknown_framing_is_einval(framing: int) -> None:
    data = struct.pack("<i", framing) + encode(IotlbMessage(a.VHOST_IOTLB_UPDATE, size=1), True)[4:]
    with pytest.raises(CodecError) as info:
        parse(data, True)
    assert info.value.errno == errno.EINVAL


def test_update_of_size_zero_is_refused_other_types_are_not() -> None:
    with pytest.raises(CodecError):
        parse(encode(IotlbMessage(a.VHOST_IOTLB_UPDATE, iova=4096), True), False)
    assert parse(encode(IotlbMessage(a.VHOST_IOTLB_INVALIDATE), True), False).last == (1 << 64) - 1
