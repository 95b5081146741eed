"""``vdpasim bench blk``: 4 KiB random reads and writes against a vdpasim blk device and qemu-storage-daemon.

The front-end is this process: a compiled driver loop (``drive``) on one split virtqueue in memfd guest
memory, set up over vhost-user by ``VhostUserClient`` (memory table, features, ring, kick and call
eventfds, DRIVER_OK). It keeps ``queue_depth`` requests in flight: each request is a fixed three-descriptor
chain (header, one 4 KiB data buffer, status byte) of its slot; the loop busy-polls the used ring,
checks every completion and resubmits the slot at once, and kicks only when the device asks for it
(VIRTQ_USED_F_NO_NOTIFY, or the avail_event of EVENT_IDX) with a libc ``write`` on the kick eventfd from
compiled code. It asks for no interrupts (used_event kept behind the used index), so it never waits on
the call eventfd. Per-request latency is the cycle counter (rdtsc) at submission and at the poll that
saw the completion, collected in a histogram.

Behind the socket is either

* **vdpasim**: a ``BlkDevice`` with a RAM disk, served by ``VhostUserServer`` in a child process
  (``python -m vdpasim.bench.blk``), so device and driver do not share a GIL; or
* **peer**: ``qemu-storage-daemon`` exporting a raw image on tmpfs (/dev/shm) as vhost-user-blk, with
  an iothread (adaptive polling) and Linux AIO on O_DIRECT (``QSD_*``).

Data are verified, not assumed: every block carries a tag in its first 16 bytes (its number, then a
hash of a seed, the block and the epoch of the write that wrote it). Before any measurement each disk
is filled (sequential writes, epoch 1); a write run writes a new epoch and records it per block when
the write completes; every read checks the tag against that record; at the end every block of each
disk is read back and checked. Any status byte other than VIRTIO_BLK_S_OK, a used length that is not
the request's, a tag that does not match or a back-end that stops answering ends the benchmark with
``BlkBenchError``.

Placement on this 2-CPU machine: the back-end (the child's data-path thread, or QSD's threads) is pinned
to one CPU, this driver to the other; runs alternate between the two back-ends (order swapped every run),
each run on a fresh vhost-user connection, and medians are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from numba import types
from numba.extending import intrinsic

from ..errors import UsageError
from ..jit import kernel
from ..jit.intrinsics import (
    call_libc,
    cycles,
    fence_acquire,
    fence_full,
    fence_release,
    load_u8,
    load_u16,
    load_u32,
    load_u64,
    store_u8,
    store_u16,
    store_u32,
    store_u64,
)
from ..virtio import constants as c
from .common import alternation, pick_cpus, print_json, progress_printer, require_program

__all__ = [
    "BlkBenchError",
    "Backend",
    "Harness",
    "Result",
    "RunStats",
    "block_tag_ok",
    "command",
    "drive",
    "find_qsd",
    "run_benchmark",
]

BLOCK = 4096
QUEUE_SIZE = 256
MAX_QUEUE_DEPTH = 64  # three descriptors per request: 192 of the 256
DEFAULT_DISK_MIB = 128
QSD_PACKAGES = ("qemu-system-x86",)  # qemu-storage-daemon is in qemu-system-common, which this brings
# qemu-storage-daemon's settings, the best of those compared here (docs/benchmarks.md): an iothread that
# polls up to 50 us before sleeping (QEMU's default is 32 us), Linux AIO with O_DIRECT (tmpfs takes it:
# no second page-cache copy); io_uring, or no O_DIRECT, or the main loop instead of an iothread were slower.
QSD_POLL_MAX_NS = 50_000
QSD_AIO = "native"
QSD_DIRECT = True
START_TIMEOUT = 30.0
STALL_SECONDS = 5.0  # no completion for this long: the back-end is stuck
FIRST_STALL_SECONDS = 120.0  # the first requests may wait for the child to load (or compile) its kernels
BUCKET_NS = 25  # latency histogram resolution
BUCKETS = 400_000  # 10 ms; slower requests land in the last bucket
LATENCY_CAP_US = BUCKET_NS * BUCKETS / 1000  # a percentile in the last bucket: "this or more"

OP_READ, OP_WRITE = 0, 1
OPS = {"read": OP_READ, "write": OP_WRITE}
_SLOT_STRIDE = 32  # per slot: 16-byte request header, then the status byte
_READ_LEN = BLOCK + 1  # used length of a read: data and status byte
_EMPTY_TAG = -1  # what a read buffer holds before the device fills it

# The driver's int64 parameter and state block (``lay``).
(
    L_DESC,
    L_AVAIL,
    L_USED,
    L_SIZE,
    L_QD,
    L_HDR_HOST,
    L_HDR_GUEST,
    L_BUF_HOST,
    L_BUF_GUEST,
    L_KICK_FD,
    L_EVENT_IDX,
    L_OP,
    L_SEQUENTIAL,
    L_BLOCKS,
    L_RNG,
    L_SEED,
    L_EPOCH,
    L_RUN_CYCLES,
    L_STALL_CYCLES,
    L_BUCKET_CYCLES,
    L_AVAIL_IDX,
    L_LAST_USED,
    L_ONE,
) = range(23)
LAYOUT_LEN = 24
# Results of one ``drive`` call.
(
    R_DONE,
    R_BAD_STATUS,
    R_BAD_DATA,
    R_BAD_USED,
    R_KICKS,
    R_START,
    R_END,
    R_STALLED,
    R_FIRST_BAD_BLOCK,
) = range(9)
RESULT_LEN = 9


class BlkBenchError(RuntimeError):
    """A back-end failed to start, stopped answering, or returned wrong data or status."""


# --- the compiled driver ---


@intrinsic
def libc_write(typingctx, fd, addr, length):
    """ssize_t write(int fd, const void *buf, size_t count), as int64 (the kick: 8 bytes on an eventfd)."""

    def codegen(context, builder, signature, args):
        return call_libc(context, builder, "write", args, signature.args, (32, 64, 64))

    return types.int64(fd, addr, length), codegen


@kernel(inline=True)
def _mix(x):
    """splitmix64's finaliser: the tag hash."""
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


