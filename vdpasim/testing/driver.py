"""The driver side of virtqueues in real guest memory: what a guest's virtio driver would do.

Shared by unit tests, hypothesis strategies, device tests and benchmarks (the role of rust-vmm
virtio-queue's ``mock.rs``). Everything lives in one memfd region, so the compiled kernels read the
very bytes written here.

Typical use::

    with GuestMemory() as mem:
        dq = DriverQueue(mem, 256, packed=False, event_idx=True)
        vq = make_device_queue(dq)                  # a Virtqueue attached to the same rings
        head = dq.add([b"request"], [64])           # one readable buffer, one 64-byte writable one
        ...run a device kernel on vq.state, mem.table.rows, vq.iov...
        for used in dq.used():                      # UsedBuffer(id, len, data written by the device)
            ...

Pieces:

* ``GuestMemory(size, guest_addr)``: one anonymous region in a ``RegionTable`` (``.table``) plus a
  first-fit allocator (``alloc``/``free``) and ``read``/``write``/``read_u16``/``write_u16``...
  ``extra_regions`` adds more regions, e.g. a read-only one: ``[(guest_addr, size, writable)]``.
* ``DriverQueue(memory, size, *, packed, event_idx, indirect, start, wrap)``: allocates and zeroes the
  ring areas (``desc_addr``, ``driver_addr``, ``device_addr``) and drives them:

  - ``add(readable, writable, *, indirect=False) -> id``: allocates buffers (readable ones filled
    with the given bytes, writable ones zeroed, of the given lengths), writes descriptors and
    publishes them in the spec's order (split: ring entry, then idx; packed: every descriptor but
    the head, then the head's flags). Returns the head index (split) or buffer id (packed).
  - ``add_segments([(addr, len, writable), ...], *, indirect=False) -> id``: the same over buffers
    the caller allocated and owns (benchmarks reuse them; nothing is freed on completion).
  - ``used() -> list[UsedBuffer]``: newly used buffers, with the bytes the device wrote (the first
    ``len`` bytes of the writable parts); their descriptors, ids and buffers are recycled.
  - ``kick_wanted()``: whether the driver must notify for what it added since the last call
    (split: VIRTQ_USED_F_NO_NOTIFY or the avail_event rule; packed: device event suppression).
  - ``set_no_interrupt(on)``, ``set_used_event(idx, wrap=None)``: driver-side interrupt suppression
    (split: avail flags / used_event; packed: the driver event suppression structure, whose raw
    flags ``set_driver_event_flags(flags)`` writes).
  - What the device wrote, raw: ``used_idx()`` (split), ``avail_event()`` (split avail_event, packed
    off_wrap), ``device_flags()`` (split used flags, packed device event flags).
  - ``room``: descriptors (split) or ring slots (packed) free for ``add``.
  - ``descriptors(id)``, ``indirect_table(id)``, ``desc_addr_of(index)``: where an in-flight buffer's
    descriptors live, to corrupt a freshly added buffer before the device reads it.

  Low-level writers for malformed layouts, bypassing the descriptor allocator (use them on queues
  or descriptor indices that ``add`` does not also use):

  - ``write_desc(index, addr, length, flags, next_or_id)``: one raw descriptor (packed: the flags
    are written as given; ``avail_flags()`` gives the AVAIL/USED bits of the driver's current lap).
    ``write_table(addr, [(addr, len, flags, next_or_id), ...])``: raw descriptors of an indirect
    table at a guest address (from ``memory.alloc``).
  - ``publish(head, ndesc=1)``: split: append ``head`` to the available ring and bump idx.
    Packed: the ``ndesc`` descriptors at ring positions ``head``... (written with ``write_desc``
    without availability bits) get the AVAIL/USED bits of the driver's wrap counter, the head's
    last; the driver's position advances. ``head`` is normally ``dq.next_avail``.
  - ``set_avail_idx(idx)``: split: store the available index as is (e.g. jump > size ahead).

  Wrap-around: ``start`` sets the initial split indices (free-running, e.g. 65530) or the packed
  ring position, ``wrap`` the initial packed wrap counters (default 1, as after reset); the ring is
  prepared as a driver that had been running would have left it.
* ``make_device_queue(dq, memory=None, *, index=0) -> Virtqueue``: the device's view of the same
  queue: size, features, addresses and start state set, ring areas attached (RingAddressSpace.GUEST).
"""

