"""The vdpasim daemon: owns the simulated devices, serves each on a vhost-user socket, answers the control socket.

Three layers, each testable on its own:

* ``DaemonBus``: the userspace vDPA bus (bus/model.py ``Bus``: the kernel's rules, errnos and
  extack texts) whose devices are each also served by a ``VhostUserServer`` at
  ``<runtime>/<name>.vhost-user.sock`` and named ``/dev/vhost-vdpa-N`` for the bypass.
* ``ControlHandler``: one control datagram in, its reply datagrams out, no I/O. Netlink datagrams
  (the vdpa family and nlctrl's GETFAMILY) go to ``VdpaNetlinkServer`` over that bus, byte for byte
  as the kernel answers; JSON datagrams are the daemon's own operations (status, stop: control.py).
  A bug in a handler becomes an EIO answer and a logged traceback, never a dead daemon.
* ``Daemon``: the I/O. It makes the runtime directory, takes its lock, removes a dead daemon's
  leftover sockets, serves the control socket from one thread (requests are short; devices run on
  their own threads), and on SIGTERM/SIGINT (or ``daemon_stop``) stops every server (QEMU sees its
  socket close), closes every device, removes the sockets and the lock, and exits 0.

The client side of the life cycle is here too: ``spawn_daemon`` starts one in the background (logging
to ``<runtime>/daemon.log``) and waits for its control socket; ``stop_daemon`` asks it to stop and
waits for its lock to be released.

A front-end that leaves is handled by the vhost-user server: its session resets the device and
unmaps guest memory and closes every fd it received; the device and its counters stay.

Devices outlive the daemon (user mode): each has a state file, ``<runtime>/<name>.state``
(vdpasim/state.py), written at ``dev add``, checkpointed while its counters or status change, and
removed by ``dev del``; a RAM disk is the file ``<runtime>/<name>.ramdisk``. A daemon starting on the
directory re-creates the devices from their files (``DaemonBus.restore``) before it serves its control
socket; see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import logging
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bus.model import VDPASIM_BLK, VDPASIM_NET, Bus, BusError, DevSetConfig, MgmtDev, VdpaDevice
from .bus.server import VdpaNetlinkServer, datagrams
from .config import BlkConfig, format_mac, parse_mac
from .control import (
    MAX_MESSAGE,
    ControlClient,
    Response,
    decode_request,
    encode_response,
)
from .devices.blk import BlkBacking, BlkDevice
from .devices.net import NetDevice
from .errors import CodecError, DeviceRequestError, VdpasimError
from .runtime import ENV_RUNTIME_DIR, DaemonRunning, RuntimeDir, runtime_dir
from .state import (
    CHECKPOINT_SECONDS,
    STATE_SUFFIX,
    DeviceState,
    StateError,
    read_state,
    remove_state,
    state_path,
    write_state,
)
from .virtio.constants import VIRTIO_CONFIG_S_DRIVER_OK
from .virtqueue import COUNTERS

if TYPE_CHECKING:
    from bridge.vhost_user.server import VhostUserServer


__all__ = [
    "DaemonBus",
    "KernelBus",
    "MODES",
    "choose_mode",
    "is_netlink",
    "ControlHandler",
    "Daemon",
    "configure_logging",
    "parse_size",
    "spawn_daemon",
    "stop_daemon",
]

log = logging.getLogger("vdpasim.daemon")

RAM_DISK_SUFFIX = ".ramdisk"
CLIENT_SOCKET_SUFFIX = ".qemu.sock"  # where a front-end listens for a device in the vhost-user client role
ENV_TEST_FAULTS = "VDPASIM_TEST_FAULTS"  # "1": the control socket takes the test-only ``test_fault`` operation
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SECTOR = 512


def parse_size(value: Any, what: str = "capacity") -> int:
    """Bytes from an integer or text with an optional binary suffix (``64M``, ``1GiB``, ``4096``)."""
    if isinstance(value, bool):
        raise DeviceRequestError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = int(m.group(1)) << 10 * " KMGT".index(m.group(2).upper() or " ")
    else:
        raise DeviceRequestError(f"{what}: {value!r} is not a size (bytes, or a number with K, M, G or T)")
    if size <= 0 or size % _SECTOR:
        raise DeviceRequestError(f"{what}: {size} bytes is not a positive multiple of {_SECTOR}")
    return size


# ======================================================================================================
# The bus the daemon serves: every device also gets a vhost-user server
# ======================================================================================================
class DaemonBus(Bus):
    """The userspace vDPA bus of one daemon: ``Bus`` whose devices are also served on vhost-user sockets.

    Every door (the netlink family on the control socket, later the bypass supervisor) adds and
    deletes devices through this one object, so they all see the same devices. A device is served
    before the add is answered: a socket path that cannot exist (ENAMETOOLONG) or a server that
    cannot start refuses the add, with a vdpasim extack, and leaves nothing behind.
    """

    persistent = True  # devices keep a state file in the runtime directory (user mode; see vdpasim/state.py)

    def __init__(self, runtime: RuntimeDir, *, vhost_user: str = "server") -> None:
        super().__init__()
        self.runtime = runtime
        # "server": a device listens on <name>.vhost-user.sock; "client": it connects to <name>.qemu.sock,
        # where the front-end listens. Chosen for new devices; a re-created device keeps its own.
        self.vhost_user_role = vhost_user
        self.servers: dict[str, VhostUserServer] = {}
        self._nodes: dict[str, int] = {}  # device -> N of /dev/vhost-vdpa-N, as the bypass will serve it
        self.states: dict[str, DeviceState] = {}  # device -> its state file's contents, as last written
        self._written: dict[str, tuple] = {}  # device -> the snapshot last written (skip unchanged ones)
        self._state_lock = threading.Lock()
        self._restoring: DeviceState | None = None  # set while a device is re-created from its state file
        self._awaiting: set[str] = set()  # re-created devices whose front-end has not started them again
        if self.persistent:
            # A RAM disk lives in a file of the runtime directory, so it survives the daemon (kill -9 too).
            self.mgmtdevs = tuple(
                dataclasses.replace(m, build_device=self._build_blk) if m is VDPASIM_BLK else m for m in self.mgmtdevs
            )

    def add(
        self, name: str | None, mgmtdev: str | None, config: DevSetConfig | None = None, **kwargs: Any
    ) -> VdpaDevice:
        if name is not None:
            try:
                self.runtime.vhost_user_socket(name)
            except VdpasimError as exc:
                raise BusError(str(exc), errno=exc.errno or errno.EINVAL, extack=f"vdpasim: {exc}") from None
        vdev = super().add(name, mgmtdev, config, **kwargs)
        try:
            self._serve(vdev)
        except BusError:
            super().delete(vdev.name)
            self._remove_ram_disk(vdev.name)
            raise
        if self.persistent:
            self._create_state(vdev, config or DevSetConfig())
        return vdev

    # ----- state files -----
    def _ram_disk_path(self, name: str) -> Path:
        return self.runtime.path / f"{name}{RAM_DISK_SUFFIX}"

    def _build_blk(self, config: BlkConfig) -> BlkDevice:
        if config.path is not None:
            return BlkDevice(config)
        path = self._ram_disk_path(config.name)
        size = (config.capacity or 0) * 512
        restoring = self._restoring is not None
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (0 if restoring else os.O_CREAT | os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise DeviceRequestError(f"RAM disk {path}: {exc.strerror}", errno=exc.errno) from None
        try:
            if restoring:
                have = os.fstat(fd).st_size
                if have != size:
                    raise DeviceRequestError(f"RAM disk {path} has {have} bytes, the device had {size}")
            else:
                os.ftruncate(fd, size)
            backing = BlkBacking(fd, size, persistent=False, writable=True, path=os.fspath(path))
        except OSError as exc:
            os.close(fd)
            raise DeviceRequestError(f"RAM disk {path}: {exc.strerror}", errno=exc.errno) from None
        except BaseException:
            os.close(fd)
            raise
        return BlkDevice(config, backing=backing)

    def _remove_ram_disk(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._ram_disk_path(name))

    def _create_state(self, vdev: VdpaDevice, config: DevSetConfig) -> None:
        previous = self._restoring
        request = {
            "mac": format_mac(config.mac) if config.mac is not None else None,
            "mtu": config.mtu,
            "max_vqp": config.max_vqp,
            "device_features": config.device_features,
            "extension": dict(config.extension),
        }
        state = DeviceState(
            name=vdev.name,
            mgmtdev=vdev.mgmtdev.name,
            runtime_dir=str(self.runtime.path),
            request=request,
            vhost_user_socket=vdev.vhost_user_path,
            vhost_user_role=(self.servers[vdev.name].connect and "client") or "server",
            vhost_vdpa_node=self._nodes.get(vdev.name),
            ram_disk=str(self._ram_disk_path(vdev.name)) if getattr(vdev.config, "path", 1) is None else None,
            created_at=previous.created_at if previous is not None else time.time(),
            restarts=previous.restarts + 1 if previous is not None else 0,
            sequence=previous.sequence if previous is not None else 0,
        )
        self.states[vdev.name] = state
        if previous is None:
            self.checkpoint(vdev.name, force=True)
            return
        # Re-created: until its front-end starts it again, the file keeps what the dead daemon had reached
        # (a daemon killed again meanwhile must find it); _restore_one writes it once the counters are back.
        state.driver_features, state.status, state.generation = (
            previous.driver_features,
            previous.status,
            previous.generation,
        )
        state.queues = [dict(q) for q in previous.queues]
        self._awaiting.add(vdev.name)

    def _snapshot(self, vdev: VdpaDevice) -> tuple:
        device = vdev.device
        queues = tuple(
            tuple(int(vq.record[f]) for f in (*COUNTERS, "last_avail", "avail_wrap", "used_idx", "used_wrap"))
            for vq in device.vqs
        )
        mac = format_mac(device.mac) if isinstance(device, NetDevice) else None
        extra = tuple(sorted(getattr(device, "restart_drops", {}).items()))
        return (device.get_driver_features(), device.get_status(), device.get_generation(), mac, queues, extra)

    def checkpoint(self, name: str | None = None, *, force: bool = False) -> int:
        """Write the state file of ``name`` (every device if None) if it changed; how many were written."""
        if not self.persistent:
            return 0
        written = 0
        with self._state_lock:
            for vdev in self.devices() if name is None else [self.get(name)]:
                state = self.states.get(vdev.name)
                if state is None:
                    continue
                snapshot = self._snapshot(vdev)
                if not force and self._written.get(vdev.name) == snapshot:
                    continue
                features, status, generation, mac, queues, extra = snapshot
                names = (*COUNTERS, "last_avail", "avail_wrap", "used_idx", "used_wrap")
                current = [dict(zip(names, q, strict=True)) for q in queues]
                if vdev.name in self._awaiting and not status & VIRTIO_CONFIG_S_DRIVER_OK:
                    # Re-created, the front-end not back yet: keep what the dead daemon had reached (a
                    # daemon killed again now must find it), update only the counters.
                    for now, before in zip(current, state.queues, strict=False):
                        for key in ("last_avail", "avail_wrap", "used_idx", "used_wrap"):
                            now[key] = before.get(key, now[key])
                    features, status = state.driver_features, state.status
                else:
                    self._awaiting.discard(vdev.name)
                state.driver_features, state.status, state.generation, state.mac = features, status, generation, mac
                state.queues = current
                for qidx, drops in extra:
                    state.queues[qidx]["restart_drops"] = drops
                try:
                    write_state(state_path(self.runtime.path, vdev.name), state)
                except OSError as exc:
                    log.warning("%s: cannot write its state file: %s", vdev.name, exc)
                    continue
                self._written[vdev.name] = snapshot
                written += 1
        return written

    def restore(self) -> list[str]:
        """Re-create the devices whose state files a previous daemon left; the names re-created.

        A file that cannot be used is logged (its path and what is wrong), renamed ``*.refused`` so that the
        device can be added again, and skipped: the other devices are re-created all the same.
        """
        if not self.persistent:
            return []
        for tmp in self.runtime.path.glob(f".*{STATE_SUFFIX}.*.tmp"):  # a write cut short by a kill
            with contextlib.suppress(OSError):
                tmp.unlink()
        loaded: list[tuple[Path, DeviceState]] = []
        for path in sorted(self.runtime.path.glob(f"*{STATE_SUFFIX}")):
            try:
                loaded.append((path, read_state(path, runtime_dir=self.runtime.path)))
            except StateError as exc:
                self._refuse_state(path, str(exc))
        restored = []
        # In the order they were added (the bus order); each asks for its own node number back.
        for path, state in sorted(loaded, key=lambda item: (item[1].created_at, item[1].name)):
            try:
                self._restore_one(state)
            except (VdpasimError, OSError, ValueError, TypeError) as exc:
                self._refuse_state(path, f"state file {path}: cannot re-create device {state.name!r}: {exc}")
                continue
            restored.append(state.name)
        return restored

    def _refuse_state(self, path: Path, message: str) -> None:
        refused = path.with_name(path.name + ".refused")
        with contextlib.suppress(OSError):
            os.replace(path, refused)
        log.error("%s; kept as %s, the device is not re-created (add it again)", message, refused.name)

    def _restore_one(self, state: DeviceState) -> None:
        request = state.request
        mac = request.get("mac")
        config = DevSetConfig(
            mac=parse_mac(mac) if mac is not None else None,
            mtu=request.get("mtu"),
            max_vqp=request.get("max_vqp"),
            device_features=request.get("device_features"),
            extension=dict(request.get("extension") or {}),
        )
        self._restoring = state
        try:
            vdev = self.add(state.name, state.mgmtdev, config)
        finally:
            self._restoring = None
        device = vdev.device
        if state.mac is not None and isinstance(device, NetDevice) and format_mac(device.mac) != state.mac:
            device.set_mac(parse_mac(state.mac))
        for vq, saved in zip(device.vqs, state.queues, strict=False):
            for name in COUNTERS:
                vq.record[name] = int(saved.get(name, 0))
        device._generation = (state.generation + 1) & 0xFFFFFFFF  # the config may have changed meanwhile
        if isinstance(device, NetDevice):
            device.restore_after_restart(state.queues, state.status, state.driver_features)
        self.checkpoint(vdev.name, force=True)
        log.info(
            "%s: re-created from its state file (written by pid %d %.1f s ago, status %#x, features %#x, "
            "restart %d); waiting for the front-end to reconnect on %s",
            state.name,
            state.written_by,
            max(time.time() - state.written_at, 0.0),
            state.status,
            state.driver_features,
            state.restarts + 1,
            vdev.vhost_user_path,
        )

    def _serve(self, vdev: VdpaDevice) -> None:
        from bridge.vhost_user.server import VhostUserServer

        path = self.runtime.vhost_user_socket(vdev.name)
        role = self._restoring.vhost_user_role if self._restoring is not None else self.vhost_user_role
        if role == "client":
            path = path.with_name(f"{vdev.name}{CLIENT_SOCKET_SUFFIX}")
        server = VhostUserServer(vdev.device, os.fspath(path), name=vdev.name, connect=role == "client")
        try:
            server.start()
        except OSError as exc:
            text = f"cannot serve {path}: {exc.strerror}"
            raise BusError(text, errno=exc.errno or errno.EIO, extack=f"vdpasim: {text}") from None
        taken = set(self._nodes.values())
        wanted = self._restoring.vhost_vdpa_node if self._restoring is not None else None
        if wanted is not None and wanted not in taken:
            node = wanted
        else:
            node = min(set(range(len(self._nodes) + 1)) - taken)
            if wanted is not None:
                log.warning("%s: /dev/vhost-vdpa-%d is taken; now /dev/vhost-vdpa-%d", vdev.name, wanted, node)
        self._nodes[vdev.name] = node
        self.servers[vdev.name] = server
        vdev.vhost_user_path = server.path
        vdev.vhost_vdpa_node = f"/dev/vhost-vdpa-{node}"
        log.info("%s: added (%s), vhost-user socket %s", vdev.name, vdev.mgmtdev.name, server.path)

    def delete(self, name: str | None, *, keep_state: bool = False) -> None:
        """Stop serving the device and delete it; its state file (and RAM disk file) go too, unless
        ``keep_state`` (the daemon stops, and the next one re-creates the device)."""
        vdev = self.get(name)
        server = self.servers.pop(vdev.name, None)
        self._nodes.pop(vdev.name, None)
        try:
            if server is not None:
                server.stop()  # a connected front-end sees the socket close; the session resets the device
        finally:
            with self._state_lock:
                self.states.pop(vdev.name, None)
                self._written.pop(vdev.name, None)
                self._awaiting.discard(vdev.name)
            super().delete(vdev.name)
            if self.persistent and not keep_state:
                remove_state(state_path(self.runtime.path, vdev.name))
                self._remove_ram_disk(vdev.name)

    def close(self) -> None:
        """The daemon stops: a last checkpoint, then every device is stopped; their state files stay."""
        self.checkpoint()
        for vdev in reversed(self.devices()):
            self.delete(vdev.name, keep_state=True)

    def connections(self) -> dict[str, int]:
        """Front-end connections each device's vhost-user server has accepted so far."""
        return {name: server.connections for name, server in self.servers.items()}


