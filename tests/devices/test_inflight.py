"""Inflight I/O tracking of the blk device: the region's bookkeeping, and resubmission after a restart.

The driver kit plays the guest on real rings in memfd guest memory; the region is a plain buffer laid
out as QEMU's docs/interop/vhost-user.rst says (``QueueRegionSplit``/``QueueRegionPacked``), read back
here through the spec's structures, not through the device's code.

A back-end that died with requests in flight is emulated with the production kernels themselves,
stopped where a crash would stop them: the ring pop and ``inflight_pop`` of the blk kernel for requests
fetched and never completed, then (for the crash windows of a completion) the inflight and ring pushes
without what follows them. A fresh BlkDevice then gets the region, as a restarted back-end gets it
from QEMU with SET_INFLIGHT_FD, and must serve exactly the unfinished requests, in fetch order, before
anything new. A region written by hand, as another back-end (libvhost-user) would leave it, checks
the order by counter rather than by descriptor index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
import time

import numpy as np
import pytest

from vdpasim.config import BlkConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.inflight import (
    INFLIGHT_VERSION,
    packed_region,
    queue_region_size,
    split_region,
    start_tracking,
)
from vdpasim.jit.inflight import inflight_pop, inflight_push, inflight_pushed
from vdpasim.jit.vq import vq_pop, vq_publish, vq_push
from vdpasim.rings.state import PackedState, RingStatus, SplitState
from vdpasim.testing.driver import DriverQueue, GuestMemory, UsedBuffer, make_device_queue
from vdpasim.virtio import constants as c

SECTOR = 512
QSIZE = 16
LAYOUTS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
_UP = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
log = logging.getLogger("test_inflight")


def new_region(packed: bool, size: int = QSIZE) -> np.ndarray:
    """A fresh region, zeroed as GET_INFLIGHT_FD hands it out."""
    return np.zeros(queue_region_size(size, packed), dtype=np.uint8)


def pattern(i: int) -> bytes:
    return bytes([0x40 + i]) * SECTOR


def write_request(mem: GuestMemory, dq: DriverQueue, sector: int, data: bytes) -> tuple[int, int]:
    """Post an OUT request (header, data, status: three descriptors); (id, status byte address)."""
    header = mem.alloc(16)
    mem.write(header, struct.pack("<IIQ", c.VIRTIO_BLK_T_OUT, 0, sector))
    payload = mem.alloc(len(data))
    mem.write(payload, data)
    status = mem.alloc(1)
    mem.write(status, b"\xff")
    ident = dq.add_segments([(header, 16, False), (payload, len(data), False), (status, 1, True)])
    return ident, status


class Device:
    """A BlkDevice started through the device operations with an inflight region, as a back-end would be."""

    def __init__(
        self, mem: GuestMemory, dq: DriverQueue, region: np.ndarray, state=None, desc_num: int | None = None
    ) -> None:
        self.device = BlkDevice(BlkConfig("inflight", capacity=64))
        self.dq = dq
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        dev = self.device
        features = dev.get_device_features() & ~(
            1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX | 1 << c.VIRTIO_RING_F_INDIRECT_DESC
        )
        features |= dq.packed << c.VIRTIO_F_RING_PACKED
        dev.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        dev.set_status(_UP)
        dev.set_driver_features(features)
        dev.set_status(_UP | c.VIRTIO_CONFIG_S_FEATURES_OK)
        dev.set_map(mem.table)
        dev.set_vq_num(0, dq.size)
        dev.set_vq_address(0, dq.desc_addr, dq.driver_addr, dq.device_addr)
        if state is not None:
            dev.set_vq_state(0, state)  # what QEMU sends with SET_VRING_BASE after the old back-end died
        dev.set_vq_kick(0, self.kick)
        dev.set_vq_call(0, self.call)
        dev.set_vq_inflight(0, region, dq.size if desc_num is None else desc_num)
        dev.set_vq_ready(0, True)
        dev.set_status(_UP | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)

    def wait(self, count: int, timeout: float = 20.0) -> list[UsedBuffer]:
        got: list[UsedBuffer] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.dq.used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} completions (fault {self.device.fault})")
            os.eventfd_write(self.kick, 1)
            select.select([self.call], [], [], 0.05)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call)
        return got

    def close(self) -> None:
        self.device.close()
        os.close(self.kick)
        os.close(self.call)


class Crashed:
    """A back-end that fetched requests with the blk kernel's tracking and died: the production kernels,
    stopped where a crash would stop them."""

    def __init__(self, mem: GuestMemory, dq: DriverQueue, region: np.ndarray) -> None:
        self.mem = mem
        self.vq = make_device_queue(dq)
        self.vq.set_inflight(region, dq.size)
        start_tracking(self.vq, log)
        self.fetched: list[tuple[int, int]] = []  # (head or buffer id, ring descriptors)

    def fetch(self, count: int) -> None:
        q = self.vq.record
        for _ in range(count):
            start = int(q["last_avail"])
            status, head, ndesc, _, _ = vq_pop(q, self.mem.table.rows, self.vq.iov)
            assert status == RingStatus.OK
            inflight_pop(q, head, start, ndesc)
            self.fetched.append((int(head), int(ndesc)))

    def complete(self, *, push_used: bool, publish: bool, finish: bool) -> None:
        """Complete the oldest fetched request up to a point: the region's part of the push, then the used
        entry (``push_used``), the used index (``publish``, split) and the region's commit (``finish``)."""
        q = self.vq.record
        head, ndesc = self.fetched.pop(0)
        if self.vq.packed:
            q["inflight_entry"] = self._packed_entry_of(head)
        inflight_push(q, head, ndesc)
        if push_used:
            vq_push(q, head, ndesc, 1)
        if publish:
            vq_publish(q)
        if finish:
            inflight_pushed(q)

    def _packed_entry_of(self, buffer_id: int) -> int:
        _, entries = packed_region(self.vq.inflight, self.vq.inflight_desc_num)
        for index in np.flatnonzero(entries["inflight"]):
            chain = int(index)
            for _ in range(int(entries["num"][index]) - 1):
                chain = int(entries["next"][chain])
            if int(entries["id"][chain]) == buffer_id:
                return int(index)
        raise AssertionError(f"buffer {buffer_id} is not in the region")


