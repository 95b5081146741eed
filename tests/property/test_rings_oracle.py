"""The compiled ring kernels (jit/) against the pure-Python reference (rings/), on generated histories.

Each example builds one queue twice, in two identical guest memories, and replays one generated
history of driver and device operations on both: the driver kit acts identically on each memory, the
device operations run the compiled kernel on the first and the oracle on the second. After every step
the two must agree on the return values, on every field of the queue record (except the host
addresses of the ring areas) and on every byte of guest memory.

Histories mix valid buffers (chains of any length, readable/writable mixes, indirect tables), queue
start points near the split index wrap and at any packed position and wrap counter, event-index and
flags-based suppression on both sides, out-of-order completions, and malformed chains made by
corrupting a buffer right after the driver posted it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from vdpasim.jit import chain as jit_chain
from vdpasim.jit import echo as jit_echo
from vdpasim.jit import vq as jit_vq
from vdpasim.rings import chain as ref_chain
from vdpasim.rings import echo as ref_echo
from vdpasim.rings import vq as ref_vq
from vdpasim.testing.driver import DriverQueue, GuestMemory, make_device_queue
from vdpasim.virtio.constants import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

GUEST_ADDR = 0x100000
MEM_SIZE = 1 << 16
RO_ADDR = 0x400000  # a read-only region: fine to read from, a fault to write to
RO_SIZE = 0x1000
# Addresses a corrupted element may take: outside memory, straddling its end, past 2**63, in read-only memory.
BAD_ADDRS = (0, GUEST_ADDR - 8, GUEST_ADDR + MEM_SIZE - 4, GUEST_ADDR + MEM_SIZE, 1 << 63, (1 << 64) - 8, RO_ADDR + 16)
HOST_FIELDS = ("desc", "driver", "device")
SETTINGS = settings(
    max_examples=1200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- generated histories ---
@dataclass(frozen=True)
class Config:
    packed: bool
    size: int
    event_idx: bool
    indirect: bool
    start: int
    wrap: int


split_configs = st.builds(
    Config,
    packed=st.just(False),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    start=st.one_of(st.integers(65536 - 8, 65535), st.integers(65536 - 40, 65535), st.integers(0, 65535)),
    wrap=st.just(1),
)


@st.composite
def packed_configs(draw: st.DrawFn) -> Config:
    size = draw(st.integers(1, 12))
    return Config(
        True, size, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, size - 1)), draw(st.integers(0, 1))
    )


# One buffer in six is corrupted (a fault stops the queue for good, so most histories go on longer).
_CORRUPTIONS = ("addr", "len", "flags", "next", "id", "table")
# How often each operation is drawn, out of 30.
_WEIGHTS = {
    "add": 8,
    "echo": 4,
    "used": 4,
    "pop": 2,
    "push": 2,
    "publish": 1,
    "needs_notify": 1,
    "enable_notify": 1,
    "disable_notify": 1,
    "has_avail": 1,
    "kick_wanted": 1,
    "no_interrupt": 1,
    "used_event": 1,
    "driver_flags": 1,
    "raw": 1,
}
_KINDS = [kind for kind, weight in _WEIGHTS.items() for _ in range(weight)]


class _Digits:
    """Reads mixed-radix digits off one big integer: one hypothesis draw per operation keeps generation cheap."""

    def __init__(self, value: int) -> None:
        self.value = value

    def take(self, n: int) -> int:
        self.value, digit = divmod(self.value, n)
        return digit


def decode(value: int) -> tuple:
    """The operation an integer stands for; 0 decodes to the simplest add (what shrinking aims at)."""
    d = _Digits(value)
    kind = _KINDS[d.take(len(_KINDS))]
    if kind == "add":
        readable = [d.take(41) for _ in range(d.take(5))]
        writable = [d.take(41) for _ in range(d.take(5))]
        indirect = bool(d.take(2))
        corruption = None
        if d.take(6) == 5:
            corruption = (_CORRUPTIONS[d.take(len(_CORRUPTIONS))], d.take(8), d.take(len(BAD_ADDRS)))
        return ("add", readable, writable, indirect, corruption)
    parameters = {
        "echo": (d.take(7),),
        "push": (d.take(16), d.take(3)),
        "no_interrupt": (bool(d.take(2)),),
        "used_event": (d.take(23) - 2,),
        "driver_flags": (d.take(4),),
        "raw": (d.take(8), d.take(21)),
    }
    return (kind, *parameters.get(kind, ()))


@st.composite
def histories(draw: st.DrawFn) -> list[tuple]:
    # An explicit length: lists drawn by hypothesis stay short, and wrap-around needs traffic.
    length = draw(st.integers(6, 48))
    history = [decode(draw(st.integers(0, (1 << 96) - 1))) for _ in range(length)]
    note(f"history: {history}")
    return history


# --- the two sides ---
def _outcome(call: Callable[[], Any]) -> Any:
    """A call's result, or its exception as comparable data."""
    try:
        return call()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


