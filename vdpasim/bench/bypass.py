"""``vdpasim bench bypass``: what the vhost-vdpa bypass costs, against vhost-user straight to the device.

Everything runs against one net device (loopback, busy-polling) of a ``vdpasim daemon`` in its own process,
pinned to one CPU. A **harness** program (``python -m vdpasim.bench.bypass harness``, a separate process on the
other CPU) plays the VMM and the guest driver. It attaches to the device in one of two ways, with the same code
above the DeviceOps line:

* **direct**: ``VhostUserClient`` on the device's vhost-user socket;
* **bypass**: ``VhostVdpaClient`` on ``/dev/vhost-vdpa-N``, the harness run under the supervisor as
  ``vdpasim run`` runs a program (``vdpasim.run.supervise``, in this process, so its counters can be read).

Two measurements:

1. **Control plane, per device start**: the harness opens the device and starts it as a VMM starts a net device
   (see ``Harness.start``), then stops it (status 0, close). This process reads the supervisor's counters (trapped
   calls answered / passed on, time spent) and the vhost-vdpa server's stats before and after each start.
2. **Data path**: the harness runs a compiled driver loop (``_drive``: post RX buffers and TX frames in bursts,
   publish, reap and check every used entry: ids, lengths, ``num_buffers``, the sequence number of every frame
   received) for a fixed time; runs alternate direct and bypass, one new harness process per run. The device
   busy-polls (its rings are NO_NOTIFY), the driver sets NO_INTERRUPT: no kick and no interrupt is needed, so
   neither path would have a reason to trap, and the trap counters are checked not to move during the run.
   A run in which the device stops taking buffers (seen on this loaded machine, on both doors: the daemon's
   data path, not the bypass) is reported with where the rings stood, and run again on a new daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from .common import alternation, pick_cpus, progress_printer

__all__ = ["Harness", "BypassError", "StallError", "run_benchmark", "command", "DEVICE_MAC", "START_STEPS"]

DEVICE_MAC = "52:54:00:12:34:56"
QUEUE_SIZE = 256
WINDOW = 128  # frames in flight at most (half the ring: the driver never waits for a full ring)
BURST = 32
BUF_STRIDE = 1600
HDR_LEN = 12  # virtio-net header with VERSION_1
RX_BUF_LEN = HDR_LEN + 1514
SEQ_OFFSET = HDR_LEN + 14  # a sequence number right after the Ethernet header
GUEST_BASE = 0x100000
CHUNK = 1 << 16  # frames per compiled call: Python runs once every few milliseconds
SPIN_LIMIT = 20_000_000  # empty polls (about a second) before the driver gives up and returns
VIRTQ_DESC_F_WRITE = 2
VRING_AVAIL_F_NO_INTERRUPT = 1
START_STEPS = (
    "open: GET_BACKEND_FEATURES, SET_BACKEND_FEATURES, SET_OWNER, GET_VQS_COUNT (vhost-user: the handshake)",
    "GET_FEATURES, GET_DEVICE_ID, GET_VRING_NUM (max), GET_CONFIG_SIZE, GET_CONFIG (whole space)",
    "SET_STATUS 0, ACKNOWLEDGE, DRIVER; SET_FEATURES; SET_STATUS FEATURES_OK; GET_STATUS",
    "the memory table: one IOTLB batch with one UPDATE (vhost-user: SET_MEM_TABLE)",
    "per queue (RX, TX): GET_VRING_GROUP, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_KICK, "
    "SET_VRING_CALL, SET_VRING_ENABLE",
    "SET_STATUS DRIVER_OK",
)

# Layout (lay) and state (st) indexes of the compiled driver.
(L_TX_DESC, L_TX_AVAIL, L_TX_USED, L_RX_DESC, L_RX_AVAIL, L_RX_USED, L_TX_BUF, L_TX_HOST, L_RX_BUF, L_RX_HOST,
 L_FRAME_LEN, L_SIZE, L_WINDOW, L_BURST, LAYOUT_LEN) = range(15)  # fmt: skip
S_TX_NEXT, S_TX_REAPED, S_RX_REAPED, S_BAD, S_SEQ_SUM, STATE_LEN = range(6)


class BypassError(RuntimeError):
    """A harness or the daemon failed; the message says what and carries the tail of its output."""


class StallError(BypassError):
    """The device stopped taking buffers during a traffic run (the run is retried, and counted)."""


# ===== the compiled driver =====


def _driver_kernel() -> Callable[..., int]:
    """The driver loop, compiled (Numba loads only in the harness, and only for the data path)."""
    from ..jit import kernel
    from ..jit.intrinsics import (
        fence_acquire,
        fence_release,
        load_u16,
        load_u32,
        load_u64,
        store_u16,
        store_u32,
        store_u64,
    )
    from .rings import received_wrong

    @kernel
    def drive(lay, st, frames, spin_limit):  # pragma: no cover - compiled
        """Until ``frames`` more were received: keep up to WINDOW in flight, reap both rings, check each frame.
        Returns 0, or 1 after ``spin_limit`` polls without progress (the device stalled)."""
        size = lay[L_SIZE]
        frame_len = lay[L_FRAME_LEN]
        window = lay[L_WINDOW]
        burst = lay[L_BURST]
        tx_desc, tx_avail, tx_used = lay[L_TX_DESC], lay[L_TX_AVAIL], lay[L_TX_USED]
        rx_desc, rx_avail, rx_used = lay[L_RX_DESC], lay[L_RX_AVAIL], lay[L_RX_USED]
        tx_buf, tx_host, rx_buf, rx_host = lay[L_TX_BUF], lay[L_TX_HOST], lay[L_RX_BUF], lay[L_RX_HOST]
        tx_next, tx_reaped, rx_reaped = st[S_TX_NEXT], st[S_TX_REAPED], st[S_RX_REAPED]
        bad, seq_sum = st[S_BAD], st[S_SEQ_SUM]
        target = rx_reaped + frames
        idle = 0
        status = 0
        while rx_reaped < target:
            progress = False
            if tx_next - rx_reaped + burst <= window:
                # RX buffers first, so the looped-back frames always find one; the same slots as the TX frames.
                for k in range(burst):
                    slot = (tx_next + k) % size
                    desc = rx_desc + 16 * slot
                    store_u64(desc, rx_buf + BUF_STRIDE * slot)
                    store_u32(desc + 8, RX_BUF_LEN)
                    store_u16(desc + 12, VIRTQ_DESC_F_WRITE)
                    store_u16(desc + 14, 0)
                    store_u16(rx_avail + 4 + 2 * slot, slot)
                fence_release()
                store_u16(rx_avail + 2, (tx_next + burst) & 0xFFFF)
                for k in range(burst):
                    slot = (tx_next + k) % size
                    store_u64(tx_host + BUF_STRIDE * slot + SEQ_OFFSET, tx_next + k)
                    desc = tx_desc + 16 * slot
                    store_u64(desc, tx_buf + BUF_STRIDE * slot)
                    store_u32(desc + 8, HDR_LEN + frame_len)
                    store_u16(desc + 12, 0)
                    store_u16(desc + 14, 0)
                    store_u16(tx_avail + 4 + 2 * slot, slot)
                tx_next += burst
                fence_release()
                store_u16(tx_avail + 2, tx_next & 0xFFFF)
                progress = True
            used = load_u16(tx_used + 2)
            fence_acquire()
            while tx_reaped & 0xFFFF != used:
                slot = tx_reaped % size
                if load_u32(tx_used + 4 + 8 * slot) != slot:
                    bad += 1
                tx_reaped += 1
                progress = True
            used = load_u16(rx_used + 2)
            fence_acquire()
            while rx_reaped & 0xFFFF != used:
                slot = rx_reaped % size
                elem = rx_used + 4 + 8 * slot
                buf = rx_host + BUF_STRIDE * slot
                seq = load_u64(buf + SEQ_OFFSET)
                if received_wrong(load_u32(elem), slot, load_u32(elem + 4), HDR_LEN + frame_len, buf, seq, rx_reaped):
                    bad += 1
                seq_sum += seq
                rx_reaped += 1
                progress = True
            if progress:
                idle = 0
            else:
                idle += 1
                if idle > spin_limit:
                    status = 1
                    break
        st[S_TX_NEXT], st[S_TX_REAPED], st[S_RX_REAPED] = tx_next, tx_reaped, rx_reaped
        st[S_BAD], st[S_SEQ_SUM] = bad, seq_sum
        return status

    return drive


# ===== the harness (a VMM and its guest driver, in its own process) =====


class Harness:
    """One device, attached ``direct`` (vhost-user socket) or ``bypass`` (/dev/vhost-vdpa-N); see the module
    docstring. Guest RAM is one memfd: both doors hand it to the device (SET_MEM_TABLE, or an IOTLB UPDATE whose
    address the supervisor resolves to the memfd)."""

    def __init__(self, door: str, path: str, mac: str = DEVICE_MAC) -> None:
        from ..memory import RegionTable, anonymous_region

        if door not in ("direct", "bypass"):
            raise UsageError(f"door {door!r}: direct or bypass")
        self.door, self.path = door, path
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.queue_area = (16 * QUEUE_SIZE + 0x1000 + 8 * QUEUE_SIZE + 8 + 0xFFF) & ~0xFFF
        self.tx_buffers = 2 * self.queue_area
        self.rx_buffers = self.tx_buffers + BUF_STRIDE * QUEUE_SIZE
        size = (self.rx_buffers + BUF_STRIDE * QUEUE_SIZE + 0xFFFF) & ~0xFFFF
        self.region = anonymous_region(size, guest_addr=GUEST_BASE, name="vdpasim-bench-guest")
        self.table = RegionTable([self.region])
        self.kick = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.client: Any = None
        self.frame_len = 0
        self.lay = np.zeros(LAYOUT_LEN, dtype=np.int64)
        self.st = np.zeros(STATE_LEN, dtype=np.int64)
        self._drive: Callable[..., int] | None = None

    def _queue(self, idx: int) -> tuple[int, int, int]:
        """(desc, avail, used) guest addresses of queue ``idx`` (0 RX, 1 TX)."""
        desc = GUEST_BASE + self.queue_area * idx
        return desc, desc + 16 * QUEUE_SIZE, desc + 16 * QUEUE_SIZE + 0x1000

    def _open(self) -> Any:
        if self.door == "direct":
            from bridge.vhost_user.client import VhostUserClient

            return VhostUserClient(self.path, name="bench")
        from bridge.vhost_vdpa.client import VhostVdpaClient

        return VhostVdpaClient(self.path)

    def start(self) -> None:
        """A VMM's start of a net device, from the open of the device to DRIVER_OK (START_STEPS)."""
        from vdpasim.ops import supports
        from vdpasim.rings.state import SplitState
        from vdpasim.virtio import constants as c

        self.region.data[: 2 * self.queue_area] = 0  # fresh rings
        for idx in (0, 1):
            _, avail, _ = self._queue(idx)
            self.region.data[avail - GUEST_BASE] = VRING_AVAIL_F_NO_INTERRUPT
        dev = self.client = self._open()
        offered = dev.get_device_features()
        dev.get_device_id()
        num_max = dev.get_vq_num_max()
        dev.get_config(0, dev.get_config_size())
        if num_max < QUEUE_SIZE:
            raise UsageError(f"the device's queues hold {num_max} entries, the bench needs {QUEUE_SIZE}")
        up = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
        dev.set_status(0)
        dev.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        dev.set_status(up)
        dev.set_driver_features(offered & (1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_F_ACCESS_PLATFORM))
        dev.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK)
        if not dev.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK:
            raise BypassError("the device refused the features")
        dev.set_map(self.table)
        for idx in (0, 1):
            if supports(dev, "get_vq_group"):
                dev.get_vq_group(idx)
            dev.set_vq_num(idx, QUEUE_SIZE)
            dev.set_vq_address(idx, *self._queue(idx))
            dev.set_vq_state(idx, SplitState(0))
            dev.set_vq_kick(idx, self.kick[idx])
            dev.set_vq_call(idx, self.call[idx])
            dev.set_vq_ready(idx, True)
        dev.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
        self.st[:] = 0

    def stop(self) -> None:
        """Reset and close, as a VMM stops the device."""
        if self.client is not None:
            try:
                self.client.set_status(0)
            finally:
                self.client.close()
                self.client = None

    def prepare(self, frame_len: int) -> None:
        """Frames of ``frame_len`` bytes to the device's MAC in every TX slot; the layout for the driver."""
        if not 14 + 8 <= frame_len <= 1514:
            raise UsageError(f"frame size {frame_len} outside 22..1514")
        self.frame_len = frame_len
        frame = (np.arange(frame_len, dtype=np.int64) * 7 + 3).astype(np.uint8)
        frame[:6] = np.frombuffer(self.mac, np.uint8)
        frame[6:12] = np.frombuffer(bytes.fromhex("525400654321"), np.uint8)
        frame[12:14] = (0x88, 0xB5)
        data = self.region.data
        for slot in range(QUEUE_SIZE):
            start = self.tx_buffers + BUF_STRIDE * slot
            data[start : start + HDR_LEN] = 0
            data[start + HDR_LEN : start + HDR_LEN + frame_len] = frame
        host = self.region.host_addr
        tx, rx = self._queue(1), self._queue(0)
        self.lay[:] = [
            *(host + a - GUEST_BASE for a in (*tx, *rx)),
            GUEST_BASE + self.tx_buffers,
            host + self.tx_buffers,
            GUEST_BASE + self.rx_buffers,
            host + self.rx_buffers,
            frame_len,
            QUEUE_SIZE,
            WINDOW,
            BURST,
        ]
        if self._drive is None:
            self._drive = _driver_kernel()

    def traffic(self, seconds: float) -> dict[str, Any]:
        """Drive the loopback for ``seconds``: frames received, rate, and the checks' verdict."""
        assert self._drive is not None
        st = self.st
        first_rx, first_bad = int(st[S_RX_REAPED]), int(st[S_BAD])
        stalls = 0
        for fd in self.kick:
            os.eventfd_write(fd, 1)  # harmless on a busy-polling device; wakes one that waits for kicks
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            if self._drive(self.lay, st, CHUNK, SPIN_LIMIT):
                stalls += 1
                if stalls > 2:
                    raise StallError(f"the device stopped taking buffers: {self._rings()}")
                for fd in self.kick:
                    os.eventfd_write(fd, 1)
            now = time.perf_counter()
            if now >= deadline:
                break
        frames = int(st[S_RX_REAPED]) - first_rx
        return {
            "frames": frames,
            "seconds": now - start,
            "mpps": frames / (now - start) / 1e6,
            "bad": int(st[S_BAD]) - first_bad,
            "tx_reaped": int(st[S_TX_REAPED]),
            "rx_reaped": int(st[S_RX_REAPED]),
            "stalls": stalls,
        }

    def _rings(self) -> str:
        """Where each ring stands (a stall's report): the driver's counts, avail and used indexes, used flags."""
        data = self.region.data
        st = self.st
        out = [f"sent {int(st[S_TX_NEXT])}, tx used {int(st[S_TX_REAPED])}, rx used {int(st[S_RX_REAPED])}"]
        for idx, name in ((0, "rx"), (1, "tx")):
            _, avail, used = (a - GUEST_BASE for a in self._queue(idx))
            word = lambda at: int.from_bytes(data[at : at + 2], "little")  # noqa: E731
            out.append(f"{name}: avail idx {word(avail + 2)}, used idx {word(used + 2)}, used flags {word(used)}")
        if self.client is not None:
            out.append(f"status {self.client.get_status():#x}")
        return "; ".join(out)

    def close(self) -> None:
        self.stop()
        for fd in (*self.kick, *self.call):
            os.close(fd)
        self.region.close()


