"""virtio-blk device: requests through real rings in memfd guest memory, served by the device's data-path thread.

The test is the driver: it negotiates through the device operations, lays out requests as Linux's
virtio_blk does (header, data, status byte, each in its own buffer unless a test splits them), kicks
the device's kick eventfd and waits on the call eventfd. The disk is checked through the requests
themselves, through ``read_disk`` and, for image files, through a separate file descriptor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import struct
import threading
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdpasim.config import BLK_DEFAULT_CAPACITY, BlkConfig
from vdpasim.devices.blk import BLK_CONFIG_SIZE, BURST, BlkDevice
from vdpasim.errors import DeviceRequestError
from vdpasim.jit.blk import P_FD, P_FEATURES, blk_burst
from vdpasim.rings.state import RingStatus
from vdpasim.testing.driver import DriverQueue, GuestMemory, make_device_queue
from vdpasim.virtio import constants as c

OK, IOERR, UNSUPP = c.VIRTIO_BLK_S_OK, c.VIRTIO_BLK_S_IOERR, c.VIRTIO_BLK_S_UNSUPP
IN, OUT, FLUSH, GET_ID = c.VIRTIO_BLK_T_IN, c.VIRTIO_BLK_T_OUT, c.VIRTIO_BLK_T_FLUSH, c.VIRTIO_BLK_T_GET_ID
DISCARD, WRITE_ZEROES = c.VIRTIO_BLK_T_DISCARD, c.VIRTIO_BLK_T_WRITE_ZEROES
UNMAP = c.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
SECTOR = 512
LAYOUTS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
_UP = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER


def header(kind: int, sector: int = 0) -> bytes:
    """struct virtio_blk_outhdr."""
    return struct.pack("<IIQ", kind, 0, sector & (1 << 64) - 1)


def segment(sector: int, nsectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes."""
    return struct.pack("<QII", sector, nsectors, flags)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Done:
    """A completed request: status byte, used length, and the bytes of its writable data buffers."""

    id: int
    status: int
    len: int
    data: bytes


@dataclass
class _Pending:
    allocations: list[int]
    status_addr: int | None
    data: list[tuple[int, int]]  # (guest address, length) of the writable data buffers


