"""The vhost-user codec, free of I/O: bytes and fds in, Messages out, and back (as h11 does for HTTP).

One ``Codec`` per channel end. ``receive_data(data, fds)`` only buffers; ``next_message()`` returns a
Message or None for "need more bytes"; ``encode(message)`` returns what to send. Both the back-end
server and the front-end client use it, on the main channel (front-end requests) and on the
back-end request channel (back-end requests).

fds arrive with the chunk of bytes they were sent with; a message owns every fd that arrived with any
of its bytes (a sender passes a message's fds with its first byte). The codec checks syntax only:
header version and flags, payload size and layout, the number of fds each request may carry. Order and
negotiation are the session's business. Any fault raises CodecError after closing the fds involved;
nothing else ever leaves ``next_message`` (tests/fuzz holds the codec to that).

A reply of exactly four bytes is the vDPA extension's failure reply (``ErrorReply``): no reply of the
protocol has that size, so it decodes unambiguously whatever the request was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from vdpasim.errors import CodecError

from .messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    BackendRequest,
    ErrorReply,
    FrontendRequest,
    MemoryTable,
    Message,
    Raw,
    VringArea,
    payload_types,
)

__all__ = ["Codec", "close_fds", "expected_fds"]

F = FrontendRequest
B = BackendRequest
# Front-end requests whose u64 payload names a ring and carries one fd unless the "no fd" bit is set.
_VRING_FD_REQUESTS = frozenset({F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR, F.VDPA_SET_CONFIG_CALL})
# Front-end requests that always carry exactly one fd.
_ONE_FD_REQUESTS = frozenset(
    {
        F.SET_LOG_BASE,
        F.SET_LOG_FD,
        F.SET_BACKEND_REQ_FD,
        F.SET_INFLIGHT_FD,
        F.GPU_SET_SOCKET,
        F.ADD_MEM_REG,
        F.SET_DEVICE_STATE_FD,
    }
)
# Replies to front-end requests that carry one fd.
_ONE_FD_REPLIES = frozenset({F.GET_INFLIGHT_FD, F.POSTCOPY_ADVISE})
# Requests or replies that may carry an fd or not, with nothing in the payload to say which.
_ANY_FDS = frozenset({F.REM_MEM_REG})  # the spec tolerates an fd here: accept and close it
_ANY_FDS_REPLIES = frozenset({F.GET_SHARED_OBJECT})  # the dma-buf fd, absent on failure


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def expected_fds(message: Message) -> int | None:
    """How many fds ``message`` must carry; None when zero or one are both acceptable."""
    request, payload = message.request, message.payload
    # The two request enums share numbers: compare by identity, never by value.
    if isinstance(request, BackendRequest):
        if message.reply:
            return None if request is B.SHARED_OBJECT_LOOKUP else 0
        if request is B.VRING_HOST_NOTIFIER_MSG:
            assert isinstance(payload, VringArea)
            return 0 if payload.index_flags & VRING_NOFD_MASK else 1
        return 1 if request is B.SHMEM_MAP else 0
    if message.reply:
        if isinstance(payload, ErrorReply):
            return 0
        if request is F.SET_DEVICE_STATE_FD:
            assert isinstance(payload, U64)
            return 0 if payload.value & VRING_NOFD_MASK else 1
        if request in _ANY_FDS_REPLIES:
            return None
        return 1 if request in _ONE_FD_REPLIES else 0
    if request is F.SET_MEM_TABLE:
        assert isinstance(payload, MemoryTable)
        return len(payload.regions)
    if request in _VRING_FD_REQUESTS:
        assert isinstance(payload, U64)
        return 0 if payload.value & VRING_NOFD_MASK else 1
    if request in _ONE_FD_REQUESTS:
        return 1
    if request in _ANY_FDS:
        return None
    return 0


class Codec:
    """Framing of one channel end. ``backend_channel`` selects the back-end request vocabulary."""

    def __init__(self, *, backend_channel: bool = False) -> None:
        self._requests: type[FrontendRequest] | type[BackendRequest] = (
            BackendRequest if backend_channel else FrontendRequest
        )
        self._buffer = bytearray()
        self._consumed = 0  # bytes ever parsed, to place fds
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset of the chunk, its fds)
        self.closed = False

    # ----- inbound -----
    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.closed:
            close_fds(fds)
            raise CodecError("the channel already failed (or was closed)")
        if fds:
            self._fds.append((self._consumed + len(self._buffer), list(fds)))
        self._buffer += data

    def pending_fds(self) -> int:
        return sum(len(fds) for _, fds in self._fds)

    def next_message(self) -> Message | None:
        if len(self._buffer) < HEADER.size:
            return None
        code, flags, size = HEADER.unpack_from(self._buffer)
        if size > MAX_PAYLOAD:
            self._fail(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
        if len(self._buffer) < HEADER.size + size:
            return None
        end = HEADER.size + size
        payload_bytes = bytes(self._buffer[HEADER.size : end])
        fds = self._take_fds(self._consumed + end)
        del self._buffer[:end]
        self._consumed += end
        try:
            return self._decode(code, flags, payload_bytes, fds)
        except CodecError:
            close_fds(fds)
            raise

    def _take_fds(self, end: int) -> tuple[int, ...]:
        taken: list[int] = []
        while self._fds and self._fds[0][0] < end:
            taken += self._fds.pop(0)[1]
        return tuple(taken)

    def _decode(self, code: int, flags: int, payload_bytes: bytes, fds: tuple[int, ...]) -> Message:
        if flags & 0x3 != VERSION or flags & ~(0x3 | FLAG_REPLY | FLAG_NEED_REPLY):
            raise CodecError(f"request {code}: bad header flags {flags:#x}")
        try:
            request = self._requests(code)
        except ValueError:
            raise CodecError(f"unknown {self._requests.__name__} {code}") from None
        reply = bool(flags & FLAG_REPLY)
        request_type, reply_type = payload_types(request)
        payload_type = (reply_type or U64) if reply else request_type  # replies to other requests are acks
        if reply and len(payload_bytes) == ErrorReply.LAYOUT.size and payload_type is not Raw:
            payload_type = ErrorReply
        payload = payload_type.unpack(payload_bytes)
        if len(fds) > MAX_FDS:
            raise CodecError(f"{request.name}: {len(fds)} fds")
        message = Message(request, payload, fds, reply=reply, need_reply=bool(flags & FLAG_NEED_REPLY))
        wanted = expected_fds(message)
        if wanted is not None and wanted != len(fds):
            raise CodecError(f"{request.name}: carries {len(fds)} fds, expected {wanted}")
        return message

    def _fail(self, reason: str) -> None:
        """An unrecoverable framing error: the stream cannot be resynchronised."""
        self.closed = True
        close_fds([fd for _, fds in self._fds for fd in fds])
        self._fds.clear()
        self._buffer.clear()
        raise CodecError(reason)

    def close(self) -> None:
        """Close fds received for messages never completed."""
        self._fail_silently()

    def _fail_silently(self) -> None:
        with contextlib.suppress(CodecError):
            self._fail("closed")

    # ----- outbound -----
    @staticmethod
    def encode(message: Message) -> tuple[bytes, tuple[int, ...]]:
        payload = message.payload.pack()
        if len(payload) > MAX_PAYLOAD:
            raise CodecError(f"{message.request.name}: payload of {len(payload)} bytes")
        return HEADER.pack(message.request, message.flags, len(payload)) + payload, message.fds
