"""The data-path runner: start, stop, suspend and resume racing with traffic never lose or repeat a buffer.

A driver thread streams numbered frames through a loopback net device (real rings in memfd memory,
kick and call eventfds) while the test thread keeps stopping, restarting, suspending and pausing the
device's data path. Every frame must come back exactly once and in order, every TX buffer must be
returned, and whenever the device is suspended it must hold no chain: everything it took from the
rings is already in their used areas.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import threading
import time

import pytest

from vdpasim.rings.state import PackedState, SplitState
from vdpasim.runner import DataPath
from vdpasim.testing.net import NetDriver, NetHarness, ethernet
from vdpasim.virtio import constants as c

SRC = bytes.fromhex("020000000077")


@pytest.fixture
def net():
    with NetHarness() as harness:
        yield harness


def numbered(dst: bytes, seq: int) -> bytes:
    return ethernet(dst, SRC, 0x88B5, struct.pack("<I", seq) + bytes(42))


class StreamingDriver:
    """Sends ``total`` numbered frames on pair 0 and collects them, never letting RX run dry."""

    def __init__(self, drv: NetDriver, mac: bytes, total: int) -> None:
        self.drv = drv
        self.mac = mac
        self.total = total
        self.received: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-driver", daemon=True)

    def _run(self) -> None:
        try:
            self._stream()
        except BaseException as exc:
            self.error = exc

    def _stream(self) -> None:
        drv = self.drv
        rxq, txq = drv.queues[drv.rx(0)], drv.queues[drv.tx(0)]
        sent = completed = 0
        deadline = time.monotonic() + 60
        while len(self.received) < self.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {self.total} frames after 60 s")
            if rxq.room:
                drv.post_rx(0, rxq.room, size=256)
            # Only send what the posted RX buffers can take (an overrun would drop a frame): the RX
            # buffers not seen used yet, less the frames sent and not seen received.
            batch = min(16, self.total - sent, txq.room, rxq.in_flight - (sent - len(self.received)))
            if batch > 0:
                drv.send(0, [numbered(self.mac, seq) for seq in range(sent, sent + batch)])
                sent += batch
            completed += len(drv.poll_used(drv.tx(0)))
            got = drv.poll_used(drv.rx(0))
            self.received += [struct.unpack_from("<I", u.data, 12 + 14)[0] for u in got]
            if not got:
                drv.wait_call(drv.rx(0), 0.005)
        while completed < sent:
            completed += len(drv.wait_used(drv.tx(0), sent - completed))


def assert_holds_nothing(dev, drv: NetDriver, packed: bool) -> None:
    """While the device is suspended, each queue's device position equals what it published as used."""
    for idx in (drv.rx(0), drv.tx(0)):
        state = dev.get_vq_state(idx)
        dq = drv.queues[idx]
        if packed:
            assert isinstance(state, PackedState)
            assert (state.last_avail, state.avail_wrap) == (state.used_idx, state.used_wrap), f"vq {idx}: {state}"
        else:
            assert isinstance(state, SplitState)
            assert state.last_avail == dq.used_idx(), f"vq {idx}: avail {state.last_avail} used {dq.used_idx()}"


@pytest.mark.parametrize("busy_poll", [False, True], ids=["epoll", "busy-poll"])
@pytest.mark.parametrize(("packed", "event_idx"), [(False, False), (False, True), (True, True)])
def test_control_racing_traffic_loses_and_repeats_nothing(
    net: NetHarness, busy_poll: bool, packed: bool, event_idx: bool
) -> None:
    dev, drv = net.add(packed=packed, event_idx=event_idx, busy_poll=busy_poll, queue_size=32)
    total = 4000
    stream = StreamingDriver(drv, dev.mac, total)
    stream.thread.start()
    rng = random.Random(1234)
    cycles = {"suspend": 0, "restart": 0, "pause": 0}
    while stream.thread.is_alive():
        action = rng.choice(list(cycles))
        if action == "suspend":
            dev.suspend()
            assert_holds_nothing(dev, drv, packed)
            time.sleep(rng.random() * 0.002)
            dev.resume()
        elif action == "restart":
            dev.datapath.stop()
            time.sleep(rng.random() * 0.002)
            dev.datapath.start()
        else:
            with dev.datapath.paused():
                time.sleep(rng.random() * 0.001)
        cycles[action] += 1
        time.sleep(rng.random() * 0.001)
    stream.thread.join()
    if stream.error is not None:
        raise stream.error
    assert stream.received == list(range(total))  # each frame once, in order
    assert drv.queues[drv.tx(0)].in_flight == 0  # each TX buffer returned
    assert dev.vstats(0) == {
        "rx packets": total,
        "rx bytes": total * 60,
        "rx errors": 0,
        "rx overruns": 0,
        "rx drops": 0,
    }
    assert dev.vstats(1)["tx packets"] == total
    assert dev.datapath.error is None
    assert sum(cycles.values()) >= 30, cycles


def test_kicks_while_stopped_are_served_on_start(net: NetHarness) -> None:
    dev, drv = net.add()
    dev.datapath.stop()
    drv.post_rx(0, 4)
    drv.send(0, [numbered(dev.mac, i) for i in range(3)])
    assert not drv.wait_call(drv.rx(0), 0.1)
    dev.datapath.start()
    assert [struct.unpack_from("<I", r.frame, 14)[0] for r in drv.receive(0, 3)] == [0, 1, 2]


def test_busy_poll_spares_the_driver_its_kicks(net: NetHarness) -> None:
    dev, drv = net.add(busy_poll=True)
    drv.post_rx(0, 8)
    drv.send(0, [numbered(dev.mac, 0)])
    drv.receive(0, 1)
    tx = drv.queues[drv.tx(0)]
    deadline = time.monotonic() + 5
    while not tx.device_flags() & c.VIRTQ_USED_F_NO_NOTIFY and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tx.device_flags() & c.VIRTQ_USED_F_NO_NOTIFY
    kick_fd = drv.kick_fds[drv.tx(0)]
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(kick_fd)  # kicks from before the device turned them off
    drv.send(0, [numbered(dev.mac, 1)])
    with pytest.raises(BlockingIOError):
        os.eventfd_read(kick_fd)  # this send did not kick: the poller finds the frame anyway
    assert struct.unpack_from("<I", drv.receive(0, 1)[0].frame, 14)[0] == 1


class _Exploding:
    """A device whose queue handler fails: the runner must record it and not hang its controllers."""

    name = "exploding"

    def __init__(self) -> None:
        self.kick = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def active_queues(self) -> list[tuple[int, int]]:
        return [(0, self.kick)]

    def process(self, idx: int) -> bool:
        raise RuntimeError("device bug")


def test_a_crashed_data_path_is_reported_and_does_not_block_pause() -> None:
    device = _Exploding()
    path = DataPath(device)
    try:
        path.start()
        deadline = time.monotonic() + 5
        while path.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(path.error, RuntimeError)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (path.pause(), done.set()), daemon=True)
        worker.start()
        assert done.wait(5), "pause() hung on a dead data-path thread"
        path.resume()
    finally:
        path.close()
        os.close(device.kick)