def harness_main(argv: list[str]) -> int:
    """The harness process: one JSON command per stdin line, one JSON answer per stdout line."""
    parser = argparse.ArgumentParser(prog="vdpasim.bench.bypass harness")
    parser.add_argument("door", choices=("direct", "bypass"))
    parser.add_argument("path", help="the vhost-user socket (direct) or the /dev/vhost-vdpa-N node (bypass)")
    parser.add_argument("--mac", default=DEVICE_MAC)
    args = parser.parse_args(argv)
    harness = Harness(args.door, args.path, args.mac)
    out = sys.stdout
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            started = time.perf_counter()
            try:
                if op == "start":
                    harness.start()
                    # the direct door's own vhost-user traffic (the bypass's is counted by its supervisor)
                    sent, waited = getattr(harness.client, "sent", 0), getattr(harness.client, "waited", 0)
                    answer: dict[str, Any] = {"sent": sent, "waited": waited}
                elif op == "stop":
                    harness.stop()
                    answer = {}
                elif op == "prepare":
                    harness.prepare(int(request["frame_len"]))
                    answer = harness.traffic(float(request.get("warmup", 0.2)))  # loads the kernel, fills caches
                elif op == "traffic":
                    answer = harness.traffic(float(request["seconds"]))
                elif op == "quit":
                    break
                else:
                    raise UsageError(f"unknown op {op!r}")
            except Exception as exc:  # reported to the bench, which fails the run with it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            answer["wall_ms"] = (time.perf_counter() - started) * 1e3
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        harness.close()
    return 0