# ======================================================================================================
# Kernel mode: the same bus rules, but each device is a VDUSE device on the kernel's real vDPA bus
# ======================================================================================================
MODES = ("kernel", "user")


def kernel_family_present() -> bool:
    """Whether the running kernel answers for the ``vdpa`` generic-netlink family (module ``vdpa`` loaded)."""
    from .bus.netlink import VdpaSocket

    try:
        sock = VdpaSocket()
    except Exception:
        return False
    sock.close()
    return True


def choose_mode(requested: str | None = None) -> str:
    """``kernel`` or ``user``: the requested one, else kernel where VDUSE and the kernel's family exist."""
    if requested in MODES:
        return requested  # type: ignore[return-value]
    from .vduse.device import vduse_available

    return "kernel" if vduse_available() and kernel_family_present() else "user"


def _vduse_net_config(name: str, config: DevSetConfig) -> Any:
    from .vduse.device import VDUSE_NET_UNSUPPORTED, vduse_net_config

    if config.device_features is not None:
        return VDPASIM_NET.build_config(name, config)
    base = vduse_net_config(name).device_features & ~VDUSE_NET_UNSUPPORTED
    return VDPASIM_NET.build_config(name, dataclasses.replace(config, device_features=base))


# The vdpasim management devices mapped onto VDUSE: same names and attribute rules, but a net device
# offers no control queue (the kernel serves none from userspace) unless device_features says otherwise.
KERNEL_MGMTDEVS: tuple[MgmtDev, ...] = (dataclasses.replace(VDPASIM_NET, build_config=_vduse_net_config), VDPASIM_BLK)