class BlkDriver:
    """A virtio-blk guest driver over the device operations, with real kick and call eventfds.

    ``submit`` posts one request made of driver-allocated buffers, so the status byte is read where
    the driver put it (the used length alone cannot locate it after an error). Thread-safe across
    queues: allocation and ring bookkeeping share one lock, waiting happens outside it.
    """

    def __init__(
        self,
        device: BlkDevice,
        memory: GuestMemory,
        *,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        queues: int = 1,
        queue_size: int = 64,
        drop: int = 0,
    ) -> None:
        offered = device.get_device_features()
        layout = 1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX | 1 << c.VIRTIO_RING_F_INDIRECT_DESC
        self.features = offered & ~layout & ~drop
        self.features |= packed << c.VIRTIO_F_RING_PACKED | event_idx << c.VIRTIO_RING_F_EVENT_IDX
        self.features |= indirect << c.VIRTIO_RING_F_INDIRECT_DESC
        self.device = device
        self.memory = memory
        self.lock = threading.Lock()
        self.queues: list[DriverQueue] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self.calls = [0] * queues
        self._pending: list[dict[int, _Pending]] = []
        self._done: list[list[Done]] = []
        device.set_status(0)
        device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        device.set_status(_UP)
        device.set_driver_features(self.features)
        device.set_status(_UP | c.VIRTIO_CONFIG_S_FEATURES_OK)
        assert device.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK, "features refused"
        device.set_map(memory.table)
        for idx in range(queues):
            dq = DriverQueue(memory, queue_size, packed=packed, event_idx=event_idx, indirect=indirect)
            self.queues.append(dq)
            self.kick_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self.call_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self._pending.append({})
            self._done.append([])
            device.set_vq_num(idx, queue_size)
            device.set_vq_address(idx, dq.desc_addr, dq.driver_addr, dq.device_addr)
            device.set_vq_kick(idx, self.kick_fds[idx])
            device.set_vq_call(idx, self.call_fds[idx])
            device.set_vq_ready(idx, True)
            self._rearm(dq)
        device.set_status(_UP | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)

    def close(self) -> None:
        for fd in (*self.kick_fds, *self.call_fds):
            os.close(fd)
        self.kick_fds.clear()
        self.call_fds.clear()

    # ----- requests -----
    def submit(
        self,
        kind: int,
        sector: int = 0,
        out: bytes | list[bytes] = b"",
        data_in: int | list[int] = 0,
        *,
        q: int = 0,
        hdr: bytes | None = None,
        status: int = 1,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Post header + readable ``out`` pieces + writable ``data_in`` buffers + a ``status``-byte buffer."""
        outs = [out] if isinstance(out, bytes) else out
        ins = ([data_in] if data_in else []) if isinstance(data_in, int) else data_in
        with self.lock:
            allocations: list[int] = []
            segments: list[tuple[int, int, bool]] = []

            def buffer(length: int, writable: bool, content: bytes = b"") -> int:
                addr = self.memory.alloc(length, 8)
                allocations.append(addr)
                if content:
                    self.memory.write(addr, content)
                elif length:
                    self.memory.fill(addr, length, 0xA5)  # not zero: a device that skips a byte shows
                segments.append((addr, length, writable))
                return addr

            first = header(kind, sector) if hdr is None else hdr
            buffer(len(first), False, first)
            for piece in outs:
                if piece:
                    buffer(len(piece), False, piece)
            data = [(buffer(length, True), length) for length in ins]
            status_addr = buffer(status, True) + status - 1 if status else None
            ident = self.queues[q].add_segments(segments, indirect=indirect)
            self._pending[q][ident] = _Pending(allocations, status_addr, data)
        if kick:
            self.kick(q)
        return ident

    def kick(self, q: int = 0) -> None:
        with self.lock:
            wanted = self.queues[q].kick_wanted()
        if wanted:
            os.eventfd_write(self.kick_fds[q], 1)

    def _rearm(self, dq: DriverQueue) -> None:
        """Ask for an interrupt at the next used buffer (Linux virtqueue_enable_cb)."""
        if dq.event_idx:
            if dq.packed:
                dq.set_used_event(dq.next_used, dq.used_wrap)
            else:
                dq.set_used_event(dq.last_used)

    def _collect(self, q: int) -> None:
        with self.lock:
            dq = self.queues[q]
            used = dq.used()
            self._rearm(dq)
            used += dq.used()  # re-check after re-arming: the device may have published in between
            for u in used:
                pending = self._pending[q].pop(u.id)
                status = -1 if pending.status_addr is None else self.memory.read(pending.status_addr, 1)[0]
                data = b"".join(self.memory.read(addr, length) for addr, length in pending.data)
                for addr in pending.allocations:
                    self.memory.free(addr)
                self._done[q].append(Done(u.id, status, u.len, data))

    def wait(self, count: int, q: int = 0, timeout: float = 20.0) -> list[Done]:
        """The next ``count`` completions of queue ``q``, in completion order."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect(q)
            if len(self._done[q]) >= count:
                done, self._done[q] = self._done[q][:count], self._done[q][count:]
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"queue {q}: {len(self._done[q])} of {count} requests done "
                    f"(device status {self.device.get_status():#x}, fault {self.device.fault})"
                )
            ready, _, _ = select.select([self.call_fds[q]], [], [], 0.05)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    self.calls[q] += os.eventfd_read(self.call_fds[q])

    def interrupts(self, q: int = 0) -> int:
        """Calls received on queue ``q`` so far, counting any not yet waited for."""
        with contextlib.suppress(BlockingIOError):
            self.calls[q] += os.eventfd_read(self.call_fds[q])
        return self.calls[q]

    def request(self, kind: int, sector: int = 0, out: bytes | list[bytes] = b"", data_in: int | list[int] = 0, **kw):
        """Submit one request and wait for it."""
        q = kw.get("q", 0)
        ident = self.submit(kind, sector, out, data_in, **kw)
        (done,) = self.wait(1, q)
        assert done.id == ident
        return done

    def write(self, sector: int, data: bytes, **kw) -> int:
        return self.request(OUT, sector, data, **kw).status

    def read(self, sector: int, length: int, **kw) -> tuple[int, bytes]:
        done = self.request(IN, sector, b"", length, **kw)
        return done.status, done.data


class Rig:
    """One device, its guest memory and its driver; ``close()`` stops the thread and frees everything."""

    def __init__(self, config: BlkConfig | None = None, *, memory_size: int = 8 << 20, **driver: object) -> None:
        self.memory = GuestMemory(memory_size)
        self.device: BlkDevice | None = None
        self.driver: BlkDriver | None = None
        try:
            self.device = BlkDevice(config or BlkConfig("blk0"))
            self.driver = BlkDriver(self.device, self.memory, **driver)  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.device is not None:
            self.device.close()  # joins the data-path thread before its eventfds go
        if self.driver is not None:
            self.driver.close()
        self.memory.close()

    def __enter__(self) -> tuple[BlkDevice, BlkDriver]:
        assert self.device is not None and self.driver is not None
        return self.device, self.driver

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_healthy(device: BlkDevice) -> None:
    assert device.fault is None
    assert not device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert device.datapath.error is None


# ----- config space and features -----


