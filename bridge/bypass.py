"""The kernel bypass's char devices: ``/dev/vhost-vdpa-N`` for devices served on vhost-user sockets.

An open of a node is the bridge at work: a vhost-vdpa server (bridge/vhost_vdpa/server.py, the kernel's
semantics) stacked on a vhost-user client (bridge/vhost_user/client.py) of the device's socket. Every
ioctl and IOTLB write the program makes becomes device operations on that client; kick and call eventfds
and guest RAM (the VMM's memfd) are handed to the device as fds, so the data path never passes through
here. The client is a ``ReplayingClient`` (bridge/vhost_user/replay.py): like the kernel, an open node
keeps its char-device state when the daemon behind the socket dies, and replays it to the daemon that
comes back on the same path, so the program sees only a pause. ``VhostVdpaNode`` is one such node,
``DaemonNodes`` the directory of a daemon's nodes, looked up at each open so devices added while the
program runs (``vdpa dev add`` under ``vdpasim run``) are found.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field

from bridge.supervisor.supervisor import NodeHandler, TargetMemory
from bridge.vhost_user.replay import ReplayingClient
from bridge.vhost_vdpa.server import VhostVdpaServer
from vdpasim.errors import PeerError, VdpasimError
from vdpasim.runtime import RuntimeDir

__all__ = ["VhostVdpaNode", "DaemonNodes", "NODE_PREFIX"]

log = logging.getLogger("vdpasim.bypass")

NODE_PREFIX = "/dev/vhost-vdpa-"


@dataclass
class VhostVdpaNode:
    """One simulated ``/dev/vhost-vdpa-N``: exclusive, as the kernel's (a second open fails with EBUSY)."""

    name: str  # the device's
    socket_path: str  # its vhost-user socket
    reconnect_seconds: float = 30.0  # how long an open node waits for a back-end that went away
    opens: int = 0
    servers: list[VhostVdpaServer] = field(default_factory=list, repr=False)  # every open's server, for its stats
    facts: dict = field(default_factory=dict, repr=False)  # the device's constants, asked once for every open
    _current: _OpenNode | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def open(self, flags: int) -> NodeHandler:
        with self._lock:
            if self._current is not None:
                raise PeerError(f"vhost-vdpa node of {self.name} is already open", errno=errno.EBUSY)
            try:
                client = ReplayingClient(
                    self.socket_path, name=self.name, reconnect_seconds=self.reconnect_seconds, facts=self.facts
                )
            except (VdpasimError, OSError) as exc:
                reason = f"device {self.name} does not answer on {self.socket_path}: {exc}"
                raise PeerError(reason, errno=errno.ENODEV) from exc
            try:
                server = VhostVdpaServer(client, name=self.name)
            except BaseException:
                client.close()
                raise
            self.opens += 1
            self.servers.append(server)
            self._current = _OpenNode(self, server, client)
            return self._current

    def _closed(self, handle: _OpenNode) -> None:
        with self._lock:
            if self._current is handle:
                self._current = None


@dataclass
class _OpenNode:
    node: VhostVdpaNode
    server: VhostVdpaServer
    client: ReplayingClient

    def ioctl(self, request: int, arg: int, memory: TargetMemory) -> int:
        return self.server.ioctl(request, arg, memory)

    def write(self, addr: int, length: int, memory: TargetMemory) -> int:
        return self.server.write(addr, length, memory)

    def close(self) -> None:
        try:
            self.server.close()  # resets the device, as the kernel's release does
        finally:
            self.client.close()
            self.node._closed(self)


class DaemonNodes:
    """The nodes of a daemon's devices (``vhost_vdpa_node`` in ``vdpasim -x dev show``), asked at each open."""

    def __init__(self, runtime: RuntimeDir) -> None:
        self.runtime = runtime
        self.nodes: dict[str, VhostVdpaNode] = {}  # device name -> node, kept so exclusivity and stats persist
        self._by_path: dict[str, VhostVdpaNode] = {}

    def get(self, path: str) -> VhostVdpaNode | None:
        """The node at ``path``. A node found before is taken as long as its device's socket is there (the daemon
        removes it with the device), without asking the daemon again: that costs milliseconds per open."""
        if not path.startswith(NODE_PREFIX):
            return None
        known = self._by_path.get(path)
        if known is not None and os.path.exists(known.socket_path):
            return known
        self._by_path.pop(path, None)
        for name, node_path, socket_path in self._devices():
            if node_path == path:
                node = self.nodes.get(name)
                if node is None or node.socket_path != socket_path:
                    node = self.nodes[name] = VhostVdpaNode(name, socket_path)
                self._by_path[path] = node
                return node
        return None

    def _devices(self) -> list[tuple[str, str, str]]:
        """(name, node, vhost-user socket) of every device the daemon holds; none if no daemon answers."""
        from vdpasim.bus import netlink as nl  # pyroute2: loaded only when a program opens a node

        try:
            sock = self.runtime.connect_control()
        except VdpasimError as exc:  # an unsafe runtime directory: no node from there
            log.warning("%s", exc)
            return []
        if sock is None:
            return []
        try:
            vdpa = nl.VdpaSocket(use_socket=sock)
            try:
                replies = vdpa.dev("show", extensions=True)
            finally:
                vdpa.close()
        except Exception as exc:  # OSError, or the daemon's NetlinkError: no list, so no node
            log.info("no device list from the daemon in %s: %s", self.runtime.path, exc)
            return []
        finally:
            sock.close()
        return [
            (
                msg.get_attr("VDPA_ATTR_DEV_NAME"),
                msg.get_attr("VDPASIM_ATTR_VHOST_VDPA_NODE"),
                msg.get_attr("VDPASIM_ATTR_VHOST_USER_PATH"),
            )
            for msg in replies
            if msg.get_attr("VDPASIM_ATTR_VHOST_VDPA_NODE")
        ]
