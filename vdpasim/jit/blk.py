"""virtio-blk data path, compiled: pop a request, execute it against the disk, complete it (VIRTIO 1.2 §5.2.6).

``blk_burst`` serves up to ``budget`` requests of one queue in one call, so no Python runs per request.
Each request is ``struct virtio_blk_req``: a 16-byte device-readable header {le32 type, le32 reserved,
le64 sector}, then data (readable for OUT, DISCARD and WRITE_ZEROES; writable for IN and GET_ID), then
one status byte, which is the last device-writable byte of the chain. The used length is the number of
bytes written: data written, plus the status byte (as the kernel's vdpa_sim_blk counts it).

The disk is one uint8 array (a memfd for a RAM disk, a MAP_SHARED mapping of the image file otherwise),
``capacity`` 512-byte sectors long. Every check below ends in a status byte, never in an exception:

* IOERR: a malformed request (header shorter than 16 bytes; data on the wrong side for the type; OUT,
  FLUSH, DISCARD or WRITE_ZEROES with more than the status byte writable), a range past the capacity,
  data not a multiple of ``blk_size`` or not aligned to it, more than ``seg_max`` data segments or more
  than ``seg_max * size_max`` bytes, a write to a read-only disk, a sector other than 0 for a request
  that has none (as vdpa_sim_blk), a failed fdatasync;
* UNSUPP: an unknown type, DISCARD or WRITE_ZEROES not negotiated, or a segment flag the type does not
  allow (§5.2.6.2: unmap is allowed only for WRITE_ZEROES).

A chain with no writable byte at all cannot be answered: it is returned with len 0 and counted as an
error. Ring-contract faults (bad descriptors) stop the burst and are reported in the queue record.

Durability: FLUSH on a file-backed disk calls libc's ``fdatasync`` on the image from compiled code (an
external symbol declared in LLVM IR, resolved from the process when the code is loaded, so
``cache=True`` keeps working); writes done through the shared mapping are dirty page-cache pages of
that file, so every write completed before the FLUSH is on stable storage when it reports OK. When
the driver did not negotiate VIRTIO_BLK_F_FLUSH, the device is write-through (§5.2.6.2, the first case
of a stable write): each write is followed by ``fdatasync`` before it completes. A RAM disk has nothing
to make durable: FLUSH is a no-op that succeeds.

DISCARD and WRITE_ZEROES zero their ranges: on a RAM disk by punching a hole in the memfd (the memory
goes back to the host) when deallocation is allowed, on an image file with FALLOC_FL_ZERO_RANGE (the
blocks stay allocated, so a later write through the mapping cannot hit a full file system), and with a
memset where ``fallocate`` is not supported.

Counters in the queue record: ``packets`` requests completed, ``successes`` completed with OK,
``errors`` completed otherwise (malformed ones included), ``bytes`` data bytes read or written.

Live migration and restarts: with dirty logging on (``q.log``) the data and status bytes written into
guest buffers are logged (jit/log.py); with inflight tracking on (``q.inflight``) every request is
marked in flight when fetched and cleared when its completion is published (jit/inflight.py), and
``blk_resubmit`` serves, before anything new, the requests a previous back-end left in flight.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from ..rings.state import RingStatus
from ..virtio.constants import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from . import kernel
from .chain import IOV_ADDR, IOV_LEN, iov_gather, iov_length, iov_scatter
from .inflight import inflight_packed_walk, inflight_pop, inflight_publish, inflight_push, inflight_pushed
from .intrinsics import call_libc, cycles, load_u32, load_u64, memset, store_u8
from .log import log_host, log_iov
from .split import split_walk
from .vq import vq_disable_notify, vq_enable_notify, vq_has_avail, vq_needs_notify, vq_pop, vq_publish, vq_push

__all__ = [
    "P_CAPACITY",
    "P_BLK_SIZE",
    "P_SEG_MAX",
    "P_SIZE_MAX",
    "P_READ_ONLY",
    "P_FD",
    "P_PERSISTENT",
    "P_WRITE_THROUGH",
    "P_FEATURES",
    "P_MAX_DISCARD_SECTORS",
    "P_MAX_DISCARD_SEG",
    "P_MAX_WRITE_ZEROES_SECTORS",
    "P_MAX_WRITE_ZEROES_SEG",
    "P_BUSY_POLL",
    "P_POLL_CYCLES",
    "BLK_PARAMS",
    "SCRATCH_BYTES",
    "new_blk_params",
    "blk_burst",
    "blk_resubmit",
    "libc_fdatasync",
    "libc_fallocate",
]

# Layout of the int64 parameter array the control plane fills (devices/blk.py).
(
    P_CAPACITY,  # disk size in 512-byte sectors
    P_BLK_SIZE,  # logical block size: IN/OUT offsets and lengths must be multiples of it
    P_SEG_MAX,
    P_SIZE_MAX,
    P_READ_ONLY,
    P_FD,  # the backing fd (memfd or image file) for fdatasync/fallocate; -1: none
    P_PERSISTENT,  # 1: an image file, whose writes FLUSH must make durable
    P_WRITE_THROUGH,  # 1: sync every write before completing it (FLUSH offered but not negotiated)
    P_FEATURES,  # the negotiated features
    P_MAX_DISCARD_SECTORS,
    P_MAX_DISCARD_SEG,
    P_MAX_WRITE_ZEROES_SECTORS,
    P_MAX_WRITE_ZEROES_SEG,
    P_BUSY_POLL,  # 1: the data-path thread polls, so drivers need not kick
    P_POLL_CYCLES,  # busy-polling: how long (cycle counter) an empty queue is watched here before returning
) = range(15)
BLK_PARAMS = 16

SCRATCH_BYTES = 64  # a header or a discard segment split across descriptors is gathered here

_OK = int(RingStatus.OK)
_EMPTY = int(RingStatus.EMPTY)

_S_OK = VIRTIO_BLK_S_OK
_S_IOERR = VIRTIO_BLK_S_IOERR
_S_UNSUPP = VIRTIO_BLK_S_UNSUPP

_SECTOR_SHIFT = 9
_HDR_LEN = 16  # struct virtio_blk_outhdr
_SEGMENT_LEN = 16  # struct virtio_blk_discard_write_zeroes

# fallocate(2) modes.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


def new_blk_params() -> np.ndarray:
    params = np.zeros(BLK_PARAMS, dtype=np.int64)
    params[P_FD] = -1
    return params


@intrinsic
def libc_fdatasync(typingctx, fd):
    """int fdatasync(int fd), as int64: 0 or -1."""

    def codegen(context, builder, signature, args):
        return call_libc(context, builder, "fdatasync", args, signature.args, (32,))

    return types.int64(fd), codegen


@intrinsic
def libc_fallocate(typingctx, fd, mode, offset, length):
    """int fallocate(int fd, int mode, off_t offset, off_t len), as int64: 0 or -1."""

    def codegen(context, builder, signature, args):
        return call_libc(context, builder, "fallocate", args, signature.args, (32, 32, 64, 64))

    return types.int64(fd, mode, offset, length), codegen


@kernel
def _sync(params):
    """Make completed writes durable: True on success (nothing to do for a RAM disk)."""
    if not params[P_PERSISTENT]:
        return True
    return libc_fdatasync(params[P_FD]) == 0


@kernel(inline=True)
def _range_ok(params, sector, nbytes):
    """[sector, sector + nbytes/512) lies on the disk, aligned to and a whole number of logical blocks."""
    blk_size = params[P_BLK_SIZE]
    if nbytes < 0 or nbytes % blk_size:
        return False
    # sector is the guest's u64: above 2**63 it is negative here and refused.
    if sector < 0 or sector % (blk_size >> _SECTOR_SHIFT):
        return False
    capacity = params[P_CAPACITY]
    return sector <= capacity and nbytes >> _SECTOR_SHIFT <= capacity - sector


@kernel(inline=True)
def _segments(iov, first, last, skip, length):
    """How many iov rows of [first, last) carry the ``length`` bytes that start ``skip`` bytes in."""
    count = 0
    for i in range(first, last):
        if length <= 0:
            break
        size = iov[i, IOV_LEN]
        if skip >= size:
            skip -= size
            continue
        length -= min(size - skip, length)
        skip = 0
        count += 1
    return count


@kernel(inline=True)
def _data_ok(params, iov, first, last, skip, length):
    """The data part respects seg_max and seg_max * size_max (as vdpa_sim_blk's size check)."""
    if length > params[P_SEG_MAX] * params[P_SIZE_MAX]:
        return False
    return _segments(iov, first, last, skip, length) <= params[P_SEG_MAX]


@kernel
def _zero(params, disk_addr, sector, nsectors, deallocate):
    """Zero a range of the disk: deallocate it when allowed and possible, else write zeroes."""
    offset = sector << _SECTOR_SHIFT
    length = nsectors << _SECTOR_SHIFT
    if length == 0:
        return
    fd = params[P_FD]
    if fd >= 0:
        if params[P_PERSISTENT]:
            mode = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        elif deallocate:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        else:
            mode = 0
        # The kernel drops the range from every mapping of the file, so the disk array reads zeroes.
        if mode and libc_fallocate(fd, mode, offset, length) == 0:
            return
    memset(disk_addr + offset, 0, length)


@kernel
def _discard_write_zeroes(params, iov, readable, payload, disk_addr, scratch_addr, kind):
    """DISCARD or WRITE_ZEROES: check every segment, then zero them all (§5.2.6)."""
    if kind == VIRTIO_BLK_T_DISCARD:
        max_seg, max_sectors, allowed_flags = params[P_MAX_DISCARD_SEG], params[P_MAX_DISCARD_SECTORS], 0
    else:
        max_seg, max_sectors = params[P_MAX_WRITE_ZEROES_SEG], params[P_MAX_WRITE_ZEROES_SECTORS]
        allowed_flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    if payload == 0 or payload % _SEGMENT_LEN or payload // _SEGMENT_LEN > max_seg:
        return _S_IOERR
    nseg = payload // _SEGMENT_LEN
    for i in range(nseg):
        iov_gather(iov, 0, readable, _HDR_LEN + _SEGMENT_LEN * i, scratch_addr, _SEGMENT_LEN)
        sector = load_u64(scratch_addr)
        nsectors = load_u32(scratch_addr + 8)
        if load_u32(scratch_addr + 12) & ~allowed_flags:
            return _S_UNSUPP  # unknown flags, or unmap on a discard (§5.2.6.2)
        if nsectors > max_sectors or not _range_ok(params, sector, nsectors << _SECTOR_SHIFT):
            return _S_IOERR
    if params[P_READ_ONLY]:
        return _S_IOERR
    for i in range(nseg):
        iov_gather(iov, 0, readable, _HDR_LEN + _SEGMENT_LEN * i, scratch_addr, _SEGMENT_LEN)
        # Deallocating is what a discard asks for; a write-zeroes may do it only with the unmap flag.
        unmap = load_u32(scratch_addr + 12) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        deallocate = kind == VIRTIO_BLK_T_DISCARD or unmap != 0
        _zero(params, disk_addr, load_u64(scratch_addr), load_u32(scratch_addr + 8), deallocate)
    if params[P_WRITE_THROUGH] and not _sync(params):
        return _S_IOERR
    return _S_OK


@kernel
def blk_execute(q, iov, n, readable, disk, params, ident, scratch):
    """Execute one request whose chain has at least one writable byte. Returns (status, data bytes written)."""
    rtotal = iov_length(iov, 0, readable)
    wtotal = iov_length(iov, readable, n)
    if rtotal < _HDR_LEN:
        return _S_IOERR, 0
    # The header: read in place when the first buffer holds it whole (every driver does that).
    if iov[0, IOV_LEN] >= _HDR_LEN:
        hdr = iov[0, IOV_ADDR]
    else:
        hdr = scratch.ctypes.data
        iov_gather(iov, 0, readable, 0, hdr, _HDR_LEN)
    kind = load_u32(hdr)
    sector = load_u64(hdr + 8)
    disk_addr = disk.ctypes.data

    if kind == VIRTIO_BLK_T_IN:
        length = wtotal - 1
        if rtotal != _HDR_LEN or not _range_ok(params, sector, length):
            return _S_IOERR, 0
        if not _data_ok(params, iov, readable, n, 0, length):
            return _S_IOERR, 0
        iov_scatter(iov, readable, n, 0, disk_addr + (sector << _SECTOR_SHIFT), length)
        q.bytes += length
        return _S_OK, length

    if kind == VIRTIO_BLK_T_OUT:
        length = rtotal - _HDR_LEN
        if wtotal != 1 or params[P_READ_ONLY] or not _range_ok(params, sector, length):
            return _S_IOERR, 0
        if not _data_ok(params, iov, 0, readable, _HDR_LEN, length):
            return _S_IOERR, 0
        iov_gather(iov, 0, readable, _HDR_LEN, disk_addr + (sector << _SECTOR_SHIFT), length)
        q.bytes += length
        if params[P_WRITE_THROUGH] and not _sync(params):
            return _S_IOERR, 0
        return _S_OK, 0

    if kind == VIRTIO_BLK_T_FLUSH:
        # The driver sets sector to 0 (§5.2.6.1); vdpa_sim_blk refuses anything else, and so do we.
        if sector != 0 or wtotal != 1:
            return _S_IOERR, 0
        if params[P_READ_ONLY] or _sync(params):
            return _S_OK, 0
        return _S_IOERR, 0

    if kind == VIRTIO_BLK_T_GET_ID:
        if sector != 0 or rtotal != _HDR_LEN:
            return _S_IOERR, 0
        # The id is up to 20 bytes, NUL-padded; a shorter buffer gets its prefix (as QEMU and vdpa_sim_blk).
        length = min(VIRTIO_BLK_ID_BYTES, wtotal - 1)
        iov_scatter(iov, readable, n, 0, ident.ctypes.data, length)
        return _S_OK, length

    if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        feature = VIRTIO_BLK_F_DISCARD if kind == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        if not params[P_FEATURES] >> feature & 1:
            return _S_UNSUPP, 0
        if sector != 0 or wtotal != 1:
            return _S_IOERR, 0
        return (
            _discard_write_zeroes(params, iov, readable, rtotal - _HDR_LEN, disk_addr, scratch.ctypes.data, kind),
            0,
        )

    return _S_UNSUPP, 0


@kernel
def blk_burst(q_state, rows, iov, disk, params, ident, scratch, budget):
    """Serve up to ``budget`` requests of one queue. Returns (status, requests completed, notify, more).

    ``status`` is OK or the ring fault that stopped the burst (recorded in the queue record); ``notify``
    says whether to signal the driver; ``more`` that requests are waiting (the budget ran out, or some
    arrived while notifications were being re-enabled). Kicks are suppressed while the burst runs and
    requested again before it returns (unless the thread busy-polls), so none is lost. A busy-polling
    thread publishes its completions when the ring runs dry and, unless the driver wants a signal, watches
    the ring for ``P_POLL_CYCLES`` before returning to Python.
    """
    q = q_state[0]
    vq_disable_notify(q)
    status = _OK
    done = 0
    published = 0
    notify = False
    more = False
    while True:
        if done == budget:
            more = True
            break
        start = q.last_avail  # the chain's first ring position (packed inflight tracking)
        status, head, ndesc, n, readable = vq_pop(q, rows, iov)
        if status == _EMPTY:
            if params[P_BUSY_POLL]:
                if done > published:
                    # Complete what was served before waiting for more; a driver that wants a signal gets it now.
                    vq_publish(q)
                    if q.inflight:
                        inflight_publish(q)
                    published = done
                    if vq_needs_notify(q):
                        notify = True
                        break
                if _watch(q, params[P_POLL_CYCLES]):
                    continue
                break
            # Ask for a kick, then look again: the driver may have added a request before it saw the
            # request for kicks (§2.7.10, §2.8.10).
            vq_enable_notify(q)
            if not vq_has_avail(q):
                break
            vq_disable_notify(q)
            continue
        if status != _OK:
            break
        if q.inflight:
            inflight_pop(q, head, start, ndesc)
        done += 1
        _serve(q, rows, iov, head, ndesc, n, readable, disk, params, ident, scratch)
    if status == _EMPTY:
        status = _OK
    if more and not params[P_BUSY_POLL]:
        # Leaving with work queued: keep kicks on, so nothing depends on the caller coming back.
        vq_enable_notify(q)
    vq_publish(q)
    if q.inflight:
        inflight_publish(q)
    notify = notify or (done > published and vq_needs_notify(q))
    return status, done, notify, more


@kernel(inline=True)
def _watch(q, limit):
    """Busy-polling: watch an empty queue for up to ``limit`` cycles; whether a request arrived.

    Compiled, a new request is seen within nanoseconds, where one more turn of the data-path thread's
    Python loop costs microseconds: this is what the latency of a busy-polled queue is made of at low depth.
    """
    if limit <= 0:
        return False
    end = cycles() + limit
    while not vq_has_avail(q):
        if cycles() > end:
            return False
    return True


@kernel(inline=True)
def _serve(q, rows, iov, head, ndesc, n, readable, disk, params, ident, scratch):
    """Execute one fetched request, write its status byte and hand the chain back."""
    q.packets += 1
    written = 0
    if n == readable:
        # Nowhere to put a status byte: hand the chain back untouched.
        q.errors += 1
    else:
        result, written = blk_execute(q, iov, n, readable, disk, params, ident, scratch)
        status_addr = iov[n - 1, IOV_ADDR] + iov[n - 1, IOV_LEN] - 1
        store_u8(status_addr, result)
        if q.log:
            log_iov(q, rows, iov, readable, n, written)
            log_host(q, rows, status_addr, 1)
        written += 1
        if result == _S_OK:
            q.successes += 1
        else:
            q.errors += 1
    if q.inflight:
        inflight_push(q, head, ndesc)
    vq_push(q, head, ndesc, written)
    if q.inflight:
        inflight_pushed(q)


@kernel
def blk_resubmit(q_state, rows, iov, disk, params, ident, scratch, entries, first, budget):
    """Serve requests a previous back-end fetched and never completed, in fetch order.

    ``entries`` lists their heads (split) or head region entries (packed), sorted by fetch counter;
    serves entries[first:], at most ``budget``. Returns (status, position of the next entry, notify).
    """
    q = q_state[0]
    status = _OK
    position = first
    while position < entries.shape[0] and position - first < budget:
        entry = entries[position]
        if q.packed:
            status, head, ndesc, n, readable = inflight_packed_walk(q, rows, entry, iov)
            q.inflight_entry = entry
        else:
            status, n, readable = split_walk(q, rows, entry, iov)
            head = entry
            ndesc = 1
        if status != _OK:
            break
        position += 1
        _serve(q, rows, iov, head, ndesc, n, readable, disk, params, ident, scratch)
    vq_publish(q)
    if q.inflight:
        inflight_publish(q)
    notify = position > first and vq_needs_notify(q)
    return status, position, notify
