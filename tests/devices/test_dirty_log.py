"""Dirty-page logging: every byte the devices write into guest memory marks its 4 KiB page in the log.

The kernels run here on real rings in memfd guest memory (the driver kit), with a numpy bitmap as the
log. What must be logged is known independently: the bytes the device wrote are found by comparing
guest memory before and after a burst, and the used lengths name the buffer bytes written. Ring writes
are logged only with VHOST_VRING_F_LOG, at the guest address the front-end gave for the used ring
(deliberately not the ring's own address in some cases, to show which one is used).
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from vdpasim.config import BlkConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.jit.blk import P_FEATURES, blk_burst
from vdpasim.jit.echo import echo_burst
from vdpasim.jit.log import VHOST_LOG_PAGE, log_range
from vdpasim.jit.net import (
    P_HDR_LEN,
    P_MAC_COUNT,
    P_MAC_TABLE,
    P_MERGEABLE,
    SCRATCH_BYTES,
    net_tx_burst,
    new_net_params,
)
from vdpasim.rings.state import RingStatus
from vdpasim.testing.driver import DriverQueue, GuestMemory, make_device_queue
from vdpasim.testing.net import VNET_HDR, NetHarness, ethernet
from vdpasim.virtio import constants as c

GUEST = 0x100000
MEMORY = 1 << 20
LOG_BYTES = 0x200  # covers guest-physical [0, 16 MiB)
ELSEWHERE = 0xC00000  # a log_guest_addr outside guest memory, still inside the log
MAC = bytes.fromhex("525400123456")
LAYOUTS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr // VHOST_LOG_PAGE, (addr + length - 1) // VHOST_LOG_PAGE + 1)) if length else set()


def logged(bitmap: np.ndarray) -> set[int]:
    """The pages the log marks: bit page % 8 of byte page // 8."""
    return {int(byte) * 8 + bit for byte in np.flatnonzero(bitmap) for bit in range(8) if bitmap[byte] >> bit & 1}


