"""Every way a driver can break a descriptor chain, fed to the compiled kernels (and to the oracle).

Each case lays out one malformed buffer in real guest memory with the driver kit's raw writers, pops
it, and checks the RingStatus returned, the fault recorded in the queue and the text of
``Virtqueue.fault()``, which names what was wrong, the descriptor and the address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from vdpasim.errors import DeviceFault
from vdpasim.jit import vq as jit_vq
from vdpasim.rings import vq as ref_vq
from vdpasim.rings.state import RingStatus
from vdpasim.testing.driver import DriverQueue, GuestMemory, make_device_queue
from vdpasim.testing.malformed import CASES, END, GUEST, MEM, NEXT, RO, SIZE, WRITE, Case, Setup

POPS = {
    "jit": lambda vq, memory: jit_vq.vq_pop(vq.record, memory.table.rows, vq.iov),
    "oracle": lambda vq, memory: ref_vq.vq_pop(vq.record, memory.table, vq.iov),
}


@pytest.fixture
def setup_for() -> Iterator[Callable[[Case], Setup]]:
    memories: list[GuestMemory] = []

    def make(c: Case) -> Setup:
        memory = GuestMemory(MEM, c.guest_addr, extra_regions=[(RO, 0x1000, False)])
        memories.append(memory)
        return Setup(memory, DriverQueue(memory, SIZE, packed=c.packed, indirect=c.indirect))

    yield make
    for memory in memories:
        memory.close()


@pytest.mark.parametrize("impl", ["jit", "oracle"])
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_malformed_chain_is_refused_and_named(c: Case, impl: str, setup_for) -> None:
    s = setup_for(c)
    status, index, addr = c.build(s)
    vq = make_device_queue(s.dq)
    before = int(vq.record["last_avail"]), int(vq.record["avail_wrap"])

    result = POPS[impl](vq, s.memory)

    assert result[0] == status
    assert result[2:] == (0, 0, 0)
    record = vq.record
    assert (int(record["error"]), int(record["error_index"]), int(record["error_addr"]) & (1 << 64) - 1) == (
        status,
        index,
        addr,
    )
    # The chain stays where it was: the device consumed nothing.
    assert (int(record["last_avail"]), int(record["avail_wrap"])) == before
    fault = vq.fault()
    assert isinstance(fault, DeviceFault)
    assert fault.code == status
    assert fault.queue == 0
    assert str(fault) == f"vq 0: {status.description} (descriptor {index}, address {addr:#x})"


def test_fault_texts_name_the_problem(setup_for) -> None:
    """The descriptions users read, spelled out once."""
    s = setup_for(Case("x", False, lambda s: (RingStatus.OK, 0, 0)))
    s.chain([(END, 16, 0, 0)])
    vq = make_device_queue(s.dq)
    POPS["jit"](vq, s.memory)
    assert str(vq.fault()) == "vq 0: address outside guest memory (descriptor 0, address 0x110000)"
    texts = {status: status.description for status in RingStatus if status.is_fault}
    assert texts[RingStatus.CHAIN_LOOP] == "descriptor chain loops (longer than its table)"
    assert texts[RingStatus.LENGTH_OVERFLOW] == "descriptor chain length over 4 GiB"
    assert texts[RingStatus.NESTED_INDIRECT] == "indirect descriptor inside an indirect table"
    assert texts[RingStatus.BAD_INDIRECT_LENGTH] == "indirect table of zero length or not a multiple of 16"
    assert texts[RingStatus.INDEX_OUT_OF_RANGE] == "descriptor index or buffer id >= queue size"
    assert texts[RingStatus.WRITE_BEFORE_READ] == "device-readable descriptor after a device-writable one"
    assert texts[RingStatus.AVAIL_IDX_AHEAD] == "available index more than the queue size ahead"
    assert texts[RingStatus.INDIRECT_NOT_NEGOTIATED] == "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"


@pytest.mark.parametrize("impl", ["jit", "oracle"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_first_fault_is_kept(impl: str, packed: bool, setup_for) -> None:
    s = setup_for(Case("x", packed, lambda s: (RingStatus.OK, 0, 0)))
    s.chain([(END, 16, 0, 0)])
    vq = make_device_queue(s.dq)
    assert POPS[impl](vq, s.memory)[0] == RingStatus.ADDR_OUT_OF_RANGE
    # The driver rewrites the chain with another fault: the device keeps failing, the report stays.
    position = 0
    s.dq.write_desc(position, GUEST - 64, 16, s.dq.avail_flags(1) if packed else 0, 0)
    assert POPS[impl](vq, s.memory)[0] == RingStatus.ADDR_OUT_OF_RANGE
    assert str(vq.fault()) == "vq 0: address outside guest memory (descriptor 0, address 0x110000)"


# --- the limits themselves are not faults ---
@pytest.mark.parametrize("impl", ["jit", "oracle"])
@pytest.mark.parametrize("packed", [False, True])
def test_limits_are_inclusive(impl: str, packed: bool, setup_for) -> None:
    s = setup_for(Case("x", packed, lambda s: (RingStatus.OK, 0, 0)))
    vq = make_device_queue(s.dq)
    a = s.buffer()
    # A chain as long as the ring, zero-length elements anywhere (their address is never used).
    descs = [(a + i, 1, NEXT, i + 1) for i in range(SIZE - 2)] + [(END + 0x100, 0, NEXT, SIZE - 1), (a, 3, WRITE, 0)]
    s.chain(descs)
    status, _, ndesc, n, readable = POPS[impl](vq, s.memory)
    assert status == RingStatus.OK
    assert (ndesc, n, readable) == ((SIZE if packed else 1), SIZE - 1, SIZE - 2)
    assert vq.fault() is None


@pytest.mark.parametrize("impl", ["jit", "oracle"])
def test_avail_index_exactly_a_ring_ahead_is_fine(impl: str, setup_for) -> None:
    s = setup_for(Case("x", False, lambda s: (RingStatus.OK, 0, 0)))
    for _ in range(SIZE):
        s.dq.add([], [4])
    vq = make_device_queue(s.dq)
    statuses = [POPS[impl](vq, s.memory)[0] for _ in range(SIZE + 1)]
    assert statuses == [RingStatus.OK] * SIZE + [RingStatus.EMPTY]
    assert vq.fault() is None


@pytest.mark.parametrize("impl", ["jit", "oracle"])
@pytest.mark.parametrize("packed", [False, True])
def test_total_length_of_exactly_4_GiB_minus_1_is_not_an_overflow(impl: str, packed: bool, setup_for) -> None:
    s = setup_for(Case("x", packed, lambda s: (RingStatus.OK, 0, 0)))
    a = s.buffer()
    s.chain([(a, 16, NEXT, 1), (a, 0xFFFF_FFEF, WRITE, 0)])
    vq = make_device_queue(s.dq)
    # 2**32 - 1 bytes in total is allowed; this one fails only because the buffer is not in memory.
    assert POPS[impl](vq, s.memory)[0] == RingStatus.ADDR_OUT_OF_RANGE