def disk_sectors(device: BlkDevice, count: int) -> list[bytes]:
    return [device.read_disk(i * SECTOR, SECTOR) for i in range(count)]


# ----- bookkeeping while serving -----


@pytest.mark.parametrize("packed", LAYOUTS)
def test_region_after_normal_traffic(packed: bool) -> None:
    """Requests served normally leave nothing in flight, and the region agrees with the ring."""
    region = new_region(packed)
    with GuestMemory(1 << 20) as mem:
        dq = DriverQueue(mem, QSIZE, packed=packed)
        rig = Device(mem, dq, region)
        try:
            for round_ in range(4):  # more requests than the queue holds: the ring wraps
                ids = [write_request(mem, dq, i, pattern(i + round_))[0] for i in range(5)]
                os.eventfd_write(rig.kick, 1)
                assert [u.id for u in rig.wait(5)] == ids
            record = rig.device.vqs[0].record
            if packed:
                header, entries = packed_region(region, QSIZE)
                assert int(header["version"][0]) == INFLIGHT_VERSION and int(header["desc_num"][0]) == QSIZE
                assert not entries["inflight"].any()
                assert int(header["used_idx"][0]) == int(header["old_used_idx"][0]) == int(record["used_idx"])
                assert int(header["used_wrap_counter"][0]) == int(record["used_wrap"])
                assert int(header["free_head"][0]) == int(header["old_free_head"][0])
                # Every entry is back on the free list.
                seen, index = set(), int(header["free_head"][0])
                while index < QSIZE and index not in seen:
                    seen.add(index)
                    index = int(entries["next"][index])
                assert seen == set(range(QSIZE))
                # The last chains' entries hold their descriptors: three each, the last naming the buffer id.
                assert set(entries["num"]) <= {0, 3}
            else:
                header, entries = split_region(region, QSIZE)
                assert int(header["version"][0]) == INFLIGHT_VERSION and int(header["desc_num"][0]) == QSIZE
                assert not entries["inflight"].any()
                assert int(header["used_idx"][0]) == dq.used_idx() == 20
                # The counters follow the order of fetching (the 16th to 20th request of the device's
                # life), and the batch list starts at the last completion.
                assert list(entries["counter"][ids]) == list(range(16, 21))
                assert int(header["last_batch_head"][0]) == ids[-1]
            assert rig.device.fault is None
        finally:
            rig.close()


