"""The daemon's own control operations: JSON messages on the control socket, next to the vdpa netlink family.

The control socket (SOCK_SEQPACKET, so message boundaries are kept as netlink keeps them) carries
two kinds of datagram. Devices are managed with the vdpa generic-netlink family itself (bus/netlink.py
``VdpaSocket(use_socket=...)``), answered by bus/server.py as the kernel would. What has no netlink
twin, the daemon's own status and stop, stays in this small JSON form; the daemon tells the two
apart by their first bytes (daemon.py ``is_netlink``):

* request  ``{"vdpasim": 1, "seq": N, "op": "daemon_get", "args": {}}``
* response ``{"vdpasim": 1, "seq": N, "result": ...}`` or ``{..., "errno": E, "error": "text"}``.

The codec (``encode_*``/``decode_*``) does no I/O and raises only ``CodecError``; ``ControlClient``
is the I/O side, and the daemon (daemon.py) serves the same codec. One message is at most
``MAX_MESSAGE`` bytes (below a UNIX socket's default send buffer, so a send never fails on size).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import CodecError, TransportError, VdpasimError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE",
    "OPS",
    "DUMP_OPS",
    "Request",
    "Response",
    "ControlError",
    "ControlClient",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
    "merge_parts",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024

# The daemon's own operations (devices are managed with vdpa netlink on the same socket).
OPS: dict[str, str | None] = {
    "daemon_get": None,
    "daemon_stop": None,
    "test_fault": None,  # test-only: answered by a daemon started with VDPASIM_TEST_FAULTS=1, refused otherwise
}
# Ops answered as a dump (several parts) when they name no object: none today.
DUMP_OPS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Request:
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    seq: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise CodecError(f"unknown operation {self.op!r}", errno=errno_mod.EOPNOTSUPP)
        if not isinstance(self.args, Mapping) or not all(isinstance(k, str) for k in self.args):
            raise CodecError("args must be an object with string keys")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 0 <= self.seq < 1 << 32:
            raise CodecError(f"seq {self.seq!r} is not a 32-bit unsigned integer")

    @property
    def is_dump(self) -> bool:
        return self.op in DUMP_OPS and self.args.get("name") is None


@dataclass(frozen=True)
class Response:
    seq: int
    result: Any = None
    errno: int = 0
    error: str = ""
    more: bool = False  # another part of this dump follows

    def __post_init__(self) -> None:
        if isinstance(self.errno, bool) or not isinstance(self.errno, int) or not 0 <= self.errno < 4096:
            raise CodecError(f"errno {self.errno!r} is not an error number")
        if not isinstance(self.error, str) or not isinstance(self.more, bool):
            raise CodecError("malformed response fields")

    @property
    def ok(self) -> bool:
        return self.errno == 0


class ControlError(VdpasimError):
    """The daemon refused a request: its errno and message, as the kernel's errno and extack would be."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message, errno=errno)

    @property
    def errno_name(self) -> str:
        if self.errno == errno_mod.EOPNOTSUPP:
            return "EOPNOTSUPP"  # errorcode picks its alias ENOTSUP; the kernel's vdpa code says EOPNOTSUPP
        return errno_mod.errorcode.get(self.errno, str(self.errno))


# ----- codec (no I/O) -----
def _encode(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE:
        raise CodecError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}", errno=errno_mod.EMSGSIZE)
    return data


def _decode(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise CodecError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}", errno=errno_mod.EMSGSIZE)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"not a JSON message: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError("a message must be a JSON object")
    version = obj.get("vdpasim")
    if version != PROTOCOL_VERSION:
        raise CodecError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}", errno=errno_mod.EPROTO)
    return obj


def encode_request(request: Request) -> bytes:
    return _encode({"vdpasim": PROTOCOL_VERSION, "seq": request.seq, "op": request.op, "args": dict(request.args)})


def decode_request(data: bytes) -> Request:
    obj = _decode(data)
    unknown = set(obj) - {"vdpasim", "seq", "op", "args"}
    if unknown:
        raise CodecError(f"unknown request field(s) {', '.join(sorted(unknown))}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise CodecError("a request needs an op (string)")
    return Request(op, obj.get("args", {}), obj.get("seq", 0))


def encode_response(response: Response) -> bytes:
    obj: dict[str, Any] = {"vdpasim": PROTOCOL_VERSION, "seq": response.seq}
    if response.ok:
        obj["result"] = response.result
    else:
        obj["errno"] = response.errno
        obj["error"] = response.error
    if response.more:
        obj["more"] = True
    return _encode(obj)


def decode_response(data: bytes) -> Response:
    obj = _decode(data)
    try:
        return Response(
            seq=obj.get("seq", 0),
            result=obj.get("result"),
            errno=obj.get("errno", 0),
            error=obj.get("error", ""),
            more=obj.get("more", False),
        )
    except TypeError as exc:
        raise CodecError(f"malformed response: {exc}") from None


def merge_parts(parts: list[Any]) -> Any:
    """One result from the parts of a dump: each part is ``{"key": {name: ...}}``; their inner maps join."""
    merged: dict[str, Any] = {}
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict):
            raise CodecError(f"dump part {part!r} is not an object")
        for key, value in part.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


# ----- client (I/O) -----
class ControlClient:
    """One connection to a daemon's control socket; ``request(op, **args)`` returns the result."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self._seq = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock

    @classmethod
    def try_connect(cls, path: str | os.PathLike[str], *, timeout: float = 60.0) -> ControlClient | None:
        """A client, or None when no daemon listens there (no socket, or a dead daemon's leftover)."""
        try:
            return cls(path, timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            return None

    def request(self, op: str, **args: Any) -> Any:
        """Send one request; return its result (a dump's parts merged), or raise ControlError."""
        request = Request(op, {k: v for k, v in args.items() if v is not None}, self._next_seq())
        parts = list(self.exchange(request))
        return merge_parts(parts) if request.is_dump else parts[0]

    def exchange(self, request: Request) -> Iterator[Any]:
        """Send ``request``; yield the result of each response part (raising ControlError on a refusal)."""
        try:
            self.sock.send(encode_request(request))
        except OSError as exc:
            raise TransportError(f"control socket {self.path}: send failed: {exc}") from exc
        while True:
            response = decode_response(self._receive())
            if response.seq != request.seq:
                raise CodecError(f"response to request {response.seq}, expected {request.seq}")
            if not response.ok:
                raise ControlError(response.error or os.strerror(response.errno), errno=response.errno)
            yield response.result
            if not response.more:
                return

    def _receive(self) -> bytes:
        try:
            data, _, flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1)
        except TimeoutError:
            raise TransportError(f"control socket {self.path}: no answer from the daemon") from None
        except OSError as exc:
            raise TransportError(f"control socket {self.path}: {exc}") from exc
        if not data:
            raise TransportError(f"control socket {self.path}: the daemon closed the connection")
        if flags & socket.MSG_TRUNC:
            raise CodecError(f"control message longer than {MAX_MESSAGE} bytes", errno=errno_mod.EMSGSIZE)
        return data

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
