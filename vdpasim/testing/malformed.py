"""Malformed descriptor-chain layouts, one per way a driver can break the virtqueue contract.

Each ``Case`` writes its layout with the driver kit's raw writers and returns what the device must
report: the RingStatus, the descriptor index and the address. Shared by the kernel/oracle tests and
the device-level tests (NEEDS_RESET on a running device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..rings.state import MAX_CHAIN, RingStatus
from ..virtio.constants import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .driver import DriverQueue, GuestMemory

__all__ = ["CASES", "Case", "Setup", "GUEST", "MEM", "END", "RO", "SIZE", "NEXT", "WRITE", "INDIRECT"]

GUEST = 0x100000
MEM = 1 << 16
END = GUEST + MEM
RO = 0x400000
SIZE = 8
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@dataclass
class Setup:
    memory: GuestMemory
    dq: DriverQueue

    def buffer(self, n: int = 64) -> int:
        return self.memory.alloc(n)

    def table(self, descs: list[tuple[int, int, int, int]]) -> int:
        """An indirect table of raw descriptors (addr, len, flags, next_or_id); its guest address."""
        addr = self.memory.alloc(16 * max(len(descs), 1))
        self.dq.write_table(addr, descs)
        return addr

    def chain(self, descs: list[tuple[int, int, int, int]]) -> None:
        """Make raw descriptors available: split at table indices 0.., packed at the next ring slots."""
        dq = self.dq
        if dq.packed:
            head = dq.next_avail
            for i, desc in enumerate(descs):
                dq.write_desc((head + i) % dq.size, *desc)
            dq.publish(head, len(descs))
        else:
            for i, desc in enumerate(descs):
                dq.write_desc(i, *desc)
            dq.publish(0)


@dataclass(frozen=True)
class Case:
    """One malformed layout: ``build`` writes it and returns the expected (status, descriptor, address)."""

    name: str
    packed: bool
    build: Callable[[Setup], tuple[RingStatus, int, int]]
    indirect: bool = True
    guest_addr: int = GUEST


CASES: list[Case] = []


def case(name: str, *, layouts: tuple[bool, ...] = (False, True), **options) -> Callable:
    def register(build: Callable[[Setup], tuple[RingStatus, int, int]]) -> Callable:
        for packed in layouts:
            CASES.append(Case(f"{'packed' if packed else 'split'}-{name}", packed, build, **options))
        return build

    return register


# --- addresses ---
@case("buffer-outside-memory")
def _(s: Setup):
    s.chain([(s.buffer(), 16, NEXT, 1), (END, 16, WRITE, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 1, END


@case("buffer-straddling-the-end")
def _(s: Setup):
    s.chain([(END - 8, 16, 0, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 0, END - 8


@case("buffer-below-memory")
def _(s: Setup):
    s.chain([(GUEST - 16, 16, 0, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 0, GUEST - 16


@case("buffer-address-above-2**63")
def _(s: Setup):
    s.chain([(0xFFFF_FFFF_FFFF_F000, 16, 0, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 0, 0xFFFF_FFFF_FFFF_F000


@case("buffer-wrapping-around-2**64-onto-memory-at-0", guest_addr=0)
def _(s: Setup):
    s.chain([((1 << 64) - 16, 64, 0, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 0, (1 << 64) - 16


@case("indirect-table-outside-memory")
def _(s: Setup):
    s.chain([(END + 0x1000, 32, INDIRECT, 0)])
    return RingStatus.ADDR_OUT_OF_RANGE, 0, END + 0x1000


@case("writable-buffer-in-read-only-memory")
def _(s: Setup):
    # Reading read-only memory is fine; writing it is not.
    s.chain([(RO, 16, NEXT, 1), (RO + 64, 16, WRITE, 0)])
    return RingStatus.READ_ONLY_MEMORY, 1, RO + 64


# --- loops and indices ---
@case("loop", layouts=(False,))
def _(s: Setup):
    a, b = s.buffer(), s.buffer()
    s.chain([(a, 8, NEXT, 1), (b, 8, NEXT, 0)])
    # Visits 0, 1, 0, 1... the ninth visit (one more than the table holds) is refused.
    return RingStatus.CHAIN_LOOP, 0, a


@case("loop-inside-an-indirect-table", layouts=(False,))
def _(s: Setup):
    a, b = s.buffer(), s.buffer()
    table = s.table([(a, 8, NEXT, 1), (b, 8, NEXT, 0)])
    s.chain([(table, 32, INDIRECT, 0)])
    return RingStatus.CHAIN_LOOP, 0, a


@case("list-longer-than-the-ring", layouts=(True,))
def _(s: Setup):
    # Every slot says NEXT: the list would go round the ring for ever.
    buffer = s.buffer()
    s.chain([(buffer, 4, NEXT, 0)] * SIZE)
    return RingStatus.CHAIN_LOOP, 0, buffer


@case("head-past-the-table", layouts=(False,))
def _(s: Setup):
    s.dq.publish(SIZE)
    return RingStatus.INDEX_OUT_OF_RANGE, SIZE, 0


@case("next-past-the-table", layouts=(False,))
def _(s: Setup):
    a = s.buffer()
    s.chain([(a, 8, NEXT, SIZE)])
    return RingStatus.INDEX_OUT_OF_RANGE, SIZE, a


@case("next-past-the-indirect-table", layouts=(False,))
def _(s: Setup):
    a = s.buffer()
    table = s.table([(a, 8, NEXT, 2), (a, 8, 0, 0)])
    s.chain([(table, 32, INDIRECT, 0)])
    return RingStatus.INDEX_OUT_OF_RANGE, 2, a


@case("buffer-id-past-the-ring", layouts=(True,))
def _(s: Setup):
    a, b = s.buffer(), s.buffer()
    # The id that counts is the last descriptor's (§2.8.6).
    s.chain([(a, 8, NEXT, 0), (b, 8, WRITE, SIZE + 3)])
    return RingStatus.INDEX_OUT_OF_RANGE, SIZE + 3, b


@case("avail-index-too-far-ahead", layouts=(False,))
def _(s: Setup):
    s.dq.set_avail_idx(s.dq.avail_idx + SIZE + 1)
    return RingStatus.AVAIL_IDX_AHEAD, SIZE + 1, 0


# --- lengths ---
@case("total-length-over-4-GiB")
def _(s: Setup):
    a = s.buffer()
    s.chain([(a, 16, NEXT, 1), (a, 0xFFFF_FFF0, WRITE, 0)])
    return RingStatus.LENGTH_OVERFLOW, 1, a


@case("total-length-over-4-GiB-in-an-indirect-table")
def _(s: Setup):
    a = s.buffer()
    link = 0 if s.dq.packed else NEXT
    table = s.table([(a, 16, link, 1), (a, 0xFFFF_FFF0, WRITE, 0)])
    s.chain([(table, 32, INDIRECT, 0)])
    return RingStatus.LENGTH_OVERFLOW, 1, a


@case("zero-length-indirect-table")
def _(s: Setup):
    table = s.table([])
    s.chain([(table, 0, INDIRECT, 0)])
    return RingStatus.BAD_INDIRECT_LENGTH, 0, table


@case("indirect-table-of-partial-descriptors")
def _(s: Setup):
    table = s.table([(s.buffer(), 8, 0, 0), (s.buffer(), 8, 0, 0)])
    s.chain([(table, 24, INDIRECT, 0)])
    return RingStatus.BAD_INDIRECT_LENGTH, 0, table


@case("chain-longer-than-the-device-allows")
def _(s: Setup):
    a = s.buffer()
    link = 0 if s.dq.packed else NEXT
    descs = [(a, 1, link, i + 1) for i in range(MAX_CHAIN)] + [(a, 1, 0, 0)]
    table = s.table(descs)
    s.chain([(table, 16 * len(descs), INDIRECT, 0)])
    return RingStatus.CHAIN_TOO_LONG, MAX_CHAIN, a


# --- flags ---
@case("indirect-inside-indirect")
def _(s: Setup):
    inner = s.table([(s.buffer(), 8, 0, 0)])
    outer = s.table([(inner, 16, INDIRECT, 0)])
    s.chain([(outer, 16, INDIRECT, 0)])
    return RingStatus.NESTED_INDIRECT, 0, inner


@case("indirect-with-next")
def _(s: Setup):
    table = s.table([(s.buffer(), 8, 0, 0)])
    s.chain([(table, 16, INDIRECT | NEXT, 1), (s.buffer(), 8, 0, 0)])
    return RingStatus.INDIRECT_WITH_NEXT, 0, table


@case("indirect-without-the-feature", indirect=False)
def _(s: Setup):
    table = s.table([(s.buffer(), 8, 0, 0)])
    s.chain([(table, 16, INDIRECT, 0)])
    return RingStatus.INDIRECT_NOT_NEGOTIATED, 0, table


@case("write-before-read")
def _(s: Setup):
    a, b = s.buffer(), s.buffer()
    s.chain([(a, 8, WRITE | NEXT, 1), (b, 8, NEXT, 2), (a, 8, WRITE, 0)])
    return RingStatus.WRITE_BEFORE_READ, 1, b


@case("write-before-read-in-an-indirect-table")
def _(s: Setup):
    a, b = s.buffer(), s.buffer()
    link = 0 if s.dq.packed else NEXT
    table = s.table([(a, 8, WRITE | link, 1), (b, 8, 0, 0)])
    s.chain([(table, 32, INDIRECT, 0)])
    return RingStatus.WRITE_BEFORE_READ, 1, b


# --- running the cases ---