# ===== the bench (this process: the daemon's and the harness's parent, and the bypass's supervisor) =====


def _harness_argv(door: str, path: str) -> list[str]:
    return [sys.executable, "-m", "vdpasim.bench.bypass", "harness", door, path, "--mac", DEVICE_MAC]


def _pinned(cpu: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {cpu})


class _Door:
    """A running harness, talked to over its stdin and stdout; under the supervisor for the bypass."""

    def __init__(self, door: str, path: str, cpu: int, runtime: Any, stderr: Any) -> None:
        self.door = door
        self.supervisor: Any = None
        argv = _harness_argv(door, path)
        pipes: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        env = {**os.environ, "VDPASIM_RUNTIME_DIR": str(runtime.path)}
        if door == "bypass":
            from ..run import supervise

            # The supervisor's own preexec_fn installs the filter: pin with taskset semantics afterwards.
            self.supervisor = supervise(argv, runtime=runtime, env=env, **pipes)
            self.process = self.supervisor.process
            os.sched_setaffinity(self.process.pid, {cpu})
        else:
            self.process = subprocess.Popen(argv, env=env, preexec_fn=_pinned(cpu), **pipes)

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise BypassError(f"the {self.door} harness exited ({self.process.poll()}) during {op}")
        answer = json.loads(line)
        if "error" in answer:
            kind = StallError if answer["error"].startswith("StallError") else BypassError
            raise kind(f"{self.door} harness, {op}: {answer['error']}")
        return answer

    def counters(self) -> dict[str, Any]:
        """The supervisor's counters and the node's server stats now (zeros for the direct door)."""
        sup = self.supervisor
        if sup is None:
            return {
                "answered": 0, "passed": 0, "calls": 0, "busy": 0.0, "server": 0.0, "ioctls": 0, "writes": 0,
                "vhost_user_sent": 0, "vhost_user_waited": 0, "by": {},
            }  # fmt: skip
        time.sleep(0.005)  # the supervisor adds a call's time just after answering it
        servers = [s for node in sup.nodes.nodes.values() for s in node.servers]
        connections = [s.ops.connection for s in servers]
        by = dict(sup.calls_by_syscall)
        by.update({f"{name}_ms": seconds * 1e3 for name, seconds in sup.seconds_by_syscall.items()})
        passed = getattr(sup, "passed", None)
        return {
            "answered": sup.calls - (passed if passed is not None else 0),
            "passed": passed if passed is not None else 0,
            "calls": sup.calls,
            "busy": sup.busy_seconds,
            "server": sum(s.stats.seconds for s in servers),
            "ioctls": sum(s.stats.ioctls for s in servers),
            "writes": sum(s.stats.writes for s in servers),
            "vhost_user_sent": sum(c.sent for c in connections),
            "vhost_user_waited": sum(c.waited for c in connections),
            "by": by,
        }

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, BypassError):
            if self.process.poll() is None:
                self.ask("quit")
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.supervisor is not None:
            self.supervisor.close()


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    by = {k: round(v - before["by"].get(k, 0), 4) for k, v in after["by"].items() if v - before["by"].get(k, 0)}
    out = {k: after[k] - before[k] for k in after if k != "by"}
    out["by"] = by
    return out