from __future__ import annotations

import bisect
import os
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError
from ..memory import Region, RegionTable, anonymous_region
from ..ops import RingAddressSpace
from ..rings.state import PackedState, SplitState
from ..virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from ..virtqueue import Virtqueue, ring_area_sizes

__all__ = ["GuestMemory", "DriverQueue", "UsedBuffer", "DeviceMisbehaved", "make_device_queue", "need_event"]

_DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
_PACKED_DESC = struct.Struct("<QIHH")  # struct pvirtq_desc: addr, len, id, flags
_DESC_SIZE = 16
_PACKED_MAX_SIZE = 1 << 15


class DeviceMisbehaved(AssertionError):
    """The device broke the ring contract as seen from the driver (unknown id, used count too large)."""


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: did the index move from ``old`` to ``new`` past ``event``? (VIRTIO 1.2 §2.7.10)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class GuestMemory:
    """Guest RAM for tests: one memfd region at ``guest_addr`` and a first-fit allocator over it."""

    def __init__(
        self,
        size: int = 1 << 20,
        guest_addr: int = 0x100000,
        *,
        user_addr: int = 0,
        extra_regions: Iterable[tuple[int, int, bool]] = (),
    ) -> None:
        self.region = anonymous_region(size, guest_addr=guest_addr, user_addr=user_addr)
        regions: list[Region] = [self.region]
        try:
            for addr, extra_size, writable in extra_regions:
                regions.append(_memfd_region(extra_size, addr, writable))
            self.table = RegionTable(regions)
        except BaseException:
            for region in regions:
                region.close()
            raise
        self.guest_addr = guest_addr
        self.size = size
        self._free: list[tuple[int, int]] = [(guest_addr, guest_addr + size)]  # sorted (start, end)
        self._allocated: dict[int, int] = {}

    # --- allocation ---
    def alloc(self, n: int, align: int = 16) -> int:
        """Guest address of ``n`` fresh bytes (at least one byte is reserved, so addresses are distinct)."""
        n = max(n, 1)
        for i, (start, end) in enumerate(self._free):
            addr = -(-start // align) * align
            if addr + n <= end:
                pieces = [(s, e) for s, e in ((start, addr), (addr + n, end)) if s < e]
                self._free[i : i + 1] = pieces
                self._allocated[addr] = n
                return addr
        raise UsageError(f"guest memory exhausted: no {n} bytes aligned to {align}")

    def free(self, addr: int) -> None:
        n = self._allocated.pop(addr)
        i = bisect.bisect(self._free, (addr, addr + n))
        start, end = addr, addr + n
        # Merge with the neighbours so the space can be handed out whole again.
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:
            i -= 1
            start = self._free.pop(i)[0]
        self._free.insert(i, (start, end))

    @property
    def allocated(self) -> int:
        return sum(self._allocated.values())

    # --- access ---
    def read(self, addr: int, n: int) -> bytes:
        return self.table.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self.table.write(addr, data)

    def fill(self, addr: int, n: int, byte: int = 0) -> None:
        self.table.view(addr, n)[:] = byte

    def read_u16(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 2), "little")

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFF).to_bytes(2, "little"))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def snapshot(self) -> bytes:
        """All bytes of the main region (to compare two memories)."""
        return self.region.data.tobytes()

    def close(self) -> None:
        self.table.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _memfd_region(size: int, guest_addr: int, writable: bool) -> Region:
    """A fresh memfd region; a read-only one is mapped PROT_READ, as a read-only IOTLB entry would be."""
    fd = os.memfd_create("vdpasim-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return Region.from_fd(fd, guest_addr=guest_addr, size=size, writable=writable)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class UsedBuffer:
    """One buffer the device returned: its head index or buffer id, the used length, the bytes written."""

    id: int
    len: int
    data: bytes = b""


@dataclass
class _InFlight:
    ndesc: int  # ring descriptors (split: table entries; packed: ring slots) it occupies
    descs: list[int] = field(default_factory=list)  # split: table indices (recycled); packed: ring positions
    table: int | None = None  # guest address of its indirect table
    owned: list[int] = field(default_factory=list)  # guest allocations to free
    writable: list[tuple[int, int]] = field(default_factory=list)  # (addr, len) the device may write


class DriverQueue:
    """One virtqueue as the driver sees it, in ``memory``; see the module docstring."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        start: int = 0,
        wrap: int = 1,
    ) -> None:
        if packed and not 1 <= size <= _PACKED_MAX_SIZE:
            raise UsageError(f"packed queue size {size} not in 1..{_PACKED_MAX_SIZE}")
        if not packed and (size < 1 or size & (size - 1) or size > _PACKED_MAX_SIZE):
            raise UsageError(f"split queue size {size} is not a power of two up to {_PACKED_MAX_SIZE}")
        self.memory = memory
        self.size = size
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect
        desc_len, driver_len, device_len = ring_area_sizes(size, packed)
        # Alignments of VIRTIO 1.2 §2.7 (16/2/4) and §2.8.10 (16/4/4).
        self.desc_addr = memory.alloc(desc_len, 16)
        self.driver_addr = memory.alloc(driver_len, 4 if packed else 2)
        self.device_addr = memory.alloc(device_len, 4)
        for addr, n in ((self.desc_addr, desc_len), (self.driver_addr, driver_len), (self.device_addr, device_len)):
            memory.fill(addr, n)
        self._inflight: dict[int, _InFlight] = {}
        if packed:
            if not 0 <= start < size or wrap not in (0, 1):
                raise UsageError(f"packed start position {start} / wrap {wrap} invalid for size {size}")
            self.next_avail = self.next_used = start
            self.avail_wrap = self.used_wrap = wrap
            self._free_ids: deque[int] = deque(range(size))
            self._slots_in_use = 0
            self._kick_added = 0
            # Slots before ``start`` were used in this lap, the rest in the previous one (§2.8.1).
            for position in range(size):
                lap = wrap if position < start else wrap ^ 1
                memory.write_u16(self._desc(position) + 14, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if lap else 0)
        else:
            start &= 0xFFFF
            self.avail_idx = self.last_used = start
            self._kick_old = start
            self._free_descs: deque[int] = deque(range(size))
            memory.write_u16(self.driver_addr + 2, start)  # avail idx
            memory.write_u16(self.device_addr + 2, start)  # used idx
            memory.write_u16(self._used_event_addr, start)
        self.start = start
        self.start_wrap = wrap

    # --- geometry ---
    def _desc(self, index: int) -> int:
        return self.desc_addr + _DESC_SIZE * index

    @property
    def _used_event_addr(self) -> int:
        return self.driver_addr + 4 + 2 * self.size

    @property
    def _avail_event_addr(self) -> int:
        return self.device_addr + 4 + 8 * self.size

    @property
    def features(self) -> int:
        """The transport feature bits this queue was laid out for."""
        return (
            1 << VIRTIO_F_VERSION_1
            | self.packed << VIRTIO_F_RING_PACKED
            | self.event_idx << VIRTIO_RING_F_EVENT_IDX
            | self.indirect << VIRTIO_RING_F_INDIRECT_DESC
        )

    @property
    def room(self) -> int:
        return len(self._free_descs) if not self.packed else min(self.size - self._slots_in_use, len(self._free_ids))

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # --- adding buffers ---
    def add(self, readable: Sequence[bytes], writable: Sequence[int], *, indirect: bool = False) -> int:
        """Post one buffer made of fresh readable buffers (with these bytes) then writable ones (these lengths)."""
        owned: list[int] = []
        segments: list[tuple[int, int, bool]] = []
        for data in readable:
            addr = self.memory.alloc(len(data), 8)
            self.memory.write(addr, bytes(data))
            owned.append(addr)
            segments.append((addr, len(data), False))
        for length in writable:
            addr = self.memory.alloc(length, 8)
            if length:
                self.memory.fill(addr, length)
            owned.append(addr)
            segments.append((addr, length, True))
        try:
            return self._add(segments, indirect, owned)
        except BaseException:
            for addr in owned:
                self.memory.free(addr)
            raise

    def add_segments(self, segments: Sequence[tuple[int, int, bool]], *, indirect: bool = False) -> int:
        """Post one buffer over caller-owned (guest address, length, device-writable) segments."""
        return self._add(list(segments), indirect, [])

    def _add(self, segments: list[tuple[int, int, bool]], indirect: bool, owned: list[int]) -> int:
        if not segments:
            raise UsageError("a buffer needs at least one descriptor")
        if indirect:
            table = self.memory.alloc(_DESC_SIZE * len(segments), 16)
            owned.append(table)
            self._write_indirect_table(table, segments)
            ring = [(table, _DESC_SIZE * len(segments), VIRTQ_DESC_F_INDIRECT)]
        else:
            table = None
            ring = [(addr, length, VIRTQ_DESC_F_WRITE if w else 0) for addr, length, w in segments]
        if len(ring) > self.room:
            raise UsageError(f"no room: {len(ring)} descriptors wanted, {self.room} free")
        entry = _InFlight(len(ring), owned=owned, writable=[(a, n) for a, n, w in segments if w], table=table)
        return self._add_packed(ring, entry) if self.packed else self._add_split(ring, entry)

    def _write_indirect_table(self, table: int, segments: list[tuple[int, int, bool]]) -> None:
        for i, (addr, length, w) in enumerate(segments):
            flags = VIRTQ_DESC_F_WRITE if w else 0
            if self.packed:
                # Packed indirect tables are consecutive; NEXT is not used there (§2.8.19).
                self.memory.write(table + _DESC_SIZE * i, _PACKED_DESC.pack(addr, length, 0, flags))
            else:
                more = i + 1 < len(segments)
                self.memory.write(
                    table + _DESC_SIZE * i,
                    _DESC.pack(addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), i + 1 if more else 0),
                )

    def _add_split(self, ring: list[tuple[int, int, int]], entry: _InFlight) -> int:
        indices = [self._free_descs.popleft() for _ in ring]
        for i, (index, (addr, length, flags)) in enumerate(zip(indices, ring, strict=True)):
            if i + 1 < len(ring):
                flags |= VIRTQ_DESC_F_NEXT
                next_index = indices[i + 1]
            else:
                next_index = 0
            self.memory.write(self._desc(index), _DESC.pack(addr, length, flags, next_index))
        entry.descs = indices
        head = indices[0]
        self._inflight[head] = entry
        self._split_publish(head)
        return head

    def _split_publish(self, head: int) -> None:
        # The ring entry first, then the index that makes it visible (§2.7.13.2-3; x86 keeps store order).
        self.memory.write_u16(self.driver_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.driver_addr + 2, self.avail_idx)

    def avail_flags(self, wrap: int | None = None) -> int:
        """Packed: the AVAIL/USED bits marking a descriptor available in lap ``wrap`` (default: the driver's)."""
        lap = self.avail_wrap if wrap is None else wrap
        return VIRTQ_DESC_F_AVAIL if lap else VIRTQ_DESC_F_USED

    def _add_packed(self, ring: list[tuple[int, int, int]], entry: _InFlight) -> int:
        buffer_id = self._free_ids.popleft()
        head = self.next_avail
        entry.descs = [(head + i) % self.size for i in range(len(ring))]
        head_flags = 0
        position = head
        wrap = self.avail_wrap
        for i, (addr, length, flags) in enumerate(ring):
            flags |= VIRTQ_DESC_F_NEXT if i + 1 < len(ring) else 0
            flags |= VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            if i == 0:
                head_flags = flags
                # Everything but the head's flags now; the flags last make the whole buffer visible (§2.8.21.1).
                self.memory.write(self._desc(position), _PACKED_DESC.pack(addr, length, buffer_id, 0)[:14])
            else:
                self.memory.write(self._desc(position), _PACKED_DESC.pack(addr, length, buffer_id, flags))
            position += 1
            if position == self.size:
                position = 0
                wrap ^= 1
        self.memory.write_u16(self._desc(head) + 14, head_flags)
        self.next_avail, self.avail_wrap = position, wrap
        self._slots_in_use += len(ring)
        self._kick_added += len(ring)
        self._inflight[buffer_id] = entry
        return buffer_id

    # --- where a posted buffer lives (to corrupt it before the device looks) ---
    def descriptors(self, buffer_id: int) -> list[int]:
        """Descriptor indices (split) or ring positions (packed) of an in-flight buffer, in chain order."""
        return list(self._inflight[buffer_id].descs)

    def indirect_table(self, buffer_id: int) -> int | None:
        """Guest address of an in-flight buffer's indirect table, if it has one."""
        return self._inflight[buffer_id].table

    def desc_addr_of(self, index: int) -> int:
        """Guest address of descriptor ``index`` in the descriptor table or ring."""
        return self._desc(index)

    # --- low-level writers (malformed layouts) ---
    def write_desc(self, index: int, addr: int, length: int, flags: int, next_or_id: int) -> None:
        """One raw descriptor at ``index`` (split: next; packed: buffer id, flags as given)."""
        if self.packed:
            raw = _PACKED_DESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF, next_or_id & 0xFFFF, flags & 0xFFFF)
        else:
            raw = _DESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF, flags & 0xFFFF, next_or_id & 0xFFFF)
        self.memory.write(self._desc(index), raw)

    def write_table(self, table: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Raw descriptors (addr, len, flags, next_or_id) into an indirect table at guest address ``table``."""
        for i, (addr, length, flags, nxt) in enumerate(descs):
            if self.packed:
                raw = _PACKED_DESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF, nxt & 0xFFFF, flags & 0xFFFF)
            else:
                raw = _DESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)
            self.memory.write(table + _DESC_SIZE * i, raw)

    def publish(self, head: int, ndesc: int = 1) -> None:
        """Make raw descriptors available: see the module docstring."""
        if not self.packed:
            self._inflight.setdefault(head, _InFlight(ndesc))
            self._split_publish(head)
            return
        positions = [(head + i) % self.size for i in range(ndesc)]
        wrap = self.avail_wrap
        bits = []
        for i, position in enumerate(positions):
            if i and position == 0:
                wrap ^= 1
            bits.append(VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)
        # The head's flags last: they make the whole chain visible (§2.8.21.1).
        order = [*range(1, ndesc), 0]
        for position, bit in ((positions[i], bits[i]) for i in order):
            flags = self.memory.read_u16(self._desc(position) + 14) & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
            self.memory.write_u16(self._desc(position) + 14, flags | bit)
        buffer_id = self.memory.read_u16(self._desc(positions[-1]) + 12)
        self._inflight.setdefault(buffer_id, _InFlight(ndesc))
        if buffer_id in self._free_ids:
            self._free_ids.remove(buffer_id)
        self._slots_in_use += ndesc
        self._kick_added += ndesc
        end = head + ndesc
        self.next_avail = end % self.size
        if end >= self.size:
            self.avail_wrap ^= 1

    def set_avail_idx(self, idx: int) -> None:
        """Split: store the available index as is (the driver's own count follows it)."""
        self.avail_idx = idx & 0xFFFF
        self.memory.write_u16(self.driver_addr + 2, self.avail_idx)

    # --- completions ---
    def used(self) -> list[UsedBuffer]:
        """Buffers the device has returned since the last call, in the order it returned them."""
        return self._used_packed() if self.packed else self._used_split()

    def _complete(self, buffer_id: int, length: int) -> tuple[UsedBuffer, _InFlight]:
        entry = self._inflight.pop(buffer_id, None)
        if entry is None:
            raise DeviceMisbehaved(f"device returned buffer {buffer_id}, which is not in flight")
        data = bytearray()
        remaining = length
        for addr, n in entry.writable:
            if remaining <= 0:
                break
            take = min(n, remaining)
            data += self.memory.read(addr, take)
            remaining -= take
        for addr in entry.owned:
            self.memory.free(addr)
        return UsedBuffer(buffer_id, length, bytes(data)), entry

    def _used_split(self) -> list[UsedBuffer]:
        used_idx = self.memory.read_u16(self.device_addr + 2)
        pending = (used_idx - self.last_used) & 0xFFFF
        if pending > self.size:
            raise DeviceMisbehaved(f"used idx {used_idx} is {pending} entries past {self.last_used}")
        out = []
        for _ in range(pending):
            elem = self.device_addr + 4 + 8 * (self.last_used % self.size)
            buffer, entry = self._complete(self.memory.read_u32(elem), self.memory.read_u32(elem + 4))
            self._free_descs.extend(entry.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
            out.append(buffer)
        return out

    def _used_packed(self) -> list[UsedBuffer]:
        out = []
        while self._inflight:
            desc = self._desc(self.next_used)
            flags = self.memory.read_u16(desc + 14)
            # Used: both bits equal the driver's used wrap counter (§2.8.1).
            if bool(flags & VIRTQ_DESC_F_AVAIL) != self.used_wrap or bool(flags & VIRTQ_DESC_F_USED) != self.used_wrap:
                break
            # len is reserved (and ignored) unless the device set WRITE (§2.8.4).
            length = self.memory.read_u32(desc + 8) if flags & VIRTQ_DESC_F_WRITE else 0
            buffer, entry = self._complete(self.memory.read_u16(desc + 12), length)
            self._free_ids.append(buffer.id)
            self._slots_in_use -= entry.ndesc
            position = self.next_used + entry.ndesc
            if position >= self.size:
                position -= self.size
                self.used_wrap ^= 1
            self.next_used = position
            out.append(buffer)
        return out

    # --- notifications ---
    def kick_wanted(self) -> bool:
        """Whether to notify the device for buffers added since the last call (Linux virtqueue_kick_prepare)."""
        if self.packed:
            added, self._kick_added = self._kick_added, 0
            off_wrap = self.memory.read_u16(self.device_addr)
            flags = self.memory.read_u16(self.device_addr + 2)
            if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
                new = self.next_avail
                old = (new - added) & 0xFFFF
                event = off_wrap & 0x7FFF
                if off_wrap >> 15 != self.avail_wrap:
                    event -= self.size
                return need_event(event, new, old)
            return flags != RING_EVENT_FLAGS_DISABLE
        old, self._kick_old = self._kick_old, self.avail_idx
        if self.event_idx:
            return need_event(self.memory.read_u16(self._avail_event_addr), self.avail_idx, old)
        return not self.memory.read_u16(self.device_addr) & VIRTQ_USED_F_NO_NOTIFY

    def set_no_interrupt(self, on: bool = True) -> None:
        """Ask the device not to interrupt (split: VIRTQ_AVAIL_F_NO_INTERRUPT; packed: flags DISABLE/ENABLE)."""
        if self.packed:
            self.memory.write_u16(self.driver_addr + 2, RING_EVENT_FLAGS_DISABLE if on else RING_EVENT_FLAGS_ENABLE)
        else:
            self.memory.write_u16(self.driver_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, idx: int, wrap: int | None = None) -> None:
        """Interrupt once the used index passes ``idx`` (split: used_event; packed: off_wrap and flags DESC)."""
        if self.packed:
            lap = self.used_wrap if wrap is None else wrap
            self.memory.write_u16(self.driver_addr, (idx & 0x7FFF) | (lap & 1) << 15)
            self.memory.write_u16(self.driver_addr + 2, RING_EVENT_FLAGS_DESC)
        else:
            self.memory.write_u16(self._used_event_addr, idx)

    def set_driver_event_flags(self, flags: int) -> None:
        """Packed: the raw flags of the driver event suppression structure."""
        self.memory.write_u16(self.driver_addr + 2, flags)

    # --- what the device wrote, raw ---
    def used_idx(self) -> int:
        """Split: the used index the device published."""
        return self.memory.read_u16(self.device_addr + 2)

    def avail_event(self) -> int:
        """Split: the device's avail_event (EVENT_IDX). Packed: the device's off_wrap."""
        return self.memory.read_u16(self.device_addr if self.packed else self._avail_event_addr)

    def device_flags(self) -> int:
        """Split: used ring flags. Packed: device event suppression flags."""
        return self.memory.read_u16(self.device_addr + 2 if self.packed else self.device_addr)


def make_device_queue(dq: DriverQueue, memory: GuestMemory | None = None, *, index: int = 0) -> Virtqueue:
    """A device-side Virtqueue over the same rings as ``dq``, attached and ready for the kernels."""
    memory = dq.memory if memory is None else memory
    vq = Virtqueue(index, max(VIRTQ_MAX_SIZE, dq.size))
    vq.negotiate(dq.features)
    vq.set_num(dq.size)
    vq.set_address(dq.desc_addr, dq.driver_addr, dq.device_addr)
    if dq.packed:
        vq.set_state(PackedState(dq.start, dq.start_wrap, dq.start, dq.start_wrap))
    else:
        vq.set_state(SplitState(dq.start))
    vq.attach(memory.table, RingAddressSpace.GUEST)
    return vq
