"""The busy-poll kernel ``net_poll``: it serves a pair until told to stop, never past a control request.

The kernel runs on the rings directly (no data-path thread), so each return condition is observed on
its own: the interrupt word, the idle limit, the burst limit, a notification the driver asked for,
and a ring fault.
"""

from __future__ import annotations

import numpy as np
import pytest

from vdpasim.jit.net import P_HDR_LEN, P_MAC_COUNT, P_MAC_TABLE, P_MERGEABLE, SCRATCH_BYTES, net_poll, new_net_params
from vdpasim.rings.state import RingStatus
from vdpasim.testing.driver import DriverQueue, GuestMemory, make_device_queue
from vdpasim.testing.net import VNET_HDR, ethernet
from vdpasim.virtio import constants as c

MAC = bytes.fromhex("020000000001")
FRAME = ethernet(MAC, bytes.fromhex("020000000002"), 0x88B5, bytes(46))


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def pair(request):
    with GuestMemory() as mem:
        rxq = DriverQueue(mem, 64, packed=request.param)
        txq = DriverQueue(mem, 64, packed=request.param)
        rx, tx = make_device_queue(rxq, index=0), make_device_queue(txq, index=1)
        params = new_net_params()
        params[P_HDR_LEN] = c.VIRTIO_NET_HDR_LEN
        params[P_MERGEABLE] = 1
        params[P_MAC_COUNT] = 1
        params[P_MAC_TABLE] = int.from_bytes(MAC, "big")
        scratch = np.zeros(SCRATCH_BYTES, np.uint8)
        interrupt = np.zeros(1, np.int64)

        def poll(max_bursts: int = 1000, idle_polls: int = 10, budget: int = 4):
            status, done, notify_tx, notify_rx = net_poll(
                tx.state,
                rx.state,
                mem.table.rows,
                tx.iov,
                rx.iov,
                scratch,
                params,
                budget,
                interrupt,
                max_bursts,
                idle_polls,
            )
            return RingStatus(status), done, bool(notify_tx), bool(notify_rx)

        yield rxq, txq, tx, poll, interrupt


def post(rxq: DriverQueue, txq: DriverQueue, frames: int) -> None:
    for _ in range(frames):
        rxq.add([], [2048])
        txq.add([VNET_HDR + FRAME], [])


def test_raised_interrupt_returns_before_touching_the_rings(pair) -> None:
    rxq, txq, _, poll, interrupt = pair
    rxq.set_no_interrupt(True)
    txq.set_no_interrupt(True)
    post(rxq, txq, 10)
    interrupt[0] = 1
    assert poll() == (RingStatus.OK, 0, False, False)
    assert rxq.used() == [] and txq.used() == []
    interrupt[0] = 0
    assert poll() == (RingStatus.OK, 10, False, False)  # all ten, then idle
    assert [u.len for u in rxq.used()] == [len(VNET_HDR + FRAME)] * 10
    assert len(txq.used()) == 10


def test_kicks_are_turned_off_and_the_burst_limit_yields(pair) -> None:
    rxq, txq, _, poll, _ = pair
    rxq.set_no_interrupt(True)
    txq.set_no_interrupt(True)
    post(rxq, txq, 12)
    assert poll(max_bursts=2, budget=4) == (RingStatus.OK, 8, False, False)  # two bursts of four, then a turn
    assert not txq.kick_wanted() and not rxq.kick_wanted()
    assert poll(budget=4)[1] == 4


def test_returns_to_notify_when_the_driver_wants_interrupts(pair) -> None:
    rxq, txq, _, poll, _ = pair
    post(rxq, txq, 3)
    assert poll(budget=2) == (RingStatus.OK, 2, True, True)  # the first burst asks for both interrupts
    assert len(rxq.used()) == 2


def test_a_ring_fault_stops_the_loop(pair) -> None:
    rxq, txq, tx, poll, _ = pair
    rxq.add([], [2048])
    txq.add_segments([(1 << 40, 100, False)])  # outside guest memory
    status, done, _, _ = poll()
    assert status == RingStatus.ADDR_OUT_OF_RANGE and done == 0
    assert tx.record["error"] == RingStatus.ADDR_OUT_OF_RANGE
