"""``vdpasim bench rings``: the compiled ring kernels against a C reference of the same semantics.

One thread plays both sides of a virtio-net queue pair in loopback. The device side is the
production kernel ``vdpasim.jit.net.net_tx_burst`` on real ``Virtqueue`` state records over a memfd
``RegionTable``, so the figures are those of what devices run. The driver side (post TX frames and
RX buffers, reap used entries and check every one) is compiled too, and the whole loop of a run is
one compiled call, since a Python-to-njit call costs about as much as a burst of small packets.

The reference is ``benchmarks/ring_loopback.c``, built with ``gcc -O2`` at run time: the same driver
and the same device checks (translation, chain walk, receive filter, RX header, used entries, one
index publish per burst, notification decision), on the very same queue records and memory. Runs
alternate between the two sides inside one invocation; the medians are compared. After each run
both sides are verified alike: status, per-packet checks done by the driver (ids, lengths,
num_buffers, sequence numbers), queue counters, notifications, and the received bytes themselves.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..jit import kernel, net
from ..jit.intrinsics import fence_acquire, fence_release, load_u16, load_u32, load_u64, store_u16, store_u32, store_u64
from ..memory import RegionTable, anonymous_region
from ..ops import RingAddressSpace
from ..rings.state import QUEUE_DTYPE, RingStatus
from ..virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_HDR_LEN,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
)
from ..virtqueue import Virtqueue

__all__ = [
    "C_SOURCE",
    "Reference",
    "RingBench",
    "Result",
    "VerificationError",
    "build_reference",
    "ring_loopback",
    "run_benchmark",
    "command",
]

C_SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "ring_loopback.c"
CFLAGS = ("-O2", "-shared", "-fPIC")

DEVICE_MAC = 0x525400123456
SOURCE_MAC = 0x525400654321
ETHERTYPE = 0x88B5  # IEEE 802 local experimental
ETH_HLEN = 14
HDR_LEN = VIRTIO_NET_HDR_LEN
SEQ_OFFSET = HDR_LEN + ETH_HLEN  # a sequence number right after the Ethernet header, in each TX buffer
RX_BUF_LEN = HDR_LEN + 1514
BUF_STRIDE = 1600  # not a power of two, so buffers spread over the cache sets

# Layout block (the C side's L_* enum) and result block (R_*).
(
    L_TX_DESC,
    L_TX_DRIVER,
    L_TX_DEVICE,
    L_RX_DESC,
    L_RX_DRIVER,
    L_RX_DEVICE,
    L_TX_BUF_GUEST,
    L_TX_BUF_HOST,
    L_RX_BUF_GUEST,
    L_RX_BUF_HOST,
    L_STRIDE,
    L_FRAME_LEN,
    L_RX_BUF_LEN,
    L_SIZE,
) = range(14)
LAYOUT_LEN = 14
R_STATUS, R_TX_REAPED, R_RX_REAPED, R_BAD, R_NOTIFICATIONS, R_SEQ_SUM = range(6)
RESULT_LEN = 6

_OK = int(RingStatus.OK)
_NO_BUFFER = int(RingStatus.NO_BUFFER)


# --- the driver, compiled: the same algorithm as split_loopback/packed_loopback in the C file ---


@kernel(inline=True)
def received_wrong(buffer_id, slot, used_len, expected_len, buf, seq, expected_seq):
    """The driver's checks of one looped-back frame: the used entry names the slot the frame's RX buffer
    was posted in, with the header and frame as its length; one buffer (the header's num_buffers); and the
    sequence number the driver stamped comes back in order. Shared with ``bench bypass``'s driver."""
    return buffer_id != slot or used_len != expected_len or load_u16(buf + 10) != 1 or seq != expected_seq


@kernel
def _split_loopback(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, lay, bursts, burst, result):
    size = lay[L_SIZE]
    stride = lay[L_STRIDE]
    frame_len = lay[L_FRAME_LEN]
    rx_len = lay[L_RX_BUF_LEN]
    tx_desc, tx_avail, tx_used = lay[L_TX_DESC], lay[L_TX_DRIVER], lay[L_TX_DEVICE]
    rx_desc, rx_avail, rx_used = lay[L_RX_DESC], lay[L_RX_DRIVER], lay[L_RX_DEVICE]
    tx_buf, tx_host = lay[L_TX_BUF_GUEST], lay[L_TX_BUF_HOST]
    rx_buf, rx_host = lay[L_RX_BUF_GUEST], lay[L_RX_BUF_HOST]
    tx_next = 0
    rx_next = 0
    tx_last_used = 0
    rx_last_used = 0
    sent = 0
    tx_reaped = 0
    rx_reaped = 0
    bad = 0
    notifications = 0
    seq_sum = 0
    status = _OK
    for _ in range(bursts):
        for _ in range(burst):
            slot = tx_next % size
            store_u64(tx_host + stride * slot + SEQ_OFFSET, sent)
            sent += 1
            desc = tx_desc + 16 * slot
            store_u64(desc, tx_buf + stride * slot)
            store_u32(desc + 8, HDR_LEN + frame_len)
            store_u16(desc + 12, 0)
            store_u16(desc + 14, 0)
            store_u16(tx_avail + 4 + 2 * slot, slot)
            tx_next = (tx_next + 1) & 0xFFFF
        fence_release()
        store_u16(tx_avail + 2, tx_next)
        for _ in range(burst):
            slot = rx_next % size
            desc = rx_desc + 16 * slot
            store_u64(desc, rx_buf + stride * slot)
            store_u32(desc + 8, rx_len)
            store_u16(desc + 12, VIRTQ_DESC_F_WRITE)
            store_u16(desc + 14, 0)
            store_u16(rx_avail + 4 + 2 * slot, slot)
            rx_next = (rx_next + 1) & 0xFFFF
        fence_release()
        store_u16(rx_avail + 2, rx_next)

        st, done, notify_tx, notify_rx = net.net_tx_burst(
            txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, burst
        )
        if st != _OK or done != burst:
            status = st if st != _OK else _NO_BUFFER
            break
        notifications += notify_tx + notify_rx

        used = load_u16(tx_used + 2)
        fence_acquire()
        while tx_last_used != used:
            slot = tx_last_used % size
            elem = tx_used + 4 + 8 * slot
            if load_u32(elem) != slot or load_u32(elem + 4) != 0:
                bad += 1
            tx_last_used = (tx_last_used + 1) & 0xFFFF
            tx_reaped += 1
        store_u16(tx_avail + 4 + 2 * size, tx_last_used)  # used_event: interrupt on the next one
        used = load_u16(rx_used + 2)
        fence_acquire()
        while rx_last_used != used:
            slot = rx_last_used % size
            elem = rx_used + 4 + 8 * slot
            buf = rx_host + stride * load_u32(elem)
            seq = load_u64(buf + SEQ_OFFSET)
            if received_wrong(load_u32(elem), slot, load_u32(elem + 4), HDR_LEN + frame_len, buf, seq, rx_reaped):
                bad += 1
            seq_sum += seq
            rx_last_used = (rx_last_used + 1) & 0xFFFF
            rx_reaped += 1
        store_u16(rx_avail + 4 + 2 * size, rx_last_used)
    result[R_STATUS] = status
    result[R_TX_REAPED] = tx_reaped
    result[R_RX_REAPED] = rx_reaped
    result[R_BAD] = bad
    result[R_NOTIFICATIONS] = notifications
    result[R_SEQ_SUM] = seq_sum


@kernel(inline=True)
def _packed_is_used(flags, wrap):
    return (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap and (flags & VIRTQ_DESC_F_USED != 0) == wrap


@kernel
def _packed_loopback(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, lay, bursts, burst, result):
    size = lay[L_SIZE]
    stride = lay[L_STRIDE]
    frame_len = lay[L_FRAME_LEN]
    rx_len = lay[L_RX_BUF_LEN]
    tx_desc, tx_driver = lay[L_TX_DESC], lay[L_TX_DRIVER]
    rx_desc, rx_driver = lay[L_RX_DESC], lay[L_RX_DRIVER]
    tx_buf, tx_host = lay[L_TX_BUF_GUEST], lay[L_TX_BUF_HOST]
    rx_buf, rx_host = lay[L_RX_BUF_GUEST], lay[L_RX_BUF_HOST]
    tx_next = 0
    tx_wrap = 1
    rx_next = 0
    rx_wrap = 1
    tx_used = 0
    tx_used_wrap = 1
    rx_used = 0
    rx_used_wrap = 1
    sent = 0
    tx_reaped = 0
    rx_reaped = 0
    bad = 0
    notifications = 0
    seq_sum = 0
    status = _OK
    # Ask for used-buffer notifications at a given position (EVENT_IDX), starting at the first.
    store_u16(tx_driver, 1 << 15)
    store_u16(tx_driver + 2, RING_EVENT_FLAGS_DESC)
    store_u16(rx_driver, 1 << 15)
    store_u16(rx_driver + 2, RING_EVENT_FLAGS_DESC)
    for _ in range(bursts):
        for _ in range(burst):
            slot = tx_next
            store_u64(tx_host + stride * slot + SEQ_OFFSET, sent)
            sent += 1
            desc = tx_desc + 16 * slot
            store_u64(desc, tx_buf + stride * slot)
            store_u32(desc + 8, HDR_LEN + frame_len)
            store_u16(desc + 12, slot)
            fence_release()  # the descriptor before the flags that make it available
            store_u16(desc + 14, VIRTQ_DESC_F_AVAIL if tx_wrap else VIRTQ_DESC_F_USED)
            tx_next += 1
            if tx_next == size:
                tx_next = 0
                tx_wrap ^= 1
        for _ in range(burst):
            slot = rx_next
            desc = rx_desc + 16 * slot
            store_u64(desc, rx_buf + stride * slot)
            store_u32(desc + 8, rx_len)
            store_u16(desc + 12, slot)
            fence_release()
            store_u16(desc + 14, VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_AVAIL if rx_wrap else VIRTQ_DESC_F_USED))
            rx_next += 1
            if rx_next == size:
                rx_next = 0
                rx_wrap ^= 1

        st, done, notify_tx, notify_rx = net.net_tx_burst(
            txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, burst
        )
        if st != _OK or done != burst:
            status = st if st != _OK else _NO_BUFFER
            break
        notifications += notify_tx + notify_rx

        while True:
            desc = tx_desc + 16 * tx_used
            if not _packed_is_used(load_u16(desc + 14), tx_used_wrap):
                break
            fence_acquire()
            if load_u16(desc + 12) != tx_used or load_u32(desc + 8) != 0:
                bad += 1
            tx_reaped += 1
            tx_used += 1
            if tx_used == size:
                tx_used = 0
                tx_used_wrap ^= 1
        store_u16(tx_driver, tx_used | tx_used_wrap << 15)  # off_wrap: interrupt on the next one
        while True:
            desc = rx_desc + 16 * rx_used
            if not _packed_is_used(load_u16(desc + 14), rx_used_wrap):
                break
            fence_acquire()
            buffer_id = load_u16(desc + 12)
            buf = rx_host + stride * buffer_id
            seq = load_u64(buf + SEQ_OFFSET)
            if received_wrong(buffer_id, rx_used, load_u32(desc + 8), HDR_LEN + frame_len, buf, seq, rx_reaped):
                bad += 1
            seq_sum += seq
            rx_reaped += 1
            rx_used += 1
            if rx_used == size:
                rx_used = 0
                rx_used_wrap ^= 1
        store_u16(rx_driver, rx_used | rx_used_wrap << 15)
    result[R_STATUS] = status
    result[R_TX_REAPED] = tx_reaped
    result[R_RX_REAPED] = rx_reaped
    result[R_BAD] = bad
    result[R_NOTIFICATIONS] = notifications
    result[R_SEQ_SUM] = seq_sum


@kernel
def ring_loopback(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, lay, bursts, burst, result):
    """Run ``bursts`` bursts of ``burst`` packets through net_tx_burst in one compiled call."""
    if txq_state[0].packed:
        _packed_loopback(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, lay, bursts, burst, result)
    else:
        _split_loopback(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, lay, bursts, burst, result)


# --- the C reference ---


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "vdpasim" / "bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def build_reference(cc: str = "gcc", source: Path = C_SOURCE) -> Path:
    """Compile the C reference into a shared library (cached by source, compiler and flags); its path."""
    compiler = shutil.which(cc)
    if compiler is None:
        raise UsageError(f"C compiler {cc!r} not found: `vdpasim bench rings` builds its C reference at run time")
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise UsageError(f"C reference {source} unreadable: {exc.strerror}") from exc
    version = subprocess.run([compiler, "--version"], capture_output=True, check=False).stdout
    key = hashlib.sha256(text + version + " ".join(CFLAGS).encode()).hexdigest()[:16]
    library = _cache_dir() / f"ring_loopback-{key}.so"
    if not library.exists():
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", str(partial), str(source)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise UsageError(f"{cc} {' '.join(CFLAGS)} {source} failed:\n{done.stderr}")
        os.replace(partial, library)
    return library


_P = ctypes.c_void_p
_I = ctypes.c_int64


class Reference:
    """The loaded C library, checked to agree with the Python-side layouts."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        names = self._string("ring_queue_fields")
        if names.split(",") != list(QUEUE_DTYPE.names):
            raise UsageError(f"{C_SOURCE.name}: struct vq does not match QUEUE_DTYPE ({names})")
        params = self._string("ring_net_params")
        for item in params.split(","):
            name, value = item.split("=")
            if getattr(net, name) != int(value):
                raise UsageError(f"{C_SOURCE.name}: {name}={value} but vdpasim.jit.net has {getattr(net, name)}")
        self.fn = self.lib.ring_loopback
        self.fn.restype = None
        self.fn.argtypes = [_P, _P, _P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _P]

    def _string(self, symbol: str) -> str:
        """A NUL-terminated ``const char[]`` exported by the library."""
        return ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(self.lib, symbol))).decode()


# --- the bench ---


@dataclass
class Result:
    """One configuration: medians over ``runs`` runs of ``packets`` packets per side."""

    layout: str
    packet_bytes: int
    burst: int
    numba_mpps: float
    c_mpps: float
    runs: int
    packets: int

    @property
    def ratio(self) -> float:
        return self.numba_mpps / self.c_mpps if self.c_mpps else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "layout": self.layout,
            "packet_bytes": self.packet_bytes,
            "burst": self.burst,
            "numba_mpps": round(self.numba_mpps, 3),
            "c_mpps": round(self.c_mpps, 3),
            "ratio": round(self.ratio, 3),
            "runs": self.runs,
            "packets": self.packets,
        }


class VerificationError(Exception):
    """A run did not move every packet intact."""


class RingBench:
    """A queue pair over memfd memory, reset to the same start before every run of either side."""

    def __init__(self, layout: str, packet_bytes: int, queue_size: int = 256) -> None:
        if layout not in ("split", "packed"):
            raise UsageError(f"unknown ring layout {layout!r}")
        if not ETH_HLEN + 8 <= packet_bytes <= RX_BUF_LEN - HDR_LEN:
            raise UsageError(f"packet size {packet_bytes} outside {ETH_HLEN + 8}..{RX_BUF_LEN - HDR_LEN}")
        if not 1 <= queue_size <= VIRTQ_MAX_SIZE or (layout == "split" and queue_size & (queue_size - 1)):
            raise UsageError(f"queue size {queue_size} invalid for a {layout} ring (split: a power of two <= 1024)")
        self.layout = layout
        self.packet_bytes = packet_bytes
        self.size = queue_size
        self.guest_base = 0x100000
        # Per queue: descriptors, then the driver area, then the device area on the next page.
        self.queue_area = (16 * queue_size + 0x1000 + 8 * queue_size + 8 + 0xFFF) & ~0xFFF
        self.tx_buffers = 2 * self.queue_area
        self.rx_buffers = self.tx_buffers + BUF_STRIDE * queue_size
        region_size = self.rx_buffers + BUF_STRIDE * queue_size
        self.region = anonymous_region((region_size + 0xFFF) & ~0xFFF, guest_addr=self.guest_base)
        self.table = RegionTable([self.region])
        self.rxq = Virtqueue(0)
        self.txq = Virtqueue(1)
        self.scratch = np.zeros(net.SCRATCH_BYTES, dtype=np.uint8)
        self.params = net.new_net_params()
        self.params[net.P_HDR_LEN] = HDR_LEN
        self.params[net.P_MODE] = net.MODE_LOOPBACK
        self.params[net.P_MAC_COUNT] = 1
        self.params[net.P_MAC_TABLE] = DEVICE_MAC
        self.frame = self._frame_template()
        self.result = np.zeros(RESULT_LEN, dtype=np.int64)
        self.lay = np.zeros(LAYOUT_LEN, dtype=np.int64)

    def _frame_template(self) -> np.ndarray:
        frame = (np.arange(self.packet_bytes, dtype=np.int64) * 7 + 3).astype(np.uint8)
        frame[:6] = np.frombuffer(DEVICE_MAC.to_bytes(6, "big"), np.uint8)
        frame[6:12] = np.frombuffer(SOURCE_MAC.to_bytes(6, "big"), np.uint8)
        frame[12:14] = np.frombuffer(ETHERTYPE.to_bytes(2, "big"), np.uint8)
        return frame

    def reset(self) -> None:
        """Fresh rings, queue records and buffers: both sides start every run from the same state."""
        data = self.region.data
        data[:] = 0
        for slot in range(self.size):
            start = self.tx_buffers + BUF_STRIDE * slot + HDR_LEN
            data[start : start + self.packet_bytes] = self.frame
        features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
        if self.layout == "packed":
            features |= 1 << VIRTIO_F_RING_PACKED
        hosts = []
        for number, vq in enumerate((self.txq, self.rxq)):
            vq.reset()
            vq.clear_counters()  # each run counts from zero
            vq.negotiate(features)
            vq.set_num(self.size)
            desc = self.guest_base + self.queue_area * number
            vq.set_address(desc, desc + 16 * self.size, desc + 16 * self.size + 0x1000)
            vq.attach(self.table, RingAddressSpace.GUEST)
            hosts += [int(vq.record["desc"]), int(vq.record["driver"]), int(vq.record["device"])]
        host = self.region.host_addr
        self.lay[:] = [
            *hosts,
            self.guest_base + self.tx_buffers,
            host + self.tx_buffers,
            self.guest_base + self.rx_buffers,
            host + self.rx_buffers,
            BUF_STRIDE,
            self.packet_bytes,
            RX_BUF_LEN,
            self.size,
        ]
        self.result[:] = 0

    def _args(self) -> tuple:
        return (
            self.txq.state,
            self.rxq.state,
            self.table.rows,
            self.txq.iov,
            self.rxq.iov,
            self.scratch,
            self.params,
            self.lay,
        )

    def run_numba(self, bursts: int, burst: int) -> float:
        """One run of the compiled side; seconds taken. Call verify() afterwards."""
        self.reset()
        args = (*self._args(), bursts, burst, self.result)
        start = time.perf_counter()
        ring_loopback(*args)
        return time.perf_counter() - start

    def run_c(self, reference: Reference, bursts: int, burst: int) -> float:
        self.reset()
        tx_state, rx_state, rows, iov_tx, iov_rx, scratch, params, lay = self._args()
        rows = np.ascontiguousarray(rows)
        args = (
            tx_state.ctypes.data,
            rx_state.ctypes.data,
            rows.ctypes.data,
            rows.shape[0],
            iov_tx.ctypes.data,
            iov_rx.ctypes.data,
            iov_tx.shape[0],
            scratch.ctypes.data,
            params.ctypes.data,
            lay.ctypes.data,
            bursts,
            burst,
            self.result.ctypes.data,
        )
        start = time.perf_counter()
        reference.fn(*args)
        return time.perf_counter() - start

    def verify(self, side: str, packets: int, bursts: int) -> None:
        """Every packet moved, checked and intact; raise VerificationError naming what is wrong otherwise."""
        result = self.result
        tx, rx = self.txq.counters(), self.rxq.counters()
        expected = {
            "status": (int(result[R_STATUS]), _OK),
            "TX used entries reaped": (int(result[R_TX_REAPED]), packets),
            "RX used entries reaped": (int(result[R_RX_REAPED]), packets),
            "entries failing the driver's checks": (int(result[R_BAD]), 0),
            "sum of received sequence numbers": (int(result[R_SEQ_SUM]), packets * (packets - 1) // 2),
            "notifications": (int(result[R_NOTIFICATIONS]), 2 * bursts),
            "TX packets": (tx["packets"], packets),
            "TX bytes": (tx["bytes"], packets * self.packet_bytes),
            "RX packets": (rx["packets"], packets),
            "RX bytes": (rx["bytes"], packets * self.packet_bytes),
            "TX errors": (tx["errors"], 0),
            "RX errors, drops, overruns": (rx["errors"] + rx["drops"] + rx["overruns"], 0),
            "queue faults": (int(self.txq.record["error"]) + int(self.rxq.record["error"]), 0),
        }
        for what, (got, want) in expected.items():
            if got != want:
                raise VerificationError(f"{side} {self.layout} {self.packet_bytes} B: {what} {got}, expected {want}")
        # The bytes themselves: each RX buffer holds the last frame that went through its slot.
        data = self.region.data
        header = np.zeros(HDR_LEN, dtype=np.uint8)
        header[10] = 1  # num_buffers
        for slot in range(min(packets, self.size)):
            seq = slot + self.size * ((packets - 1 - slot) // self.size)
            frame = self.frame.copy()
            frame[ETH_HLEN : ETH_HLEN + 8] = np.frombuffer(seq.to_bytes(8, "little"), np.uint8)
            start = self.rx_buffers + BUF_STRIDE * slot
            if not np.array_equal(data[start : start + HDR_LEN], header) or not np.array_equal(
                data[start + HDR_LEN : start + HDR_LEN + self.packet_bytes], frame
            ):
                raise VerificationError(f"{side} {self.layout} {self.packet_bytes} B: RX buffer {slot} corrupted")

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Everything a run leaves behind: guest memory and both queue records."""
        return self.region.data.copy(), self.txq.state.copy(), self.rxq.state.copy()

    def compare(self, c: tuple[np.ndarray, ...], numba: tuple[np.ndarray, ...]) -> None:
        """The two sides must leave identical memory and queue records after the same run."""
        (c_mem, *c_queues), (n_mem, *n_queues) = c, numba
        for name, c_q, n_q in zip(("TX", "RX"), c_queues, n_queues, strict=True):
            for field in QUEUE_DTYPE.names:
                if c_q[0][field] != n_q[0][field]:
                    raise VerificationError(
                        f"{self.layout} {self.packet_bytes} B: {name} queue {field} is {int(n_q[0][field])} "
                        f"after the Numba run but {int(c_q[0][field])} after the C run"
                    )
        differ = np.flatnonzero(c_mem != n_mem)
        if differ.size:
            offset = int(differ[0])
            if offset < self.tx_buffers:
                area = f"{('TX', 'RX')[offset // self.queue_area]} ring offset {offset % self.queue_area:#x}"
            else:
                area = f"buffers offset {offset - self.tx_buffers:#x}"
            raise VerificationError(
                f"{self.layout} {self.packet_bytes} B: the Numba and C runs left different bytes "
                f"({differ.size} bytes, first in the {area})"
            )

    def close(self) -> None:
        self.table.close()


def run_benchmark(
    layouts: Iterable[str] = ("split", "packed"),
    sizes: Iterable[int] = (64, 1500),
    bursts: Iterable[int] = (32, 256),
    *,
    runs: int = 7,
    duration: float = 0.2,
    packets: int | None = None,
    queue_size: int = 256,
    cc: str = "gcc",
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Measure every (layout, packet size, burst); alternate Numba and C runs and take medians.

    Each run moves ``packets`` packets per side (rounded up to whole bursts), or as many as the
    compiled side moves in about ``duration`` seconds when ``packets`` is None.
    """
    if runs < 1:
        raise UsageError("runs must be at least 1")
    bursts = list(bursts)
    for burst in bursts:
        if not 1 <= burst <= queue_size:
            raise UsageError(f"burst {burst} must be between 1 and the queue size {queue_size}")
    reference = Reference(build_reference(cc))
    results = []
    for layout in layouts:
        for size in sizes:
            bench = RingBench(layout, size, queue_size)
            try:
                for burst in bursts:
                    results.append(_measure(bench, reference, burst, runs, duration, packets, progress))
            finally:
                bench.close()
    return results


def _measure(
    bench: RingBench,
    reference: Reference,
    burst: int,
    runs: int,
    duration: float,
    packets: int | None,
    progress: Callable[[str], None] | None,
) -> Result:
    label = f"{bench.layout} {bench.packet_bytes} B burst {burst}"
    if progress:
        progress(f"{label}: warming up")
    # Warm-up (compilation, caches): verified like the real runs, and both sides must leave the very same
    # memory and queue state. A second compiled run sizes the runs.
    trial = max(1, 20000 // burst)
    bench.run_c(reference, trial, burst)
    bench.verify("C", trial * burst, trial)
    c_state = bench.snapshot()
    bench.run_numba(trial, burst)
    bench.verify("Numba", trial * burst, trial)
    bench.compare(c_state, bench.snapshot())
    seconds = bench.run_numba(trial, burst)
    wanted = duration / max(seconds, 1e-9) * trial * burst if packets is None else packets
    count = max(1, -(-round(wanted) // burst))  # whole bursts
    numba, c = [], []
    for run in range(runs):
        if progress:
            progress(f"{label}: run {run + 1}/{runs}")
        order = ("numba", "c") if run % 2 == 0 else ("c", "numba")
        for side in order:
            if side == "numba":
                seconds = bench.run_numba(count, burst)
                bench.verify("Numba", count * burst, count)
                numba.append(count * burst / seconds / 1e6)
            else:
                seconds = bench.run_c(reference, count, burst)
                bench.verify("C", count * burst, count)
                c.append(count * burst / seconds / 1e6)
    return Result(
        bench.layout, bench.packet_bytes, burst, statistics.median(numba), statistics.median(c), runs, count * burst
    )


# --- the command ---


def command(args: argparse.Namespace) -> int:
    """The ``vdpasim bench rings`` handler: progress on stderr, JSON or a table on stdout."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    layouts = args.layout or ["split", "packed"]
    sizes = args.size or [64, 1500]
    bursts = args.burst or [32, 256]
    errors = Console(stderr=True)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=errors) as bar:
            task = bar.add_task("building the C reference")

            def progress(text: str) -> None:
                bar.update(task, description=text)

            results = run_benchmark(
                layouts,
                sizes,
                bursts,
                runs=args.runs,
                duration=args.duration,
                packets=args.packets,
                queue_size=args.queue_size,
                cc=args.cc,
                progress=progress,
            )
    except (UsageError, VerificationError) as exc:
        errors.print(f"vdpasim bench rings: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    if args.json:
        json.dump([r.as_dict() for r in results], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    table = Table(title=f"ring loopback, one thread, queue size {args.queue_size}, medians of {args.runs} runs")
    for name in ("layout", "bytes", "burst", "Numba Mpps", "C Mpps", "Numba/C", "Numba Gbit/s"):
        table.add_column(name, justify="left" if name == "layout" else "right")
    for r in results:
        table.add_row(
            r.layout,
            str(r.packet_bytes),
            str(r.burst),
            f"{r.numba_mpps:.2f}",
            f"{r.c_mpps:.2f}",
            f"{r.ratio:.2f}",
            f"{r.numba_mpps * r.packet_bytes * 8 / 1000:.1f}",
        )
    Console().print(table)
    return 0