@kernel(inline=True)
def _tag(seed, block, epoch):
    return _mix(seed ^ _mix(block * 0x10001 + (epoch << 40)))


@kernel(inline=True)
def block_tag_ok(addr, block, epoch, seed):
    """The 4 KiB block at host address ``addr`` carries the tag written to ``block`` in ``epoch``."""
    return load_u64(addr) == block and load_u64(addr + 8) == _tag(seed, block, epoch)


@kernel(inline=True)
def _need_event(event, new, old):
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@kernel(inline=True)
def _submit(lay, slots, slot, block):
    """Fill slot ``slot``'s header and data for ``block`` and put its chain on the available ring."""
    hdr = lay[L_HDR_HOST] + _SLOT_STRIDE * slot
    data = lay[L_BUF_HOST] + BLOCK * slot
    write = lay[L_OP] == OP_WRITE
    store_u32(hdr, c.VIRTIO_BLK_T_OUT if write else c.VIRTIO_BLK_T_IN)
    store_u64(hdr + 8, block * (BLOCK // c.VIRTIO_BLK_SECTOR_SIZE))
    store_u8(hdr + 16, 0xFF)  # the device must overwrite it
    if write:
        store_u64(data, block)
        store_u64(data + 8, _tag(lay[L_SEED], block, lay[L_EPOCH]))
    else:
        store_u64(data, _EMPTY_TAG)  # a read that copies nothing cannot pass for a good one
        store_u64(data + 8, 0)
    data_desc = lay[L_DESC] + 16 * (3 * slot + 1)
    store_u16(data_desc + 12, c.VIRTQ_DESC_F_NEXT | (0 if write else c.VIRTQ_DESC_F_WRITE))
    slots[slot, 0] = block
    slots[slot, 1] = cycles()
    idx = lay[L_AVAIL_IDX]
    store_u16(lay[L_AVAIL] + 4 + 2 * (idx % lay[L_SIZE]), 3 * slot)
    lay[L_AVAIL_IDX] = (idx + 1) & 0xFFFF


@kernel(inline=True)
def _next_block(lay, next_seq):
    """The block for the next request: the next one in order, or a random one (a 64-bit LCG)."""
    if lay[L_SEQUENTIAL]:
        return next_seq
    rng = lay[L_RNG] * 6364136223846793005 + 1442695040888963407
    lay[L_RNG] = rng
    return ((rng >> 33) & 0x7FFFFFFF) % lay[L_BLOCKS]


@kernel(inline=True)
def _publish(lay, kick_old, result):
    """Make the new entries visible, then kick if the device asked for it (§2.7.10). Returns the new kick_old."""
    avail, used, size = lay[L_AVAIL], lay[L_USED], lay[L_SIZE]
    new = lay[L_AVAIL_IDX]
    fence_release()
    store_u16(avail + 2, new)
    fence_full()  # the index store before the read of the device's suppression state
    if lay[L_EVENT_IDX]:
        kick = _need_event(load_u16(used + 4 + 8 * size), new, kick_old)
    else:
        kick = load_u16(used) & c.VIRTQ_USED_F_NO_NOTIFY == 0
    if kick:
        libc_write(lay[L_KICK_FD], lay.ctypes.data + 8 * L_ONE, 8)
        result[R_KICKS] += 1
    return new


@kernel
def drive(lay, slots, expected, hist, result):
    """Keep ``lay[L_QD]`` requests in flight until the run ends, check each completion, then drain.

    Random blocks for ``lay[L_RUN_CYCLES]`` cycles, or every block once in order (``L_SEQUENTIAL``).
    Reads are checked against ``expected`` (the epoch each block was last written in); completed
    writes update it. Latencies go to ``hist`` (buckets of ``L_BUCKET_CYCLES``); counts to ``result``.
    """
    size, qd, blocks = lay[L_SIZE], lay[L_QD], lay[L_BLOCKS]
    desc, avail, used = lay[L_DESC], lay[L_AVAIL], lay[L_USED]
    write = lay[L_OP] == OP_WRITE
    sequential = lay[L_SEQUENTIAL]
    seed, epoch = lay[L_SEED], lay[L_EPOCH]
    nbuckets = hist.shape[0]
    bucket = lay[L_BUCKET_CYCLES]
    for slot in range(qd):  # the fixed chains: header -> data -> status
        d = desc + 16 * 3 * slot
        store_u64(d, lay[L_HDR_GUEST] + _SLOT_STRIDE * slot)
        store_u32(d + 8, 16)
        store_u16(d + 12, c.VIRTQ_DESC_F_NEXT)
        store_u16(d + 14, 3 * slot + 1)
        store_u64(d + 16, lay[L_BUF_GUEST] + BLOCK * slot)
        store_u32(d + 24, BLOCK)
        store_u16(d + 30, 3 * slot + 2)
        store_u64(d + 32, lay[L_HDR_GUEST] + _SLOT_STRIDE * slot + 16)
        store_u32(d + 40, 1)
        store_u16(d + 44, c.VIRTQ_DESC_F_WRITE)
        store_u16(d + 46, 0)
        slots[slot, 2] = 0
    last_used = lay[L_LAST_USED]
    if lay[L_EVENT_IDX]:
        store_u16(avail + 4 + 2 * size, (last_used - 1) & 0xFFFF)  # no interrupts: we poll
    else:
        store_u16(avail, c.VIRTQ_AVAIL_F_NO_INTERRUPT)
    result[:] = 0
    result[R_FIRST_BAD_BLOCK] = -1
    start = cycles()
    result[R_START] = start
    stop_at = start + lay[L_RUN_CYCLES]
    next_seq = 0
    inflight = 0
    for slot in range(qd):
        if sequential and next_seq >= blocks:
            break
        _submit(lay, slots, slot, _next_block(lay, next_seq))
        slots[slot, 2] = 1
        next_seq += 1
        inflight += 1
    kick_old = _publish(lay, (lay[L_AVAIL_IDX] - inflight) & 0xFFFF, result)
    stopping = False
    last_progress = start
    spins = 0
    now = start
    while inflight > 0:
        used_idx = load_u16(used + 2)
        if used_idx == last_used:
            spins += 1
            if spins & 1023 == 0 and cycles() - last_progress > lay[L_STALL_CYCLES]:
                result[R_STALLED] = 1
                break
            continue
        fence_acquire()
        now = cycles()
        if not sequential and now >= stop_at:
            stopping = True
        if (used_idx - last_used) & 0xFFFF > inflight:
            result[R_BAD_USED] += 1  # more completions than requests in flight
            break
        submitted = 0
        while last_used != used_idx:
            elem = used + 4 + 8 * (last_used % size)
            head = load_u32(elem)
            length = load_u32(elem + 4)
            last_used = (last_used + 1) & 0xFFFF
            slot = head // 3
            if head % 3 or slot >= qd or slots[slot, 2] == 0:
                result[R_BAD_USED] += 1
                continue
            slots[slot, 2] = 0
            inflight -= 1
            block = slots[slot, 0]
            latency = (now - slots[slot, 1]) // bucket
            hist[min(latency, nbuckets - 1)] += 1
            result[R_DONE] += 1
            if load_u8(lay[L_HDR_HOST] + _SLOT_STRIDE * slot + 16) != c.VIRTIO_BLK_S_OK:
                result[R_BAD_STATUS] += 1
            elif length != (1 if write else _READ_LEN):
                result[R_BAD_USED] += 1
            elif write:
                expected[block] = epoch
            elif not block_tag_ok(lay[L_BUF_HOST] + BLOCK * slot, block, expected[block], seed):
                result[R_BAD_DATA] += 1
                if result[R_FIRST_BAD_BLOCK] < 0:
                    result[R_FIRST_BAD_BLOCK] = block
            if stopping or (sequential and next_seq >= blocks):
                continue
            _submit(lay, slots, slot, _next_block(lay, next_seq))
            slots[slot, 2] = 1
            next_seq += 1
            inflight += 1
            submitted += 1
        if lay[L_EVENT_IDX]:
            store_u16(avail + 4 + 2 * size, (last_used - 1) & 0xFFFF)
        if submitted:
            kick_old = _publish(lay, kick_old, result)
        last_progress = now
    result[R_END] = now
    lay[L_LAST_USED] = last_used


@kernel
def _read_cycles():
    return cycles()


def cycle_rate(seconds: float = 0.1) -> float:
    """Cycle-counter ticks per second, measured against the monotonic clock."""
    _read_cycles()  # loaded (or compiled) before the clock starts
    t0, c0 = time.perf_counter(), _read_cycles()
    time.sleep(seconds)
    t1, c1 = time.perf_counter(), _read_cycles()
    return (c1 - c0) / (t1 - t0)


# --- one connection: the front-end ---


@dataclass
class RunStats:
    """One measured run of one side."""

    iops: float
    p50_us: float
    p99_us: float
    kicks: int
    requests: int


class Harness:
    """One vhost-user connection to a blk back-end, with one split queue driven by ``drive``."""

    def __init__(self, socket_path: str, hz: float, *, timeout: float = START_TIMEOUT) -> None:
        from bridge.vhost_user.client import VhostUserClient

        from ..testing.driver import GuestMemory
        from ..virtqueue import ring_area_sizes

        self.hz = hz
        self.memory = GuestMemory(1 << 20)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.client: VhostUserClient | None = None
        try:
            deadline = time.monotonic() + timeout
            while True:  # the back-end may still be starting
                try:
                    self.client = VhostUserClient(socket_path, backend_channel=False, timeout=timeout)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            client = self.client
            offered = client.get_device_features()
            wanted = (
                1 << c.VIRTIO_F_VERSION_1
                | 1 << c.VIRTIO_RING_F_EVENT_IDX
                | 1 << c.VIRTIO_BLK_F_FLUSH
                | 1 << c.VIRTIO_BLK_F_SEG_MAX
                | 1 << c.VIRTIO_BLK_F_BLK_SIZE
                | 1 << c.VIRTIO_BLK_F_SIZE_MAX
            )
            features = offered & wanted
            if not features >> c.VIRTIO_F_VERSION_1 & 1:
                raise BlkBenchError(f"{socket_path}: the back-end does not offer VIRTIO_F_VERSION_1")
            up = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
            client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
            client.set_status(up)
            client.set_driver_features(features)
            client.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK)
            client.set_map(self.memory.table)
            desc_len, avail_len, used_len = ring_area_sizes(QUEUE_SIZE, False)
            desc = self.memory.alloc(desc_len, 4096)
            avail = self.memory.alloc(avail_len, 64)
            used = self.memory.alloc(used_len, 4096)
            headers = self.memory.alloc(_SLOT_STRIDE * MAX_QUEUE_DEPTH, 64)
            buffers = self.memory.alloc(BLOCK * MAX_QUEUE_DEPTH, 4096)
            for addr, n in ((desc, desc_len), (avail, avail_len), (used, used_len)):
                self.memory.fill(addr, n)
            client.set_vq_num(0, QUEUE_SIZE)
            client.set_vq_address(0, desc, avail, used)
            client.set_vq_kick(0, self.kick)
            client.set_vq_call(0, self.call)
            client.set_vq_ready(0, True)
            client.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
            self.capacity = int.from_bytes(client.get_config(0, 8), "little")  # sectors
        except BaseException:
            self.close()
            raise
        host = self.memory.region.host_addr - self.memory.guest_addr
        self.lay = np.zeros(LAYOUT_LEN, dtype=np.int64)
        lay = self.lay
        lay[L_DESC], lay[L_AVAIL], lay[L_USED] = desc + host, avail + host, used + host
        lay[L_SIZE] = QUEUE_SIZE
        lay[L_HDR_HOST], lay[L_HDR_GUEST] = headers + host, headers
        lay[L_BUF_HOST], lay[L_BUF_GUEST] = buffers + host, buffers
        lay[L_KICK_FD] = self.kick
        lay[L_EVENT_IDX] = features >> c.VIRTIO_RING_F_EVENT_IDX & 1
        lay[L_BUCKET_CYCLES] = max(1, round(hz * BUCKET_NS / 1e9))
        lay[L_ONE] = 1
        self.slots = np.zeros((MAX_QUEUE_DEPTH, 3), dtype=np.int64)
        self.hist = np.zeros(BUCKETS, dtype=np.int64)
        self.result = np.zeros(RESULT_LEN, dtype=np.int64)

    def run(
        self,
        disk: Disk,
        op: str,
        queue_depth: int,
        *,
        seconds: float = 0.0,
        sequential: bool = False,
        stall: float = STALL_SECONDS,
    ) -> RunStats:
        """One run; raises BlkBenchError unless every request completed OK with the right data."""
        if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
            raise UsageError(f"queue depth {queue_depth} outside 1..{MAX_QUEUE_DEPTH}")
        if disk.blocks * BLOCK // c.VIRTIO_BLK_SECTOR_SIZE > self.capacity:
            raise BlkBenchError(f"{disk.name}: the disk has {self.capacity} sectors, fewer than the benchmark's")
        lay = self.lay
        if op == "write":
            disk.epoch += 1
        lay[L_QD] = queue_depth
        lay[L_OP] = OPS[op]
        lay[L_SEQUENTIAL] = sequential
        lay[L_BLOCKS] = disk.blocks
        lay[L_RNG] = disk.rng.integers(1, 1 << 62)
        lay[L_SEED] = disk.seed
        lay[L_EPOCH] = disk.epoch
        lay[L_RUN_CYCLES] = int(seconds * self.hz)
        lay[L_STALL_CYCLES] = int(stall * self.hz)
        self.hist[:] = 0
        drive(lay, self.slots, disk.expected, self.hist, self.result)
        r = self.result
        what = f"{disk.name}: {'sequential' if sequential else 'random'} {op} at queue depth {queue_depth}"
        if r[R_STALLED]:
            raise BlkBenchError(f"{what}: no completion for {stall:.0f} s after {r[R_DONE]} requests")
        problems = {
            "status bytes other than VIRTIO_BLK_S_OK": r[R_BAD_STATUS],
            "wrong used entries (id or length)": r[R_BAD_USED],
            f"blocks with wrong data (first: block {r[R_FIRST_BAD_BLOCK]})": r[R_BAD_DATA],
        }
        for problem, count in problems.items():
            if count:
                raise BlkBenchError(f"{what}: {count} {problem} in {r[R_DONE]} requests")
        if sequential and r[R_DONE] != disk.blocks:
            raise BlkBenchError(f"{what}: {r[R_DONE]} requests completed, expected {disk.blocks}")
        elapsed = max(1, r[R_END] - r[R_START]) / self.hz
        return RunStats(
            r[R_DONE] / elapsed, *self._percentiles((0.5, 0.99)), kicks=int(r[R_KICKS]), requests=int(r[R_DONE])
        )

    def _percentiles(self, fractions: Iterable[float]) -> list[float]:
        counts = np.cumsum(self.hist)
        total = counts[-1]
        bucket_us = self.lay[L_BUCKET_CYCLES] / self.hz * 1e6
        # The last bucket holds everything slower: a percentile there is reported as LATENCY_CAP_US.
        return [min(LATENCY_CAP_US, (int(np.searchsorted(counts, f * total)) + 0.5) * bucket_us) for f in fractions]

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()  # the back-end resets the device and stops using our fds
            self.client = None
        for fd in (self.kick, self.call):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick = self.call = -1
        self.memory.close()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Disk:
    """What the driver knows of one back-end's disk: the epoch each block was last written in."""

    name: str
    blocks: int
    seed: int
    epoch: int = 0
    expected: np.ndarray = field(init=False)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.expected = np.zeros(self.blocks, dtype=np.int64)
        self.rng = np.random.default_rng(self.seed)


# --- the back-ends ---


def find_qsd(say: Callable[[str], None] = lambda text: None) -> str:
    return require_program("qemu-storage-daemon", QSD_PACKAGES, say)


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit from their creator)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), {cpu})


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (both back-ends stop cleanly on it), SIGKILL if that takes over 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Backend:
    """A running back-end process serving ``socket_path``, and the disk it holds."""

    name: str
    socket_path: str
    proc: subprocess.Popen
    disk: Disk
    log_path: str
    image: str | None = None  # the peer's image file (vdpasim's RAM disk is a memfd of its process)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BlkBenchError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-20:])
        except OSError:
            return ""


