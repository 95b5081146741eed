"""The driver-side test kit itself: what it writes, what it reads back, and its notification rules."""

from __future__ import annotations

import pytest

from vdpasim.errors import UsageError
from vdpasim.jit.echo import echo_burst
from vdpasim.jit.vq import vq_enable_notify, vq_pop, vq_publish, vq_push
from vdpasim.rings.state import PackedState, SplitState
from vdpasim.testing.driver import DeviceMisbehaved, DriverQueue, GuestMemory, UsedBuffer, make_device_queue
from vdpasim.virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_USED_F_NO_NOTIFY,
)


@pytest.fixture
def memory():
    with GuestMemory(1 << 16) as memory:
        yield memory


def _echo(vq, memory, budget=32):
    return echo_burst(vq.state, memory.table.rows, vq.iov, budget)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_round_trip_returns_what_the_device_wrote(memory: GuestMemory, packed: bool, indirect: bool) -> None:
    dq = DriverQueue(memory, 8, packed=packed, indirect=True)
    vq = make_device_queue(dq)
    first = dq.add([b"hello ", b"world"], [4, 16], indirect=indirect)
    second = dq.add([b"xyz"], [2], indirect=indirect)
    assert _echo(vq, memory) == (0, 2, True)
    assert dq.used() == [UsedBuffer(first, 11, b"hello world"), UsedBuffer(second, 2, b"xy")]
    assert dq.used() == []
    assert memory.allocated == sum(a for a in (16 * 8, 4 if packed else 22, 4 if packed else 70))


def test_allocator_reuses_freed_space(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 4)
    vq = make_device_queue(dq)
    baseline = memory.allocated
    for _ in range(2000):  # far more than the memory holds without reuse
        dq.add([bytes(100)], [100])
        _echo(vq, memory)
        dq.used()
    assert memory.allocated == baseline
    with pytest.raises(UsageError, match="guest memory exhausted"):
        memory.alloc(1 << 17)


def test_adding_past_the_ring_is_refused(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 2)
    dq.add([b"a"], [1])
    assert dq.room == 0
    with pytest.raises(UsageError, match="no room: 1 descriptors wanted, 0 free"):
        dq.add([b"b"], [])
    with pytest.raises(UsageError, match="at least one descriptor"):
        dq.add([], [])


def test_packed_out_of_order_completions_skip_each_buffers_slots(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 5, packed=True)
    vq = make_device_queue(dq)
    ids = [dq.add([b"a"], [3, 3]), dq.add([b"b"], [1])]
    popped = [vq_pop(vq.record, memory.table.rows, vq.iov) for _ in range(2)]
    assert [(p[1], p[2]) for p in popped] == [(ids[0], 3), (ids[1], 2)]
    # Complete the second buffer first, then the first: used descriptors go in completion order,
    # each written over the next slot, and both sides skip the slots of the buffer it names.
    vq_push(vq.record, ids[1], 2, 1)
    vq_push(vq.record, ids[0], 3, 0)
    vq_publish(vq.record)
    assert [(u.id, u.len) for u in dq.used()] == [(ids[1], 1), (ids[0], 0)]
    assert (dq.room, dq.next_used, dq.used_wrap) == (5, 0, 0)


def test_packed_len_without_write_flag_is_ignored(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 4, packed=True)
    dq.add([b"a"], [8])
    # A device that reports a length without VIRTQ_DESC_F_WRITE: §2.8.4 says the driver ignores it.
    dq.write_desc(0, 0, 5, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, 0)
    assert dq.used() == [UsedBuffer(0, 0, b"")]


def test_unknown_ids_from_the_device_are_reported(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 4)
    memory.write_u32(dq.device_addr + 4, 3)  # used elem: id 3, never posted
    memory.write_u16(dq.device_addr + 2, 1)
    with pytest.raises(DeviceMisbehaved, match="device returned buffer 3, which is not in flight"):
        dq.used()


