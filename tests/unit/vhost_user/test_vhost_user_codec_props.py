"""Properties of the vhost-user codec, for every request and payload hypothesis can build.

* decode(encode(x)) == x, and encode(decode(encode(x))) == encode(x), for any valid message of either
  channel, request or reply (the extension's error reply included);
* how the bytes are cut into chunks does not change what is decoded;
* arbitrary or mutated bytes decode to a message or raise CodecError, nothing else (h11's fuzzing
  invariant), and a message they decode to is a fixed point of encode/decode.

fds here are numbers above the process's hard fd limit: the codec only counts and passes them on,
and if a bug made it close one, nothing real would be closed.
"""

from __future__ import annotations

import resource
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.vhost_user import messages as m
from bridge.vhost_user.codec import Codec, expected_fds
from bridge.vhost_user.messages import BackendRequest, FrontendRequest, Message
from vdpasim.errors import CodecError

FAKE_FD = resource.getrlimit(resource.RLIMIT_NOFILE)[1] + 1000

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
region = st.builds(m.MemoryRegion, u64, u64, u64, u64)


def _config() -> st.SearchStrategy[m.ConfigSpace]:
    return st.builds(
        lambda offset, flags, data: m.ConfigSpace(offset, len(data), flags, data),
        u32,
        u32,
        st.binary(max_size=m.ConfigSpace.MAX_SIZE),
    )


PAYLOADS: dict[type[m.Payload], st.SearchStrategy[m.Payload]] = {
    m.Empty: st.just(m.Empty()),
    m.U64: st.builds(m.U64, u64),
    m.VringState: st.builds(m.VringState, u32, u32),
    m.VringAddr: st.builds(m.VringAddr, u32, u32, u64, u64, u64, u64),
    m.MemoryTable: st.builds(lambda regions: m.MemoryTable(tuple(regions)), st.lists(region, max_size=8)),
    m.SingleMemoryRegion: st.builds(m.SingleMemoryRegion, region),
    m.LogArea: st.builds(m.LogArea, u64, u64),
    m.IotlbMsg: st.builds(m.IotlbMsg, u64, u64, u64, u8, u8),
    m.ConfigSpace: _config(),
    m.VringArea: st.builds(m.VringArea, u64, u64, u64),
    m.InflightInfo: st.builds(m.InflightInfo, u64, u64, u16, u16),
    m.DeviceStateTransfer: st.builds(m.DeviceStateTransfer, u32, u32),
    m.IovaRange: st.builds(m.IovaRange, u64, u64),
    m.SharedObject: st.builds(m.SharedObject, st.binary(min_size=16, max_size=16)),
    m.ShmemMap: st.builds(m.ShmemMap, u8, u64, u64, u64, u64),
    m.ShmemConfig: st.builds(lambda sizes: m.ShmemConfig(tuple(sizes)), st.lists(u64, max_size=12)),
    m.ErrorReply: st.builds(m.ErrorReply, st.integers(1, m.ErrorReply.MAX_ERRNO)),
    m.Raw: st.builds(m.Raw, st.binary(max_size=64)),
}
REQUESTS = list(FrontendRequest) + list(BackendRequest)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    request = draw(st.sampled_from(REQUESTS))
    reply = draw(st.booleans())
    request_type, reply_type = m.payload_types(request)
    kind = (reply_type or m.U64) if reply else request_type
    if reply and kind is not m.Raw and draw(st.integers(0, 7)) == 0:
        kind = m.ErrorReply  # the extension's failure answer fits any reply
    payload = draw(PAYLOADS[kind])
    need_reply = draw(st.booleans())
    message = Message(request, payload, reply=reply, need_reply=need_reply)
    count = expected_fds(message)
    if count is None:
        count = draw(st.integers(0, 1))
    fds = tuple(FAKE_FD + i for i in range(count))
    return Message(request, payload, fds, reply=reply, need_reply=need_reply)


def _decode_all(data: bytes, fds: tuple[int, ...] = (), *, backend_channel: bool = False) -> list[Message]:
    codec = Codec(backend_channel=backend_channel)
    codec.receive_data(data, fds)
    out = []
    while (message := codec.next_message()) is not None:
        out.append(message)
    return out


@given(messages())
def test_decode_inverts_encode(message: Message) -> None:
    data, fds = Codec.encode(message)
    backend = isinstance(message.request, BackendRequest)
    assert _decode_all(data, fds, backend_channel=backend) == [message]
    (again,) = _decode_all(data, fds, backend_channel=backend)
    assert Codec.encode(again) == (data, fds)


@given(st.lists(messages().filter(lambda x: isinstance(x.request, FrontendRequest)), max_size=6), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_chunking_does_not_change_what_is_decoded(batch: list[Message], data: st.DataObject) -> None:
    """One sendmsg per message (its fds with its first byte), recvmsg cutting the stream anywhere."""
    codec = Codec()
    wire = b""
    fd_at: list[tuple[int, tuple[int, ...]]] = []
    for message in batch:
        encoded, fds = Codec.encode(message)
        fd_at.append((len(wire), fds))
        wire += encoded
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)) + [o for o, _ in fd_at]))
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if start == end:
            continue
        fds = tuple(fd for offset, chunk_fds in fd_at if offset == start for fd in chunk_fds)
        codec.receive_data(wire[start:end], fds)
        while (message := codec.next_message()) is not None:
            decoded.append(message)
    assert decoded == batch


def _only_codec_errors(data: bytes, nfds: int, backend_channel: bool) -> None:
    codec = Codec(backend_channel=backend_channel)
    codec.receive_data(data, tuple(FAKE_FD + i for i in range(nfds)))
    for _ in range(64):
        try:
            message = codec.next_message()
        except CodecError:
            if codec.closed:
                return
            continue
        if message is None:
            return
        # A message bytes decode to is a fixed point: re-encoding it decodes to the same message.
        encoded, fds = Codec.encode(message)
        assert _decode_all(encoded, fds, backend_channel=backend_channel) == [message]


@given(st.binary(max_size=600), st.integers(0, 3), st.booleans())
def test_arbitrary_bytes_raise_nothing_but_codec_error(data: bytes, nfds: int, backend_channel: bool) -> None:
    _only_codec_errors(data, nfds, backend_channel)


@given(messages(), st.data())
def test_mutated_messages_raise_nothing_but_codec_error(message: Message, data: st.DataObject) -> None:
    wire = bytearray(Codec.encode(message)[0])
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "size", "code"]))
    if mutation == "flip" and wire:
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] ^= data.draw(st.integers(1, 0xFF))
    elif mutation == "truncate":
        del wire[data.draw(st.integers(0, len(wire))) :]
    elif mutation == "extend":
        wire += data.draw(st.binary(min_size=1, max_size=64))
    elif mutation == "size":
        struct.pack_into("<I", wire, 8, data.draw(u32))
    else:
        struct.pack_into("<I", wire, 0, data.draw(u32))
    nfds = data.draw(st.integers(0, 3))
    _only_codec_errors(bytes(wire), nfds, isinstance(message.request, BackendRequest))
