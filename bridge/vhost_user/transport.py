"""Moving vhost-user bytes and fds over a UNIX stream socket (the only I/O of the vhost-user wire).

Facts this module relies on:
* A sender passes a message's fds with the message (QEMU: one sendmsg per message, fds with it). A
  stream recvmsg may join several messages, and returns the fds of the last one it touched, so we read
  one message at a time: its header (the fds come with it), then exactly its payload.
* SCM_RIGHTS fds that arrive are already open in this process; whoever receives them must close them,
  also on error paths (the codec and session close what they refuse).
* MSG_CMSG_CLOEXEC keeps received fds out of processes we spawn.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

from vdpasim.errors import TransportError

from .codec import Codec, close_fds
from .messages import HEADER, MAX_FDS, MAX_PAYLOAD, Message

__all__ = ["recv_exact", "send_message", "MessageStream"]


def recv_exact(sock: socket.socket, size: int, fds: list[int] | None = None) -> bytes:
    """Exactly ``size`` bytes (fewer only if the peer closed); fds that come with them go to ``fds``."""
    data = bytearray()
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize) if fds is not None else 0
    while len(data) < size:
        try:
            chunk, ancdata, flags, _ = sock.recvmsg(size - len(data), space, socket.MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise TransportError(f"connection lost: {exc}", reconnect=True) from exc
        except TimeoutError as exc:  # a socket timeout (the client sets one): the peer stopped answering
            raise TransportError(f"no data from the peer within {sock.gettimeout()} s") from exc
        except OSError as exc:
            raise TransportError(f"receive failed: {exc}") from exc
        received = _fds_of(ancdata)
        if fds is None or flags & socket.MSG_CTRUNC:
            close_fds(received)
            if flags & socket.MSG_CTRUNC:
                raise TransportError("more fds than a vhost-user message may carry (control data truncated)")
        else:
            fds += received
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(data[sent:])
    except OSError as exc:
        raise TransportError(f"send failed: {exc}", reconnect=True) from exc


class MessageStream:
    """A socket with a codec: whole messages in and out."""

    def __init__(self, sock: socket.socket, *, backend_channel: bool = False) -> None:
        self.sock = sock
        self.codec = Codec(backend_channel=backend_channel)

    def receive(self) -> Message | None:
        """The next message, or None once the peer closed the connection."""
        fds: list[int] = []
        try:
            header = recv_exact(self.sock, HEADER.size, fds)
        except TransportError:
            close_fds(fds)
            raise
        if len(header) < HEADER.size:
            close_fds(fds)
            if header:
                raise TransportError(f"connection closed inside a message header ({len(header)} bytes)")
            return None
        size = HEADER.unpack(header)[2]
        self.codec.receive_data(header, fds)
        if size <= MAX_PAYLOAD:  # larger sizes are refused by the codec without reading on
            payload = recv_exact(self.sock, size)
            if len(payload) < size:
                raise TransportError("connection closed inside a message payload")
            self.codec.receive_data(payload)
        message = self.codec.next_message()
        if message is None:
            raise TransportError("incomplete message")  # unreachable: header and payload were read whole
        return message

    def send(self, message: Message) -> None:
        data, fds = Codec.encode(message)
        send_message(self.sock, data, fds)

    def close(self) -> None:
        self.codec.close()
        self.sock.close()