class KernelBus(DaemonBus):
    """The daemon's bus in kernel mode: a device is created through ``/dev/vduse/control`` and added
    to the kernel's vDPA bus (mgmtdev ``vduse``) under its name; ``delete`` undoes both. No vhost-user
    socket: the kernel's drivers (virtio_vdpa, vhost_vdpa) are its front-ends. No state files: a VDUSE
    device goes with the daemon that created it."""

    persistent = False

    def __init__(self, runtime: RuntimeDir) -> None:
        super().__init__(runtime)
        self.mgmtdevs = KERNEL_MGMTDEVS
        self.vduse: dict[str, Any] = {}

    def _serve(self, vdev: VdpaDevice) -> None:
        from .vduse.device import VduseDevice

        try:
            vduse = VduseDevice(vdev.device)
        except VdpasimError as exc:
            raise BusError(str(exc), errno=errno.EOPNOTSUPP, extack=f"vdpasim: {exc}") from None
        try:
            vduse.create()
            vduse.add()
        except Exception as exc:
            with contextlib.suppress(Exception):
                vduse.remove()
            err = getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EIO
            text = f"VDUSE: {exc}"
            raise BusError(text, errno=err, extack=f"vdpasim: {text}") from None
        self.vduse[vdev.name] = vduse
        log.info("%s: added (%s) through VDUSE on the kernel's vDPA bus", vdev.name, vdev.mgmtdev.name)

    def delete(self, name: str | None, *, keep_state: bool = False) -> None:
        vdev = self.get(name)
        vduse = self.vduse.pop(vdev.name, None)
        try:
            if vduse is not None:
                vduse.remove()
        finally:
            Bus.delete(self, vdev.name)