def test_split_kick_rules(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 8)
    dq.add([b"a"], [])
    assert dq.kick_wanted()
    memory.write_u16(dq.device_addr, VIRTQ_USED_F_NO_NOTIFY)
    dq.add([b"b"], [])
    assert not dq.kick_wanted()

    dq = DriverQueue(memory, 8, event_idx=True, start=65534)
    vq = make_device_queue(dq)
    vq_enable_notify(vq.record)  # avail_event = 65534: kick for the entry written at 65534
    dq.add([b"a"], [])
    assert dq.avail_event() == 65534
    assert dq.kick_wanted()
    dq.add([b"b"], [])
    assert not dq.kick_wanted()


def test_packed_kick_rules(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 4, packed=True, event_idx=True)
    vq = make_device_queue(dq)
    dq.add([b"a"], [])
    assert dq.kick_wanted()  # flags ENABLE after reset
    memory.write_u16(dq.device_addr + 2, RING_EVENT_FLAGS_DISABLE)
    dq.add([b"b"], [])
    assert not dq.kick_wanted()
    vq_enable_notify(vq.record)  # off_wrap = next slot the device reads (0, wrap 1)
    assert dq.device_flags() == RING_EVENT_FLAGS_DESC
    assert dq.avail_event() == 0 | 1 << 15
    _echo(vq, memory)
    dq.used()
    vq_enable_notify(vq.record)  # now slot 2
    dq.add([b"c"], [])  # slot 2
    assert dq.kick_wanted()
    dq.add([b"d"], [])  # slot 3
    assert not dq.kick_wanted()


@pytest.mark.parametrize("packed", [False, True])
def test_interrupt_suppression_reaches_the_device(memory: GuestMemory, packed: bool) -> None:
    dq = DriverQueue(memory, 4, packed=packed)
    vq = make_device_queue(dq)
    dq.set_no_interrupt(True)
    dq.add([b"a"], [1])
    assert _echo(vq, memory) == (0, 1, False)
    dq.set_no_interrupt(False)
    dq.add([b"a"], [1])
    assert _echo(vq, memory) == (0, 1, True)


def test_used_event_reaches_the_device(memory: GuestMemory) -> None:
    dq = DriverQueue(memory, 4, event_idx=True)
    vq = make_device_queue(dq)
    dq.add([b"a"], [1])
    assert _echo(vq, memory)[2]  # the first notification is always sent
    dq.used()
    dq.set_used_event(dq.last_used + 1)  # not for the next buffer, for the one after
    dq.add([b"a"], [1])
    assert not _echo(vq, memory)[2]
    dq.add([b"a"], [1])
    assert _echo(vq, memory)[2]


@pytest.mark.parametrize(("packed", "start", "wrap"), [(False, 65533, 1), (True, 3, 0), (True, 0, 0), (True, 2, 1)])
def test_queues_start_anywhere_and_wrap(memory: GuestMemory, packed: bool, start: int, wrap: int) -> None:
    dq = DriverQueue(memory, 4, packed=packed, start=start, wrap=wrap)
    vq = make_device_queue(dq)
    expected = PackedState(start, wrap, start, wrap) if packed else SplitState(start)
    assert vq.get_state() == expected
    for round_ in range(6):
        first = dq.add([bytes([round_]) * 3], [3])
        second = dq.add([b"zz"], [2])
        assert _echo(vq, memory) == (0, 2, True)
        assert dq.used() == [UsedBuffer(first, 3, bytes([round_]) * 3), UsedBuffer(second, 2, b"zz")]
    if packed:
        # 6 rounds of 2 + 2 slots: 24 slots, the ring went round 6 times.
        assert (dq.next_avail, dq.avail_wrap) == ((start + 24) % 4, wrap ^ ((start + 24) // 4) % 2)
        assert vq.get_state() == PackedState(dq.next_avail, dq.avail_wrap, dq.next_used, dq.used_wrap)
    else:
        assert vq.get_state() == SplitState((start + 12) & 0xFFFF)
        assert dq.used_idx() == (start + 12) & 0xFFFF