@dataclass
class StartResult:
    door: str
    wall_ms: list[float] = field(default_factory=list)
    stop_wall_ms: list[float] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    passed: list[int] = field(default_factory=list)
    supervisor_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    ioctls: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    vhost_user_sent: list[int] = field(default_factory=list)  # requests to the device's socket
    vhost_user_waited: list[int] = field(default_factory=list)  # round trips: answers waited for
    openat_ms: list[float] = field(default_factory=list)  # supervisor time by call: the node's open (the bridge
    ioctl_ms: list[float] = field(default_factory=list)  # connects to the device), the ioctls, the IOTLB writes
    write_ms: list[float] = field(default_factory=list)
    by_syscall: dict[str, int] = field(default_factory=dict)  # of the last start
    first: dict[str, float] = field(default_factory=dict)  # the first start of the harness (node first opened)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"door": self.door, "starts": len(self.wall_ms), "by_syscall": self.by_syscall}
        out["first_start"] = {k: round(v, 4) for k, v in self.first.items()}
        names = ("wall_ms", "stop_wall_ms", "answered", "passed", "supervisor_ms", "server_ms", "ioctls", "writes",
                 "vhost_user_sent", "vhost_user_waited", "openat_ms", "ioctl_ms", "write_ms")  # fmt: skip
        for name in names:
            values = getattr(self, name)
            out[name] = round(statistics.median(values), 4) if values else 0
            out[f"{name}_range"] = [round(min(values), 4), round(max(values), 4)] if values else [0, 0]
        return out