# ======================================================================================================
# The control handler (no I/O)
# ======================================================================================================
def is_netlink(data: bytes) -> bool:
    """Whether a control datagram is netlink (else it is a JSON daemon request).

    A netlink datagram starts with its first message's length, a native-endian u32 of at least 16
    that fits the datagram; a JSON request starts with ``{"`` (or is malformed), whose bytes read
    as a length of over 570 million. The two cannot be confused.
    """
    return len(data) >= 16 and 16 <= struct.unpack_from("=I", data)[0] <= len(data)


class ControlHandler:
    """Control datagrams in, reply datagrams out: vdpa netlink for the devices, JSON for the daemon itself."""

    def __init__(self, bus: DaemonBus, info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.bus = bus
        self.netlink = VdpaNetlinkServer(bus)
        self.info = info or (lambda: {})
        self.stop_requested = False
        self._ops: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "daemon_get": lambda a: {
                "daemon": {
                    **self.info(),
                    "devices": sorted(v.name for v in self.bus.devices()),
                    "connections": self.bus.connections(),
                }
            },
            "daemon_stop": self._daemon_stop,
        }
        if os.environ.get(ENV_TEST_FAULTS) == "1":
            self._ops["test_fault"] = self._test_fault

    def handle(self, data: bytes, *, truncated: bool = False, sender_pid: int = 0) -> list[bytes]:
        """The reply datagrams to one request datagram.

        Netlink requests are answered as the kernel answers a socket with NETLINK_EXT_ACK and
        NETLINK_CAP_ACK set (what iproute2 sets) and CAP_NET_ADMIN: only our own user can connect.
        """
        if not truncated and is_netlink(data):
            return datagrams(self.netlink.handle(data, sender_pid=sender_pid, ext_ack=True, cap_ack=True))
        try:
            if truncated:
                raise CodecError(f"request longer than {MAX_MESSAGE} bytes", errno=errno.EMSGSIZE)
            request = decode_request(data)
        except CodecError as exc:
            log.warning("control: malformed request: %s", exc)
            return [encode_response(Response(0, errno=exc.errno, error=str(exc)))]
        if request.op not in self._ops:  # known to the codec, not served here (test_fault without its variable)
            error = f"unknown operation {request.op!r}"
            return [encode_response(Response(request.seq, errno=errno.EOPNOTSUPP, error=error))]
        try:
            result = self._ops[request.op](request.args)
        except VdpasimError as exc:
            log.warning("control: %s refused: %s", request.op, exc)
            return [encode_response(Response(request.seq, errno=exc.errno or errno.EIO, error=str(exc)))]
        except Exception as exc:  # a bug: answer, log it whole, keep serving
            log.exception("control: %s failed", request.op)
            return [encode_response(Response(request.seq, errno=errno.EIO, error=f"internal error: {exc!r}"))]
        return [encode_response(Response(request.seq, result))]

    def _test_fault(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Test-only (``VDPASIM_TEST_FAULTS=1`` in the daemon's environment): make the data-path thread of
        device ``args["device"]`` crash at its next burst, as a bug would."""
        vdev = self.bus.get(str(args.get("device")))
        vdev.device.datapath.inject_fault = RuntimeError(f"injected fault in {vdev.name}'s data path")
        vdev.device.datapath.wake()
        log.warning("control: a data-path crash injected into %s (test hook)", vdev.name)
        return {"device": vdev.name}

    def _daemon_stop(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self.stop_requested = True
        log.info("control: stop requested")
        return {"daemon": {**self.info(), "stopping": True}}


# ======================================================================================================
# The daemon (I/O)
# ======================================================================================================
def configure_logging(level: str = "info") -> None:
    """Log lines on stderr with time, pid, level and the logger (device names are in logger names)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s vdpasim[%(process)d] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger("vdpasim")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Daemon:
    """One daemon on one runtime directory. ``run()`` returns the exit status."""

    def __init__(self, runtime: RuntimeDir, mode: str = "user", vhost_user: str = "server") -> None:
        self.runtime = runtime
        self.mode = mode
        self.bus = KernelBus(runtime) if mode == "kernel" else DaemonBus(runtime, vhost_user=vhost_user)
        self.started = time.time()
        self.handler = ControlHandler(self.bus, self._info)
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signal: int | None = None
        self._stopping = False
        self._peers: dict[socket.socket, int] = {}

    def _info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "runtime_dir": str(self.runtime.path),
            "control_socket": str(self.runtime.control_socket),
            "log_file": str(self.runtime.log_file),
            "mode": self.mode,
            "started": datetime.datetime.fromtimestamp(self.started, datetime.UTC).isoformat(timespec="seconds"),
        }

    def request_stop(self) -> None:
        """Ask the serving loop to stop (any thread, or a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def run(self) -> int:
        try:
            self.runtime.ensure()
            self.runtime.acquire()
        except DaemonRunning as exc:
            log.error("%s", exc)
            return 1
        except VdpasimError as exc:
            log.error("%s", exc)
            return 1
        listener = None
        restore = self._install_signals()
        try:
            for path in self.runtime.remove_stale_sockets():
                log.info("removed a stale socket %s (its daemon is gone)", path)
            restored = self.bus.restore()  # before the control socket answers: a ready daemon serves them all
            if restored:
                log.info("re-created %d device(s) from their state files: %s", len(restored), ", ".join(restored))
            checkpoints = threading.Thread(target=self._checkpoint_loop, name="vdpasim-checkpoint", daemon=True)
            checkpoints.start()
            listener = self._listen()
            log.info(
                "serving %s in %s mode (pid %d, control socket %s)",
                self.runtime.path,
                self.mode,
                os.getpid(),
                listener.getsockname(),
            )
            self._serve(listener)
            reason = signal.Signals(self._signal).name if self._signal else "a stop request"
            log.info("stopping on %s: %d device(s)", reason, len(self.bus.devices()))
        finally:
            self.bus.close()
            if listener is not None:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.runtime.control_socket)
            self.runtime.release()
            restore()
            self._wake_r.close()
            self._wake_w.close()
        log.info("stopped")
        return 0

    def _checkpoint_loop(self) -> None:
        """Write the state files of devices that changed, every CHECKPOINT_SECONDS, until the daemon stops."""
        while not self._stopping:
            time.sleep(CHECKPOINT_SECONDS)
            try:
                self.bus.checkpoint()
            except BusError:
                continue  # a device deleted meanwhile
            except Exception:
                log.exception("checkpoint failed")

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is created 0600: only our user may manage devices
        try:
            listener.bind(os.fspath(self.runtime.control_socket))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        listener.setblocking(False)
        return listener

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # in-process use (tests): stop with request_stop()

        def on_signal(signum: int, _frame: object) -> None:
            self._signal = signum
            self.request_stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _serve(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            selector.register(listener, selectors.EVENT_READ, "listen")
            connections: set[socket.socket] = set()
            try:
                while not self._stopping:
                    for key, _ in selector.select():
                        if key.data == "wake":
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(64)
                        elif key.data == "listen":
                            self._accept(listener, selector, connections)
                        else:
                            self._receive(key.fileobj, selector, connections)  # type: ignore[arg-type]
                        if self.handler.stop_requested:
                            self._stopping = True
            finally:
                for conn in connections:
                    conn.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector, connections: set) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("control: accept failed: %s", exc)
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _gid = (int.from_bytes(creds[i : i + 4], sys.byteorder) for i in (0, 4, 8))
        if uid not in (os.geteuid(), 0):
            log.warning("control: refusing a connection from uid %d (pid %d)", uid, pid)
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a client that stops reading cannot hold the control thread for long
        connections.add(conn)
        self._peers[conn] = pid  # the port id netlink replies carry (the kernel's nl_pid is the pid, too)
        selector.register(conn, selectors.EVENT_READ, "conn")

    def _receive(self, conn: socket.socket, selector: selectors.BaseSelector, connections: set) -> None:
        try:
            data, _, flags, _ = conn.recvmsg(MAX_MESSAGE + 1)
        except OSError:
            data, flags = b"", 0
        if not data:
            selector.unregister(conn)
            connections.discard(conn)
            self._peers.pop(conn, None)
            conn.close()
            return
        pid = self._peers.get(conn, 0)
        for reply in self.handler.handle(data, truncated=bool(flags & socket.MSG_TRUNC), sender_pid=pid):
            try:
                conn.send(reply)
            except OSError as exc:
                log.warning("control: cannot answer a client (%s); closing its connection", exc)
                selector.unregister(conn)
                connections.discard(conn)
                conn.close()
                return


# ======================================================================================================
# Client side of the life cycle: start in the background, stop
# ======================================================================================================
def spawn_daemon(runtime: RuntimeDir, *, log_level: str = "info", mode: str = "auto", timeout: float = 60.0) -> int:
    """Start ``vdpasim daemon`` in the background, logging to ``<runtime>/daemon.log``; return its pid
    once its control socket answers. Two commands racing to start one end up with the same daemon."""
    runtime.ensure()
    log_fd = os.open(runtime.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    env = dict(os.environ)
    env[ENV_RUNTIME_DIR] = str(runtime.path)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdpasim.cli", "daemon", "run", "--log-level", log_level, "--mode", mode],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd="/",
            env=env,
            start_new_session=True,  # detached: no terminal signals, outlives this command
        )
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + timeout
    while True:
        pid = _answering_daemon(runtime)
        if pid is not None:
            if pid != proc.pid:
                proc.wait()  # lost a start race to another daemon: ours exits at once (lock taken)
            return pid
        if proc.poll() is not None:
            time.sleep(0.05)  # a winner of a start race may be about to listen
            pid = _answering_daemon(runtime)
            if pid is not None:
                return pid
            raise VdpasimError(
                f"the daemon exited with status {proc.returncode} before serving; see {runtime.log_file}:\n"
                + _tail(runtime.log_file)
            )
        if time.monotonic() > deadline:
            raise VdpasimError(
                f"the daemon (pid {proc.pid}) did not answer within {timeout:.0f} s; see {runtime.log_file}"
            )
        time.sleep(0.02)


def _answering_daemon(runtime: RuntimeDir) -> int | None:
    client = ControlClient.try_connect(runtime.control_socket, timeout=10.0)
    if client is None:
        return None
    with client:
        return int(client.request("daemon_get")["daemon"]["pid"])


def _tail(path: os.PathLike[str] | str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def stop_daemon(runtime: RuntimeDir, *, timeout: float = 60.0) -> int | None:
    """Ask the daemon of ``runtime`` to stop and wait until it released its lock; its pid, or None if none ran."""
    if not os.path.lexists(runtime.path):
        return None
    runtime.check()  # an unsafe directory's socket or pidfile may not be our daemon's
    client = ControlClient.try_connect(runtime.control_socket)
    if client is None:
        pid = runtime.daemon_pid()
        if pid is None:
            return None
        os.kill(pid, signal.SIGTERM)  # it holds the lock but does not answer: the signal does the same
    else:
        with client:
            pid = int(client.request("daemon_stop")["daemon"]["pid"])
    deadline = time.monotonic() + timeout
    while runtime.daemon_pid() is not None:
        if time.monotonic() > deadline:
            raise VdpasimError(f"the daemon (pid {pid}) did not stop within {timeout:.0f} s")
        time.sleep(0.02)
    return pid


def run_foreground(args: argparse.Namespace) -> int:
    """``vdpasim daemon [run]``: serve until SIGTERM/SIGINT."""
    configure_logging(args.log_level)
    mode = choose_mode(getattr(args, "mode", "auto"))
    if mode == "kernel":
        from .vduse.device import vduse_available

        if not vduse_available() or not kernel_family_present():
            log.error(
                "kernel mode needs VDUSE (/dev/vduse/control: modprobe vduse) and the kernel's vdpa netlink "
                "family (modprobe vdpa); use --mode user for the userspace bus"
            )
            return 1
    return Daemon(runtime_dir(), mode, getattr(args, "vhost_user", "server")).run()