# ----- resubmission after a restart -----

# Where the old back-end died: (layout, crash point, requests it completed, requests to serve again).
CRASHES = [
    pytest.param(False, "fetched", (), (0, 1, 2), id="split-fetched"),
    # The used entry written, the used index not published: still in flight.
    pytest.param(False, "used", (), (0, 1, 2), id="split-used"),
    # The used index published, the batch not cleared: the region's used_idx lags the ring's.
    pytest.param(False, "published", (0,), (1, 2), id="split-published"),
    pytest.param(True, "fetched", (), (0, 1, 2), id="packed-fetched"),
    # The region's part of a completion done, the used descriptor not written: rolled back.
    pytest.param(True, "pushed", (), (0, 1, 2), id="packed-pushed"),
    # The used descriptor written (and so seen by the driver), the region not committed: committed.
    pytest.param(True, "used", (0,), (1, 2), id="packed-used"),
]


@pytest.mark.parametrize(("packed", "crash", "completed", "resubmitted"), CRASHES)
def test_resubmits_what_was_in_flight(packed: bool, crash: str, completed: tuple, resubmitted: tuple) -> None:
    region = new_region(packed)
    with GuestMemory(1 << 20) as mem:
        dq = DriverQueue(mem, QSIZE, packed=packed)
        ids = [write_request(mem, dq, i, pattern(i))[0] for i in range(3)]
        old = Crashed(mem, dq, region)
        old.fetch(3)
        if crash == "pushed":
            old.complete(push_used=False, publish=False, finish=False)
        elif crash == "used" and not packed:
            old.complete(push_used=True, publish=False, finish=True)
        elif crash == "used":
            old.complete(push_used=True, publish=False, finish=False)
        elif crash == "published":
            old.complete(push_used=True, publish=True, finish=False)
        # Scribble over the fetched descriptors in a packed ring: a restarted back-end must rebuild the
        # chains from the region, where the old one copied them.
        if packed:
            for position in range(len(completed) * 3, 9):
                dq.write_desc(position, 0xDEAD0000, 7, dq.avail_flags(), 0xBEEF)
        # A new request after the restart, to be served after the resubmitted ones.
        new_id = write_request(mem, dq, 5, pattern(5))[0]
        # QEMU restores the next available index to the used index when the old back-end dies.
        used = dq.used_idx() if not packed else 0
        state = PackedState(0, 1, 0, 1) if packed else SplitState(used)
        rig = Device(mem, dq, region, state)
        try:
            done = rig.wait(len(resubmitted) + 1 + len(completed))
            assert [u.id for u in done] == [ids[i] for i in completed] + [ids[i] for i in resubmitted] + [new_id]
            served = disk_sectors(rig.device, 6)
            for i in range(3):
                assert served[i] == (pattern(i) if i in resubmitted else bytes(SECTOR)), f"request {i}"
            assert served[5] == pattern(5)
            assert rig.device.vqs[0].counters()["packets"] == len(resubmitted) + 1
            assert rig.device.fault is None
            _, entries = (packed_region if packed else split_region)(region, QSIZE)
            assert not entries["inflight"].any()
        finally:
            rig.close()