def changed_pages(before: bytes, after: bytes, base: int) -> set[int]:
    diff = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    return {(base + int(offset)) // VHOST_LOG_PAGE for offset in diff}


class Log:
    """A bitmap with guard bytes after it: the device must never write past ``size``."""

    def __init__(self, size: int = LOG_BYTES) -> None:
        self.backing = np.zeros(size + 64, dtype=np.uint8)
        self.bitmap = self.backing[:size]

    def pages(self) -> set[int]:
        return logged(self.bitmap)

    def guard_intact(self) -> bool:
        return not self.backing[len(self.bitmap) :].any()


def net_params() -> np.ndarray:
    params = new_net_params()
    params[P_HDR_LEN] = c.VIRTIO_NET_HDR_LEN
    params[P_MERGEABLE] = 1
    params[P_MAC_COUNT] = 1
    params[P_MAC_TABLE] = int.from_bytes(MAC, "big")
    return params


def snapshot(mem: GuestMemory) -> bytes:
    return mem.read(GUEST, MEMORY)


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("ring_log", ["off", "ring", "elsewhere"])
def test_net_loopback_logs_rx_buffers_and_used_rings(packed: bool, ring_log: str) -> None:
    with GuestMemory(MEMORY, GUEST) as mem:
        rxq = DriverQueue(mem, 16, packed=packed)
        txq = DriverQueue(mem, 16, packed=packed)
        rx, tx = make_device_queue(rxq, index=0), make_device_queue(txq, index=1)
        log = Log()
        for vq, dq in ((rx, rxq), (tx, txq)):
            vq.set_log(log.bitmap)
            if ring_log != "off":
                # The device area's guest address as the front-end says it (QEMU: the used ring's GPA).
                vq.set_log_used(dq.device_addr if ring_log == "ring" else ELSEWHERE + 0x10000 * vq.index)
        # RX buffers straddling page boundaries, one frame spread over two buffers (mergeable).
        page = -(-mem.alloc(3 * VHOST_LOG_PAGE, VHOST_LOG_PAGE) // VHOST_LOG_PAGE) * VHOST_LOG_PAGE
        buffers = {rxq.add_segments([(page + 4000, 1000, True)]): page + 4000}
        buffers[rxq.add_segments([(page + 2 * VHOST_LOG_PAGE - 100, 1500, True)])] = page + 2 * VHOST_LOG_PAGE - 100
        untouched = mem.alloc(VHOST_LOG_PAGE, VHOST_LOG_PAGE)  # a page of its own, posted but not needed
        buffers[rxq.add_segments([(untouched, 1024, True)])] = untouched
        frame = ethernet(MAC, b"\x02\0\0\0\0\x01", 0x88B5, bytes(range(256)) * 5)[:1200]
        txq.add([VNET_HDR + frame], [])
        before = snapshot(mem)
        status, done, _, _ = net_tx_burst(
            tx.state, rx.state, mem.table.rows, tx.iov, rx.iov, np.zeros(SCRATCH_BYTES, np.uint8), net_params(), 64
        )
        after = snapshot(mem)
        assert (status, done) == (RingStatus.OK, 1)
        used = rxq.used()
        # Mergeable buffers: the header only in the first one.
        assert [u.len for u in used] == [1000, len(frame) - (1000 - c.VIRTIO_NET_HDR_LEN)]
        want = set()
        for u in used:
            want |= pages(buffers[u.id], u.len)
        assert pages(untouched, 1024).isdisjoint(log.pages())
        if ring_log == "off":
            assert log.pages() == want  # buffers always, rings only with VHOST_VRING_F_LOG
        elif packed:
            # Used entries go into the descriptor rings, logged at their guest addresses.
            assert log.pages() == want | pages(rxq.desc_addr, 16 * 2) | pages(txq.desc_addr, 16)
        elif ring_log == "ring":
            assert log.pages() == want | pages(rxq.device_addr, 4 + 8 * 2) | pages(txq.device_addr, 4 + 8)
        else:
            assert log.pages() == want | {ELSEWHERE // VHOST_LOG_PAGE, (ELSEWHERE + 0x10000) // VHOST_LOG_PAGE}
        changed = changed_pages(before, after, GUEST)
        if ring_log == "ring" or (packed and ring_log == "elsewhere"):
            # Independent of the device's own accounting: every page whose bytes changed is logged.
            assert changed <= log.pages()
        else:
            assert changed - log.pages() <= pages(rxq.device_addr, 4 + 8 * 16) | pages(txq.device_addr, 4 + 8 * 16)
        assert log.guard_intact()


@pytest.mark.parametrize("packed", LAYOUTS)
def test_no_log_no_bits(packed: bool) -> None:
    """Logging off (the record's log address 0): the same traffic marks nothing."""
    with GuestMemory(MEMORY, GUEST) as mem:
        rxq = DriverQueue(mem, 16, packed=packed)
        txq = DriverQueue(mem, 16, packed=packed)
        rx, tx = make_device_queue(rxq, index=0), make_device_queue(txq, index=1)
        log = Log()
        for vq in (rx, tx):
            vq.set_log(log.bitmap)
            vq.set_log_used(GUEST)
            vq.set_log(None)  # VHOST_F_LOG_ALL withdrawn: the ring flag alone logs nothing
        rxq.add([], [2048])
        txq.add([VNET_HDR + ethernet(MAC, MAC, 0x88B5, bytes(100))], [])
        status, done, _, _ = net_tx_burst(
            tx.state, rx.state, mem.table.rows, tx.iov, rx.iov, np.zeros(SCRATCH_BYTES, np.uint8), net_params(), 64
        )
        assert (status, done, len(rxq.used())) == (RingStatus.OK, 1, 1)
        assert not log.backing.any()


@pytest.mark.parametrize("packed", LAYOUTS)
def test_blk_read_data_and_status_bytes_are_logged(packed: bool) -> None:
    device = BlkDevice(BlkConfig("log-blk", capacity=64))
    device.params[P_FEATURES] = device.device_features
    device.write_disk(0, bytes(range(256)) * 16)
    try:
        with GuestMemory(MEMORY, GUEST) as mem:
            dq = DriverQueue(mem, 16, packed=packed)
            vq = make_device_queue(dq)
            log = Log()
            vq.set_log(log.bitmap)
            base = -(-mem.alloc(4 * VHOST_LOG_PAGE, VHOST_LOG_PAGE) // VHOST_LOG_PAGE) * VHOST_LOG_PAGE
            header = mem.alloc(16)
            mem.write(header, struct.pack("<IIQ", c.VIRTIO_BLK_T_IN, 0, 0))
            data = base + VHOST_LOG_PAGE - 512  # 1024 bytes across a page boundary
            status = base + 3 * VHOST_LOG_PAGE + 7  # the status byte alone on a third page
            dq.add_segments([(header, 16, False), (data, 1024, True), (status, 1, True)])
            out_header = mem.alloc(16)
            mem.write(out_header, struct.pack("<IIQ", c.VIRTIO_BLK_T_OUT, 0, 8))
            out_data = base + 2 * VHOST_LOG_PAGE  # read by the device: never logged
            mem.write(out_data, b"\x5a" * 512)
            out_status = mem.alloc(1)
            dq.add_segments([(out_header, 16, False), (out_data, 512, False), (out_status, 1, True)])
            args = (mem.table.rows, vq.iov, device.backing.data, device.params, device.ident, device.scratch[0])
            result, done, _, _ = blk_burst(vq.state, *args, 64)
            assert (result, done) == (RingStatus.OK, 2)
            assert [u.len for u in dq.used()] == [1025, 1]
            assert mem.read(data, 1024) == (bytes(range(256)) * 4)
            assert log.pages() == pages(data, 1024) | pages(status, 1) | pages(out_status, 1)
            assert not log.pages() & pages(out_data, 512)
    finally:
        device.close()


def test_echo_kernel_logs_what_it_writes() -> None:
    with GuestMemory(MEMORY, GUEST) as mem:
        dq = DriverQueue(mem, 8, packed=False)
        vq = make_device_queue(dq)
        log = Log()
        vq.set_log(log.bitmap)
        out = mem.alloc(100)
        mem.write(out, b"x" * 100)
        back = mem.alloc(6000, VHOST_LOG_PAGE)
        dq.add_segments([(out, 100, False), (back, 6000, True)])
        assert echo_burst(vq.state, mem.table.rows, vq.iov, 8)[:2] == (RingStatus.OK, 1)
        assert log.pages() == pages(back, 100)


def test_log_too_small_is_a_fault_not_a_stray_write() -> None:
    """A guest address beyond the log: the write is refused, the queue records the fault, the guard stays."""
    with GuestMemory(MEMORY, GUEST) as mem:
        dq = DriverQueue(mem, 8, packed=False)
        vq = make_device_queue(dq)
        log = Log(size=(GUEST >> 12) // 8 + 2)  # covers only the first 16 pages of guest memory
        vq.set_log(log.bitmap)
        record = vq.record
        assert log_range(record, GUEST + 4 * VHOST_LOG_PAGE, 10)
        assert not log_range(record, GUEST + 64 * VHOST_LOG_PAGE, 10)
        assert not log_range(record, -4096, 10)  # a u64 above 2**63 is negative in the kernels
        vq.set_log_used((1 << 64) - 4096)  # such a log_guest_addr from the wire is stored, and refused
        assert record["log_used"] == -4096
        assert log.guard_intact()
        assert record["error"] == RingStatus.LOG_OUT_OF_RANGE
        assert "dirty log" in str(vq.fault())


def test_device_logs_while_serving_and_stops_on_a_log_fault() -> None:
    """Through a running NetDevice: logging follows set_dirty_log; a log too small sets NEEDS_RESET."""
    with NetHarness(memory_size=4 << 20) as harness:
        device, driver = harness.add("log0")
        log = Log()
        device.set_dirty_log(log.bitmap)
        assert device.logging
        driver.post_rx(0, 4, size=2048)
        frame = ethernet(device.mac, b"\x02\0\0\0\0\x01", 0x88B5, bytes(300))
        driver.send(0, [frame, frame])
        assert [r.frame for r in driver.receive(0, 2)] == [frame, frame]
        assert log.pages(), "received frames were logged"
        assert all(GUEST >> 12 <= p < (GUEST + (4 << 20)) >> 12 for p in log.pages())
        device.set_dirty_log(None)
        log.bitmap[:] = 0
        driver.send(0, [frame])
        driver.receive(0, 1)
        assert not log.pages()
        # A log that covers no guest page: the next write is a device fault, not a crash.
        small = Log(size=1)
        device.set_dirty_log(small.bitmap)
        driver.send(0, [frame])
        assert _wait_for(lambda: device.get_status() & c.VIRTIO_CONFIG_S_NEEDS_RESET)
        assert device.fault is not None and device.fault.code == RingStatus.LOG_OUT_OF_RANGE
        assert small.guard_intact() and not small.bitmap.any()


def test_control_queue_ack_is_logged() -> None:
    with NetHarness(memory_size=4 << 20) as harness:
        device, driver = harness.add("log-cvq")
        log = Log()
        device.set_dirty_log(log.bitmap)
        assert driver.ctrl(c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == c.VIRTIO_NET_OK
        assert log.pages(), "the ack byte's page is dirty"


def test_disabled_queue_discards_without_writing_buffers() -> None:
    """A started but disabled RX queue (vhost-user SET_VRING_ENABLE 0): no RX buffer is written, TX frames
    are consumed and counted as RX drops; a disabled TX queue counts them as TX drops."""
    with NetHarness(memory_size=4 << 20) as harness:
        device, driver = harness.add("gate0")
        rx_dq = driver.queues[driver.rx(0)]
        driver.post_rx(0, 2, size=2048)
        device.set_vq_enabled(driver.rx(0), False)
        frame = ethernet(device.mac, b"\x02\0\0\0\0\x01", 0x88B5, bytes(64))
        before = rx_dq.used_idx() if not rx_dq.packed else None
        driver.send(0, [frame, frame])
        assert len(driver.wait_used(driver.tx(0), 2)) == 2
        assert driver.poll_used(driver.rx(0)) == []
        assert rx_dq.used_idx() == before
        assert device.vstats(0)["rx drops"] == 2 and device.vstats(1)["tx packets"] == 2
        device.set_vq_enabled(driver.rx(0), True)
        driver.send(0, [frame])
        assert [r.frame for r in driver.receive(0, 1)] == [frame]
        driver.wait_used(driver.tx(0), 1)
        device.set_vq_enabled(driver.tx(0), False)
        driver.send(0, [frame])
        driver.wait_used(driver.tx(0), 1)
        assert device.vstats(1)["tx drops"] == 1 and device.vstats(0)["rx packets"] == 1


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