class Side:
    """One memory, its driver queue and its device queue."""

    def __init__(self, config: Config) -> None:
        self.memory = GuestMemory(MEM_SIZE, GUEST_ADDR, extra_regions=[(RO_ADDR, RO_SIZE, False)])
        self.dq = DriverQueue(
            self.memory,
            config.size,
            packed=config.packed,
            event_idx=config.event_idx,
            indirect=config.indirect,
            start=config.start,
            wrap=config.wrap,
        )
        self.vq = make_device_queue(self.dq)

    def guest_iov(self, n: int) -> list[tuple[int, int, int]]:
        """iov rows as guest addresses (host addresses differ between the two memories)."""
        rows = []
        for host, length, writable in self.vq.iov[:n].tolist():
            region = next(r for r in self.memory.table.regions if r.host_addr <= host < r.host_addr + r.size)
            rows.append((region.guest_addr + host - region.host_addr, length, writable))
        return rows

    def record(self) -> dict[str, int]:
        record = self.vq.record
        return {name: int(record[name]) for name in record.dtype.names if name not in HOST_FIELDS}

    def close(self) -> None:
        self.memory.close()


class Pair:
    """The same queue in two memories: the compiled kernels drive ``jit``, the oracle drives ``ref``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.jit = Side(config)
        self.ref = Side(config)
        self.popped: list[tuple[int, int, int]] = []  # (id, ring descriptors, writable bytes), not yet pushed

    def close(self) -> None:
        self.jit.close()
        self.ref.close()

    def both(self, action: Callable[[Side], Any]) -> Any:
        """Run a driver-side action on both sides; they must agree."""
        a, b = _outcome(lambda: action(self.jit)), _outcome(lambda: action(self.ref))
        assert a == b
        return a

    def device(self, compiled: Callable[..., Any], reference: Callable[..., Any], *args: Any) -> Any:
        a = compiled(self.jit.vq.record, *args)
        b = reference(self.ref.vq.record, *args)
        assert a == b
        return a

    def check(self) -> None:
        assert self.jit.record() == self.ref.record()
        assert self.jit.memory.snapshot() == self.ref.memory.snapshot()

    # --- operations ---
    def run(self, op: tuple) -> None:
        getattr(self, "op_" + op[0])(*op[1:])
        self.check()

    def op_add(self, readable: list[int], writable: list[int], indirect: bool, corruption: tuple | None) -> None:
        if not readable and not writable:
            writable = [8]
        if indirect and not self.config.indirect:
            indirect = len(readable) == 3  # now and then post a table anyway: a fault
        data = [bytes((17 * n + i) & 0xFF for i in range(n)) for n in readable]
        buffer_id = self.both(lambda s: s.dq.add(data, writable, indirect=indirect))
        if isinstance(buffer_id, int) and corruption is not None:
            self.both(lambda s: _corrupt(s.dq, buffer_id, corruption))

    def op_echo(self, budget: int) -> None:
        a = jit_echo.echo_burst(self.jit.vq.state, self.jit.memory.table.rows, self.jit.vq.iov, budget)
        b = ref_echo.echo_burst(self.ref.vq.state, self.ref.memory.table, self.ref.vq.iov, budget)
        assert a == b

    def op_pop(self) -> None:
        a = jit_vq.vq_pop(self.jit.vq.record, self.jit.memory.table.rows, self.jit.vq.iov)
        b = ref_vq.vq_pop(self.ref.vq.record, self.ref.memory.table, self.ref.vq.iov)
        assert a == b
        status, head, ndesc, n, readable = a
        if status == 0:
            rows = self.jit.guest_iov(n)
            assert rows == self.ref.guest_iov(n)
            self.popped.append((head, ndesc, sum(length for _, length, _ in rows[readable:])))

    def op_push(self, which: int, how: int) -> None:
        if not self.popped:
            return
        head, ndesc, room = self.popped.pop(which % len(self.popped))
        written = (0, room // 2, room)[how]
        self.device(jit_vq.vq_push, ref_vq.vq_push, head, ndesc, written)

    def op_publish(self) -> None:
        self.device(jit_vq.vq_publish, ref_vq.vq_publish)

    def op_needs_notify(self) -> None:
        self.device(jit_vq.vq_needs_notify, ref_vq.vq_needs_notify)

    def op_enable_notify(self) -> None:
        self.device(jit_vq.vq_enable_notify, ref_vq.vq_enable_notify)

    def op_disable_notify(self) -> None:
        self.device(jit_vq.vq_disable_notify, ref_vq.vq_disable_notify)

    def op_has_avail(self) -> None:
        self.device(jit_vq.vq_has_avail, ref_vq.vq_has_avail)

    def op_used(self) -> None:
        self.both(lambda s: s.dq.used())

    def op_kick_wanted(self) -> None:
        self.both(lambda s: s.dq.kick_wanted())

    def op_no_interrupt(self, on: bool) -> None:
        self.both(lambda s: s.dq.set_no_interrupt(on))

    def op_used_event(self, ahead: int) -> None:
        def set_event(side: Side) -> None:
            dq = side.dq
            if dq.packed:
                position = dq.next_used + ahead % dq.size
                dq.set_used_event(position % dq.size, dq.used_wrap ^ (position >= dq.size))
            else:
                dq.set_used_event(dq.last_used + ahead)

        self.both(set_event)

    def op_driver_flags(self, flags: int) -> None:
        if self.config.packed:
            self.both(lambda s: s.dq.set_driver_event_flags(flags))

    def op_raw(self, kind: int, value: int) -> None:
        """Split only, now and then: a raw available entry naming any descriptor, or an idx jumping ahead."""
        if self.config.packed:
            return
        if kind == 0:
            self.both(lambda s: s.dq.publish(value))  # in use, free, or past the table
        elif kind == 1 and value < 4:
            self.both(lambda s: s.dq.set_avail_idx(s.dq.avail_idx + s.dq.size + 1 + value))


def _corrupt(dq: DriverQueue, buffer_id: int, corruption: tuple) -> None:
    """Break a freshly posted buffer the way ``corruption`` says, before the device reads it."""
    kind, which, choice = corruption
    memory = dq.memory
    ring = dq.descriptors(buffer_id)
    table = dq.indirect_table(buffer_id)
    ring_addrs = [dq.desc_addr_of(i) for i in ring]
    if table is not None:
        count = memory.read_u32(ring_addrs[0] + 8) // 16
        elements = [table + 16 * k for k in range(count)]
    else:
        count = dq.size
        elements = ring_addrs
    # Field offsets of struct virtq_desc and struct pvirtq_desc.
    flags_at, link_at = (14, 12) if dq.packed else (12, 14)
    element = elements[which % len(elements)]
    if kind == "addr":
        memory.write(element, struct.pack("<Q", BAD_ADDRS[choice % len(BAD_ADDRS)]))
    elif kind == "len":
        length = memory.read_u32(element + 8)
        memory.write_u32(element + 8, (0, length // 2, 0xFFFFFFFF, 0x80000000)[choice % 4])
    elif kind == "flags":
        bit = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT)[choice % 3]
        memory.write_u16(element + flags_at, memory.read_u16(element + flags_at) ^ bit)
    elif kind == "next" and not dq.packed:
        # Link an element to the chain's first (a loop), to itself, or past the table.
        first = 0 if table is not None else ring[0]
        here = elements.index(element) if table is not None else ring[elements.index(element)]
        target = (first, here, count + choice, count - 1)[choice % 4]
        memory.write_u16(element + flags_at, memory.read_u16(element + flags_at) | VIRTQ_DESC_F_NEXT)
        memory.write_u16(element + link_at, target)
    elif kind == "id" and dq.packed:
        memory.write_u16(ring_addrs[-1] + link_at, dq.size + choice)
    elif kind == "table" and table is not None:
        head = ring_addrs[0]
        if choice < 4:
            length = memory.read_u32(head + 8)
            memory.write_u32(head + 8, (0, 8, length + 8, length - 16)[choice])
        else:
            bit = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT)[choice - 4]
            memory.write_u16(head + flags_at, memory.read_u16(head + flags_at) ^ bit)


def _replay(config: Config, history: list[tuple]) -> None:
    pair = Pair(config)
    try:
        pair.check()
        for op in history:
            pair.run(op)
        # Finally drain what is left, so every history ends with used buffers handed back and read.
        pair.op_echo(64)
        pair.check()
        pair.op_used()
    finally:
        pair.close()


@SETTINGS
@given(config=split_configs, history=histories())
def test_split_kernels_match_the_oracle(config: Config, history: list[tuple]) -> None:
    _replay(config, history)


@SETTINGS
@given(config=packed_configs(), history=histories())
def test_packed_kernels_match_the_oracle(config: Config, history: list[tuple]) -> None:
    _replay(config, history)


def test_histories_reach_wrap_faults_and_suppression() -> None:
    """The generated histories are not vacuous: a fixed long history wraps, faults and suppresses."""
    config = Config(True, 3, True, True, 2, 0)
    history: list[tuple] = []
    for i in range(12):
        history += [("add", [5, 3], [9], i % 2 == 0, None), ("used_event", 1), ("echo", 2), ("used",)]
        history += [("needs_notify",), ("kick_wanted",), ("enable_notify",)]
    history += [("add", [4], [4], False, ("id", 0, 1)), ("echo", 4)]
    pair = Pair(config)
    try:
        for op in history:
            pair.run(op)
        record = pair.jit.vq.record
        assert int(record["packets"]) == 12
        assert int(record["error"]) != 0  # the corrupted buffer id was refused
        assert pair.jit.vq.fault() is not None
        # 26 slots posted from position 2 in lap 0: the ring went round 9 times.
        assert (pair.jit.dq.next_avail, pair.jit.dq.avail_wrap) == (1, 1)
    finally:
        pair.close()


def test_oracle_and_kernel_agree_on_split_wrap_of_the_free_running_index() -> None:
    config = Config(False, 4, True, False, 65534, 1)
    pair = Pair(config)
    try:
        for _ in range(5):
            pair.run(("add", [3], [3, 2], False, None))
            pair.run(("echo", 1))
            pair.run(("used",))
        assert int(pair.jit.vq.record["last_avail"]) == 3  # 65534 + 5, modulo 65536
        assert np.array_equal(pair.jit.vq.state["used_idx"], pair.ref.vq.state["used_idx"])
    finally:
        pair.close()


# --- scatter-gather helpers ---
IOV_MEM = 0x2000
FLAT = 0x1000  # offset of a flat buffer for gather/scatter; iov rows live below it


@st.composite
def iov_layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Two disjoint lists of (offset, length) rows below FLAT: a source and a destination chain."""
    rows: list[tuple[int, int]] = []
    offset = 0
    for _ in range(draw(st.integers(2, 12))):
        offset += draw(st.integers(0, 24))  # gaps between buffers
        length = draw(st.integers(0, 96))
        rows.append((offset, length))
        offset += length
    split = draw(st.integers(1, len(rows) - 1))
    return rows[:split], rows[split:]


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(
    layout=iov_layouts(),
    operation=st.sampled_from(["gather", "scatter", "fill", "copy"]),
    skips=st.tuples(st.integers(0, 200), st.integers(0, 200)),
    length=st.integers(0, 600),
    byte=st.integers(0, 255),
)
def test_iov_helpers_match_the_oracle(
    layout: tuple[list[tuple[int, int]], list[tuple[int, int]]],
    operation: str,
    skips: tuple[int, int],
    length: int,
    byte: int,
) -> None:
    results = []
    snapshots = []
    for implementation in (jit_chain, ref_chain):
        with GuestMemory(IOV_MEM, GUEST_ADDR) as memory:
            memory.write(GUEST_ADDR, bytes((i * 7 + 3) & 0xFF for i in range(IOV_MEM)))
            base = memory.region.host_addr
            iovs = []
            for rows in layout:
                iov = np.zeros((len(rows), 3), dtype=np.int64)
                for i, (offset, size) in enumerate(rows):
                    iov[i] = (base + offset, size, 1)
                iovs.append(iov)
            src, dst = iovs
            skip, other_skip = skips
            if operation == "gather":
                result = implementation.iov_gather(src, 0, len(src), skip, base + FLAT, min(length, IOV_MEM - FLAT))
            elif operation == "scatter":
                result = implementation.iov_scatter(dst, 0, len(dst), skip, base + FLAT, min(length, IOV_MEM - FLAT))
            elif operation == "fill":
                result = implementation.iov_fill(dst, 0, len(dst), skip, byte, length)
            else:
                result = implementation.iov_copy(dst, 0, len(dst), skip, src, 0, len(src), other_skip, length)
            results.append((result, implementation.iov_length(src, 0, len(src))))
            snapshots.append(memory.snapshot())
    assert results[0] == results[1]
    assert snapshots[0] == snapshots[1]
