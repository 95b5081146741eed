"""A vhost-user back-end that dies as under kill -9 and comes back on the same socket, for restart tests.

A restarted daemon looks, from the socket's other end, like this: the connection hangs up without a word
(no reset, no reply), the socket path stops answering for a while, then a fresh device with the same
configuration listens on the same path and knows nothing of the old one's rings. ``RestartingBackend``
does that in-process: ``crash()`` stops the server (its sockets are shut down, nothing is sent) and throws
the device away; ``start()`` makes a new device with ``make_device`` and serves it on the same path.
``restart()`` does both and returns the moment of the crash, for pause measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.vhost_user.server import VhostUserServer

from ..devices.core import SimDevice

__all__ = ["RestartingBackend", "replace_rig_backend"]


@dataclass
class RestartingBackend:
    make_device: Callable[[], SimDevice]
    path: str
    name: str = ""
    device: SimDevice | None = field(default=None, init=False)
    server: VhostUserServer | None = field(default=None, init=False)
    restarts: int = field(default=0, init=False)

    def start(self) -> None:
        device = self.make_device()
        try:
            server = VhostUserServer(device, self.path, name=self.name or device.name)
            server.start()
        except BaseException:
            device.close()
            raise
        self.device, self.server = device, server

    def crash(self) -> None:
        """The daemon is gone: its connection and listener close, its device with them."""
        server, device = self.server, self.device
        self.server = self.device = None
        if server is not None:
            server.stop()  # shuts the sockets down: the front-end sees a hang-up, nothing else
        if device is not None:
            device.close()

    def restart(self, down_seconds: float = 0.0) -> float:
        """Crash, stay away ``down_seconds``, come back; the monotonic time of the crash."""
        crashed = time.monotonic()
        self.crash()
        if down_seconds:
            time.sleep(down_seconds)
        self.start()
        self.restarts += 1
        return crashed

    def close(self) -> None:
        self.crash()


def replace_rig_backend(rig: object, index: int, device: SimDevice, server: VhostUserServer) -> None:
    """Point a VhostUserRig's backend ``index`` at a restarted device, so its counters are read at the end."""
    backend = rig.backends[index]  # type: ignore[attr-defined]
    backend.device, backend.server = device, server
