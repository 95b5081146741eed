"""A vhost-user front-end that outlives its back-end: ``ReplayingClient(path)`` is a DeviceOps.

The kernel keeps a vhost-vdpa device's char-device state (features, status, rings, IOTLB, eventfds) for as
long as the file is open, whatever happens to the parent device's driver. A bypass node (bridge/bypass.py)
reaches its device over a vhost-user socket instead, and the daemon behind that socket may die (kill -9)
and come back on the same path. This proxy sits between the node's VhostVdpaServer and a VhostUserClient
and makes the node behave like the kernel's:

* it **records** what the vhost-vdpa side set since the last reset: driver features, status, config
  writes, per-queue size / addresses / base / kick / call / ready, the memory table (its regions keep
  their fds: the server owns them while they are committed), the config callback, suspension;
* a **watcher thread** polls a duplicate of the connection's fd for a hang-up (POLLRDHUP: no data is
  ever read from it, so replies stay with the client); a request that fails with TransportError counts
  as a hang-up too;
* while the back-end is away, setters are only recorded, and getters are answered from the record or
  from values cached while connected (status, features, config bytes, queue facts); ``get_vq_state``
  reads the ring in guest memory, as below. Nothing blocks, so QEMU's vCPU and main threads, which may
  be the ones trapped in an ioctl, never stall on a dead daemon. An operation with nothing recorded to
  answer from waits up to ``wait_seconds`` for the back-end, then fails with EIO;
* the watcher **reconnects** with backoff (10 ms doubling to 100 ms) for up to ``reconnect_seconds``;
  then it gives up and the status reads DEVICE_NEEDS_RESET, so the driver learns the device is gone;
* on reconnect it **replays**, in the order a vhost-user front-end starts a device: (owner: the
  handshake), config writes, features, ACKNOWLEDGE|DRIVER, FEATURES_OK, the memory table, then per queue
  SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE, the
  config callback, DRIVER_OK (and SUSPEND if suspended). Then it kicks every started ring and signals
  every call eventfd once: a kick the dead daemon swallowed, or a used entry it wrote without
  interrupting, must not leave the guest waiting. Spurious kicks and interrupts are harmless to virtio.

Ring bases: the dead back-end cannot answer GET_VRING_BASE, so a running ring restarts where the guest's
memory says the device stopped, as QEMU's vhost-user reconnect does (virtio_queue_restore_last_avail_idx):

* split: ``used->idx``. Every request the old device took but had not completed (avail > used) is taken
  again and run again: a net frame is sent twice or a receive buffer is filled later, a blk request is
  re-executed. Both devices complete in order per queue, so used == the number of completed requests;
* packed: QEMU keeps its last known index (it has "no reference like avail idx in shared memory"). Here
  the descriptor ring is that reference: the device marks a used descriptor by setting its USED flag to
  the used wrap counter, so USED flags read 1-bit constant ``w`` over [0, U) and ``!w`` over [U, size):
  U is the next used position and w its wrap counter (all equal: U = 0 and w flips). This holds while
  every buffer is one descriptor in the ring, which Linux's driver makes so for multi-element buffers
  with INDIRECT_DESC (both devices offer it); chained descriptors without it can mislead the scan.

``stats`` counts outages, replays and the buffers re-queued (avail - used, split) and keeps each pause
(hang-up seen to replay done).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vdpasim.errors import PeerError, TransportError, VdpasimError
from vdpasim.memory import RegionTable
from vdpasim.ops import Call, IovaRange, RingAddressSpace, supports
from vdpasim.rings.state import PackedState, SplitState, VqState
from vdpasim.virtio.constants import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
)
from vdpasim.virtio.status import status_change_error

from .client import VhostUserClient

__all__ = ["ReplayingClient", "ReplayStats", "split_ring_indexes", "packed_used_position"]

log = logging.getLogger("vdpasim.vhost_user.replay")

_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 0.1
_POLL_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_DESC_FLAG_USED = 1 << 15


@dataclass
class ReplayStats:
    outages: int = 0  # back-end connections lost
    replays: int = 0  # successful replays onto a new back-end
    failed_replays: int = 0  # a new back-end that broke during the replay (retried)
    requeued: int = 0  # buffers the dead back-end had taken and a new one takes again (split rings)
    requeued_by_queue: dict[int, int] = field(default_factory=dict)  # the same, per queue
    pauses: list[float] = field(default_factory=list)  # seconds from the hang-up seen to the replay done
    replayed_at: list[float] = field(default_factory=list)  # time.monotonic() at the end of each replay
    gave_up: bool = False  # reconnect_seconds passed without a back-end


@dataclass
class _Queue:
    num: int | None = None
    addr: tuple[int, int, int] | None = None  # desc, driver, device
    state: VqState | None = None
    kick: int | None = None
    kick_set: bool = False
    call: Call = None
    call_set: bool = False
    ready: bool = False


@dataclass
class _Record:
    """What the vhost-vdpa side has set since the last reset (config writes and the config callback stay)."""

    features: int | None = None
    status: int = 0
    queues: dict[int, _Queue] = field(default_factory=dict)
    table: RegionTable | None = None
    ring_space: RingAddressSpace = RingAddressSpace.GUEST
    config_writes: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (offset, length) -> last data
    config_cb: Call = None
    config_cb_set: bool = False
    suspended: bool = False

    def reset(self) -> None:
        self.features = None
        self.status = 0
        self.queues.clear()
        self.suspended = False


def _view(table: RegionTable, space: RingAddressSpace, addr: int, length: int) -> np.ndarray:
    return table.view(addr, length, user=space is RingAddressSpace.USER)


def split_ring_indexes(table: RegionTable, space: RingAddressSpace, driver: int, device: int) -> tuple[int, int]:
    """(avail->idx, used->idx) of a split ring, read from guest memory."""
    (avail,) = struct.unpack("<H", _view(table, space, driver + 2, 2).tobytes())
    (used,) = struct.unpack("<H", _view(table, space, device + 2, 2).tobytes())
    return avail, used


def packed_used_position(table: RegionTable, space: RingAddressSpace, desc: int, num: int) -> tuple[int, int]:
    """(next used position, used wrap counter) of a packed ring, from its descriptors' USED flags."""
    flags = np.frombuffer(_view(table, space, desc, num * 16).tobytes(), dtype="<u2").reshape(num, 8)[:, 7]
    used = (flags & _DESC_FLAG_USED) != 0
    changes = np.nonzero(used != used[0])[0]
    if changes.size:
        return int(changes[0]), int(used[0])
    return 0, int(not used[0])


