"""A vhost-user back-end server: one device on one UNIX socket, one front-end connection at a time.

The front-end (QEMU with `-chardev socket,path=...`) connects; each connection gets a fresh
BackendSession. Malformed bytes (CodecError) close the connection with a logged reason; a request the
session refuses is logged and, where the front-end asked for an ack, answered with a failure code.
When the front-end leaves, the session resets the device and releases guest memory and fds.

``BackendChannel`` is the other direction: back-end requests (BACKEND_CONFIG_CHANGE_MSG) on the socket
the front-end passed with SET_BACKEND_REQ_FD. Facts it is built on: QEMU serves that socket from its
main loop, which is blocked whenever QEMU waits for one of our replies on the main channel, and a
front-end may not answer at all. So requests are queued by whoever produces them (the session, or the
data-path thread through the device's config callback) and sent by a thread of the channel's own,
which waits for an ack (NEED_REPLY, with REPLY_ACK) at most ``timeout`` seconds and logs what happened;
no other thread ever waits on the front-end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time

from vdpasim.errors import CodecError, PeerError, TransportError
from vdpasim.ops import DeviceOps

from .backend import BackendSession
from .codec import close_fds
from .messages import U64, Message, payload_types
from .transport import MessageStream

__all__ = ["VhostUserServer", "BackendChannel", "BACKEND_REPLY_TIMEOUT"]

BACKEND_REPLY_TIMEOUT = 5.0  # seconds to wait for the front-end's ack of a back-end request


class BackendChannel:
    """The back-end request channel of one connection; owns the socket fd it is built on."""

    def __init__(self, fd: int, *, name: str = "", timeout: float = BACKEND_REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(fileno=fd)  # OSError (ENOTSOCK) if the front-end sent something else
        if self.sock.family != socket.AF_UNIX or self.sock.type != socket.SOCK_STREAM:
            self.sock.detach()
            raise OSError(f"back-end channel fd {fd} is not a UNIX stream socket")
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.log = logging.getLogger(f"vdpasim.vhost_user.backend_channel.{name or fd}")
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.broken = False
        self._stream = MessageStream(self.sock, backend_channel=True)
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"vhost-user-backend-{name}", daemon=True)
        self._thread.start()

    def send(self, message: Message) -> None:
        """Queue a back-end request; returns at once (dropped, and logged, once the channel broke)."""
        if self.broken:
            self.log.debug("%s dropped: the back-end channel is broken", message.request.name)
            close_fds(message.fds)
            return
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # ends a wait for an ack at once
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._stream.close()

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._stream.send(message)
                self.sent += 1
                if message.need_reply:
                    self._await_ack(message)
            except (TransportError, CodecError) as exc:
                self.failed += 1
                self.log.warning("%s not delivered: %s; dropping the channel", message.request.name, exc)
                self.broken = True
                break
            finally:
                close_fds(message.fds)
        # Broken or closing: whatever is still queued is dropped (its fds closed).
        while (left := self._queue.get() if not self._queue.empty() else None) is not None:
            close_fds(left.fds)

    def _await_ack(self, message: Message) -> None:
        reply = self._stream.receive()  # a TransportError after ``timeout`` seconds of silence
        if reply is None:
            raise TransportError("the front-end closed the back-end channel")
        if not reply.reply or reply.request != message.request or not isinstance(reply.payload, U64):
            raise TransportError(f"expected the ack of {message.request.name}, got {reply.request.name}")
        if reply.payload.value:
            self.failed += 1
            self.log.warning("%s: the front-end answered %d (failure)", message.request.name, reply.payload.value)
        else:
            self.acked += 1


class VhostUserServer:
    """Serves ``device`` to one front-end at a time on the UNIX socket ``path``.

    ``connect=False`` (the usual arrangement): the server listens on ``path``; the front-end connects
    (QEMU ``-chardev socket,path=...[,reconnect=N]``). ``connect=True``: the front-end listens on ``path``
    (QEMU ``-chardev socket,path=...,server=on,wait=off``) and the server connects to it, trying again
    every ``RETRY_SECONDS`` until it is there, and again whenever the connection ends, so a back-end
    restarted under a listening QEMU finds it by itself.
    """

    RETRY_SECONDS = 0.2

    def __init__(
        self,
        device: DeviceOps,
        path: str,
        *,
        protocol_features: int | None = None,
        name: str = "",
        connect: bool = False,
    ) -> None:
        self.device = device
        self.path = path
        self.connect = connect
        self._retry = threading.Event()  # set by stop(): ends a wait between connection attempts
        self.protocol_features = protocol_features
        self.name = name or os.path.basename(path)
        self.log = logging.getLogger(f"vdpasim.vhost_user.server.{self.name}")
        self.connections = 0
        self.requests = 0  # front-end messages served over every connection, and the time spent serving them
        self.busy_seconds = 0.0
        self.session: BackendSession | None = None
        self._listener: socket.socket | None = None
        self._connection: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._state_lock = threading.Lock()  # stop() and a new connection: one of them sees the other

    def start(self) -> None:
        if self.connect:
            self._thread = threading.Thread(target=self._connect_loop, name=f"vhost-user-{self.name}", daemon=True)
            self._thread.start()
            self.log.info("connecting to the front-end's socket %s", self.path)
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old_umask = os.umask(0o177)  # the socket is created 0600: only our user may drive the device
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(1)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name=f"vhost-user-{self.name}", daemon=True)
        self._thread.start()
        self.log.info("serving on %s", self.path)

    def stop(self) -> None:
        with self._state_lock:
            self._stopping = True
            self._retry.set()
            for sock in (self._listener, self._connection):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        if not self.connect:  # a socket we connect to is the front-end's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _connect_loop(self) -> None:
        waiting_logged = False
        while not self._stopping:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                connection.connect(self.path)
            except OSError as exc:
                connection.close()
                if not waiting_logged:
                    self.log.info("waiting for the front-end to listen on %s (%s)", self.path, exc.strerror)
                    waiting_logged = True
                self._retry.wait(self.RETRY_SECONDS)
                continue
            waiting_logged = False
            if not self._serve_unless_stopping(connection):
                break

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                break
            if not self._serve_unless_stopping(connection):
                break

    def _serve_unless_stopping(self, connection: socket.socket) -> bool:
        """Serve ``connection`` to its end; False (and closed) if stop() came first: accept() still returns a
        connection queued before the listener was shut down, and a connect may race stop() too."""
        with self._state_lock:
            if self._stopping:
                connection.close()
                return False
            self._connection = connection
        self.connections += 1
        try:
            self.serve(connection)
        finally:
            self._connection = None
        return True

    def serve(self, connection: socket.socket) -> None:
        """Serve one front-end until it leaves or breaks the protocol."""
        stream = MessageStream(connection)
        session = self.session = BackendSession(
            self.device,
            protocol_features=self.protocol_features,
            name=self.name,
            channel_factory=lambda fd: BackendChannel(fd, name=self.name),
        )
        self.log.info("front-end connected")
        try:
            while (message := stream.receive()) is not None:
                started = time.perf_counter()
                try:
                    reply = session.handle(message)
                except PeerError as exc:
                    if payload_types(message.request)[1] is not None and not message.reply:
                        # The front-end waits for a reply nothing can carry: hanging up beats a hang.
                        self.log.error(
                            "closing the connection: %s failed and has no failure reply: %s", message.request.name, exc
                        )
                        break
                    self.log.warning("%s: %s", message.request.name, exc)
                    continue
                finally:
                    self.requests += 1
                    self.busy_seconds += time.perf_counter() - started
                if reply is not None:
                    try:
                        stream.send(reply)
                    finally:
                        close_fds(reply.fds)  # fds a reply passes on (GET_INFLIGHT_FD) are the front-end's now
        except CodecError as exc:
            self.log.error("closing the connection: malformed message: %s", exc)
        except TransportError as exc:
            self.log.info("connection ended: %s", exc)
        except Exception:  # a bug, not the peer's fault: drop this connection, keep the server (and device)
            self.log.exception("closing the connection: internal error")
        finally:
            session.close()
            stream.close()
            self.log.info("front-end left after %d requests", session.requests)
