"""A vhost-user front-end that speaks the vDPA device operations: ``VhostUserClient(path)`` is a DeviceOps.

It connects to a back-end socket, negotiates, and turns every operation of vdpasim/ops.py into
vhost-user requests, plus the vDPA extension (docs/vhost-user-vdpa.md) when the back-end offers
``ProtocolFeature.VDPA``. So a server for another wire (the vhost-vdpa bridge) can be stacked on it,
and the conformance suite (vdpasim/testing/conformance.py) can hold it to the same contract as a
device model.

How the operations map (the table in docs/vhost-user-vdpa.md says the same):

* status: GET_STATUS/SET_STATUS with STATUS, otherwise a local mirror. The status machine's rules are
  checked here before anything is sent, as a device would check them. Adding FEATURES_OK first sends
  SET_FEATURES with the proposed driver features; a back-end that refuses them NACKs (REPLY_ACK) and
  the status read back lacks FEATURES_OK, as virtio §3.1.1 step 6 expects. A status of 0 resets
  (SET_STATUS(0), else RESET_DEVICE, else RESET_OWNER).
* rings: SET_VRING_NUM/ADDR/BASE/CALL as such; SET_VRING_KICK at ``set_vq_kick`` (a kick fd starts a
  vhost-user ring); ``set_vq_ready`` is SET_VRING_ENABLE, and starts the ring with our own kick
  eventfd if none was given. ``get_vq_state`` is GET_VRING_BASE, which stops a vhost-user ring, so a
  ring that was started is started again with its kick fd: the state read leaves the ring as it was,
  as on a vDPA device. ``stop_vq`` stops without restarting.
* memory: ``set_map`` sends the table as SET_MEM_TABLE (the region fds: regions must keep theirs,
  ``Region.from_fd(keep_fd=True)``), or as REM_MEM_REG/ADD_MEM_REG beyond 8 regions with
  CONFIGURE_MEM_SLOTS. With ``RingAddressSpace.GUEST`` the regions' user addresses are sent equal to
  their guest addresses, so ring addresses given as GPAs mean the same bytes to the back-end.
* what plain vhost-user cannot say (device id, vendor id, queue count and size, config size...) raises
  a ``SessionError`` with EOPNOTSUPP; the optional operations that need the extension (suspend,
  resume, and set_config_cb without a back-end channel either) are absent (``ops.supports`` is false).
  The IOVA range falls back to the whole 64-bit space, as vhost-vdpa does for a parent without one.

Errors: a request the back-end refuses raises ``DeviceRequestError`` with the back-end's errno (it
arrives through REPLY_ACK, or the extension's ``ErrorReply``); a back-end that answers out of turn
raises ``SessionError``; a broken or silent connection raises ``TransportError`` and the client
is unusable after it. One connection, one request at a time, under a lock.

``defer_acks=True`` (the vhost-vdpa bridge: bridge/bypass.py) trades those errors for round trips on the
requests whose vDPA counterpart cannot fail (``DEFERRED``: the kernel's set_vq_num, set_vq_cb, set_vq_ready,
set_status, set_config, reset are void): they still ask for an ack, but the client does not wait for it; the
acks are read, in order, before the next request that needs an answer, and a refusal found there is logged
(and counted in ``deferred_refusals``). The status the client checks transitions against is then its own
mirror of what it set, not a GET_STATUS per change. Everything else still waits for its answer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vdpasim.errors import CodecError, DeviceRequestError, PeerError, SessionError, TransportError, UsageError
from vdpasim.memory import Region, RegionTable
from vdpasim.ops import Call, IovaRange, RingAddressSpace
from vdpasim.rings.state import PackedState, SplitState, VqState
from vdpasim.virtio.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
)
from vdpasim.virtio.status import status_change_error

from . import messages as m
from .codec import close_fds
from .messages import MAX_MEM_REGIONS, VRING_IDX_MASK, VRING_NOFD_MASK, BackendRequest, FrontendRequest, Message
from .messages import ProtocolFeature as P
from .transport import MessageStream

__all__ = ["VhostUserClient", "WANTED_PROTOCOL_FEATURES", "IOVA_FULL_RANGE"]

F = FrontendRequest
WANTED_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (P.MQ, P.REPLY_ACK, P.CONFIG, P.STATUS, P.BACKEND_REQ, P.RESET_DEVICE, P.CONFIGURE_MEM_SLOTS, P.VDPA)
)
# vhost feature bits that GET_FEATURES mixes into the virtio ones: VHOST_F_LOG_ALL (dirty logging for
# migration) and VHOST_USER_F_PROTOCOL_FEATURES. Neither is a device feature a driver negotiates.
VHOST_F_LOG_ALL = 26
_VHOST_TRANSPORT_BITS = 1 << VHOST_F_LOG_ALL | 1 << VHOST_USER_F_PROTOCOL_FEATURES
# What vhost-vdpa answers for a parent without get_iova_range: everything.
IOVA_FULL_RANGE = IovaRange(0, (1 << 64) - 1)
_MAX_CONFIG_CHUNK = m.ConfigSpace.MAX_SIZE
# Requests whose ack ``defer_acks`` does not wait for: their vDPA counterparts cannot fail.
DEFERRED = frozenset(
    {F.SET_OWNER, F.SET_VRING_NUM, F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ENABLE, F.SET_STATUS,
     F.SET_CONFIG, F.VDPA_SET_CONFIG_CALL, F.SET_BACKEND_REQ_FD, F.RESET_DEVICE}
)  # fmt: skip


def _signal(call: Call) -> None:
    if call is None:
        return
    if callable(call):
        call()
        return
    with contextlib.suppress(OSError):
        os.eventfd_write(call, 1)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@dataclass
class _Ring:
    """What the front-end knows of one ring: the back-end keeps no state we could ask for."""

    kick: int | None = None  # the caller's kick fd (None: ours)
    own_kick: int | None = None  # our eventfd, when the caller gave none
    started: bool = False  # the back-end holds a kick fd for it (vhost-user "started")
    ready: bool = False  # enabled, as the caller last set it
    call: Call = None
    own_call: int | None = None  # our eventfd standing for a callable ``call``

    def kick_fd(self) -> int:
        if self.kick is not None:
            return self.kick
        if self.own_kick is None:
            self.own_kick = _eventfd()
        return self.own_kick


class _Notifier:
    """A thread turning our own eventfds into calls of Python callables (vq and config callbacks)."""

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake = _eventfd()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._targets: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"vhost-user-client-{name}", daemon=True)
        self._thread.start()

    def add(self, fd: int, target: Callable[[], None]) -> None:
        with self._lock:
            self._targets[fd] = target
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._targets.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    def _run(self) -> None:
        log = logging.getLogger("vdpasim.vhost_user.client")
        while not self._stopping:
            for fd, _ in self._epoll.poll():
                with contextlib.suppress(BlockingIOError, OSError):
                    os.eventfd_read(fd)
                with self._lock:
                    target = self._targets.get(fd)
                if target is not None:
                    try:
                        target()
                    except Exception:  # a caller's callback failing must not stop the others
                        log.exception("notification callback failed")

    def close(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        self._epoll.close()
        os.close(self._wake)


class VhostUserClient:
    """DeviceOps over one vhost-user connection; see the module docstring.

    ``path`` is the back-end's socket (or pass a connected ``sock``, which the client then owns and
    closes). ``protocol_features`` limits
    what is negotiated (the back-end's offer is intersected with it); ``backend_channel`` sets up
    the back-end request channel when BACKEND_REQ is offered (config-change messages); ``timeout``
    bounds every wait for a reply.
    """

    # Optional in DeviceOps, and neither vhost-user nor vhost-vdpa can ask for it: absent, so a consumer
    # probing with ops.supports() falls back to 1, as virtio_vdpa does.
    get_vq_num_min = None

    def __init__(
        self,
        path: str | None = None,
        *,
        sock: socket.socket | None = None,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        backend_channel: bool = True,
        timeout: float = 30.0,
        name: str = "",
        defer_acks: bool = False,
    ) -> None:
        if (path is None) == (sock is None):
            raise UsageError("give either the back-end's socket path or a connected socket")
        self.name = name or (os.path.basename(path) if path else "socket")
        self.log = logging.getLogger(f"vdpasim.vhost_user.client.{self.name}")
        self._lock = threading.RLock()
        self._stream: MessageStream | None = None
        self._notifier: _Notifier | None = None
        self._backend_sock: socket.socket | None = None
        self._backend_thread: threading.Thread | None = None
        self._rings: dict[int, _Ring] = {}
        self._driver_features = 0
        self._status = 0  # mirror, used when STATUS is not negotiated (and by defer_acks for its checks)
        self.defer_acks = defer_acks
        self._pending: list[FrontendRequest] = []  # requests sent whose acks were not read yet (defer_acks)
        self.deferred_refusals = 0
        self.sent = 0  # requests sent, and answers waited for (a round trip each): what the bench counts
        self.waited = 0
        self._generation = 0  # mirror: config changes the back-end channel reported
        self._config_call: Call = None
        self._config_own_call: int | None = None
        self._vq_count: int | None = None
        self._sent_regions: list[m.MemoryRegion] = []
        self.device_features = 0  # as GET_FEATURES said, without the vhost transport bits
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.has_protocol_features = False
        if sock is None:
            assert path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                raise TransportError(f"cannot connect to {path}: {exc}", reconnect=True) from exc
        sock.settimeout(timeout)
        self._stream = MessageStream(sock)
        try:
            self._handshake(protocol_features, backend_channel)
        except BaseException:
            self.close()
            raise

    # ----- connection -----
    def _handshake(self, wanted: int, backend_channel: bool) -> None:
        features = self._u64(F.GET_FEATURES)
        self.has_protocol_features = bool(features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)
        self.device_features = features & ~_VHOST_TRANSPORT_BITS
        if self.has_protocol_features:
            self.offered_protocol_features = self._u64(F.GET_PROTOCOL_FEATURES)
            chosen = self.offered_protocol_features & wanted
            if not chosen >> P.REPLY_ACK & 1:
                chosen &= ~(1 << P.VDPA)  # the extension reports failures through REPLY_ACK
            self._call(F.SET_PROTOCOL_FEATURES, m.U64(chosen), ack=False)
            self.protocol_features = chosen
        if backend_channel and self.negotiated(P.BACKEND_REQ):
            self._open_backend_channel()
        self._call(F.SET_OWNER)
        if self.negotiated(P.VDPA):
            self._vq_count = self._u64(F.VDPA_GET_VQS_COUNT)
        absent = []
        if not self.negotiated(P.VDPA):
            absent += ["suspend", "resume"]
            if self._backend_sock is None:
                absent.append("set_config_cb")
        for op in absent:  # optional operations the back-end cannot do: ops.supports() says no
            setattr(self, op, None)
        self.log.info(
            "connected: device features %#x, protocol features %#x of %#x offered",
            self.device_features,
            self.protocol_features,
            self.offered_protocol_features,
        )

    def negotiated(self, feature: P) -> bool:
        return bool(self.protocol_features >> feature & 1)

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def fileno(self) -> int:
        """The connection's fd, for a watcher to poll for a hang-up (it must read nothing from it)."""
        if self._stream is None:
            raise TransportError(f"{self.name}: not connected")
        return self._stream.sock.fileno()

    def close(self) -> None:
        """Leave the back-end (which resets the device) and release every fd we own."""
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            if self._backend_sock is not None:
                with contextlib.suppress(OSError):
                    self._backend_sock.shutdown(socket.SHUT_RDWR)
            if self._backend_thread is not None and self._backend_thread is not threading.current_thread():
                self._backend_thread.join()
            if self._backend_sock is not None:
                self._backend_sock.close()
                self._backend_sock = None
            if self._notifier is not None:
                self._notifier.close()
                self._notifier = None
            for ring in self._rings.values():
                close_fds([fd for fd in (ring.own_kick, ring.own_call) if fd is not None])
                ring.own_kick = ring.own_call = None
            if self._config_own_call is not None:
                close_fds([self._config_own_call])
                self._config_own_call = None

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _broken(self, reason: str) -> None:
        self.log.error("dropping the connection: %s", reason)
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # ----- one request, one answer -----
    def _call(
        self,
        request: FrontendRequest,
        payload: m.Payload | None = None,
        fds: Sequence[int] = (),
        *,
        ack: bool = True,
        defer: bool | None = None,
    ) -> m.Payload | None:
        """Send ``request``; return its reply payload (None for requests without one).

        With REPLY_ACK negotiated, requests without a reply ask for an ack (unless ``ack`` is false)
        and a failure code raises DeviceRequestError.
        """
        with self._lock:
            stream = self._stream
            if stream is None:
                raise TransportError(f"{self.name}: not connected")
            reply_type = m.payload_types(request)[1]
            need_reply = reply_type is None and ack and self.negotiated(P.REPLY_ACK)
            message = Message(request, payload if payload is not None else m.Empty(), tuple(fds), need_reply=need_reply)
            deferred = need_reply and self.defer_acks and (request in DEFERRED if defer is None else defer)
            if not deferred and self._pending and (reply_type is not None or need_reply):
                self._drain(stream)
            try:
                stream.send(message)
                self.sent += 1
                if deferred:
                    self._pending.append(request)
                    return None
                if reply_type is None and not need_reply:
                    return None
            except (TransportError, CodecError) as exc:
                self._broken(f"{request.name}: {exc}")
                if isinstance(exc, CodecError):
                    raise SessionError(f"{request.name}: malformed reply from the back-end: {exc}") from exc
                raise
            self.waited += 1
            reply = self._receive(stream, request)
        if isinstance(reply.payload, m.ErrorReply):
            raise DeviceRequestError(f"{request.name} refused by the back-end", errno=reply.payload.errno)
        if need_reply:
            assert isinstance(reply.payload, m.U64)
            code = reply.payload.value
            if code:
                raise DeviceRequestError(
                    f"{request.name} refused by the back-end (code {code})",
                    errno=code if code <= m.ErrorReply.MAX_ERRNO else errno.EIO,
                )
            return None
        return reply.payload

    def _receive(self, stream: MessageStream, request: FrontendRequest) -> Message:
        """The back-end's answer to ``request`` (lock held)."""
        try:
            reply = stream.receive()
        except (TransportError, CodecError) as exc:
            self._broken(f"{request.name}: {exc}")
            if isinstance(exc, CodecError):
                raise SessionError(f"{request.name}: malformed reply from the back-end: {exc}") from exc
            raise
        if reply is None:
            self._broken(f"the back-end closed the connection during {request.name}")
            raise TransportError(f"the back-end closed the connection during {request.name}", reconnect=True)
        close_fds(reply.fds)  # no reply we ask for carries fds; never keep what we did not ask for
        if not reply.reply or reply.request is not request:
            self._broken(f"answer {reply.request.name} to {request.name}")
            raise SessionError(f"the back-end answered {request.name} with {reply.request.name}")
        return reply

    def _drain(self, stream: MessageStream) -> None:
        """Read the acks of the deferred requests, in order (lock held); log the refusals."""
        pending, self._pending = self._pending, []
        for request in pending:
            reply = self._receive(stream, request)
            code = reply.payload.value if isinstance(reply.payload, m.U64) else errno.EIO
            if code:
                self.deferred_refusals += 1
                self.log.warning("%s refused by the back-end (code %d), after the caller went on", request.name, code)

    def _call_many(self, calls: Sequence[tuple[FrontendRequest, m.Payload | None]]) -> list[m.Payload]:
        """Requests that each have a reply, sent back to back: their replies, in order, for one round trip."""
        with self._lock:
            stream = self._stream
            if stream is None:
                raise TransportError(f"{self.name}: not connected")
            if self._pending:
                self._drain(stream)
            for request, payload in calls:
                if m.payload_types(request)[1] is None:
                    raise UsageError(f"{request.name} has no reply to pipeline")
                try:
                    stream.send(Message(request, payload if payload is not None else m.Empty()))
                except (TransportError, CodecError) as exc:
                    self._broken(f"{request.name}: {exc}")
                    raise TransportError(f"{request.name}: {exc}") from exc
                self.sent += 1
            self.waited += 1
            replies = [self._receive(stream, request) for request, _ in calls]
        for (request, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply.payload, m.ErrorReply):
                raise DeviceRequestError(f"{request.name} refused by the back-end", errno=reply.payload.errno)
        return [reply.payload for reply in replies]

    def device_facts(self) -> dict[str, Any]:
        """The device's constants in one round trip (vDPA extension), keyed by the DeviceOps that reads each:
        a bridge asks them once instead of once per ioctl. Empty without the extension."""
        if not self.negotiated(P.VDPA):
            return {}
        names = {
            "get_device_id": F.VDPA_GET_DEVICE_ID,
            "get_vendor_id": F.VDPA_GET_VENDOR_ID,
            "get_vq_num_max": F.VDPA_GET_VRING_NUM,
            "get_config_size": F.VDPA_GET_CONFIG_SIZE,
            "get_group_num": F.VDPA_GET_GROUP_NUM,
            "get_as_num": F.VDPA_GET_AS_NUM,
            "get_backend_features": F.VDPA_GET_BACKEND_FEATURES,
        }
        replies = self._call_many([(request, None) for request in (*names.values(), F.VDPA_GET_IOVA_RANGE)])
        facts: dict[str, Any] = {}
        for name, reply in zip(names, replies, strict=False):
            assert isinstance(reply, m.U64)
            facts[name] = reply.value
        span = replies[-1]
        assert isinstance(span, m.IovaRange)
        facts["get_iova_range"] = IovaRange(span.first, span.last)
        return facts

    def config_snapshot(self, size: int) -> tuple[bytes, int]:
        """(the whole config space of ``size`` bytes, its generation), in one round trip where the extension allows."""
        if not self.negotiated(P.VDPA) or not 0 < size <= _MAX_CONFIG_CHUNK:
            return self.get_config(0, size), self.get_generation()
        config, generation = self._call_many(
            [(F.GET_CONFIG, m.ConfigSpace(0, size, 0, bytes(size))), (F.VDPA_GET_CONFIG_GENERATION, None)]
        )
        assert isinstance(config, m.ConfigSpace) and isinstance(generation, m.U64)
        if config.size != size or config.offset != 0:
            raise DeviceRequestError(f"{self.name}: the back-end refused config read 0+{size}")
        return config.data, generation.value

    def _u64(self, request: FrontendRequest) -> int:
        reply = self._call(request)
        assert isinstance(reply, m.U64)
        return reply.value

    def _extension(self, request: FrontendRequest) -> None:
        """The request belongs to the vDPA extension: refuse it plainly when it was not negotiated."""
        if not self.negotiated(P.VDPA):
            raise SessionError(
                f"{request.name}: the back-end does not offer the vDPA extension", errno=errno.EOPNOTSUPP
            )

    def _vdpa_u64(self, request: FrontendRequest) -> int:
        self._extension(request)
        return self._u64(request)

    # ----- rings, as we know them -----
    def _ring(self, idx: int, *, fd_index: bool = False) -> _Ring:
        """The record of ring ``idx``; refuses indexes the device (or the message field) cannot have."""
        limit = VRING_IDX_MASK if fd_index else 0xFFFFFFFF
        if not 0 <= idx <= limit or (self._vq_count is not None and idx >= self._vq_count):
            count = "" if self._vq_count is None else f" (the device has {self._vq_count})"
            raise DeviceRequestError(f"{self.name}: no virtqueue {idx}{count}", errno=errno.ENOBUFS)
        return self._rings.setdefault(idx, _Ring())

    def _packed(self) -> bool:
        return bool(self._driver_features >> VIRTIO_F_RING_PACKED & 1)

    def _send_kick(self, idx: int, ring: _Ring) -> None:
        self._call(F.SET_VRING_KICK, m.U64(idx), (ring.kick_fd(),))
        ring.started = True

    def _call_fd(self, call: Call, current_own: int | None) -> tuple[int | None, int | None]:
        """The fd to send for ``call`` and our own eventfd standing for it (a callable needs one)."""
        if current_own is not None and self._notifier is not None:
            self._notifier.remove(current_own)
        if call is None:
            return None, current_own
        if callable(call):
            own = current_own if current_own is not None else _eventfd()
            if self._notifier is None:
                self._notifier = _Notifier(self.name)
            self._notifier.add(own, call)
            return own, own
        return call, current_own

    # ===== the vDPA device operations =====

    # --- virtqueue operations ---
    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None:
        self._ring(idx)
        # struct vhost_vring_addr order: descriptor, used (device area), available (driver area).
        self._call(F.SET_VRING_ADDR, m.VringAddr(idx, 0, desc, device, driver, 0))

    def set_vq_num(self, idx: int, num: int) -> None:
        self._ring(idx)
        if not 0 <= num <= 0xFFFFFFFF:
            raise DeviceRequestError(f"{self.name}: vq {idx}: size {num}")
        self._call(F.SET_VRING_NUM, m.VringState(idx, num))

    def kick_vq(self, idx: int) -> None:
        with self._lock:
            ring = self._ring(idx, fd_index=True)
            if not ring.started:
                self._send_kick(idx, ring)  # a kick fd starts a vhost-user ring, as a kick would
            fd = ring.kick_fd()
        os.eventfd_write(fd, 1)

    def set_vq_kick(self, idx: int, fd: int | None) -> None:
        with self._lock:
            ring = self._ring(idx, fd_index=True)
            ring.kick = fd
            self._send_kick(idx, ring)

    def set_vq_call(self, idx: int, call: Call) -> None:
        with self._lock:
            ring = self._ring(idx, fd_index=True)
            fd, ring.own_call = self._call_fd(call, ring.own_call)
            ring.call = call
            if fd is None:
                self._call(F.SET_VRING_CALL, m.U64(idx | VRING_NOFD_MASK))
            else:
                self._call(F.SET_VRING_CALL, m.U64(idx), (fd,))

    def set_vq_ready(self, idx: int, ready: bool) -> None:
        with self._lock:
            ring = self._ring(idx, fd_index=True)
            if ready and not ring.started:
                self._send_kick(idx, ring)
            if self.has_protocol_features:
                self._call(F.SET_VRING_ENABLE, m.VringState(idx, int(ready)))
            elif not ready and ring.started:
                self.stop_vq(idx)  # without PROTOCOL_FEATURES rings are always enabled: stop it instead
            ring.ready = ready

    def get_vq_ready(self, idx: int) -> bool:
        with self._lock:
            return self._ring(idx).ready

    def set_vq_state(self, idx: int, state: VqState) -> None:
        self._ring(idx)
        self._call(F.SET_VRING_BASE, m.VringState(idx, state.encode()))

    def stop_vq(self, idx: int) -> VqState:
        """GET_VRING_BASE as vhost-user means it: stop the ring and return where it stopped."""
        with self._lock:
            ring = self._ring(idx)
            reply = self._call(F.GET_VRING_BASE, m.VringState(idx, 0))
            assert isinstance(reply, m.VringState)
            ring.started = False  # the back-end dropped its kick fd
            if reply.index != idx:
                raise SessionError(f"GET_VRING_BASE for ring {idx} answered for ring {reply.index}")
            return PackedState.decode(reply.num) if self._packed() else SplitState(reply.num & 0xFFFF)

    def get_vq_state(self, idx: int) -> VqState:
        with self._lock:
            ring = self._ring(idx)
            was_started = ring.started
            state = self.stop_vq(idx)
            if was_started:
                self._send_kick(idx, ring)  # reading the state must not leave the ring stopped
            return state

    def get_vq_num_max(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_VRING_NUM)

    def get_vq_count(self) -> int:
        if self._vq_count is None:
            # GET_QUEUE_NUM is no substitute: back-ends answer queues or queue pairs (QEMU's net reads pairs).
            raise SessionError(
                f"{self.name}: the back-end does not offer the vDPA extension: queue count unknown",
                errno=errno.EOPNOTSUPP,
            )
        return self._vq_count

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (MQ) as the back-end answers it: queues, or queue pairs for vhost-user-net."""
        if not self.negotiated(P.MQ):
            raise SessionError(f"{self.name}: GET_QUEUE_NUM without MQ", errno=errno.EOPNOTSUPP)
        return self._u64(F.GET_QUEUE_NUM)

    # --- device operations ---
    def get_device_id(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_DEVICE_ID)

    def get_vendor_id(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_VENDOR_ID)

    def get_device_features(self) -> int:
        return self.device_features

    def set_driver_features(self, features: int) -> None:
        with self._lock:
            if self._checked_status() & VIRTIO_CONFIG_S_FEATURES_OK:
                raise DeviceRequestError(f"{self.name}: driver features are frozen once FEATURES_OK is set")
            if not 0 <= features < 1 << 64:
                raise DeviceRequestError(f"{self.name}: driver features {features:#x} do not fit 64 bits")
            self._driver_features = features  # proposed; sent with SET_FEATURES when FEATURES_OK is added

    def get_driver_features(self) -> int:
        return self._driver_features

    def _checked_status(self) -> int:
        """The status transitions are checked against: the device's, or with defer_acks what we set."""
        return self._status if self.defer_acks else self.get_status()

    def get_status(self) -> int:
        if self.negotiated(P.STATUS):
            return self._u64(F.GET_STATUS) & 0xFF
        return self._status

    def set_status(self, status: int) -> None:
        with self._lock:
            if status == 0:
                self.reset()
                return
            if not 0 < status <= 0xFF:
                raise DeviceRequestError(f"{self.name}: status {status:#x} is not a byte")
            current = self._checked_status()
            reason = status_change_error(current, status)
            if reason:
                raise DeviceRequestError(f"{self.name}: {reason}")
            added = status & ~current
            if added & VIRTIO_CONFIG_S_FEATURES_OK and not self._send_features():
                status &= ~(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
            if self.negotiated(P.STATUS):
                self._call(F.SET_STATUS, m.U64(status))
            self._status = status

    def _send_features(self) -> bool:
        """SET_FEATURES with the proposed driver features; False if the back-end refused them."""
        value = self._driver_features
        if self.has_protocol_features:
            value |= 1 << VHOST_USER_F_PROTOCOL_FEATURES  # keeps the rings disabled until SET_VRING_ENABLE
        try:
            self._call(F.SET_FEATURES, m.U64(value))
        except DeviceRequestError as exc:
            self.log.info("the back-end refused driver features %#x: %s", self._driver_features, exc)
            return False
        return True

    def reset(self) -> None:
        with self._lock:
            if self.negotiated(P.STATUS):
                self._call(F.SET_STATUS, m.U64(0))
            elif self.negotiated(P.RESET_DEVICE):
                self._call(F.RESET_DEVICE)
            else:
                self._call(F.RESET_OWNER)
            # The back-end forgot its ring fds and calls; so do we (our eventfds stay for reuse).
            for ring in self._rings.values():
                if ring.own_call is not None and self._notifier is not None:
                    self._notifier.remove(ring.own_call)
                ring.kick = None
                ring.started = ring.ready = False
                ring.call = None
            self._driver_features = 0
            self._status = 0

    def get_config_size(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_CONFIG_SIZE)

    def _config_allowed(self, request: FrontendRequest) -> None:
        if not (self.negotiated(P.CONFIG) or self.negotiated(P.VDPA)):
            raise SessionError(f"{request.name}: the back-end does not offer CONFIG", errno=errno.EOPNOTSUPP)

    @staticmethod
    def _config_range(offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > 0xFFFFFFFF:
            raise DeviceRequestError(f"config range {offset}+{length}")

    def get_config(self, offset: int, length: int) -> bytes:
        self._config_allowed(F.GET_CONFIG)
        self._config_range(offset, length)
        if length == 0:
            if self.negotiated(P.VDPA) and offset > self.get_config_size():
                raise DeviceRequestError(f"{self.name}: config offset {offset} is past the config space")
            return b""
        data = b""
        while len(data) < length:
            at, size = offset + len(data), min(_MAX_CONFIG_CHUNK, length - len(data))
            # As QEMU does: the request carries a zeroed buffer of the size it wants back.
            reply = self._call(F.GET_CONFIG, m.ConfigSpace(at, size, 0, bytes(size)))
            assert isinstance(reply, m.ConfigSpace)
            if reply.size == 0:  # the spec's failure answer
                raise DeviceRequestError(f"{self.name}: the back-end refused config read {at}+{size}")
            if reply.offset != at or reply.size != size:
                raise SessionError(f"GET_CONFIG {at}+{size} answered with {reply.offset}+{reply.size}")
            data += reply.data
        return data

    def set_config(self, offset: int, data: bytes) -> None:
        self._config_allowed(F.SET_CONFIG)
        self._config_range(offset, len(data))
        for start in range(0, len(data), _MAX_CONFIG_CHUNK):
            chunk = bytes(data[start : start + _MAX_CONFIG_CHUNK])
            # flags 0: VHOST_SET_CONFIG_TYPE_FRONTEND (a driver's write, not migration).
            self._call(F.SET_CONFIG, m.ConfigSpace(offset + start, len(chunk), 0, chunk))

    def get_generation(self) -> int:
        if self.negotiated(P.VDPA):
            return self._u64(F.VDPA_GET_CONFIG_GENERATION)
        return self._generation

    def set_config_cb(self, call: Call) -> None:
        with self._lock:
            self._config_call = call
            if not self.negotiated(P.VDPA):
                return  # config-change messages on the back-end channel will signal it
            fd, self._config_own_call = self._call_fd(call, self._config_own_call)
            if fd is None:
                self._call(F.VDPA_SET_CONFIG_CALL, m.U64(VRING_NOFD_MASK))
            else:
                self._call(F.VDPA_SET_CONFIG_CALL, m.U64(0), (fd,))

    def get_iova_range(self) -> IovaRange:
        if not self.negotiated(P.VDPA):
            return IOVA_FULL_RANGE
        self._extension(F.VDPA_GET_IOVA_RANGE)
        reply = self._call(F.VDPA_GET_IOVA_RANGE)
        assert isinstance(reply, m.IovaRange)
        return IovaRange(reply.first, reply.last)

    def suspend(self) -> None:
        self._extension(F.VDPA_SUSPEND)
        self._call(F.VDPA_SUSPEND)

    def resume(self) -> None:
        self._extension(F.VDPA_RESUME)
        self._call(F.VDPA_RESUME)

    # --- DMA operations ---
    def set_map(self, table: RegionTable, ring_space: RingAddressSpace = RingAddressSpace.GUEST) -> None:
        regions = [self._describe(region, ring_space) for region in table.regions]
        fds = [self._fd_of(region) for region in table.regions]
        with self._lock:
            if len(regions) <= MAX_MEM_REGIONS:
                # An empty table (a reset's clean map) cannot fail on a vDPA device: no need to wait for it.
                self._call(F.SET_MEM_TABLE, m.MemoryTable(tuple(regions)), fds, defer=not regions)
            elif self.negotiated(P.CONFIGURE_MEM_SLOTS):
                for region in self._sent_regions:
                    self._call(F.REM_MEM_REG, m.SingleMemoryRegion(region))
                self._sent_regions = []
                for region, fd in zip(regions, fds, strict=True):
                    self._call(F.ADD_MEM_REG, m.SingleMemoryRegion(region), (fd,))
                    self._sent_regions.append(region)
                return
            else:
                raise DeviceRequestError(
                    f"{self.name}: {len(regions)} memory regions, and the back-end takes at most {MAX_MEM_REGIONS}",
                    errno=errno.E2BIG,
                )
            self._sent_regions = regions

    @staticmethod
    def _describe(region: Region, ring_space: RingAddressSpace) -> m.MemoryRegion:
        # vhost-user translates ring addresses by user address: for rings given as guest (or IOVA)
        # addresses, make each region's user address its guest address.
        user = region.user_addr if ring_space is RingAddressSpace.USER else region.guest_addr
        return m.MemoryRegion(region.guest_addr, region.size, user, region.offset)

    @staticmethod
    def _fd_of(region: Region) -> int:
        if region.fd is None:
            raise UsageError(f"memory region at {region.guest_addr:#x} has no fd to share (map it with keep_fd=True)")
        return region.fd

    # ===== the rest of the vDPA extension (vhost-vdpa ioctls a DeviceOps does not name) =====
    def get_vq_size(self, idx: int) -> int:
        """VDPA_GET_VRING_SIZE: the size of queue ``idx`` (VHOST_VDPA_GET_VRING_SIZE)."""
        self._extension(F.VDPA_GET_VRING_SIZE)
        self._ring(idx)
        reply = self._call(F.VDPA_GET_VRING_SIZE, m.VringState(idx, 0))
        assert isinstance(reply, m.VringState)
        return reply.num

    def get_vq_group(self, idx: int) -> int:
        self._extension(F.VDPA_GET_VRING_GROUP)
        self._ring(idx)
        reply = self._call(F.VDPA_GET_VRING_GROUP, m.VringState(idx, 0))
        assert isinstance(reply, m.VringState)
        return reply.num

    def get_group_num(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_GROUP_NUM)

    def get_as_num(self) -> int:
        return self._vdpa_u64(F.VDPA_GET_AS_NUM)

    def set_group_asid(self, group: int, asid: int) -> None:
        self._extension(F.VDPA_SET_GROUP_ASID)
        if not (0 <= group <= 0xFFFFFFFF and 0 <= asid <= 0xFFFFFFFF):
            raise DeviceRequestError(f"{self.name}: group {group} / address space {asid}")
        self._call(F.VDPA_SET_GROUP_ASID, m.VringState(group, asid))

    def get_backend_features(self) -> int:
        """VDPA_GET_BACKEND_FEATURES: the VHOST_BACKEND_F_* bits that depend on the device."""
        return self._vdpa_u64(F.VDPA_GET_BACKEND_FEATURES)

    # ===== the back-end request channel =====
    def _open_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._call(F.SET_BACKEND_REQ_FD, None, (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the back-end has its own copy now
        self._backend_sock = ours
        self._backend_thread = threading.Thread(
            target=self._serve_backend_channel, name=f"vhost-user-backend-req-{self.name}", daemon=True
        )
        self._backend_thread.start()

    def _serve_backend_channel(self) -> None:
        assert self._backend_sock is not None
        stream = MessageStream(self._backend_sock, backend_channel=True)
        try:
            while (message := stream.receive()) is not None:
                code = self._backend_request(message)
                if message.need_reply:
                    stream.send(Message(message.request, m.U64(code), reply=True))
        except (PeerError, TransportError) as exc:
            self.log.warning("back-end request channel closed: %s", exc)
        finally:
            stream.codec.close()

    def _backend_request(self, message: Message) -> int:
        """Apply one back-end request; the ack code (0 or an errno)."""
        close_fds(message.fds)
        request = message.request
        if message.reply:
            return errno.EINVAL
        if request is BackendRequest.CONFIG_CHANGE_MSG:
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            if not self.negotiated(P.VDPA):  # with the extension the back-end signals our config call itself
                _signal(self._config_call)
            return 0
        if request in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
            assert isinstance(message.payload, m.VringState)
            ring = self._rings.get(message.payload.index)
            if ring is None:
                return errno.ENOBUFS
            if request is BackendRequest.VRING_CALL:
                _signal(ring.call)
            return 0
        self.log.info("ignoring back-end request %s", request.name)
        return errno.EOPNOTSUPP