def test_resubmission_follows_the_counters_not_the_descriptor_indices() -> None:
    """A region as another back-end leaves it: heads 9, 3, 6 fetched in that order (counters 7, 8, 9)."""
    region = new_region(False)
    with GuestMemory(1 << 20) as mem:
        dq = DriverQueue(mem, QSIZE, packed=False)
        heads = [9, 3, 6]
        for n, head in enumerate(heads):
            header, payload, status = mem.alloc(16), mem.alloc(SECTOR), mem.alloc(1)
            mem.write(header, struct.pack("<IIQ", c.VIRTIO_BLK_T_OUT, 0, 0))  # all to sector 0
            mem.write(payload, pattern(n))
            dq.write_desc(head, header, 16, c.VIRTQ_DESC_F_NEXT, head + 1)
            dq.write_desc(head + 1, payload, SECTOR, c.VIRTQ_DESC_F_NEXT, head + 2)
            dq.write_desc(head + 2, status, 1, c.VIRTQ_DESC_F_WRITE, 0)
            dq.publish(head)
        hdr, entries = split_region(region, QSIZE)
        hdr["version"], hdr["desc_num"] = 1, QSIZE
        for counter, head in enumerate(heads, start=7):
            entries["counter"][head] = counter
            entries["inflight"][head] = 1
        rig = Device(mem, dq, region, SplitState(0))
        try:
            assert [u.id for u in rig.wait(3)] == heads
            assert rig.device.read_disk(0, SECTOR) == pattern(2)  # head 6, fetched last, wrote last
            assert int(rig.device.vqs[0].record["inflight_counter"]) == 10  # new requests count on from there
        finally:
            rig.close()


@pytest.mark.parametrize("packed", LAYOUTS)
def test_a_region_that_makes_no_sense_is_started_afresh(packed: bool, caplog: pytest.LogCaptureFixture) -> None:
    region = new_region(packed)
    if packed:
        hdr, entries = packed_region(region, QSIZE)
        hdr["version"], hdr["desc_num"] = 1, QSIZE
        entries["inflight"][2] = 1
        entries["num"][2] = 0  # a chain of no descriptors
    else:
        hdr, entries = split_region(region, QSIZE)
        hdr["version"], hdr["desc_num"] = 1, QSIZE + 8  # not the queue's geometry
    with GuestMemory(1 << 20) as mem, caplog.at_level(logging.WARNING):
        dq = DriverQueue(mem, QSIZE, packed=packed)
        ident = write_request(mem, dq, 1, pattern(1))[0]
        rig = Device(mem, dq, region)
        try:
            assert [u.id for u in rig.wait(1)] == [ident]
            assert rig.device.vqs[0].counters()["packets"] == 1
        finally:
            rig.close()
    assert any("inflight region unusable" in r.getMessage() for r in caplog.records)
    assert int(hdr["desc_num"][0]) == QSIZE and not entries["inflight"].any()


def test_region_smaller_than_the_queue_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    region = new_region(False, size=4)
    with GuestMemory(1 << 20) as mem, caplog.at_level(logging.WARNING):
        dq = DriverQueue(mem, QSIZE, packed=False)
        ident = write_request(mem, dq, 1, pattern(1))[0]
        rig = Device(mem, dq, region, desc_num=4)  # heads up to 15 cannot be tracked in 4 entries
        try:
            assert [u.id for u in rig.wait(1)] == [ident]
            assert int(rig.device.vqs[0].record["inflight"]) == 0
        finally:
            rig.close()
    assert not region.any()
    assert any("not tracked" in r.getMessage() for r in caplog.records)


def test_net_device_has_no_inflight_tracking() -> None:
    from vdpasim.config import NetConfig
    from vdpasim.devices.net import NetDevice
    from vdpasim.errors import DeviceRequestError

    device = NetDevice(NetConfig("noinflight"))
    try:
        with pytest.raises(DeviceRequestError):
            device.set_vq_inflight(0, new_region(False), QSIZE)
    finally:
        device.close()