def test_features_and_config_space():
    config = BlkConfig("blk0", capacity=0x8000, blk_size=4096, seg_max=16, size_max=65536, num_queues=3)
    with Rig(config, queues=1) as (device, _):
        features = device.get_device_features()
        for bit in (
            c.VIRTIO_F_VERSION_1,
            c.VIRTIO_F_ACCESS_PLATFORM,
            c.VIRTIO_RING_F_EVENT_IDX,
            c.VIRTIO_RING_F_INDIRECT_DESC,
            c.VIRTIO_F_RING_PACKED,
            c.VIRTIO_F_IN_ORDER,
            c.VIRTIO_BLK_F_SIZE_MAX,
            c.VIRTIO_BLK_F_SEG_MAX,
            c.VIRTIO_BLK_F_BLK_SIZE,
            c.VIRTIO_BLK_F_TOPOLOGY,
            c.VIRTIO_BLK_F_FLUSH,
            c.VIRTIO_BLK_F_MQ,
            c.VIRTIO_BLK_F_DISCARD,
            c.VIRTIO_BLK_F_WRITE_ZEROES,
        ):
            assert features >> bit & 1, bit
        assert not features >> c.VIRTIO_BLK_F_RO & 1
        assert device.get_device_id() == c.VIRTIO_ID_BLOCK
        assert device.get_vq_count() == 3
        assert device.get_config_size() == BLK_CONFIG_SIZE == 96
        raw = device.get_config(0, BLK_CONFIG_SIZE)
        capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
        assert (capacity, size_max, seg_max) == (0x8000, 65536, 16)
        assert struct.unpack_from("<I", raw, 20)[0] == 4096  # blk_size
        assert struct.unpack_from("<BBHI", raw, 24) == (0, 0, 1, 1)  # topology
        assert struct.unpack_from("<H", raw, 34)[0] == 3  # num_queues
        # max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors/seg, may_unmap
        assert struct.unpack_from("<IIIIIB", raw, 36) == (0xFFFFFFFF, 1, 8, 0xFFFFFFFF, 1, 1)
        assert raw[60:] == bytes(36)  # secure erase and zoned: not offered
        assert device.get_config(34, 2) == struct.pack("<H", 3)
        with pytest.raises(DeviceRequestError, match="outside the 96-byte config space"):
            device.get_config(90, 8)
        with pytest.raises(DeviceRequestError, match="read-only"):
            device.set_config(0, bytes(8))


def test_defaults_mirror_vdpa_sim_blk():
    with Rig() as (device, driver):
        raw = device.get_config(0, 24)
        assert struct.unpack("<QIIHBBI", raw) == (BLK_DEFAULT_CAPACITY, 4096, 32, 0, 0, 0, 512)
        assert device.get_vq_count() == 1
        assert device.get_vq_num_max() == 256
        done = driver.request(GET_ID, 0, b"", 20)
        assert (done.status, done.len, done.data) == (OK, 21, b"vdpa_blk_sim".ljust(20, b"\0"))


