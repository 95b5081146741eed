"""Pure-Python reference of descriptor chains (the test oracle of jit/chain.py), written to be read.

The compiled kernels flatten every check into one loop; here each rule is one statement next to the
VIRTIO 1.2 clause it enforces, in the spirit of rust-vmm's virtio-queue (``DescriptorChain`` with its
ttl, ``is_indirect`` and byte counter). Both sides must agree on every return value, every field of
the queue record and every byte of guest memory; hypothesis checks that (tests/property).

Conventions shared with jit/: a chain's elements become rows (host address, length, writable) of an
int64 ``iov`` array, device-readable rows first. Zero-length elements carry no data: they take no
row, need no valid address and do not count for the readable-before-writable rule (as vhost's
``translate_desc`` yields no iovec for them). When a chain breaks several rules, the first one met
walking the chain in order is reported, checks on one descriptor in the order of ``ChainBuilder.add``.

Ring areas are read and written at the host addresses in the queue record (translated once, by
``Virtqueue.attach``); descriptor buffers are translated here, through ``RegionTable.find``. Python
needs no memory fences: it runs one thread at a time and x86 keeps stores in order.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..memory import RegionTable
from ..virtio.constants import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .state import MAX_CHAIN, RingStatus

__all__ = [
    "IOV_ADDR",
    "IOV_LEN",
    "IOV_WRITABLE",
    "DESC_SIZE",
    "MAX_CHAIN_BYTES",
    "Queue",
    "as_queue",
    "ChainFault",
    "Descriptor",
    "ChainBuilder",
    "new_iov",
    "fail",
    "translate",
    "add_buffer",
    "iov_length",
    "iov_gather",
    "iov_scatter",
    "iov_copy",
    "iov_fill",
    "load_u16",
    "load_u32",
    "load_u64",
    "store_u16",
    "store_u32",
]

IOV_ADDR, IOV_LEN, IOV_WRITABLE = 0, 1, 2
DESC_SIZE = 16
# §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"; used len is le32.
MAX_CHAIN_BYTES = 0xFFFFFFFF


# --- ring memory at host addresses ---
def load_u16(host: int) -> int:
    return ctypes.c_uint16.from_address(host).value


def load_u32(host: int) -> int:
    return ctypes.c_uint32.from_address(host).value


def load_u64(host: int) -> int:
    return ctypes.c_uint64.from_address(host).value


def store_u16(host: int, value: int) -> None:
    ctypes.c_uint16.from_address(host).value = value & 0xFFFF


def store_u32(host: int, value: int) -> None:
    ctypes.c_uint32.from_address(host).value = value & 0xFFFFFFFF


def _signed64(value: int) -> int:
    """A guest u64 as the int64 the record stores (the kernels see the same bit pattern)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --- the queue record ---
class Queue:
    """Attribute access to a QUEUE_DTYPE record with Python ints, so arithmetic never wraps silently."""

    __slots__ = ("record",)

    def __init__(self, record: np.void) -> None:
        object.__setattr__(self, "record", record)

    def __getattr__(self, name: str) -> int:
        return int(self.record[name])

    def __setattr__(self, name: str, value: int) -> None:
        self.record[name] = value


def as_queue(q: np.void | Queue) -> Queue:
    return q if isinstance(q, Queue) else Queue(q)


class ChainFault(Exception):
    """A rule of the spec the driver broke: which, at which descriptor, with which address."""

    def __init__(self, status: RingStatus, index: int, addr: int) -> None:
        super().__init__(f"{status.description} (descriptor {index}, address {addr:#x})")
        self.status = status
        self.index = index
        self.addr = addr


def fail(q: np.void | Queue, status: int, index: int, addr: int) -> int:
    """Record the first fault of a queue and return its status (later faults keep the first report)."""
    q = as_queue(q)
    if q.error == RingStatus.OK:
        q.error = int(status)
        q.error_index = index
        q.error_addr = _signed64(addr)
    return int(status)


@dataclass(frozen=True)
class Descriptor:
    """One descriptor as read from guest memory (split: ``next``; packed: ``next`` holds the buffer id)."""

    index: int  # position in its table (split) or ring (packed), or in an indirect table
    addr: int
    len: int
    flags: int
    next: int

    @classmethod
    def read_split(cls, host: int, index: int) -> Descriptor:
        """struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (§2.7.5)."""
        return cls(index, load_u64(host), load_u32(host + 8), load_u16(host + 12), load_u16(host + 14))

    @classmethod
    def read_packed(cls, host: int, index: int) -> Descriptor:
        """struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } (§2.8.13)."""
        return cls(index, load_u64(host), load_u32(host + 8), load_u16(host + 14), load_u16(host + 12))

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)

    @property
    def has_next(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_NEXT)

    @property
    def is_indirect(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_INDIRECT)

    def fault(self, status: RingStatus) -> ChainFault:
        return ChainFault(status, self.index, self.addr)


def translate(table: RegionTable, addr: int, length: int, writable: bool) -> int:
    """Host address of guest range [addr, addr+length): 0 outside memory, -1 writable in read-only memory.

    Guest addresses are u64 here, so an address >= 2**63 simply matches no region (no wrap-around).
    """
    hit = table.find(addr, length)
    if hit is None:
        return 0
    region, offset = hit
    if writable and not region.writable:
        return -1
    return region.host_addr + offset


