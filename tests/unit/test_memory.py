"""Guest memory bounds: RegionTable.find (Python), jit translate and the oracle's translate agree on every edge."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vdpasim.errors import UsageError
from vdpasim.jit.memory import TRANSLATE_READ_ONLY
from vdpasim.jit.memory import translate as jit_translate
from vdpasim.memory import Region, RegionTable, anonymous_region
from vdpasim.rings.chain import translate as ref_translate

BASE = 0x10000
SIZE = 0x2000
RO_BASE = 0x20000
RO_SIZE = 0x1000


def _region(size: int, guest_addr: int, *, writable: bool = True, user_addr: int = 0) -> Region:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return Region.from_fd(fd, guest_addr=guest_addr, size=size, user_addr=user_addr, writable=writable)
    finally:
        os.close(fd)


@pytest.fixture
def table():
    table = RegionTable([_region(SIZE, BASE), _region(RO_SIZE, RO_BASE, writable=False)])
    yield table
    table.close()


def _as_int64(addr: int) -> int:
    """A guest u64 as the compiled kernels hold it (int64 bit pattern)."""
    return addr - (1 << 64) if addr >= 1 << 63 else addr


def _all_translate(table: RegionTable, addr: int, length: int, writable: bool = False) -> tuple[int, int, int]:
    """Offsets into the matching region per RegionTable.host_addr, jit and oracle (or their 0 / -1 answers)."""
    results = []
    for host in (
        table.host_addr(addr, length),
        jit_translate(table.rows, _as_int64(addr), length, writable),
        ref_translate(table, addr, length, writable),
    ):
        if host in (0, TRANSLATE_READ_ONLY):
            results.append(host)
        else:
            region = next(r for r in table.regions if r.host_addr <= host <= r.host_addr + r.size)
            results.append(region.guest_addr + host - region.host_addr)
    return tuple(results)


@pytest.mark.parametrize(
    ("addr", "length", "inside"),
    [
        (BASE, 1, True),  # first byte
        (BASE + SIZE - 1, 1, True),  # last byte
        (BASE, SIZE, True),  # the whole region
        (BASE + SIZE - 16, 16, True),  # ends exactly at the end
        (BASE + SIZE - 15, 16, False),  # one byte past the end
        (BASE - 1, 2, False),  # starts one byte before
        (BASE - 16, 16, False),  # ends exactly at the start
        (BASE, SIZE + 1, False),  # longer than the region
        (BASE + SIZE, 0, True),  # zero length at the very end is still inside
        (BASE + SIZE + 1, 0, False),  # zero length past the end is not
        (BASE + SIZE, 1, False),
        (0, 1, False),
        (BASE, 0xFFFFFFFF, False),  # the largest descriptor length
    ],
)
def test_translate_edges(table: RegionTable, addr: int, length: int, inside: bool) -> None:
    expected = addr if inside else 0
    assert _all_translate(table, addr, length) == (expected, expected, expected)


@pytest.mark.parametrize(
    "addr",
    [1 << 63, (1 << 63) + BASE, (1 << 64) - 1, (1 << 64) - 16, (1 << 64) - SIZE],
)
def test_addresses_from_2_63_up_miss_instead_of_wrapping(table: RegionTable, addr: int) -> None:
    # With 64-bit wrap-around, (2**64 - 16) + 32 would land at 16; every check must see a miss.
    assert _all_translate(table, addr, 32) == (0, 0, 0)


def test_an_address_that_would_wrap_onto_a_region_at_zero_misses() -> None:
    table = RegionTable([_region(SIZE, 0)])
    try:
        assert _all_translate(table, (1 << 64) - 16, 32) == (0, 0, 0)
        assert _all_translate(table, 0, 32) == (0, 0, 0)
    finally:
        table.close()


def test_a_range_across_two_adjacent_regions_misses() -> None:
    table = RegionTable([_region(0x1000, 0x1000), _region(0x1000, 0x2000)])
    try:
        assert _all_translate(table, 0x1FF0, 16) == (0x1FF0, 0x1FF0, 0x1FF0)
        assert _all_translate(table, 0x2000, 16) == (0x2000, 0x2000, 0x2000)
        assert _all_translate(table, 0x1FF8, 16) == (0, 0, 0)
    finally:
        table.close()


def test_read_only_regions_refuse_device_writes_only(table: RegionTable) -> None:
    assert _all_translate(table, RO_BASE, 64, writable=False) == (RO_BASE, RO_BASE, RO_BASE)
    jit = jit_translate(table.rows, RO_BASE, 64, True)
    ref = ref_translate(table, RO_BASE, 64, True)
    assert jit == ref == TRANSLATE_READ_ONLY
    # The mapping itself is read-only: nothing in this process can write it either.
    read_only = table.regions[1]
    assert not read_only.data.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        table.write(RO_BASE, b"x")


def test_writable_regions_accept_device_writes(table: RegionTable) -> None:
    assert jit_translate(table.rows, BASE + 8, 8, True) == table.regions[0].host_addr + 8
    table.write(BASE + 8, b"abcdefgh")
    assert table.read(BASE + 8, 8) == b"abcdefgh"
    assert bytes(np.frombuffer(table.regions[0].data[8:16], np.uint8)) == b"abcdefgh"


@pytest.mark.parametrize(
    ("spans", "where"),
    [
        ([(0x1000, 0x1000), (0x1800, 0x1000)], "guest_addr at 0x1800"),
        ([(0x1000, 0x1000), (0x1000, 0x10)], "guest_addr at 0x1000"),
        ([(0x2000, 0x1000), (0x1000, 0x1001)], "guest_addr at 0x2000"),
    ],
)
def test_overlapping_regions_are_refused(spans: list[tuple[int, int]], where: str) -> None:
    regions = [_region(size, addr) for addr, size in spans]
    try:
        with pytest.raises(UsageError, match=f"memory regions overlap in {where}"):
            RegionTable(regions)
    finally:
        for region in regions:
            region.close()


def test_overlapping_user_addresses_are_refused() -> None:
    regions = [_region(0x1000, 0x1000, user_addr=0x7000), _region(0x1000, 0x4000, user_addr=0x7800)]
    try:
        with pytest.raises(UsageError, match="memory regions overlap in user_addr at 0x7800"):
            RegionTable(regions)
    finally:
        for region in regions:
            region.close()


def test_touching_regions_are_fine() -> None:
    table = RegionTable([_region(0x1000, 0x2000), _region(0x1000, 0x1000)])
    try:
        assert [r.guest_addr for r in table.regions] == [0x1000, 0x2000]  # sorted
        assert table.rows[:, 0].tolist() == [0x1000, 0x2000]
    finally:
        table.close()


def test_user_addresses_translate_separately() -> None:
    table = RegionTable([_region(0x1000, 0x1000, user_addr=0x7F0000001000)])
    try:
        region = table.regions[0]
        assert table.host_addr(0x7F0000001010, 16, user=True) == region.host_addr + 0x10
        assert table.host_addr(0x7F0000001010, 16) == 0  # not a guest address
        assert table.host_addr(0x1010, 16, user=True) == 0
    finally:
        table.close()


@pytest.mark.parametrize(
    ("guest_addr", "size", "message"),
    [
        (0, 0, "memory region of size 0"),
        (0, -4096, "memory region of size -4096"),
        ((1 << 63) - 0x1000, 0x2000, "is out of range"),  # would end past 2**63
        (1 << 63, 0x1000, "is out of range"),
    ],
)
def test_regions_outside_the_int64_range_are_refused(guest_addr: int, size: int, message: str) -> None:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x2000)
        with pytest.raises(UsageError, match=message):
            Region.from_fd(fd, guest_addr=guest_addr, size=size)
    finally:
        os.close(fd)


def test_the_last_region_below_2_63_translates_to_its_end() -> None:
    top = (1 << 63) - 0x1000
    table = RegionTable([anonymous_region(0x1000, guest_addr=top)])
    try:
        assert _all_translate(table, top + 0xFF0, 16) == (top + 0xFF0,) * 3
        assert _all_translate(table, top + 0xFF1, 16) == (0, 0, 0)
    finally:
        table.close()


def test_a_region_mapped_at_an_unaligned_offset_sees_the_right_bytes() -> None:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x3000)
        os.pwrite(fd, b"0123456789", 0x1234)
        region = Region.from_fd(fd, guest_addr=0x5000, size=0x100, offset=0x1234)
    finally:
        os.close(fd)
    table = RegionTable([region])
    try:
        assert table.read(0x5000, 10) == b"0123456789"
    finally:
        table.close()
