"""Guest memory: regions mapped from fds, and the table the compiled data path translates through.

Two address spaces reach a device. Descriptor buffers always carry guest addresses (GPA for
vhost-user, IOVA for vhost-vdpa and VDUSE). Ring addresses carry the front-end's user addresses on
vhost-user and IOVAs elsewhere. Each ``Region`` knows both bases, so one table serves every door.

A ``RegionTable`` is immutable: a new SET_MEM_TABLE or IOTLB batch builds a new one, and the owner
swaps it whole while the queues are stopped. Compiled code sees ``table.rows``, an int64 array with
one row per region: guest base, size, user base, host address of that region's uint8 mapping
(``Region.data``) and flags. It bounds-checks every (address, length) against it (jit/memory.py).
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError

__all__ = [
    "Region",
    "RegionTable",
    "GUEST",
    "SIZE",
    "USER",
    "HOST",
    "FLAGS",
    "REGION_WRITABLE",
    "anonymous_region",
]

# Columns of RegionTable.rows.
GUEST, SIZE, USER, HOST, FLAGS = range(5)
REGION_WRITABLE = 1

_PAGE = mmap.PAGESIZE
_ADDR_LIMIT = 1 << 63


@dataclass(eq=False)
class Region:
    """One mapped piece of guest memory. ``data`` is the uint8 view the data path uses."""

    guest_addr: int
    size: int
    user_addr: int
    data: np.ndarray = field(repr=False)
    writable: bool = True
    _map: mmap.mmap | None = field(default=None, repr=False)
    offset: int = 0  # where the region starts in its file
    fd: int | None = None  # a dup of the file, kept only when asked (to pass the region on: SET_MEM_TABLE)

    @classmethod
    def from_fd(
        cls,
        fd: int,
        *,
        guest_addr: int,
        size: int,
        user_addr: int = 0,
        offset: int = 0,
        writable: bool = True,
        keep_fd: bool = False,
    ) -> Region:
        """Map ``size`` bytes of ``fd`` at ``offset`` (need not be page aligned); the fd may be closed after.

        With ``keep_fd`` the region keeps a duplicate of ``fd`` (``Region.fd``, closed by ``close``).
        """
        if size <= 0:
            raise UsageError(f"memory region of size {size}")
        # Addresses stay below 2**63 so compiled code can use int64 throughout (uint64 mixes into float64).
        if not 0 <= guest_addr < guest_addr + size <= _ADDR_LIMIT or not 0 <= user_addr < _ADDR_LIMIT or offset < 0:
            raise UsageError(f"memory region {guest_addr:#x}+{size:#x} at offset {offset:#x} is out of range")
        # Pages of a mapping past the end of its file raise SIGBUS when touched, which would kill the
        # whole process long after the mapping was accepted: refuse such a region now.
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and offset + size > info.st_size:
            raise UsageError(f"memory region at offset {offset:#x}+{size:#x} ends past its file ({info.st_size:#x} B)")
        skew = offset % _PAGE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, size + skew, flags=mmap.MAP_SHARED, prot=prot, offset=offset - skew)
        data = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=skew)
        kept = os.dup(fd) if keep_fd else None
        return cls(guest_addr, size, user_addr, data, writable, mapping, offset, kept)

    @property
    def host_addr(self) -> int:
        return self.data.ctypes.data

    def close(self) -> None:
        self.data = np.empty(0, np.uint8)
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def anonymous_region(size: int, *, guest_addr: int = 0, user_addr: int = 0, name: str = "vdpasim-guest") -> Region:
    """A region backed by a fresh memfd: guest RAM for tests and benchmarks (it keeps its fd, so a
    vhost-user front-end can share it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return Region.from_fd(fd, guest_addr=guest_addr, size=size, user_addr=user_addr, keep_fd=True)
    finally:
        os.close(fd)


class RegionTable:
    """An immutable set of non-overlapping regions, sorted by guest address."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self.regions: tuple[Region, ...] = tuple(sorted(regions, key=lambda r: r.guest_addr))
        rows = np.zeros((len(self.regions), 5), dtype=np.int64)
        for row, region in zip(rows, self.regions, strict=True):
            row[:] = (
                region.guest_addr,
                region.size,
                region.user_addr,
                region.host_addr,
                REGION_WRITABLE if region.writable else 0,
            )
        self.rows = rows
        _check_disjoint(self.regions, "guest_addr")
        _check_disjoint([r for r in self.regions if r.user_addr], "user_addr")

    def __len__(self) -> int:
        return len(self.regions)

    def find(self, addr: int, length: int, *, user: bool = False) -> tuple[Region, int] | None:
        """The region holding [addr, addr+length) whole, and the offset of addr in it; None if none does."""
        for region in self.regions:
            base = region.user_addr if user else region.guest_addr
            if base <= addr and addr + length <= base + region.size and length >= 0:
                return region, addr - base
        return None

    def host_addr(self, addr: int, length: int, *, user: bool = False) -> int:
        """Host address of guest (or user) range [addr, addr+length); 0 if it is not inside one region."""
        hit = self.find(addr, length, user=user)
        return 0 if hit is None else hit[0].host_addr + hit[1]

    def view(self, addr: int, length: int, *, user: bool = False) -> np.ndarray:
        hit = self.find(addr, length, user=user)
        if hit is None:
            raise UsageError(f"guest range {addr:#x}+{length:#x} is outside guest memory")
        region, offset = hit
        return region.data[offset : offset + length]

    def read(self, addr: int, length: int) -> bytes:
        return self.view(addr, length).tobytes()

    def write(self, addr: int, data: bytes) -> None:
        self.view(addr, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        for region in self.regions:
            region.close()


def _check_disjoint(regions: Sequence[Region], attr: str) -> None:
    spans = sorted((getattr(r, attr), getattr(r, attr) + r.size) for r in regions)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise UsageError(f"memory regions overlap in {attr} at {start:#x}")
