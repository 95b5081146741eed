"""The vdpasim daemon: owns the simulated devices, serves each on a vhost-user socket, answers the control socket.

Three layers, each testable on its own:

* ``Registry``: the devices, created from a management device (``vdpasim_net``, ``vdpasim_blk``)
  and attributes, each with its ``VhostUserServer`` at ``<runtime>/<name>.vhost-user.sock``. Every
  refusal is a ``PeerError`` with the errno the kernel's vdpa bus would give (ENODEV for an unknown
  mgmtdev or device, EEXIST for a duplicate name, EOPNOTSUPP for an attribute the mgmtdev does not
  take, EINVAL for a bad value).
* ``ControlHandler``: one control message in, its response messages out (control.py's codec), no I/O.
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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .control import (
    MAX_MESSAGE,
    ControlClient,
    Response,
    decode_request,
    encode_response,
)
from .errors import CodecError, DeviceRequestError, VdpasimError
from .runtime import ENV_RUNTIME_DIR, DaemonRunning, RuntimeDir, runtime_dir
from .virtio import constants as c
from .virtio.features import feature_names
from .virtio.status import STATUS_NAMES

if TYPE_CHECKING:
    from bridge.vhost_user.server import VhostUserServer

    from .devices.core import SimDevice

__all__ = [
    "MgmtDev",
    "MGMTDEVS",
    "ManagedDevice",
    "Registry",
    "ControlHandler",
    "Daemon",
    "configure_logging",
    "parse_size",
    "short_feature_names",
    "spawn_daemon",
    "stop_daemon",
]

log = logging.getLogger("vdpasim.daemon")

DEVICE_TYPES = {c.VIRTIO_ID_NET: "network", c.VIRTIO_ID_BLOCK: "block"}  # iproute2 `vdpa dev show` words
_FEATURE_PREFIX = re.compile(r"^(VIRTIO_NET_F_|VIRTIO_BLK_F_|VIRTIO_RING_F_|VIRTIO_F_|VHOST_USER_F_)")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SECTOR = 512

# vdpasim_blk's per-queue counters, and the queue record field behind each.
BLK_STATS = {"requests": "packets", "successes": "successes", "errors": "errors", "bytes": "bytes"}


def short_feature_names(features: int, device_id: int) -> list[str]:
    """Feature names as iproute2 prints them (``MAC``, ``VERSION_1``, ``EVENT_IDX``)."""
    return [_FEATURE_PREFIX.sub("", name) for name in feature_names(features, device_id)]


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
# Management devices and the registry
# ======================================================================================================
@dataclass(frozen=True)
class MgmtDev:
    """A management device: which devices it creates and which attributes ``dev add`` may give it.

    ``attrs`` maps a ``dev add`` keyword to the config field it sets (the kernel's config_attr_mask).
    """

    name: str
    device_id: int
    attrs: Mapping[str, str]
    supported_features: int
    max_supported_vqs: int
    make: Callable[[str, dict[str, Any]], SimDevice]

    @property
    def supported_classes(self) -> list[str]:
        return [{c.VIRTIO_ID_NET: "net", c.VIRTIO_ID_BLOCK: "block"}[self.device_id]]

    def describe(self) -> dict[str, Any]:
        return {
            "supported_classes": self.supported_classes,
            "max_supported_vqs": self.max_supported_vqs,
            "dev_features": short_feature_names(self.supported_features, self.device_id),
            "attributes": sorted(self.attrs),
        }


def _make_net(name: str, values: dict[str, Any]) -> SimDevice:
    from .config import NetConfig
    from .devices.net import NetDevice

    return NetDevice(NetConfig.from_mapping({"name": name, **values}))


def _make_blk(name: str, values: dict[str, Any]) -> SimDevice:
    from .config import BlkConfig
    from .devices.blk import BlkDevice

    if "capacity" in values:
        values["capacity"] = parse_size(values["capacity"]) // _SECTOR
    path = values.get("path")
    if isinstance(path, str) and not os.path.isabs(path):
        raise DeviceRequestError(f"file: {path!r} is not an absolute path (the daemon runs from /)")
    return BlkDevice(BlkConfig.from_mapping({"name": name, **values}))


def _mgmtdevs() -> dict[str, MgmtDev]:
    from .config import BLK_SUPPORTED_FEATURES, NET_MAX_VQP, NET_SUPPORTED_FEATURES

    net = MgmtDev(
        name="vdpasim_net",
        device_id=c.VIRTIO_ID_NET,
        attrs={
            "mac": "mac",
            "mtu": "mtu",
            "max_vqp": "max_vqp",
            "device_features": "device_features",
            "mode": "mode",
            "peer_ip": "peer_ip",
            "peer_mac": "peer_mac",
            "queue_size": "max_queue_size",
            "busy_poll": "busy_poll",
        },
        supported_features=NET_SUPPORTED_FEATURES,
        max_supported_vqs=2 * NET_MAX_VQP + 1,
        make=_make_net,
    )
    blk = MgmtDev(
        name="vdpasim_blk",
        device_id=c.VIRTIO_ID_BLOCK,
        attrs={
            "capacity": "capacity",
            "file": "path",
            "create": "create",
            "read_only": "read_only",
            "num_queues": "num_queues",
            "blk_size": "blk_size",
            "serial": "serial",
            "queue_size": "max_queue_size",
            "busy_poll": "busy_poll",
        },
        supported_features=BLK_SUPPORTED_FEATURES | 1 << c.VIRTIO_BLK_F_RO,
        max_supported_vqs=256,
        make=_make_blk,
    )
    return {m.name: m for m in (net, blk)}


MGMTDEVS: dict[str, MgmtDev] = _mgmtdevs()


@dataclass
class ManagedDevice:
    """A device in the registry: the model, the management device that made it, and its vhost-user server."""

    name: str
    mgmtdev: MgmtDev
    device: SimDevice
    server: VhostUserServer
    created: float

    @property
    def socket(self) -> str:
        return self.server.path


class Registry:
    """The daemon's devices by name. Called from the control thread only; devices run on their own threads."""

    def __init__(self, runtime: RuntimeDir, mgmtdevs: Mapping[str, MgmtDev] | None = None) -> None:
        self.runtime = runtime
        self.mgmtdevs = dict(MGMTDEVS if mgmtdevs is None else mgmtdevs)
        self.devices: dict[str, ManagedDevice] = {}

    # ----- lookups -----
    def _mgmtdev(self, name: Any) -> MgmtDev:
        if not isinstance(name, str) or name not in self.mgmtdevs:
            known = ", ".join(sorted(self.mgmtdevs))
            raise DeviceRequestError(f"management device {name!r} not found (there are: {known})", errno=errno.ENODEV)
        return self.mgmtdevs[name]

    def _device(self, name: Any) -> ManagedDevice:
        if not isinstance(name, str) or name not in self.devices:
            raise DeviceRequestError(f"device {name!r} not found", errno=errno.ENODEV)
        return self.devices[name]

    # ----- create / delete -----
    def add(self, name: Any, mgmtdev: Any, attrs: Mapping[str, Any]) -> ManagedDevice:
        from bridge.vhost_user.server import VhostUserServer

        if not isinstance(name, str) or not name:
            raise DeviceRequestError("a device needs a name")
        spec = self._mgmtdev(mgmtdev)
        unsupported = sorted(set(attrs) - set(spec.attrs))
        if unsupported:
            raise DeviceRequestError(
                f"Some provided attributes are not supported by {spec.name}: {', '.join(unsupported)}",
                errno=errno.EOPNOTSUPP,
            )
        if name in self.devices:
            raise DeviceRequestError(f"device {name!r} already exists", errno=errno.EEXIST)
        values = {spec.attrs[key]: value for key, value in attrs.items()}
        device = spec.make(name, values)  # validates the name and every value (DeviceRequestError, EINVAL)
        try:
            try:
                path = self.runtime.vhost_user_socket(name)
            except VdpasimError as exc:
                raise DeviceRequestError(str(exc), errno=exc.errno) from None
            server = VhostUserServer(device, os.fspath(path), name=name)
            try:
                server.start()
            except OSError as exc:
                raise DeviceRequestError(f"cannot serve {path}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
        except BaseException:
            device.close()
            raise
        managed = ManagedDevice(name, spec, device, server, time.time())
        self.devices[name] = managed
        log.info("%s: added (%s), vhost-user socket %s", name, spec.name, server.path)
        return managed

    def delete(self, name: Any) -> None:
        managed = self._device(name)
        del self.devices[managed.name]
        self._close(managed)
        log.info("%s: deleted", managed.name)

    def _close(self, managed: ManagedDevice) -> None:
        try:
            managed.server.stop()  # a connected front-end sees the socket close; the session resets the device
        finally:
            managed.device.close()

    def close(self) -> None:
        """Stop every server and close every device (daemon shutdown)."""
        while self.devices:
            name, managed = self.devices.popitem()
            try:
                self._close(managed)
                log.info("%s: stopped", name)
            except Exception:
                log.exception("%s: error while stopping", name)

    # ----- show -----
    def mgmtdev_show(self, name: Any = None) -> list[dict[str, Any]]:
        specs = [self._mgmtdev(name)] if name is not None else list(self.mgmtdevs.values())
        return [{"mgmtdev": {spec.name: spec.describe()}} for spec in specs]

    def dev_show(self, name: Any = None) -> list[dict[str, Any]]:
        managed = [self._device(name)] if name is not None else [self.devices[n] for n in sorted(self.devices)]
        return [{"dev": {m.name: self.describe(m)}} for m in managed]

    def describe(self, managed: ManagedDevice) -> dict[str, Any]:
        device, spec = managed.device, managed.mgmtdev
        device_id = device.get_device_id()
        status = device.get_status()
        out: dict[str, Any] = {
            "type": DEVICE_TYPES.get(device_id, str(device_id)),
            "mgmtdev": spec.name,
            "vendor_id": device.get_vendor_id(),
            "max_vqs": device.get_vq_count(),
            "max_vq_size": device.get_vq_num_max(),
            "min_vq_size": device.get_vq_num_min(),
            "status": [name for bit, name in STATUS_NAMES.items() if status & bit],
            "device_features": short_feature_names(device.get_device_features(), device_id),
        }
        if status & c.VIRTIO_CONFIG_S_FEATURES_OK:
            out["negotiated_features"] = short_feature_names(device.get_driver_features(), device_id)
        if device.fault is not None:
            out["fault"] = str(device.fault)
        out["vhost_user_socket"] = managed.socket
        out["vhost_user_connections"] = managed.server.connections
        config = getattr(device, "config", None)
        if device_id == c.VIRTIO_ID_NET and config is not None:
            from .config import format_mac

            out["mac"] = format_mac(device.mac)  # type: ignore[attr-defined]
            out["mtu"] = config.mtu
            out["max_vqp"] = config.max_vqp
            out["mode"] = config.mode
            if config.peer_ip is not None:
                out["peer_ip"] = config.peer_ip
        elif device_id == c.VIRTIO_ID_BLOCK and config is not None:
            capacity = device.capacity  # type: ignore[attr-defined]
            out["capacity"] = capacity
            out["size"] = capacity * _SECTOR
            out["blk_size"] = config.blk_size
            out["num_queues"] = config.num_queues
            out["read_only"] = config.read_only
            out["file"] = config.path
        return out

    def vstats(self, name: Any, qidx: Any) -> dict[str, Any]:
        managed = self._device(name)
        if isinstance(qidx, str) and qidx.isdigit():
            qidx = int(qidx)
        if isinstance(qidx, bool) or not isinstance(qidx, int):
            raise DeviceRequestError(f"qidx: {qidx!r} is not a queue index")
        device = managed.device
        device_id = device.get_device_id()
        if device_id == c.VIRTIO_ID_NET:
            stats = device.vstats(qidx)  # type: ignore[attr-defined]
            role = device.queue_role(qidx)  # type: ignore[attr-defined]
            queue_type = {"rx": "rx", "tx": "tx", "cvq": "control_vq"}[role]
        else:
            if not 0 <= qidx < device.get_vq_count():
                raise DeviceRequestError(
                    f"{managed.name}: no queue {qidx} to report statistics for (it has {device.get_vq_count()})"
                )
            counters = device.stats()[qidx]
            stats = {label: counters[field] for label, field in BLK_STATS.items()}
            queue_type = "request"
        status = device.get_status()
        entry: dict[str, Any] = {"queue_index": qidx, "queue_type": queue_type}
        if status & c.VIRTIO_CONFIG_S_FEATURES_OK:
            entry["negotiated_features"] = short_feature_names(device.get_driver_features(), device_id)
        entry["stats"] = stats
        return {"vstats": {managed.name: entry}}


# ======================================================================================================
# The control handler (no I/O)
# ======================================================================================================
class ControlHandler:
    """Control messages in, response messages out, against a registry."""

    def __init__(self, registry: Registry, info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self.info = info or (lambda: {})
        self.stop_requested = False
        self._ops: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "mgmtdev_get": lambda a: self.registry.mgmtdev_show(a.get("name")),
            "dev_new": self._dev_new,
            "dev_del": self._dev_del,
            "dev_get": lambda a: self.registry.dev_show(a.get("name")),
            "dev_vstats_get": lambda a: self.registry.vstats(a.get("name"), a.get("qidx")),
            "daemon_get": lambda a: {"daemon": {**self.info(), "devices": sorted(self.registry.devices)}},
            "daemon_stop": self._daemon_stop,
        }

    def handle(self, data: bytes, *, truncated: bool = False) -> list[bytes]:
        """The response messages to one request message."""
        try:
            if truncated:
                raise CodecError(f"request longer than {MAX_MESSAGE} bytes", errno=errno.EMSGSIZE)
            request = decode_request(data)
        except CodecError as exc:
            log.warning("control: malformed request: %s", exc)
            return [encode_response(Response(0, errno=exc.errno, error=str(exc)))]
        try:
            result = self._ops[request.op](request.args)
        except VdpasimError as exc:  # PeerError above all; also a runtime-directory refusal
            log.warning("control: %s refused: %s", request.op, exc)
            return [encode_response(Response(request.seq, errno=exc.errno or errno.EIO, error=str(exc)))]
        except Exception as exc:  # a bug: answer, log it whole, keep serving
            log.exception("control: %s failed", request.op)
            return [encode_response(Response(request.seq, errno=errno.EIO, error=f"internal error: {exc!r}"))]
        if request.is_dump:
            parts = [Response(request.seq, part, more=True) for part in result]
            return [encode_response(p) for p in [*parts, Response(request.seq, None)]]
        if isinstance(result, list):  # a dump op asked for one object
            result = result[0]
        return [encode_response(Response(request.seq, result))]

    def _dev_new(self, args: Mapping[str, Any]) -> dict[str, Any]:
        attrs = {k: v for k, v in args.items() if k not in ("name", "mgmtdev")}
        managed = self.registry.add(args.get("name"), args.get("mgmtdev"), attrs)
        return {"dev": {managed.name: self.registry.describe(managed)}}

    def _dev_del(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self.registry.delete(args.get("name"))
        return {}

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

    def __init__(self, runtime: RuntimeDir) -> None:
        self.runtime = runtime
        self.registry = Registry(runtime)
        self.started = time.time()
        self.handler = ControlHandler(self.registry, self._info)
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signal: int | None = None
        self._stopping = False

    def _info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "runtime_dir": str(self.runtime.path),
            "control_socket": str(self.runtime.control_socket),
            "log_file": str(self.runtime.log_file),
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
            listener = self._listen()
            log.info("serving %s (pid %d, control socket %s)", self.runtime.path, os.getpid(), listener.getsockname())
            self._serve(listener)
            reason = signal.Signals(self._signal).name if self._signal else "a stop request"
            log.info("stopping on %s: %d device(s)", reason, len(self.registry.devices))
        finally:
            self.registry.close()
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
        selector.register(conn, selectors.EVENT_READ, "conn")

    def _receive(self, conn: socket.socket, selector: selectors.BaseSelector, connections: set) -> None:
        try:
            data, _, flags, _ = conn.recvmsg(MAX_MESSAGE + 1)
        except OSError:
            data, flags = b"", 0
        if not data:
            selector.unregister(conn)
            connections.discard(conn)
            conn.close()
            return
        for reply in self.handler.handle(data, truncated=bool(flags & socket.MSG_TRUNC)):
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
def spawn_daemon(runtime: RuntimeDir, *, log_level: str = "info", timeout: float = 60.0) -> int:
    """Start ``vdpasim daemon`` in the background, logging to ``<runtime>/daemon.log``; return its pid
    once its control socket answers. Two commands racing to start one end up with the same daemon."""
    runtime.ensure()
    log_fd = os.open(runtime.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    env = dict(os.environ)
    env[ENV_RUNTIME_DIR] = str(runtime.path)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdpasim.cli", "daemon", "run", "--log-level", log_level],
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
    return Daemon(runtime_dir()).run()
