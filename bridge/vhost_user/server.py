"""A vhost-user back-end server: one device on one UNIX socket, one front-end connection at a time.

The front-end (QEMU with `-chardev socket,path=...`) connects; each connection gets a fresh
BackendSession. Malformed bytes (CodecError) close the connection with a logged reason; a request the
session refuses is logged and, where the front-end asked for an ack, answered with a failure code.
When the front-end leaves, the session resets the device and releases guest memory and fds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from vdpasim.errors import CodecError, PeerError, TransportError
from vdpasim.ops import DeviceOps

from .backend import BackendSession
from .transport import MessageStream

__all__ = ["VhostUserServer"]


class VhostUserServer:
    def __init__(self, device: DeviceOps, path: str, *, protocol_features: int | None = None, name: str = "") -> None:
        self.device = device
        self.path = path
        self.protocol_features = protocol_features
        self.name = name or os.path.basename(path)
        self.log = logging.getLogger(f"vdpasim.vhost_user.server.{self.name}")
        self.connections = 0
        self.session: BackendSession | None = None
        self._listener: socket.socket | None = None
        self._connection: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
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
        self._stopping = True
        for sock in (self._listener, self._connection):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                break
            self._connection = connection
            self.connections += 1
            try:
                self.serve(connection)
            finally:
                self._connection = None

    def serve(self, connection: socket.socket) -> None:
        """Serve one front-end until it leaves or breaks the protocol."""
        stream = MessageStream(connection)
        session = self.session = BackendSession(self.device, protocol_features=self.protocol_features, name=self.name)
        self.log.info("front-end connected")
        try:
            while (message := stream.receive()) is not None:
                try:
                    reply = session.handle(message)
                except PeerError as exc:
                    self.log.warning("%s: %s", message.request.name, exc)
                    continue
                if reply is not None:
                    stream.send(reply)
        except CodecError as exc:
            self.log.error("closing the connection: malformed message: %s", exc)
        except TransportError as exc:
            self.log.info("connection ended: %s", exc)
        finally:
            session.close()
            stream.close()
            self.log.info("front-end left after %d requests", session.requests)