class ReplayingClient:
    """DeviceOps over a vhost-user socket whose back-end may die and come back; see the module docstring.

    ``connect`` makes a connected VhostUserClient (default: one on ``path``); the first one is made here and
    its failure (TransportError) is the caller's. Operations this class does not name (the vDPA extension's
    queue groups, sizes...) are passed to the current client, waiting for one if the back-end is away.
    """

    get_vq_num_min = None  # as VhostUserClient: absent

    def __init__(
        self,
        path: str,
        *,
        name: str = "",
        reconnect_seconds: float = 30.0,
        wait_seconds: float = 2.0,
        connect: Callable[[], VhostUserClient] | None = None,
        facts: dict[tuple[Any, ...], Any] | None = None,
    ) -> None:
        self.path = path
        self.name = name or os.path.basename(path)
        self.reconnect_seconds = reconnect_seconds
        self.wait_seconds = wait_seconds
        # defer_acks: the vhost-vdpa side never learns of a refusal of a request whose kernel op cannot fail.
        self._connect = connect or (lambda: VhostUserClient(path, name=self.name, defer_acks=True))
        self.stats = ReplayStats()
        self._lock = threading.RLock()
        self._up = threading.Event()
        self._closing = threading.Event()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._record = _Record()
        self._status_unsure = False  # the record's FEATURES_OK awaits the device's word (set_status)
        # The device's constant facts; ``facts`` shares them between the opens of one node (the same device
        # comes back on the path: the replay assumes it too).
        self._cache: dict[tuple[Any, ...], Any] = {} if facts is None else facts
        self._config: bytearray | None = None
        self._generation = 0
        self._down_at = 0.0
        self._watch_fd: int | None = None
        self._client: VhostUserClient | None = None
        client = self._connect()
        self._last = client  # what the back-end could do: the optional operations follow it
        for op in ("suspend", "resume", "set_config_cb"):
            if not supports(client, op):
                setattr(self, op, None)
        try:
            self._snapshot_config(client)
            self._attach(client)
        except BaseException:
            client.close()
            os.close(self._wake)
            raise
        self._thread = threading.Thread(target=self._watch, name=f"vhost-user-replay-{self.name}", daemon=True)
        self._thread.start()

    # ===== connection =====
    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def connection(self) -> VhostUserClient:
        """The vhost-user client in use (or last used): its ``sent``/``waited`` counters say what an open cost."""
        return self._client or self._last

    def _attach(self, client: VhostUserClient) -> None:
        """Make ``client`` the current connection (lock held, or in __init__)."""
        self._watch_fd = os.dup(client.fileno())
        self._client = self._last = client
        self._up.set()

    def _snapshot_config(self, client: VhostUserClient) -> None:
        try:
            if not self._cache:  # the device's constants, all in one round trip (a node shares them: bypass.py)
                for name, value in client.device_facts().items():
                    self._cache[(name,)] = value
            size = self._const(client, "get_config_size")
            if size:
                config, self._generation = client.config_snapshot(size)
                self._config = bytearray(config)
            else:
                self._config, self._generation = bytearray(), client.get_generation()
        except (PeerError, VdpasimError) as exc:
            if isinstance(exc, TransportError):
                raise
            self._config = None  # no config space to answer from while the back-end is away

    def _lost(self, reason: str) -> None:
        """The back-end is gone (lock held): drop the client, let the watcher reconnect."""
        client = self._client
        if client is None:
            return
        self._client = None
        self._up.clear()
        self._down_at = time.monotonic()
        self.stats.outages += 1
        log.warning("%s: the back-end went away (%s); reconnecting to %s", self.name, reason, self.path)
        with contextlib.suppress(Exception):
            client.close()
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        self._closing.set()
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._watch_fd is not None:
                os.close(self._watch_fd)
                self._watch_fd = None
            self._up.clear()
        os.close(self._wake)

    def __enter__(self) -> ReplayingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                client, fd = self._client, self._watch_fd
            if client is not None and fd is not None:
                poller = select.poll()
                poller.register(fd, _POLL_HANGUP)
                poller.register(self._wake, select.POLLIN)
                events = dict(poller.poll())
                if self._wake in events:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                if fd in events:
                    with self._lock:
                        if self._client is client:
                            self._lost("the connection hung up")
                continue
            if self.stats.gave_up:
                self._closing.wait()
                return
            self._reconnect()

    def _reconnect(self) -> None:
        delay = _BACKOFF_FIRST
        while not self._closing.is_set():
            try:
                client = self._connect()
            except (VdpasimError, OSError) as exc:
                if time.monotonic() - self._down_at > self.reconnect_seconds:
                    log.error("%s: no back-end on %s for %.0f s: giving up (%s)", self.name, self.path,
                              self.reconnect_seconds, exc)  # fmt: skip
                    with self._lock:
                        self.stats.gave_up = True
                    return
                self._closing.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            with self._lock:
                try:
                    self._replay(client)
                    self._attach(client)
                except (VdpasimError, OSError) as exc:
                    self.stats.failed_replays += 1
                    log.warning("%s: the replay to the new back-end failed: %s", self.name, exc)
                    with contextlib.suppress(Exception):
                        client.close()
                    continue
                now = time.monotonic()
                pause = now - self._down_at
                self.stats.replays += 1
                self.stats.pauses.append(pause)
                self.stats.replayed_at.append(now)
                log.info("%s: state replayed to the new back-end after %.3f s", self.name, pause)
            return

    # ===== the replay =====
    def _packed(self) -> bool:
        return bool((self._record.features or 0) >> VIRTIO_F_RING_PACKED & 1)

    def _memory_state(self, idx: int, queue: _Queue, *, count: bool = False) -> VqState | None:
        """Where a running ring stopped, from guest memory; None if its memory is not mapped."""
        record = self._record
        if record.table is None or queue.addr is None or not queue.num:
            return None
        desc, driver, device = queue.addr
        try:
            if self._packed():
                position, wrap = packed_used_position(record.table, record.ring_space, desc, queue.num)
                return PackedState(position, wrap, position, wrap)
            avail, used = split_ring_indexes(record.table, record.ring_space, driver, device)
        except VdpasimError as exc:  # the ring is outside the recorded memory
            log.warning("%s: cannot read the ring at %#x: %s", self.name, desc, exc)
            return None
        pending = (avail - used) & 0xFFFF if count else 0
        self.stats.requeued += pending
        self.stats.requeued_by_queue[idx] = self.stats.requeued_by_queue.get(idx, 0) + pending
        return SplitState(used)

    def _replay(self, client: VhostUserClient) -> None:
        record = self._record
        self._status_unsure = False  # replayed as recorded: a refused FEATURES_OK is refused again
        running = bool(record.status & VIRTIO_CONFIG_S_DRIVER_OK)
        bases: dict[int, VqState] = {}
        for idx, queue in record.queues.items():
            state = self._memory_state(idx, queue, count=True) if running and queue.ready else None
            if state is None:
                state = queue.state
            if state is not None:
                bases[idx] = state
        for (offset, _), data in record.config_writes.items():
            try:
                client.set_config(offset, data)
            except PeerError as exc:
                if isinstance(exc, TransportError):
                    raise
                log.info("%s: config write %d+%d not replayed: %s", self.name, offset, len(data), exc)
        if record.features is not None:
            client.set_driver_features(record.features)
        early = record.status & ~(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET)
        if early:
            client.set_status(early)
        if record.status & VIRTIO_CONFIG_S_FEATURES_OK:
            client.set_status(early | VIRTIO_CONFIG_S_FEATURES_OK)
        if record.table is not None:
            client.set_map(record.table, record.ring_space)
        for idx in sorted(record.queues):
            queue = record.queues[idx]
            if queue.num:
                client.set_vq_num(idx, queue.num)
            if idx in bases:
                client.set_vq_state(idx, bases[idx])
            if queue.addr is not None:
                client.set_vq_address(idx, *queue.addr)
            if queue.kick_set:
                client.set_vq_kick(idx, queue.kick)
            if queue.call_set:
                client.set_vq_call(idx, queue.call)
            if queue.ready:
                client.set_vq_ready(idx, True)
        if record.config_cb_set and supports(client, "set_config_cb"):
            client.set_config_cb(record.config_cb)
        self._snapshot_config(client)  # before DRIVER_OK: once the rings run, the driver may act at once
        if running:
            client.set_status(record.status & ~VIRTIO_CONFIG_S_NEEDS_RESET)
        if record.suspended and supports(client, "suspend"):
            client.suspend()
        if running and not record.suspended:
            self._nudge(client)

    def _nudge(self, client: VhostUserClient) -> None:
        """One kick per started ring, one interrupt per call eventfd (see the module docstring)."""
        for idx, queue in self._record.queues.items():
            if not queue.ready:
                continue
            if queue.kick is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(queue.kick, 1)
            else:
                client.kick_vq(idx)
            call = queue.call
            if callable(call):
                call()
            elif call is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(call, 1)

    # ===== forwarding =====
    def _forward(self, name: str, *args: Any, offline: Callable[[], Any] | None = None) -> Any:
        """``name(*args)`` on the back-end; ``offline()`` answers while it is away (else wait, then EIO)."""
        deadline: float | None = None
        while True:
            with self._lock:
                client = self._client
                if client is not None:
                    try:
                        return getattr(client, name)(*args)
                    except TransportError as exc:
                        self._lost(f"{name}: {exc}")
                if offline is not None:
                    return offline()
                if self.stats.gave_up:
                    raise PeerError(f"{self.name}: the back-end is gone", errno=errno.EIO)
            if deadline is None:
                deadline = time.monotonic() + self.wait_seconds
            if not self._up.wait(max(0.0, deadline - time.monotonic())):
                raise PeerError(f"{self.name}: {name}: the back-end is away (reconnecting)", errno=errno.EIO)

    def _setter(self, name: str, apply: Callable[[], None], *args: Any) -> None:
        """Forward a setter; record it once the back-end took it, or at once while the back-end is away."""
        with self._lock:
            done = self._forward(name, *args, offline=lambda: _OFFLINE)
            apply()
            if done is _OFFLINE:
                log.debug("%s: %s recorded while the back-end is away", self.name, name)

    def _const(self, client: VhostUserClient | None, name: str, *args: Any) -> Any:
        """A fact of the device that does not change: asked once, then answered from the cache."""
        key = (name, *args)
        if key not in self._cache:
            if client is not None:
                self._cache[key] = getattr(client, name)(*args)
            else:
                self._cache[key] = self._forward(name, *args)
        return self._cache[key]

    def __getattr__(self, name: str) -> Any:
        last = self.__dict__.get("_last")
        if name.startswith("_") or last is None:
            raise AttributeError(name)
        target = getattr(last, name)
        if not callable(target):
            return target
        return lambda *args: self._forward(name, *args)

    def _queue(self, idx: int) -> _Queue:
        return self._record.queues.setdefault(idx, _Queue())

    # ===== virtqueue operations =====
    def set_vq_address(self, idx: int, desc: int, driver: int, device: int) -> None:
        self._setter("set_vq_address", lambda: setattr(self._queue(idx), "addr", (desc, driver, device)),
                     idx, desc, driver, device)  # fmt: skip

    def set_vq_num(self, idx: int, num: int) -> None:
        self._setter("set_vq_num", lambda: setattr(self._queue(idx), "num", num), idx, num)

    def kick_vq(self, idx: int) -> None:
        self._forward("kick_vq", idx, offline=lambda: None)  # the replay kicks every started ring

    def set_vq_kick(self, idx: int, fd: int | None) -> None:
        def apply() -> None:
            queue = self._queue(idx)
            queue.kick, queue.kick_set = fd, True

        self._setter("set_vq_kick", apply, idx, fd)

    def set_vq_call(self, idx: int, call: Call) -> None:
        def apply() -> None:
            queue = self._queue(idx)
            queue.call, queue.call_set = call, True

        self._setter("set_vq_call", apply, idx, call)

    def set_vq_ready(self, idx: int, ready: bool) -> None:
        self._setter("set_vq_ready", lambda: setattr(self._queue(idx), "ready", ready), idx, ready)

    def get_vq_ready(self, idx: int) -> bool:
        with self._lock:
            return self._queue(idx).ready

    def set_vq_state(self, idx: int, state: VqState) -> None:
        self._setter("set_vq_state", lambda: setattr(self._queue(idx), "state", state), idx, state)

    def get_vq_state(self, idx: int) -> VqState:
        def offline() -> VqState:
            queue = self._queue(idx)
            state = None
            if self._record.status & VIRTIO_CONFIG_S_DRIVER_OK and queue.ready:
                state = self._memory_state(idx, queue)
            if state is None:
                state = queue.state
            if state is None:
                state = PackedState(0, 1, 0, 1) if self._packed() else SplitState(0)
            return state

        with self._lock:
            return self._forward("get_vq_state", idx, offline=offline)

    def get_vq_num_max(self) -> int:
        return self._const(None, "get_vq_num_max")

    def get_vq_count(self) -> int:
        return self._const(None, "get_vq_count")

    # ===== device operations =====
    def get_device_id(self) -> int:
        return self._const(None, "get_device_id")

    def get_vendor_id(self) -> int:
        return self._const(None, "get_vendor_id")

    def get_device_features(self) -> int:
        return self._last.get_device_features()  # read at the handshake; the same device comes back

    def set_driver_features(self, features: int) -> None:
        with self._lock:
            if self._client is None and self._record.status & VIRTIO_CONFIG_S_FEATURES_OK:
                raise PeerError(f"{self.name}: driver features are frozen once FEATURES_OK is set")
            self._setter("set_driver_features", lambda: setattr(self._record, "features", features), features)

    def get_driver_features(self) -> int:
        with self._lock:
            return self._record.features or 0

    def get_status(self) -> int:
        with self._lock:
            if self.stats.gave_up:
                return self._record.status | VIRTIO_CONFIG_S_NEEDS_RESET
            status = self._forward("get_status", offline=lambda: _OFFLINE)
            if status is _OFFLINE:
                return self._record.status
            if self._status_unsure:
                self._record.status = status & ~VIRTIO_CONFIG_S_NEEDS_RESET
                self._status_unsure = False
            return status

    def set_status(self, status: int) -> None:
        if status == 0:
            self.reset()
            return
        with self._lock:
            if self._client is None:
                reason = status_change_error(self._record.status, status)
                if reason:
                    raise PeerError(f"{self.name}: {reason}")
            adds = bool(status & ~self._record.status & VIRTIO_CONFIG_S_FEATURES_OK)
            done = self._forward("set_status", status, offline=lambda: _OFFLINE)
            self._record.status = status
            # The device may not keep FEATURES_OK (the client drops it with refused features): the next status
            # read says what it took, so no read here (a VMM reads it back anyway, virtio §3.1.1 step 6).
            self._status_unsure = done is not _OFFLINE and (adds or self._status_unsure)

    def reset(self) -> None:
        self._setter("reset", self._record.reset)
        self._status_unsure = False

    def get_config_size(self) -> int:
        return self._const(None, "get_config_size")

    def get_config(self, offset: int, length: int) -> bytes:
        def offline() -> bytes:
            if self._config is None or offset + length > len(self._config):
                raise PeerError(f"{self.name}: config read while the back-end is away", errno=errno.EIO)
            return bytes(self._config[offset : offset + length])

        with self._lock:
            data = self._forward("get_config", offset, length, offline=offline)
            if self._config is not None and offset + length <= len(self._config):
                self._config[offset : offset + length] = data
            return data

    def set_config(self, offset: int, data: bytes) -> None:
        def apply() -> None:
            self._record.config_writes[(offset, len(data))] = bytes(data)
            if self._config is not None and offset + len(data) <= len(self._config):
                self._config[offset : offset + len(data)] = data

        self._setter("set_config", apply, offset, data)

    def get_generation(self) -> int:
        with self._lock:
            self._generation = self._forward("get_generation", offline=lambda: self._generation)
            return self._generation

    def set_config_cb(self, call: Call) -> None:
        def apply() -> None:
            self._record.config_cb, self._record.config_cb_set = call, True

        self._setter("set_config_cb", apply, call)

    def get_iova_range(self) -> IovaRange:
        return self._const(None, "get_iova_range")

    def get_group_num(self) -> int:
        return self._const(None, "get_group_num")

    def get_as_num(self) -> int:
        return self._const(None, "get_as_num")

    def get_backend_features(self) -> int:
        return self._const(None, "get_backend_features")

    def get_vq_group(self, idx: int) -> int:
        """A device fact for the negotiated features (a group may depend on them, e.g. a control queue's)."""
        with self._lock:
            key = ("get_vq_group", idx, self._record.features)
            if key not in self._cache:
                self._cache[key] = self._forward("get_vq_group", idx)
            return self._cache[key]

    def suspend(self) -> None:
        self._setter("suspend", lambda: setattr(self._record, "suspended", True))

    def resume(self) -> None:
        self._setter("resume", lambda: setattr(self._record, "suspended", False))

    # ===== DMA operations =====
    def set_map(self, table: RegionTable, ring_space: RingAddressSpace = RingAddressSpace.GUEST) -> None:
        def apply() -> None:
            self._record.table, self._record.ring_space = table, ring_space

        self._setter("set_map", apply, table, ring_space)


_OFFLINE = object()