@contextlib.contextmanager
def _process(
    name: str, argv: list[str], socket_path: str, cpu: int, disk: Disk, workdir: str, image: str | None = None
) -> Iterator[Backend]:
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    backend = Backend(name, socket_path, proc, disk, log_path, image)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(socket_path):
            backend.check()
            if time.monotonic() > deadline:
                raise BlkBenchError(f"{name} did not create {socket_path}:\n{backend.log_tail()}")
            time.sleep(0.02)
        _pin(proc.pid, cpu)
        yield backend
    finally:
        _stop(proc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


@contextlib.contextmanager
def vdpasim_backend(workdir: str, cpu: int, blocks: int, seed: int, *, busy_poll: bool) -> Iterator[Backend]:
    """A vdpasim BlkDevice (RAM disk) served over vhost-user by a child process pinned to ``cpu``."""
    socket_path = os.path.join(workdir, "vdpasim.sock")
    argv = [sys.executable, "-m", "vdpasim.bench.blk", socket_path, "--sectors", str(blocks * BLOCK // 512)]
    if busy_poll:
        argv.append("--busy-poll")
    with _process("vdpasim", argv, socket_path, cpu, Disk("vdpasim", blocks, seed), workdir) as backend:
        yield backend


@contextlib.contextmanager
def qsd_backend(
    workdir: str,
    cpu: int,
    blocks: int,
    seed: int,
    *,
    aio: str = QSD_AIO,
    direct: bool = QSD_DIRECT,
    poll_max_ns: int = QSD_POLL_MAX_NS,
    iothread: bool = True,
) -> Iterator[Backend]:
    """qemu-storage-daemon exporting a raw image on tmpfs as vhost-user-blk, in an iothread (see QSD_*)."""
    socket_path = os.path.join(workdir, "qsd.sock")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else workdir
    fd, image = tempfile.mkstemp(prefix="vdpasim-bench-blk-", suffix=".img", dir=shm)
    with os.fdopen(fd, "wb") as f:
        f.truncate(blocks * BLOCK)
    argv = [
        find_qsd(),
        *(["--object", f"iothread,id=io0,poll-max-ns={poll_max_ns}"] if iothread else []),
        "--blockdev",
        f"driver=file,filename={image},node-name=disk,aio={aio},cache.direct={'on' if direct else 'off'}",
        "--export",
        f"type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={socket_path},"
        "writable=on,num-queues=1" + (",iothread=io0" if iothread else ""),
    ]
    try:
        disk = Disk("qemu-storage-daemon", blocks, seed)
        with _process("qemu-storage-daemon", argv, socket_path, cpu, disk, workdir, image) as backend:
            yield backend
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)


# --- the benchmark ---


@dataclass
class Result:
    op: str
    queue_depth: int
    vdpasim: list[RunStats] = field(default_factory=list)
    peer: list[RunStats] = field(default_factory=list)

    @property
    def case(self) -> str:
        return f"rand{self.op}-qd{self.queue_depth}"

    @staticmethod
    def _median(runs: list[RunStats], what: str) -> float:
        return statistics.median(getattr(r, what) for r in runs)

    def median(self, side: str, what: str) -> float:
        return self._median(getattr(self, side), what)

    def kicks_per_request(self, side: str) -> float:
        runs = getattr(self, side)
        return sum(r.kicks for r in runs) / max(1, sum(r.requests for r in runs))

    @property
    def ratio(self) -> float:
        peer = self.median("peer", "iops")
        return self.median("vdpasim", "iops") / peer if peer else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case,
            "op": self.op,
            "queue_depth": self.queue_depth,
            "vdpasim_iops": round(self.median("vdpasim", "iops")),
            "peer_iops": round(self.median("peer", "iops")),
            "ratio": round(self.ratio, 4),
            "vdpasim_p50_us": round(self.median("vdpasim", "p50_us"), 2),
            "vdpasim_p99_us": round(self.median("vdpasim", "p99_us"), 2),
            "peer_p50_us": round(self.median("peer", "p50_us"), 2),
            "peer_p99_us": round(self.median("peer", "p99_us"), 2),
            "runs": len(self.vdpasim),
            "vdpasim_runs_iops": [round(r.iops) for r in self.vdpasim],
            "peer_runs_iops": [round(r.iops) for r in self.peer],
            "vdpasim_kicks_per_request": round(self.kicks_per_request("vdpasim"), 4),
            "peer_kicks_per_request": round(self.kicks_per_request("peer"), 4),
        }


def run_benchmark(
    ops: Iterable[str] = ("read", "write"),
    queue_depths: Iterable[int] = (32, 1),
    *,
    runs: int = 5,
    seconds: float = 2.0,
    warmup: float = 0.5,
    disk_mib: int = DEFAULT_DISK_MIB,
    busy_poll: bool = True,
    seed: int = 1,
    corrupt: Callable[[Backend], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Alternate vdpasim and qemu-storage-daemon for every (op, queue depth); ``runs`` runs per side.

    ``corrupt`` (tests) is called with each back-end after its disk was filled, before any measurement.
    """
    ops, queue_depths = list(ops), list(queue_depths)
    if runs < 1 or seconds <= 0 or warmup < 0:
        raise UsageError("runs must be at least 1, seconds positive, warmup not negative")
    for op in ops:
        if op not in OPS:
            raise UsageError(f"unknown op {op!r} (read or write)")
    for qd in queue_depths:
        if not 1 <= qd <= MAX_QUEUE_DEPTH:
            raise UsageError(f"queue depth {qd} outside 1..{MAX_QUEUE_DEPTH}")
    if not 1 <= disk_mib <= 4096:
        raise UsageError("disk size must be 1..4096 MiB")
    say = progress or (lambda text: None)
    find_qsd(say)
    blocks = disk_mib * (1 << 20) // BLOCK
    back_cpu, front_cpu = pick_cpus()
    affinity = os.sched_getaffinity(0)
    workdir = tempfile.mkdtemp(prefix="vdpasim-bench-blk-")
    results: list[Result] = []
    try:
        os.sched_setaffinity(0, {front_cpu})
        hz = cycle_rate()
        say(f"cycle counter {hz / 1e9:.3f} GHz; back-ends on CPU {back_cpu}, driver on CPU {front_cpu}")
        with (
            vdpasim_backend(workdir, back_cpu, blocks, seed, busy_poll=busy_poll) as vdpasim,
            qsd_backend(workdir, back_cpu, blocks, seed) as peer,
        ):
            sides = {"vdpasim": vdpasim, "peer": peer}

            def session(side: str, timeout: float = START_TIMEOUT) -> Harness:
                backend = sides[side]
                backend.check()
                return Harness(backend.socket_path, hz, timeout=timeout)

            for side, backend in sides.items():
                say(f"{backend.name}: filling {disk_mib} MiB (sequential writes, verified by the reads that follow)")
                with session(side, FIRST_STALL_SECONDS) as h:
                    h.run(backend.disk, "write", 32, sequential=True, stall=FIRST_STALL_SECONDS)
                    if corrupt is not None:
                        corrupt(backend)
            for op in ops:
                for qd in queue_depths:
                    result = Result(op, qd)
                    for run in range(runs):
                        for side in alternation(run):
                            backend = sides[side]
                            say(f"{result.case}: run {run + 1}/{runs}, {backend.name}")
                            with session(side) as h:
                                if warmup:
                                    h.run(backend.disk, op, qd, seconds=warmup)
                                stats = h.run(backend.disk, op, qd, seconds=seconds)
                            getattr(result, side).append(stats)
                        say(
                            f"{result.case}: run {run + 1}/{runs}: vdpasim {result.vdpasim[-1].iops / 1e3:.1f}k IOPS "
                            f"p50 {result.vdpasim[-1].p50_us:.1f} us, qemu-storage-daemon "
                            f"{result.peer[-1].iops / 1e3:.1f}k IOPS p50 {result.peer[-1].p50_us:.1f} us"
                        )
                    results.append(result)
            for side, backend in sides.items():
                say(f"{backend.name}: reading back all {blocks} blocks")
                with session(side) as h:
                    h.run(backend.disk, "read", 32, sequential=True)
    finally:
        os.sched_setaffinity(0, affinity)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _us(value: float) -> str:
    return f">={LATENCY_CAP_US:.0f}" if value >= LATENCY_CAP_US else f"{value:.1f}"


def command(args: argparse.Namespace) -> int:
    """The ``vdpasim bench blk`` handler: progress on stderr, a JSON list or a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    errors = Console(stderr=True)
    try:
        results = run_benchmark(
            args.op or ["read", "write"],
            args.qd or [32, 1],
            runs=args.runs,
            seconds=args.seconds,
            warmup=args.warmup,
            disk_mib=args.disk_mib,
            busy_poll=not args.no_busy_poll,
            progress=progress_printer(errors),
        )
    except (UsageError, BlkBenchError) as exc:
        errors.print(f"vdpasim bench blk: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    mode = "kicks" if args.no_busy_poll else "busy-poll"
    title = (
        f"4 KiB random I/O, one queue, medians of {args.runs} alternations "
        f"(vdpasim: RAM disk, {mode}; qemu-storage-daemon: tmpfs image, iothread polling, aio={QSD_AIO})"
    )
    if args.plot:
        from .plot import plot_medians

        sides = {
            "vdpasim": [[x.iops / 1e3 for x in r.vdpasim] for r in results],
            "qemu-storage-daemon": [[x.iops / 1e3 for x in r.peer] for r in results],
        }
        plot_medians(args.plot, title, "kIOPS", [r.case for r in results], sides)
    if args.json:
        print_json(r.as_dict() for r in results)
        return 0
    table = Table(title=title)
    columns = (
        "op",
        "QD",
        "vdpasim kIOPS",
        "QSD kIOPS",
        "vdpasim/QSD",
        "vdpasim p50/p99 us",
        "QSD p50/p99 us",
        "vdpasim range",
        "QSD range",
    )
    for name in columns:
        table.add_column(name, justify="left" if name == "op" else "right")
    for r in results:
        v, p = [x.iops / 1e3 for x in r.vdpasim], [x.iops / 1e3 for x in r.peer]
        table.add_row(
            r.op,
            str(r.queue_depth),
            f"{r.median('vdpasim', 'iops') / 1e3:.1f}",
            f"{r.median('peer', 'iops') / 1e3:.1f}",
            f"{r.ratio:.2f}",
            f"{_us(r.median('vdpasim', 'p50_us'))} / {_us(r.median('vdpasim', 'p99_us'))}",
            f"{_us(r.median('peer', 'p50_us'))} / {_us(r.median('peer', 'p99_us'))}",
            f"{min(v):.1f}-{max(v):.1f}",
            f"{min(p):.1f}-{max(p):.1f}",
        )
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # a pipe or file: no 80-column squeeze
    return 0


# --- the vdpasim back-end process ---


def serve(argv: list[str] | None = None) -> int:
    """``python -m vdpasim.bench.blk SOCKET --sectors N [--busy-poll]``: serve a RAM-disk BlkDevice until SIGTERM."""
    from bridge.vhost_user.server import VhostUserServer

    from ..config import BlkConfig
    from ..devices.blk import BlkDevice

    parser = argparse.ArgumentParser(prog="python -m vdpasim.bench.blk")
    parser.add_argument("socket")
    parser.add_argument("--sectors", type=int, required=True)
    parser.add_argument("--busy-poll", action="store_true")
    args = parser.parse_args(argv)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    device = BlkDevice(BlkConfig(name="bench-blk", capacity=args.sectors, busy_poll=args.busy_poll))
    server = VhostUserServer(device, args.socket)
    try:
        server.start()
        while not stop:
            time.sleep(0.2)
    finally:
        server.stop()
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