def new_iov() -> np.ndarray:
    return np.zeros((MAX_CHAIN, 3), dtype=np.int64)


class ChainBuilder:
    """Collects a chain's elements into iov rows, enforcing the rules on each element."""

    def __init__(self, table: RegionTable, iov: np.ndarray, n: int = 0, readable: int = 0, total: int = 0) -> None:
        self.table = table
        self.iov = iov
        self.n = n  # iov rows filled
        self.readable = readable  # of which device-readable
        self.total = total  # bytes of all elements so far

    def add(self, desc: Descriptor) -> None:
        writable = desc.is_write_only
        # §2.7.4.2 / §2.8.17: "The driver MUST place any device-writable descriptor elements after any
        # device-readable descriptor elements."
        if not writable and self.n > self.readable:
            raise desc.fault(RingStatus.WRITE_BEFORE_READ)
        # §2.7.5.2: no chain longer than 2^32 bytes in total (the used length is a le32).
        self.total += desc.len
        if self.total > MAX_CHAIN_BYTES:
            raise desc.fault(RingStatus.LENGTH_OVERFLOW)
        if desc.len == 0:
            return  # nothing to read or write: no row, no address to check
        # §2.7.4.1: "The device MAY have a reasonable limit of descriptors it will allow in a chain."
        if self.n >= self.iov.shape[0]:
            raise desc.fault(RingStatus.CHAIN_TOO_LONG)
        host = translate(self.table, desc.addr, desc.len, writable)
        if host == 0:
            raise desc.fault(RingStatus.ADDR_OUT_OF_RANGE)
        if host < 0:
            raise desc.fault(RingStatus.READ_ONLY_MEMORY)
        self.iov[self.n] = (host, desc.len, int(writable))
        self.n += 1
        if not writable:
            self.readable += 1

    def add_all(self, descriptors: Iterator[Descriptor]) -> None:
        for desc in descriptors:
            self.add(desc)


def add_buffer(
    q: np.void | Queue,
    table: RegionTable,
    iov: np.ndarray,
    n: int,
    readable: int,
    total: int,
    addr: int,
    length: int,
    flags: int,
    index: int,
) -> tuple[int, int, int, int]:
    """Append one descriptor's buffer to iov. Returns (status, n, readable, total), as jit/chain.py."""
    builder = ChainBuilder(table, iov, n, readable, total)
    try:
        builder.add(Descriptor(index, addr, length, flags, 0))
    except ChainFault as fault:
        return fail(q, fault.status, fault.index, fault.addr), n, readable, builder.total
    return int(RingStatus.OK), builder.n, builder.readable, builder.total


# --- scatter-gather copies over a popped chain ---
def _segments(iov: np.ndarray, first: int, last: int, skip: int) -> Iterator[tuple[int, int]]:
    """(host address, length) of the bytes of rows [first, last) from byte ``skip`` on."""
    for row in range(first, last):
        addr, size = int(iov[row, IOV_ADDR]), int(iov[row, IOV_LEN])
        if skip >= size:
            skip -= size
            continue
        yield addr + skip, size - skip
        skip = 0


def iov_length(iov: np.ndarray, first: int, last: int) -> int:
    return sum(int(iov[row, IOV_LEN]) for row in range(first, last))


def iov_gather(iov: np.ndarray, first: int, last: int, skip: int, dst: int, length: int) -> int:
    """Copy up to ``length`` bytes of the rows, from byte ``skip`` on, to host address dst."""
    copied = 0
    for addr, size in _segments(iov, first, last, skip):
        if copied == length:
            break
        chunk = min(size, length - copied)
        ctypes.memmove(dst + copied, addr, chunk)
        copied += chunk
    return copied


def iov_scatter(iov: np.ndarray, first: int, last: int, skip: int, src: int, length: int) -> int:
    """Copy up to ``length`` bytes from host address src into the rows, from byte ``skip`` on."""
    copied = 0
    for addr, size in _segments(iov, first, last, skip):
        if copied == length:
            break
        chunk = min(size, length - copied)
        ctypes.memmove(addr, src + copied, chunk)
        copied += chunk
    return copied


def iov_fill(iov: np.ndarray, first: int, last: int, skip: int, byte: int, length: int) -> int:
    done = 0
    for addr, size in _segments(iov, first, last, skip):
        if done == length:
            break
        chunk = min(size, length - done)
        ctypes.memset(addr, byte & 0xFF, chunk)
        done += chunk
    return done


def iov_copy(
    dst: np.ndarray,
    dst_first: int,
    dst_last: int,
    dst_skip: int,
    src: np.ndarray,
    src_first: int,
    src_last: int,
    src_skip: int,
    length: int,
) -> int:
    """Copy up to ``length`` bytes between two iov ranges, each from a byte offset; returns bytes copied."""
    targets = _segments(dst, dst_first, dst_last, dst_skip)
    sources = _segments(src, src_first, src_last, src_skip)
    target = next(targets, None)
    source = next(sources, None)
    copied = 0
    # Piece by piece, in chain order: each piece is as long as both current segments allow.
    while target is not None and source is not None and copied < length:
        chunk = min(target[1], source[1], length - copied)
        ctypes.memmove(target[0], source[0], chunk)
        copied += chunk
        target = (target[0] + chunk, target[1] - chunk) if target[1] > chunk else next(targets, None)
        source = (source[0] + chunk, source[1] - chunk) if source[1] > chunk else next(sources, None)
    return copied