# ----- data path -----


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_random_patterns_read_back(packed, indirect):
    rng = random.Random(1234 + packed * 2 + indirect)
    with Rig(packed=packed, queue_size=256) as (device, driver):
        written: dict[int, bytes] = {}
        # A batch of writes in flight together, each split over up to 4 descriptors at random points.
        ids = []
        for i in range(24):
            sector = rng.randrange(0, device.capacity - 64) & ~7
            data = pattern(i, SECTOR * rng.randrange(1, 33))
            cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 4)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            ids.append(driver.submit(OUT, sector, pieces, indirect=indirect, kick=False))
            written = {s: d for s, d in written.items() if s + len(d) // SECTOR <= sector or s >= sector + 64}
            written[sector] = data
        driver.kick()
        done = driver.wait(len(ids))
        assert [d.id for d in done] == ids  # in order: the device serves a queue sequentially
        assert all((d.status, d.len) == (OK, 1) for d in done)
        for sector, data in written.items():
            pieces = [len(data) // 2, len(data) - len(data) // 2] if len(data) > SECTOR else [len(data)]
            result = driver.request(IN, sector, b"", pieces, indirect=indirect)
            assert (result.status, result.len) == (OK, len(data) + 1)
            assert digest(result.data) == digest(data)
            assert digest(device.read_disk(sector * SECTOR, len(data))) == digest(data)
        stats = device.stats()[0]
        assert stats["packets"] == len(ids) + len(written)
        assert stats["successes"] == stats["packets"] and stats["errors"] == 0
        assert stats["bytes"] >= 2 * sum(len(d) for d in written.values())
        assert driver.interrupts() > 0  # completions were signalled, not just polled
        assert_healthy(device)


def test_status_shares_a_buffer_with_data():
    """A driver may put the status byte at the end of the last data buffer: it is the last writable byte."""
    with Rig() as (_, driver):
        data = pattern(7, 1024)
        assert driver.write(100, data) == OK
        done = driver.request(IN, 100, b"", 1025, status=0)
        assert (done.len, done.data[:1024], done.data[1024]) == (1025, data, OK)


def test_many_requests_beyond_one_burst():
    """More requests than one kernel call serves, posted with a single kick: all complete."""
    with Rig(queue_size=256) as (device, driver):
        count = 3 * BURST + 5
        ids = [driver.submit(OUT, i * 8, pattern(i, 4096), indirect=True, kick=False) for i in range(count)]
        driver.kick()
        done = driver.wait(count)
        assert [d.id for d in done] == ids and {d.status for d in done} == {OK}
        for i in (0, BURST, count - 1):
            assert device.read_disk(i * 8 * SECTOR, 4096) == pattern(i, 4096)


@pytest.mark.parametrize("packed", LAYOUTS)
def test_multiqueue_concurrent(packed):
    """Two driver threads, each on its own queue and disk area, against the one data-path thread."""
    config = BlkConfig("blk0", num_queues=2)
    with Rig(config, packed=packed, queues=2, queue_size=64, memory_size=16 << 20) as (device, driver):
        errors: list[BaseException] = []

        def worker(q: int) -> None:
            try:
                base = q * 0x10000
                for round_ in range(6):
                    ids = []
                    for i in range(16):
                        data = pattern(q * 1000 + round_ * 16 + i, 4096)
                        ids.append(driver.submit(OUT, base + i * 8, data, q=q, kick=False))
                    driver.kick(q)
                    assert {d.status for d in driver.wait(len(ids), q)} == {OK}
                    for i in range(16):
                        status, got = driver.read(base + i * 8, 4096, q=q)
                        assert status == OK
                        assert digest(got) == digest(pattern(q * 1000 + round_ * 16 + i, 4096))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(q,)) for q in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        stats = device.stats()
        assert [s["packets"] for s in stats] == [6 * 32, 6 * 32]
        assert [s["bytes"] for s in stats] == [6 * 32 * 4096] * 2
        assert driver.interrupts(0) > 0 and driver.interrupts(1) > 0
        assert_healthy(device)


@pytest.mark.parametrize("packed", LAYOUTS)
def test_busy_poll_needs_no_kicks(packed):
    with Rig(BlkConfig("blk0", busy_poll=True), packed=packed, event_idx=False) as (device, driver):
        ids = [driver.submit(OUT, i * 8, pattern(i, 512), kick=False) for i in range(8)]
        done = driver.wait(len(ids))
        assert {d.status for d in done} == {OK}
        # The polling thread leaves kicks off: the driver is told not to notify.
        assert not driver.queues[0].kick_wanted()
        assert device.read_disk(7 * 8 * SECTOR, 512) == pattern(7, 512)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("packed", LAYOUTS)
def test_busy_poll_signals_each_completion_while_it_watches_the_ring(packed, event_idx):
    """A busy-polled queue is watched from compiled code between requests: what it completes before
    watching is published and signalled at once, not when the watch ends."""
    with Rig(BlkConfig("blk0", busy_poll=True), packed=packed, event_idx=event_idx) as (device, driver):
        for i in range(20):
            driver.submit(OUT, i * 8, pattern(i, 512), kick=False)
            started = time.monotonic()
            (done,) = driver.wait(1)
            assert done.status == OK
            assert time.monotonic() - started < 1.0
            assert driver.interrupts() == i + 1  # one signal per request, none missing
        assert device.read_disk(19 * 8 * SECTOR, 512) == pattern(19, 512)


# ----- errors -----


def test_range_alignment_and_size_checks():
    config = BlkConfig("blk0", capacity=2048, blk_size=4096, seg_max=4, size_max=8192)
    with Rig(config) as (device, driver):
        device.write_disk(0, pattern(1, 2048 * SECTOR))
        before = device.read_disk(0, 2048 * SECTOR)
        cases = [
            (OUT, 2048, [bytes(4096)], 0),  # starts at the end of the disk
            (OUT, 2040, [bytes(8192)], 0),  # runs past the end
            (OUT, 1 << 63, [bytes(4096)], 0),  # a sector above 2**63
            (OUT, (1 << 64) - 8, [bytes(4096)], 0),  # wraps around
            (OUT, 1, [bytes(4096)], 0),  # not aligned to blk_size
            (OUT, 8, [bytes(512)], 0),  # not a whole block
            (OUT, 8, [bytes(8192)] * 4 + [bytes(4096)], 0),  # more than seg_max * size_max bytes
            (OUT, 8, [bytes(4096)] * 5, 0),  # more than seg_max segments
            (IN, 2048, b"", [4096]),
            (IN, 0, b"", [4096, 4096, 4096, 4096, 4096]),
            (IN, 0, b"", [512]),
        ]
        for kind, sector, out, data_in in cases:
            done = driver.request(kind, sector, out, data_in)
            assert (done.status, done.len) == (IOERR, 1), (kind, sector)
        assert device.read_disk(0, 2048 * SECTOR) == before
        # The limits themselves are fine: seg_max segments of size_max bytes, up to the last block.
        assert driver.write(2048 - 64, [bytes(8192)] * 4) == OK
        status, data = driver.read(2048 - 8, 4096)
        assert (status, data) == (OK, bytes(4096))
        stats = device.stats()[0]
        assert (stats["errors"], stats["successes"]) == (len(cases), 2)
        assert_healthy(device)


def test_malformed_requests_get_ioerr():
    with Rig() as (device, driver):
        device.write_disk(0, pattern(2, 8192))
        before = device.read_disk(0, 8192)
        short = driver.request(OUT, hdr=header(OUT)[:8])  # header too short (8 of 16 bytes)
        assert (short.status, short.len) == (IOERR, 1)
        # Data must be on the side the type says.
        cases = [
            dict(kind=IN, sector=0, out=bytes(512), data_in=512),  # IN with readable data
            dict(kind=OUT, sector=0, out=bytes(512), data_in=512),  # OUT with writable data
            dict(kind=FLUSH, sector=0, out=b"", data_in=8),  # FLUSH with writable data
            dict(kind=FLUSH, sector=5, out=b"", data_in=0),  # FLUSH with a sector
            dict(kind=GET_ID, sector=3, out=b"", data_in=20),  # GET_ID with a sector
            dict(kind=GET_ID, sector=0, out=bytes(16), data_in=20),  # GET_ID with readable data
            dict(kind=DISCARD, sector=0, out=b"", data_in=0),  # no segment
            dict(kind=DISCARD, sector=0, out=bytes(8), data_in=0),  # half a segment
            dict(kind=WRITE_ZEROES, sector=9, out=segment(0, 8), data_in=0),  # header sector set
        ]
        for case in cases:
            done = driver.request(**case)
            assert (done.status, done.len) == (IOERR, 1), case
        # Unknown types are unsupported, not errors of the driver (§5.2.6).
        for kind in (2, 10, 14, 0x80000000):
            assert driver.request(kind, 0, b"", 0).status == UNSUPP
        # No writable byte at all: returned untouched with len 0, and counted.
        nostatus = driver.request(OUT, 0, bytes(512), 0, status=0)
        assert (nostatus.status, nostatus.len) == (-1, 0)
        assert device.read_disk(0, 8192) == before
        stats = device.stats()[0]
        assert stats["errors"] == 1 + len(cases) + 4 + 1
        assert stats["successes"] == 0
        assert stats["packets"] == stats["errors"]
        assert_healthy(device)


def test_header_split_across_descriptors():
    with Rig() as (device, driver):
        device.write_disk(SECTOR * 3, pattern(3, 512))
        # Post the 16-byte header as 5 + 11 bytes: the device gathers it.
        with driver.lock:
            mem = driver.memory
            pieces = [mem.alloc(5), mem.alloc(11), mem.alloc(512), mem.alloc(1)]
            mem.write(pieces[0], header(IN, 3)[:5])
            mem.write(pieces[1], header(IN, 3)[5:])
            ident = driver.queues[0].add_segments(
                [(pieces[0], 5, False), (pieces[1], 11, False), (pieces[2], 512, True), (pieces[3], 1, True)]
            )
            driver._pending[0][ident] = _Pending(pieces, pieces[3], [(pieces[2], 512)])
        driver.kick()
        (done,) = driver.wait(1)
        assert (done.status, done.len, done.data) == (OK, 513, pattern(3, 512))


def test_ring_fault_sets_needs_reset_and_spares_the_disk():
    with Rig() as (device, driver):
        dq = driver.queues[0]
        with driver.lock:
            # A descriptor pointing outside guest memory: a ring-contract fault, not a request error.
            dq.write_desc(dq.size - 1, 0x7FFF_0000_0000, 16, 0, 0)
            dq.publish(dq.size - 1)
        driver.kick()
        deadline = time.monotonic() + 10
        while not device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET
        assert device.fault is not None and device.fault.code == RingStatus.ADDR_OUT_OF_RANGE
        assert "outside guest memory" in str(device.fault)
        assert device.datapath.error is None


# ----- read-only, GET_ID, DISCARD, WRITE_ZEROES -----


@pytest.mark.parametrize("backing", ["ram", "file"])
def test_read_only_device(backing, tmp_path):
    path = None
    if backing == "file":
        path = str(tmp_path / "ro.img")
        with open(path, "wb") as image:
            image.write(pattern(4, 4096) + bytes(4096 * SECTOR - 4096))
        os.chmod(path, 0o444)  # a read-only disk needs only read access to its image
    with Rig(BlkConfig("ro0", read_only=True, capacity=4096, path=path)) as (device, driver):
        assert device.get_device_features() >> c.VIRTIO_BLK_F_RO & 1
        assert driver.features >> c.VIRTIO_BLK_F_RO & 1
        if path is None:
            device.write_disk(0, pattern(4, 4096))
        assert driver.write(0, bytes(4096)) == IOERR
        assert driver.request(WRITE_ZEROES, 0, segment(0, 8)).status == IOERR
        assert driver.request(DISCARD, 0, segment(0, 8)).status == IOERR
        assert driver.request(FLUSH).status == OK
        assert driver.read(0, 4096) == (OK, pattern(4, 4096))
        assert device.read_disk(0, 4096) == pattern(4, 4096)


def test_get_id_serial():
    with Rig(BlkConfig("blk0", serial="S" * 20)) as (_, driver):
        full = driver.request(GET_ID, 0, b"", 20)
        assert (full.status, full.len, full.data) == (OK, 21, b"S" * 20)  # 20 bytes: no NUL terminator
        short = driver.request(GET_ID, 0, b"", 8)
        assert (short.status, short.len, short.data) == (OK, 9, b"S" * 8)


@pytest.mark.parametrize("backing", ["ram", "file"])
def test_discard_and_write_zeroes(backing, tmp_path):
    path = str(tmp_path / "disk.img") if backing == "file" else None
    config = BlkConfig("blk0", capacity=4096, path=path, create=path is not None)
    with Rig(config) as (device, driver):
        size = 4096 * SECTOR
        device.write_disk(0, pattern(5, size))
        expect = bytearray(pattern(5, size))

        def zeroed(sector: int, nsectors: int) -> None:
            expect[sector * SECTOR : (sector + nsectors) * SECTOR] = bytes(nsectors * SECTOR)

        assert driver.request(DISCARD, 0, segment(8, 24)).status == OK
        zeroed(8, 24)
        assert driver.request(WRITE_ZEROES, 0, segment(101, 3)).status == OK  # not page aligned
        zeroed(101, 3)
        assert driver.request(WRITE_ZEROES, 0, segment(2000, 100, UNMAP)).status == OK
        zeroed(2000, 100)
        assert driver.request(WRITE_ZEROES, 0, segment(3000, 0)).status == OK  # nothing to do
        assert device.read_disk(0, size) == bytes(expect)
        assert driver.read(8, 24 * SECTOR) == (OK, bytes(24 * SECTOR))
        assert driver.read(100, 5 * SECTOR)[1] == bytes(expect[100 * SECTOR : 105 * SECTOR])
        # Refused without touching anything.
        refused = [
            (DISCARD, segment(0, 8, UNMAP), UNSUPP),  # unmap is for write-zeroes only
            (DISCARD, segment(0, 8, 2), UNSUPP),  # unknown flag
            (WRITE_ZEROES, segment(0, 8, 4), UNSUPP),
            (DISCARD, segment(4090, 8), IOERR),  # past the end
            (WRITE_ZEROES, segment(1 << 63, 1), IOERR),
            (DISCARD, segment(0, 8) + segment(16, 8), IOERR),  # more than max_discard_seg
            (WRITE_ZEROES, segment(0, 8)[:12], IOERR),  # not a whole segment
        ]
        for kind, payload, status in refused:
            assert driver.request(kind, 0, payload).status == status, (kind, payload)
        assert device.read_disk(0, size) == bytes(expect)
        if path is not None:
            with open(path, "rb") as image:
                assert digest(image.read()) == digest(bytes(expect))
        assert_healthy(device)


def test_discard_and_write_zeroes_need_negotiation():
    drop = 1 << c.VIRTIO_BLK_F_DISCARD | 1 << c.VIRTIO_BLK_F_WRITE_ZEROES
    with Rig(drop=drop) as (device, driver):
        device.write_disk(0, pattern(6, 4096))
        assert driver.request(DISCARD, 0, segment(0, 8)).status == UNSUPP
        assert driver.request(WRITE_ZEROES, 0, segment(0, 8)).status == UNSUPP
        assert device.read_disk(0, 4096) == pattern(6, 4096)


# ----- file backing and durability -----


def test_file_backed_writes_reach_the_file_after_flush(tmp_path):
    path = str(tmp_path / "disk.img")
    config = BlkConfig("blk0", capacity=8192, path=path, create=True)
    with Rig(config) as (device, driver):
        assert os.path.getsize(path) == 8192 * SECTOR
        blocks = {sector: pattern(sector, 8 * SECTOR) for sector in (0, 64, 4096, 8184)}
        for sector, data in blocks.items():
            assert driver.write(sector, data) == OK
        assert driver.request(FLUSH).status == OK
        fd = os.open(path, os.O_RDONLY)
        try:
            for sector, data in blocks.items():
                assert os.pread(fd, len(data), sector * SECTOR) == data
        finally:
            os.close(fd)
        # FLUSH really asks the file system: with an fd that cannot be synced it fails.
        read_end, write_end = os.pipe()
        real_fd = int(device.params[P_FD])
        device.params[P_FD] = read_end
        try:
            assert driver.request(FLUSH).status == IOERR
        finally:
            device.params[P_FD] = real_fd
            os.close(read_end)
            os.close(write_end)
        assert driver.request(FLUSH).status == OK
    # The image outlives the device: a new one over it reads the same bytes.
    with Rig(BlkConfig("blk1", path=path)) as (device, driver):
        assert device.capacity == 8192
        for sector, data in blocks.items():
            assert driver.read(sector, len(data)) == (OK, data)


def test_write_through_without_negotiated_flush(tmp_path):
    """FLUSH offered but not negotiated: each write is synced before it completes (§5.2.6.2)."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as image:
        image.truncate(1024 * SECTOR)  # a sparse, existing image: used as is
    config = BlkConfig("blk0", path=path)
    with Rig(config, drop=1 << c.VIRTIO_BLK_F_FLUSH) as (device, driver):
        assert device.capacity == 1024
        assert driver.write(16, pattern(8, 4096)) == OK
        with open(path, "rb") as image:
            image.seek(16 * SECTOR)
            assert image.read(4096) == pattern(8, 4096)
        read_end, write_end = os.pipe()
        real_fd = int(device.params[P_FD])
        device.params[P_FD] = read_end
        try:
            # The sync fails, so the write cannot be reported stable.
            assert driver.write(32, pattern(9, 4096)) == IOERR
        finally:
            device.params[P_FD] = real_fd
            os.close(read_end)
            os.close(write_end)


def test_image_file_checks(tmp_path):
    path = str(tmp_path / "small.img")
    with open(path, "wb") as image:
        image.write(bytes(4 * SECTOR))
    with pytest.raises(DeviceRequestError, match="has 2048 bytes, the disk needs 8192"):
        BlkDevice(BlkConfig("blk0", path=path, capacity=16))
    with pytest.raises(DeviceRequestError, match="No such file"):
        BlkDevice(BlkConfig("blk0", path=str(tmp_path / "missing.img")))
    grown = BlkDevice(BlkConfig("blk0", path=path, capacity=16, create=True))
    try:
        assert grown.capacity == 16 and os.path.getsize(path) == 16 * SECTOR
    finally:
        grown.close()
    read_only = BlkDevice(BlkConfig("blk0", path=path, read_only=True))
    try:
        assert read_only.capacity == 16
        assert read_only.get_device_features() >> c.VIRTIO_BLK_F_RO & 1
    finally:
        read_only.close()


def test_reset_keeps_the_disk():
    with Rig() as (device, driver):
        assert driver.write(40, pattern(10, 2048)) == OK
        driver.close()
        device.reset()
        assert device.stats()[0]["packets"] == 1  # counters outlive a reset, as vdpa_sim's vstats do
        driver2 = BlkDriver(device, driver.memory, packed=True)
        try:
            assert driver2.read(40, 2048) == (OK, pattern(10, 2048))
        finally:
            device.reset()
            driver2.close()


# ----- configuration -----


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"blk_size": 1000}, "blk_size: 1000 is outside 512..65536|blk_size: 1000 is not a power of two"),
        ({"blk_size": 3072}, "blk_size: 3072 is not a power of two"),
        ({"capacity": 9, "blk_size": 4096}, "capacity: 9 sectors is not a whole number of 4096-byte blocks"),
        ({"capacity": 0}, "capacity: 0 is outside"),
        ({"seg_max": 0}, "seg_max: 0 is outside 1..1022"),
        ({"size_max": 100}, "size_max: 100 is outside"),
        ({"num_queues": 0}, "num_queues: 0 is outside 1..256"),
        ({"serial": "x" * 21}, "serial: .* at most 20"),
        ({"serial": "caf\u00e9"}, "serial: .* printable ASCII"),
        ({"create": True}, "create: only an image file"),
        ({"path": "/tmp/x", "create": True, "read_only": True}, "create: a read-only disk"),
        ({"max_queue_size": 100}, "max_queue_size: 100 is not a power of two"),
        ({"read_only": "maybe"}, "read_only: 'maybe' is not a boolean"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(DeviceRequestError, match=message):
        BlkConfig("blk0", **fields)


def test_config_mapping_round_trip():
    config = BlkConfig.from_mapping({"name": "b", "capacity": "0x1000", "read_only": "on", "num_queues": "2"})
    assert (config.capacity, config.read_only, config.num_queues) == (0x1000, True, 2)
    assert BlkConfig.from_mapping(config.to_mapping()) == config
    assert BlkConfig("b").capacity == BLK_DEFAULT_CAPACITY
    assert BlkConfig("b", path="/x").capacity is None  # the image's size, when the device opens it
    assert config.features >> c.VIRTIO_BLK_F_RO & 1


# ----- the kernel against a model, without threads -----


_REQUEST = st.tuples(
    st.sampled_from([IN, OUT, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, 3]),
    st.one_of(st.integers(0, 130), st.sampled_from([0, (1 << 63) + 1, (1 << 64) - 1])),  # sector
    st.sampled_from([0, 512, 1024, 1536, 4096, 4608, 300]),  # data bytes (sectors for discard/write-zeroes)
    st.booleans(),  # data split over two descriptors
    st.integers(0, 3),  # flags of a discard/write-zeroes segment
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_REQUEST, min_size=1, max_size=12), packed=st.booleans())
def test_kernel_matches_model(requests, packed):
    """blk_burst against a bytearray model: statuses, used lengths, data read and the final disk."""
    device = BlkDevice(BlkConfig("model", capacity=128, seg_max=4, size_max=1024))
    device.params[P_FEATURES] = device.device_features
    model = bytearray(128 * SECTOR)
    try:
        with GuestMemory(1 << 20) as mem:
            dq = DriverQueue(mem, 64, packed=packed)
            vq = make_device_queue(dq)
            posted = []
            for i, (kind, sector, length, split, flags) in enumerate(requests):
                readable: list[bytes] = []
                writable = 0
                if kind == OUT:
                    data = pattern(i, length)
                    readable = [data[: length // 2], data[length // 2 :]] if split else [data]
                elif kind == IN:
                    writable = length
                elif kind == GET_ID:
                    writable = 20
                elif kind in (DISCARD, WRITE_ZEROES):
                    readable = [segment(sector, length // SECTOR, flags)]
                hdr_sector = 0 if kind in (DISCARD, WRITE_ZEROES) else sector
                segments = [(mem.alloc(16), 16, False)]
                mem.write(segments[0][0], header(kind, hdr_sector))
                for piece in readable:
                    if piece:
                        segments.append((mem.alloc(len(piece)), len(piece), False))
                        mem.write(segments[-1][0], piece)
                data_addr = mem.alloc(writable) if writable else None
                if data_addr is not None:
                    segments.append((data_addr, writable, True))
                status_addr = mem.alloc(1)
                mem.write(status_addr, b"\xff")
                segments.append((status_addr, 1, True))
                dq.add_segments(segments)
                posted.append((data_addr, status_addr, _model(model, kind, sector, length, flags, i)))
            args = (mem.table.rows, vq.iov, device.backing.data, device.params, device.ident, device.scratch[0])
            status, done, _notify, more = blk_burst(vq.state, *args, 64)
            assert (status, done, more) == (RingStatus.OK, len(requests), False)
            for used, (data_addr, status_addr, (want, data)) in zip(dq.used(), posted, strict=True):
                assert mem.read(status_addr, 1)[0] == want
                assert used.len == (1 if data is None else len(data) + 1)
                if data:
                    assert mem.read(data_addr, len(data)) == data
            assert device.read_disk(0, len(model)) == bytes(model)
    finally:
        device.close()


def _model(model: bytearray, kind: int, sector: int, length: int, flags: int, i: int) -> tuple[int, bytes | None]:
    """(status, data the device returns) for one request; applies writes to ``model``."""
    capacity = len(model) // SECTOR
    in_range = sector <= capacity and length // SECTOR <= capacity - sector
    sized = length % SECTOR == 0 and length <= 4 * 1024  # blk_size 512, seg_max * size_max 4096
    if kind == IN:
        if not in_range or not sized:
            return IOERR, None
        return OK, bytes(model[sector * SECTOR : sector * SECTOR + length])
    if kind == OUT:
        if not in_range or not sized:
            return IOERR, None
        model[sector * SECTOR : sector * SECTOR + length] = pattern(i, length)
        return OK, None
    if kind == FLUSH:
        return (OK if sector == 0 else IOERR), None
    if kind == GET_ID:
        return (OK, b"vdpa_blk_sim".ljust(20, b"\0")) if sector == 0 else (IOERR, None)
    if kind in (DISCARD, WRITE_ZEROES):
        if flags & ~(UNMAP if kind == WRITE_ZEROES else 0):
            return UNSUPP, None
        count = length // SECTOR
        if sector > capacity or count > capacity - sector:
            return IOERR, None
        model[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
        return OK, None
    return UNSUPP, None
