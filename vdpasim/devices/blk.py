"""The virtio-blk device (VIRTIO 1.2 §5.2): backing store, config space, and the compiled request path.

A ``BlkDevice`` is ``SimDevice`` plus a disk. The disk (``BlkBacking``) is one shared mapping seen by
the compiled code as a uint8 array: an anonymous memfd for a RAM disk, the image file itself otherwise,
so the guest's writes are the file's page cache and ``fdatasync`` makes them durable (see jit/blk.py).
Every queue is served by ``blk_burst``: no Python runs per request.

Defaults follow the kernel's vdpa_sim_blk (capacity 0x40000 sectors, size_max 4096, seg_max 32,
blk_size 512, min/opt I/O size 1, one discard or write-zeroes segment of up to UINT_MAX sectors,
serial "vdpa_blk_sim"); unlike it, the device also offers FLUSH, EVENT_IDX, INDIRECT_DESC,
RING_PACKED and IN_ORDER, answers unknown request types with UNSUPP (§5.2.6.2) and can have several
queues (``num_queues``, VIRTIO_BLK_F_MQ). One difference on purpose: discard_sector_alignment is one
logical block (blk_size / 512), where vdpa_sim_blk puts 512 (bytes, in a field counted in sectors).

``process`` runs on the data-path thread and never takes the device lock (the control plane holds it
while it waits for that thread to park). A disabled queue (``set_vq_enabled``) is left alone: its
requests wait in the ring. Requests a previous back-end left in flight (inflight tracking,
devices/inflight.py) are served before any new one.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct

import numpy as np

from ..config import BlkConfig
from ..errors import DeviceRequestError
from ..jit.blk import (
    P_BLK_SIZE,
    P_BUSY_POLL,
    P_CAPACITY,
    P_FD,
    P_FEATURES,
    P_MAX_DISCARD_SECTORS,
    P_MAX_DISCARD_SEG,
    P_MAX_WRITE_ZEROES_SECTORS,
    P_MAX_WRITE_ZEROES_SEG,
    P_PERSISTENT,
    P_POLL_CYCLES,
    P_READ_ONLY,
    P_SEG_MAX,
    P_SIZE_MAX,
    P_WRITE_THROUGH,
    SCRATCH_BYTES,
    blk_burst,
    blk_resubmit,
    new_blk_params,
)
from ..rings.state import RingStatus
from ..virtio import constants as c
from .core import SimDevice

__all__ = [
    "BlkDevice",
    "BlkBacking",
    "BLK_CONFIG_SIZE",
    "BURST",
    "POLL_WATCH_CYCLES",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
]

BURST = 64  # requests per kernel call: enough to amortise the call, few enough to stay fair to other queues
POLL_WATCH_CYCLES = 100_000  # about 40 us at 2.5 GHz: what a pause() of the data path may wait longer

MAX_DISCARD_SECTORS = 0xFFFFFFFF  # vdpa_sim_blk's VDPASIM_BLK_DWZ_MAX_SECTORS, for write-zeroes as well
MAX_DISCARD_SEG = 1  # vdpa_sim_blk (and QEMU): one range per discard or write-zeroes request

# struct virtio_blk_config (§5.2.4), little-endian, with the 1.2 secure-erase and zoned tails (all zero):
# capacity, size_max, seg_max, geometry {cylinders, heads, sectors}, blk_size,
# topology {physical_block_exp, alignment_offset, min_io_size, opt_io_size}, writeback, unused0,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3], max_secure_erase_sectors,
# max_secure_erase_seg, secure_erase_sector_alignment, zoned {zone_sectors, max_open_zones,
# max_active_zones, max_append_sectors, write_granularity, model, unused2[3]}.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIIIIIIIIB3x")
BLK_CONFIG_SIZE = _CONFIG.size  # 96, the kernel's sizeof(struct virtio_blk_config)

_FAULT = int(RingStatus.ADDR_OUT_OF_RANGE)
_SECTOR = c.VIRTIO_BLK_SECTOR_SIZE


class BlkBacking:
    """The disk: one MAP_SHARED mapping and its fd, and ``data``, a uint8 array over the mapping.

    ``persistent`` is True for an image file (FLUSH must reach the file system), False for RAM.
    """

    def __init__(self, fd: int, size: int, *, persistent: bool, writable: bool, path: str | None = None) -> None:
        self.fd = fd
        self.size = size
        self.persistent = persistent
        self.path = path
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self.data = np.frombuffer(self._map, dtype=np.uint8, count=size)

    @classmethod
    def ram(cls, size: int, name: str = "vdpasim-blk") -> BlkBacking:
        """A zero-filled RAM disk: pages are allocated as the guest writes them."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, persistent=False, writable=True)
        except OSError as exc:
            os.close(fd)
            raise DeviceRequestError(f"RAM disk of {size} bytes: {exc.strerror}", errno=exc.errno) from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def file(cls, path: str, capacity: int | None, *, read_only: bool, create: bool) -> BlkBacking:
        """The image at ``path``, ``capacity`` sectors of it (None: all of it, rounded down to sectors)."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise DeviceRequestError(f"disk image {path}: {exc.strerror}", errno=exc.errno) from None
        try:
            have = os.fstat(fd).st_size
            size = (have // _SECTOR if capacity is None else capacity) * _SECTOR
            if size == 0:
                raise DeviceRequestError(f"disk image {path} is empty", errno=errno.EINVAL)
            if have < size:
                if not create:
                    raise DeviceRequestError(
                        f"disk image {path} has {have} bytes, the disk needs {size} (capacity {size // _SECTOR})",
                        errno=errno.EINVAL,
                    )
                # Allocate the blocks now: a write into a hole through the mapping would be a SIGBUS on
                # a full file system, not an error we could report.
                try:
                    os.posix_fallocate(fd, have, size - have)
                except OSError:
                    os.ftruncate(fd, size)  # a file system without fallocate: a sparse file it is
            return cls(fd, size, persistent=True, writable=not read_only, path=path)
        except BaseException:
            os.close(fd)
            raise

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self.size // _SECTOR

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length].tobytes()

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        self.data = np.empty(0, np.uint8)  # drop our view first: a mapping with exported views cannot close
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlkDevice(SimDevice):
    """A virtio-blk device with a RAM or file-backed disk (``BlkConfig``)."""

    device_id = c.VIRTIO_ID_BLOCK
    supports_inflight = True

    def __init__(self, config: BlkConfig, *, backing: BlkBacking | None = None) -> None:
        if backing is None:
            if config.path is None:
                backing = BlkBacking.ram((config.capacity or 0) * _SECTOR, f"vdpasim-blk-{config.name}")
            else:
                backing = BlkBacking.file(
                    config.path, config.capacity, read_only=config.read_only, create=config.create
                )
        self.config = config
        self.backing = backing
        super().__init__(
            config.name,
            features=config.features,
            num_queues=config.num_queues,
            max_queue_size=config.max_queue_size,
            busy_poll=config.busy_poll,
        )
        capacity = backing.capacity
        if capacity * _SECTOR % config.blk_size:
            backing.close()
            raise DeviceRequestError(
                f"{config.name}: capacity {capacity} sectors is not a whole number of {config.blk_size}-byte blocks"
            )
        params = new_blk_params()
        params[P_CAPACITY] = capacity
        params[P_BLK_SIZE] = config.blk_size
        params[P_SEG_MAX] = config.seg_max
        params[P_SIZE_MAX] = config.size_max
        params[P_READ_ONLY] = config.read_only
        params[P_FD] = backing.fd
        params[P_PERSISTENT] = backing.persistent
        params[P_MAX_DISCARD_SECTORS] = MAX_DISCARD_SECTORS
        params[P_MAX_DISCARD_SEG] = MAX_DISCARD_SEG
        params[P_MAX_WRITE_ZEROES_SECTORS] = MAX_DISCARD_SECTORS
        params[P_MAX_WRITE_ZEROES_SEG] = MAX_DISCARD_SEG
        params[P_BUSY_POLL] = config.busy_poll
        # One busy-polled queue is watched from compiled code between requests (jit/blk.py: a request is
        # seen within nanoseconds instead of a Python turn of the data-path loop later); with several
        # queues, watching one would delay the others, so the loop visits each in turn.
        params[P_POLL_CYCLES] = POLL_WATCH_CYCLES if config.busy_poll and config.num_queues == 1 else 0
        self.params = params
        self.ident = np.zeros(c.VIRTIO_BLK_ID_BYTES, dtype=np.uint8)
        serial = config.serial.encode("ascii")
        self.ident[: len(serial)] = np.frombuffer(serial, dtype=np.uint8)
        self.scratch = [np.zeros(SCRATCH_BYTES, dtype=np.uint8) for _ in self.vqs]

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return int(self.params[P_CAPACITY])

    # ----- device-type hooks -----
    def config_space(self) -> bytes:
        cfg = self.config
        return _CONFIG.pack(
            self.capacity,
            cfg.size_max,
            cfg.seg_max,
            0,  # geometry: not offered (VIRTIO_BLK_F_GEOMETRY)
            0,
            0,
            cfg.blk_size,
            0,  # physical_block_exp: physical blocks are logical blocks
            0,  # alignment_offset
            1,  # min_io_size (blocks), as vdpa_sim_blk
            1,  # opt_io_size (blocks), as vdpa_sim_blk
            0,  # writeback: not offered (VIRTIO_BLK_F_CONFIG_WCE)
            0,
            len(self.vqs),
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            cfg.blk_size // _SECTOR,  # discard_sector_alignment, in sectors
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            # write_zeroes_may_unmap: a RAM disk punches holes; an image keeps its blocks (ZERO_RANGE).
            0 if self.backing.persistent else 1,
            0,  # secure erase: not offered
            0,
            0,
            0,  # zoned: not offered
            0,
            0,
            0,
            0,
            0,
        )

    def on_features(self, features: int) -> None:
        self.params[P_FEATURES] = features
        # FLUSH offered but not negotiated: every write must be stable when it completes (§5.2.6.2).
        self.params[P_WRITE_THROUGH] = self.backing.persistent and not features >> c.VIRTIO_BLK_F_FLUSH & 1

    def on_reset(self) -> None:
        self.params[P_FEATURES] = 0
        self.params[P_WRITE_THROUGH] = 0

    def process(self, idx: int) -> bool:
        vq = self.vqs[idx]
        memory = self.memory
        if memory is None or not vq.attached or vq.enabled is False:
            return False
        if vq.resubmitting:
            status, vq.resubmit_pos, notify = blk_resubmit(
                vq.state,
                memory.rows,
                vq.iov,
                self.backing.data,
                self.params,
                self.ident,
                self.scratch[idx],
                vq.resubmit,
                vq.resubmit_pos,
                BURST,
            )
            if notify:
                self.notify(idx)
            if status >= _FAULT or vq.record["error"]:
                self.check_queue(vq)
                return False
            if vq.resubmitting:
                return True
        status, _done, notify, more = blk_burst(
            vq.state, memory.rows, vq.iov, self.backing.data, self.params, self.ident, self.scratch[idx], BURST
        )
        if notify:
            self.notify(idx)
        if status >= _FAULT or vq.record["error"]:  # a ring fault, or one of logging or inflight tracking
            self.check_queue(vq)
            return False
        if more and not self.datapath.busy_poll:
            # Requests are waiting that may never be kicked (the driver added them while kicks were off):
            # kick ourselves, so they are served even if the thread moves on before coming back here.
            kick = self._kicks[idx]
            with contextlib.suppress(OSError):
                os.eventfd_write(self._own_kick(idx) if kick is None else kick, 1)
        return bool(more)

    # ----- disk access for tools and tests (not the data path) -----
    def read_disk(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.backing.size:
            raise DeviceRequestError(f"{self.name}: disk range {offset}+{length} is outside {self.backing.size}")
        return self.backing.read(offset, length)

    def write_disk(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.backing.size:
            raise DeviceRequestError(f"{self.name}: disk range {offset}+{len(data)} is outside {self.backing.size}")
        self.backing.write(offset, data)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(BufferError):  # someone still holds a view: the mapping goes with the process
            self.backing.close()