@dataclass
class TrafficResult:
    frame_len: int
    ring: str = "split"
    direct: list[float] = field(default_factory=list)  # Mpps per run
    bypass: list[float] = field(default_factory=list)
    frames: int = 0  # received and checked, over every run of both doors
    bad: int = 0
    trap_growth: list[int] = field(default_factory=list)  # trapped calls during each bypass run
    stalls: list[str] = field(default_factory=list)  # runs retried because the device stopped taking buffers

    def as_dict(self) -> dict[str, Any]:
        direct = statistics.median(self.direct)
        bypass = statistics.median(self.bypass)
        return {
            "case": f"{self.ring}-{self.frame_len}",
            "ring": self.ring,
            "packet_bytes": self.frame_len,
            "direct_mpps": round(direct, 4),
            "bypass_mpps": round(bypass, 4),
            "ratio": round(bypass / direct, 4) if direct else 0.0,
            "runs": len(self.direct),
            "direct_runs_mpps": [round(x, 4) for x in self.direct],
            "bypass_runs_mpps": [round(x, 4) for x in self.bypass],
            "frames_checked": self.frames,
            "bad_frames": self.bad,
            "trap_growth": self.trap_growth,
            "stalled_runs": self.stalls,
        }


class _Device:
    """A daemon pinned to ``cpu`` with one busy-polling loopback net device (bench0); ``restart`` replaces both
    (a device whose data path stopped is not reused: its rings would tell nothing)."""

    def __init__(self, cpu: int, progress: Callable[[str], None]) -> None:
        self.cpu, self.say = cpu, progress
        self.daemons: list[int] = []  # every daemon started, by pid
        self.sockets: list[str] = []
        self._daemon: Any = None
        self.start()

    def start(self) -> None:
        from ..testing.daemon import DaemonProcess

        affinity = os.sched_getaffinity(0)
        daemon = self._daemon = DaemonProcess(log_level="warning")
        os.sched_setaffinity(0, {self.cpu})  # the daemon inherits it, and so does every thread it starts
        try:
            daemon.start()
        finally:
            os.sched_setaffinity(0, affinity)
        self.daemons.append(daemon.pid)
        daemon.cli("dev", "add", "name", "bench0", "mgmtdev", "vdpasim_net", "mac", DEVICE_MAC, "busy_poll", "on")
        shown = daemon.json("-x", "dev", "show", "bench0")["dev"]["bench0"]
        self.runtime, self.node, self.socket = daemon.runtime, shown["vhost_vdpa_node"], shown["vhost_user_socket"]
        self.sockets.append(self.socket)
        self.say(f"daemon {daemon.pid} on CPU {self.cpu}: device bench0, {self.node}, {self.socket}")

    def path(self, door: str) -> str:
        return self.node if door == "bypass" else self.socket

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        if self._daemon is not None:
            self._daemon.cleanup()  # ended by its pid, its runtime directory (sockets) removed
            self._daemon = None


def run_benchmark(
    sizes: tuple[int, ...] = (64, 1500),
    *,
    runs: int = 5,
    starts: int = 10,
    seconds: float = 2.0,
    warmup: float = 0.3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Both measurements (module docstring); the report as a JSON-able dict."""
    if runs < 1 or starts < 1 or seconds <= 0:
        raise UsageError("runs and starts must be at least 1, seconds positive")
    say = progress or (lambda text: None)
    back_cpu, front_cpu = pick_cpus()
    report: dict[str, Any] = {"cpus": {"device": back_cpu, "harness": front_cpu}, "start_steps": list(START_STEPS)}
    log = open(os.devnull, "w")  # noqa: SIM115 - the harnesses' stderr, closed below
    affinity = os.sched_getaffinity(0)
    device: _Device | None = None
    try:
        device = _Device(back_cpu, say)
        # The supervisor works while the harness waits in its call: they share the harness's CPU, and the
        # device's busy-polling thread has the other one to itself, as a VMM's vCPU would not.
        os.sched_setaffinity(0, {front_cpu})
        report["control_plane"] = [
            _starts(door, device.path(door), front_cpu, device.runtime, starts, say, log).as_dict()
            for door in ("direct", "bypass")
        ]
        results = []
        for size in sizes:
            result = TrafficResult(size)
            for run in range(runs):
                for door in alternation(run, ("direct", "bypass")):
                    for attempt in range(3):
                        try:
                            mpps = _traffic(door, device, front_cpu, size, seconds, warmup, result, log)
                            break
                        except StallError as exc:
                            result.stalls.append(f"{door}: {exc}")
                            say(f"split-{size}: {door} run stalled, again on a new daemon: {exc}")
                            if attempt == 2:
                                raise
                            device.restart()
                    getattr(result, door).append(mpps)
                say(
                    f"split-{size}: run {run + 1}/{runs}: direct {result.direct[-1]:.3f} Mpps, "
                    f"bypass {result.bypass[-1]:.3f} Mpps, traps during the run {result.trap_growth[-1]}"
                )
            results.append(result.as_dict())
        report["data_path"] = results
    finally:
        if device is not None:
            device.close()
            report["device"] = {"daemon_pids": device.daemons, "sockets": device.sockets}
        os.sched_setaffinity(0, affinity)
        log.close()
    return report


def _starts(
    door: str, path: str, cpu: int, runtime: Any, starts: int, say: Callable[[str], None], log: Any
) -> StartResult:
    result = StartResult(door)
    harness = _Door(door, path, cpu, runtime, log)
    try:
        for i in range(starts + 1):  # the first is reported apart: it loads modules and asks the daemon for the node
            before = harness.counters()
            answer = harness.ask("start")
            wall = answer["wall_ms"]
            after = harness.counters()
            stop = harness.ask("stop")["wall_ms"]
            d = _delta(before, after)
            if door == "direct":
                d["vhost_user_sent"], d["vhost_user_waited"] = answer["sent"], answer["waited"]
            if i == 0:
                result.first = {"wall_ms": wall, "supervisor_ms": d["busy"] * 1e3, "answered": d["answered"],
                                "vhost_user_waited": d["vhost_user_waited"]}  # fmt: skip
                continue
            result.wall_ms.append(wall)
            result.stop_wall_ms.append(stop)
            result.answered.append(d["answered"])
            result.passed.append(d["passed"])
            result.supervisor_ms.append(d["busy"] * 1e3)
            result.server_ms.append(d["server"] * 1e3)
            result.ioctls.append(d["ioctls"])
            result.writes.append(d["writes"])
            result.vhost_user_sent.append(d["vhost_user_sent"])
            result.vhost_user_waited.append(d["vhost_user_waited"])
            for call in ("openat", "ioctl", "write"):
                getattr(result, f"{call}_ms").append(d["by"].get(f"{call}_ms", 0.0))
            result.by_syscall = d["by"]
            say(
                f"{door} start {i}/{starts}: {wall:.2f} ms wall, {d['answered']} traps answered, "
                f"{d['passed']} passed on, supervisor {d['busy'] * 1e3:.2f} ms (server {d['server'] * 1e3:.2f} ms), "
                f"vhost-user {d['vhost_user_sent']} requests, {d['vhost_user_waited']} round trips"
            )
    finally:
        harness.close()
    return result


def _traffic(
    door: str, device: _Device, cpu: int, size: int, seconds: float, warmup: float, result: TrafficResult, log: Any
) -> float:
    harness = _Door(door, device.path(door), cpu, device.runtime, log)
    try:
        harness.ask("start")
        harness.ask("prepare", frame_len=size, warmup=warmup)
        before = harness.counters()
        answer = harness.ask("traffic", seconds=seconds)
        after = harness.counters()
        harness.ask("stop")
    finally:
        harness.close()
    result.frames += answer["frames"]
    result.bad += answer["bad"]
    if answer["bad"]:
        raise BypassError(f"{door} {size} B: {answer['bad']} frames failed the driver's checks")
    if door == "bypass":
        result.trap_growth.append(after["calls"] - before["calls"])
    return float(answer["mpps"])


def command(args: argparse.Namespace) -> int:
    """The ``vdpasim bench bypass`` handler: progress on stderr, a JSON report or tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    errors = Console(stderr=True)
    try:
        report = run_benchmark(
            tuple(args.size or (64, 1500)),
            runs=args.runs,
            starts=args.starts,
            seconds=args.seconds,
            progress=progress_printer(errors),
        )
    except (UsageError, BypassError) as exc:
        errors.print(f"vdpasim bench bypass: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    table = Table(title=f"control plane per device start, medians of {args.starts} starts")
    columns = ("door", "wall ms", "traps answered", "passed on", "supervisor ms", "server ms", "vhost-user round trips",
               "stop wall ms")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "door" else "right")
    for r in report["control_plane"]:
        table.add_row(
            r["door"], f"{r['wall_ms']:.2f}", str(r["answered"]), str(r["passed"]), f"{r['supervisor_ms']:.2f}",
            f"{r['server_ms']:.2f}", str(r["vhost_user_waited"]), f"{r['stop_wall_ms']:.2f}",
        )  # fmt: skip
    Console().print(table)
    table = Table(title=f"loopback through the device, medians of {args.runs} alternations")
    for name in ("case", "direct Mpps", "bypass Mpps", "bypass/direct", "direct range", "bypass range", "traps"):
        table.add_column(name, justify="left" if name == "case" else "right")
    for r in report["data_path"]:
        table.add_row(
            r["case"], f"{r['direct_mpps']:.3f}", f"{r['bypass_mpps']:.3f}", f"{r['ratio']:.3f}",
            f"{min(r['direct_runs_mpps']):.3f}-{max(r['direct_runs_mpps']):.3f}",
            f"{min(r['bypass_runs_mpps']):.3f}-{max(r['bypass_runs_mpps']):.3f}", str(sum(r["trap_growth"])),
        )  # fmt: skip
    Console().print(table)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["harness"]:
        sys.exit(harness_main(sys.argv[2:]))
    sys.exit("usage: python -m vdpasim.bench.bypass harness direct|bypass PATH")
