"""The vhost-vdpa character device, served in userspace: ``VhostVdpaServer(ops, name=...)`` is one open file.

The bypass supervisor (bridge/supervisor) hands it every ioctl and write a trapped program makes on its fd,
with a ``Caller`` to reach that program's memory and fds; the answers are the kernel's
(drivers/vhost/vdpa.c over drivers/vhost/vhost.c), with any DeviceOps as the vDPA parent. Each rule below
was checked against those sources; the function named is where the kernel decides.

Open and close (vhost_vdpa_open, vhost_vdpa_release): both reset the device, and a reset clears its memory
map (VDPA_RESET_F_CLEAN_MAP: ``set_map`` of an empty table) unless IOTLB_PERSIST was acked. Close also drops
every IOTLB mapping and every fd taken from the caller.

Ioctls (vhost_vdpa_unlocked_ioctl), in the kernel's order of checks:

* SET_BACKEND_FEATURES is answered first: unknown bits, SUSPEND/RESUME without ``ops.suspend``/``resume``,
  IOTLB_PERSIST without a persistent map -> EOPNOTSUPP; DESC_ASID without IOTLB_ASID -> EINVAL, without
  ``ops.get_vq_desc_group`` -> EOPNOTSUPP. GET_BACKEND_FEATURES offers IOTLB_MSG_V2 | IOTLB_BATCH | IOTLB_ASID,
  SUSPEND/RESUME as supported, DESC_ASID, and the parent's own bits (``ops.get_backend_features``; a
  DeviceOps without it is taken to offer ENABLE_AFTER_DRIVER_OK, as vdpa_sim does: see differences).
* GET/SET_FEATURES (vhost_vdpa_set_features): EBUSY once FEATURES_OK is set (checked before the argument is
  read), a refusal by the device -> EINVAL. GET/SET_STATUS (vhost_vdpa_set_status): a non-zero status that
  clears a bit -> EINVAL; 0 resets; any other status is handed to the device, which cannot fail the ioctl:
  a device that refuses (FEATURES_OK for bad features) just does not keep the bit, and the VMM reads it back.
* GET/SET_CONFIG (vhost_vdpa_config_validate): len 0 or off > size -> EINVAL; len > size - off is E2BIG
  there, but both callers turn every validation failure into EINVAL, so EINVAL it is. A config read before
  any SET_FEATURES since reset first sets driver features 0 (vdpa_get_config_unlocked's legacy-guest rule).
  A config write the device refuses is not reported (set_config returns void).
* GET_VRING_NUM is the max size as u16; GET_IOVA_RANGE is the device's range read at open; GET_CONFIG_SIZE,
  GET_VQS_COUNT, GET_GROUP_NUM, GET_AS_NUM as u32 (one group and one address space unless ``ops`` says more).
* SET_CONFIG_CALL (vhost_vdpa_set_config_call): -1 unbinds; a bad fd -> EBADF, a non-eventfd -> EINVAL, and
  a failed call leaves no config eventfd bound (the kernel swaps the old one out first).
* SUSPEND/RESUME (vhost_vdpa_suspend/resume): 0 without DRIVER_OK, EOPNOTSUPP without the operation.
* SET_LOG_BASE / SET_LOG_FD: -ENOIOCTLCMD, which the ioctl syscall reports as ENOTTY.
* Everything else goes through vhost_dev_ioctl: SET_OWNER (EBUSY for a second one), then every other request
  needs an owner (EPERM). SET_MEM_TABLE is checked as vhost_set_memory does (padding -> EOPNOTSUPP, more
  than 64 regions -> E2BIG, unreadable or empty/wrapping regions -> EFAULT) and then has no effect on a
  vDPA device. RESET_OWNER is not a vhost-vdpa request: it falls through like any unknown one.
* Then vhost_vdpa_vring_ioctl: the u32 at the argument is read as a ring index (EFAULT) and must be below
  the queue count (ENOBUFS) -- for unknown requests too, which then get ENOTTY. SET_VRING_NUM: 0, over
  0xffff or not a power of 2 -> EINVAL (never refused after DRIVER_OK: vhost-vdpa has no such check).
  SET_VRING_ADDR: flags other than LOG -> EOPNOTSUPP, misaligned avail (2) / used / log (4) -> EINVAL, and
  after DRIVER_OK unless suspended -> EINVAL. SET_VRING_BASE: a split base over 0xffff -> EINVAL, after
  DRIVER_OK unless suspended -> EINVAL. GET_VRING_BASE reads the device. SET_VRING_KICK/CALL/ERR: -1
  unbinds, a bad fd -> EBADF, a non-eventfd -> EINVAL; the fd is taken with ``caller.take_fd`` and the
  previous copy closed once the device holds the new one. SET/GET_VRING_BUSYLOOP_TIMEOUT are stored and
  read back (vhost_vring_ioctl accepts them). GET_VRING_GROUP / GET_VRING_DESC_GROUP / SET_GROUP_ASID /
  GET_VRING_SIZE: EOPNOTSUPP without the matching operation on ``ops``; a group >= the group count -> EIO;
  SET_GROUP_ASID with asid >= the address-space count -> EINVAL.

IOTLB writes (vhost_chr_write_iter, vhost_vdpa_process_iotlb_msg): framing errors, and an UPDATE of size
0, are EINVAL (see iotlb.py). Every error of the message handler is turned into EFAULT by
vhost_chr_write_iter, so a write fails with EFAULT whatever was wrong (no owner, an asid beyond the
address spaces, a batch of another asid, no mapping yet in that asid for INVALIDATE or BATCH_END, an
UPDATE outside the IOVA range / wrapping (EINVAL inside), overlapping a mapping (EEXIST inside), an unknown
message type); the exception raised (``IotlbRejected``) keeps the handler's errno as ``cause`` and the log
line says what it was. UPDATE maps the caller's shared file mapping (``caller.map_file``) as a
``Region``; a range that is not backed by a shared file (QEMU's ROMs and other anonymous RAM blocks) is
skipped without an error and without an IOTLB entry, as vhost_vdpa_va_map skips VMAs that are not
VM_SHARED files -- the device simply cannot reach it (``stats.skipped`` counts them). INVALIDATE drops
every mapping that meets [iova, iova + size - 1] whole (vhost_iotlb_del_range semantics: mappings are
never split). BATCH_BEGIN .. BATCH_END collects changes for one ``ops.set_map``,
and outside a batch every UPDATE and INVALIDATE commits at once. A write returns 72 (the kernel answers
sizeof the framing for any write of at least the 40 bytes it reads). A Region is closed only once it is
neither in the IOTLB nor in the table the device was last given.

Deliberate differences from the kernel:

* Ownership is per open file, not per process (``Caller`` carries no mm): SET_OWNER makes this open owned.
* An UPDATE of a range ``map_file`` cannot resolve is skipped whatever the reason; the kernel skips
  non-shared VMAs too but fails (EFAULT) a range with no VMA at all, which the Caller protocol does not
  tell apart. A range spanning several mappings is resolved as one (QEMU sends one UPDATE per RAM block).
  ``perm`` must be RO, WO or RW (the kernel's use_va path does not check it).
* A reset by SET_STATUS(0) also closes the kick, call and error eventfds: our devices forget them on reset
  (SimDevice.reset), where the kernel's vhost layer would keep polling the old kick fd.
* Only address space 0 is the device's memory (DeviceOps.set_map has no asid); mappings in other address
  spaces are kept and checked but not handed on.
* A device operation that raises where the kernel's op cannot fail (SET_VRING_NUM, SET_VRING_CALL,
  SET_VRING_ENABLE) reports its errno instead of being ignored. (Over the bypass's vhost-user bridge those
  requests are not waited for, so there a refusal is only logged, as the kernel would ignore it.)

Cost: the status is kept once known (``_driver_bits``): only the driver moves FEATURES_OK and DRIVER_OK, so
the FEATURES_OK / DRIVER_OK checks of SET_FEATURES and of every vring ioctl do not ask the device, which over
the bridge is a vhost-user round trip each. A SET_STATUS is checked against the kept status before DRIVER_OK
(no ring runs yet, so the device cannot have set NEEDS_RESET) and against the device's own afterwards;
GET_STATUS always asks the device; a status that adds FEATURES_OK is asked again (the device may refuse it).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from vdpasim.errors import PeerError, VdpasimError
from vdpasim.memory import Region, RegionTable
from vdpasim.ops import DeviceOps, RingAddressSpace, supports
from vdpasim.rings.state import PackedState, SplitState
from vdpasim.virtio.constants import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_RING_PACKED

from . import abi as a
from . import iotlb

__all__ = ["Caller", "VhostVdpaServer", "VhostVdpaStats", "IotlbRejected", "BACKEND_FEATURES_ALWAYS"]

log = logging.getLogger("vdpasim.vhost_vdpa")

BACKEND_FEATURES_ALWAYS = (
    1 << a.VHOST_BACKEND_F_IOTLB_MSG_V2 | 1 << a.VHOST_BACKEND_F_IOTLB_BATCH | 1 << a.VHOST_BACKEND_F_IOTLB_ASID
)
_BACKEND_FEATURES_KNOWN = BACKEND_FEATURES_ALWAYS | sum(
    1 << bit
    for bit in (
        a.VHOST_BACKEND_F_DESC_ASID,
        a.VHOST_BACKEND_F_IOTLB_PERSIST,
        a.VHOST_BACKEND_F_SUSPEND,
        a.VHOST_BACKEND_F_RESUME,
        a.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    )
)
# Requests vhost_vring_ioctl accepts that abi.py does not name (declared _IOW, both of them).
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = 1 << 30 | 8 << 16 | a.VHOST_VIRTIO << 8 | 0x23
VHOST_GET_VRING_BUSYLOOP_TIMEOUT = 1 << 30 | 8 << 16 | a.VHOST_VIRTIO << 8 | 0x24
VHOST_MAX_MEM_REGIONS = 64  # vhost.ko's max_mem_regions module parameter default
_VHOST_MEMORY = struct.Struct("<II")  # nregions, padding
_VHOST_MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, flags_padding
_U8, _U16, _U32, _I32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<i", "<Q"))
_U64_MAX = (1 << 64) - 1


class Caller(Protocol):
    """The process that made the call, as the server reaches it (bridge.supervisor.TargetMemory implements it)."""

    def read(self, addr: int, length: int) -> bytes:
        """Its memory; raises PeerError(errno=EFAULT)."""

    def write(self, addr: int, data: bytes) -> None:
        """Its memory; raises PeerError(errno=EFAULT)."""

    def take_fd(self, number: int) -> int:
        """A new fd (ours to close) for its fd ``number``; raises PeerError(errno=EBADF)."""

    def map_file(self, uaddr: int, size: int) -> tuple[int, int]:
        """(fd ours to close, file offset) of the shared file mapping backing [uaddr, uaddr+size); PeerError EFAULT."""


class IotlbRejected(PeerError):
    """An IOTLB message the device's handler refused: the write fails with EFAULT, ``cause`` says why."""

    def __init__(self, message: str, *, cause: int) -> None:
        super().__init__(message, errno=errno.EFAULT)
        self.cause = cause


@dataclass
class VhostVdpaStats:
    """What one open served: calls, failures and the time spent in them (``vdpasim compare`` reports it)."""

    ioctls: int = 0
    writes: int = 0
    failures: int = 0
    seconds: float = 0.0
    updates: int = 0
    skipped: int = 0  # UPDATEs of memory that is not a shared file mapping
    invalidates: int = 0
    commits: int = 0
    requests: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Mapping:
    iova: int
    last: int
    uaddr: int
    perm: int
    region: Region


_REQUEST_NAMES = {
    value: name.removeprefix("VHOST_")
    for name, value in vars(a).items()
    if isinstance(value, int) and value >> 8 & 0xFF == a.VHOST_VIRTIO and name.startswith("VHOST_")
}


def _request_name(request: int) -> str:
    return _REQUEST_NAMES.get(request, "unknown ioctl")  # a bounded set of names: stats count by name


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            log.warning("closing fd %d failed", fd)


class VhostVdpaServer:
    """One open of a simulated /dev/vhost-vdpa-N over ``ops``; see the module docstring for the rules."""

    def __init__(self, ops: DeviceOps, *, name: str, backend_features: int | None = None) -> None:
        self.ops = ops
        self.name = name
        self.stats = VhostVdpaStats()
        self._lock = threading.RLock()
        self.nvqs = ops.get_vq_count()
        self.ngroups = self._probe("get_group_num", 1)
        self.nas = self._probe("get_as_num", 1)
        span = ops.get_iova_range()
        self.iova_first, self.iova_last = span.first, span.last
        if backend_features is None:
            backend_features = self._probe("get_backend_features", 1 << a.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
        self.parent_backend_features = backend_features
        self.acked_backend_features = 0
        self.owned = False
        self.suspended = False
        self.closed = False
        self._features_valid = False
        self._in_batch = False
        self._batch_asid = 0
        self._iotlb: dict[int, list[_Mapping]] = {}  # address space -> mappings, in iova order
        self._committed: tuple[Region, ...] = ()  # what the device was last given (address space 0)
        self._regions: list[Region] = []  # every region we mapped and have not closed yet
        self._kick: list[int | None] = [None] * self.nvqs
        self._call: list[int | None] = [None] * self.nvqs
        self._err: list[int | None] = [None] * self.nvqs
        self._busyloop = [0] * self.nvqs
        self._config_call: int | None = None
        self._known: int | None = None  # the device's status as far as the server knows it (_driver_bits)
        self._reset("open")

    def _probe(self, name: str, default: int) -> int:
        """An optional parent fact (vdpa core: 1 group, 1 address space); a parent that cannot say means the default."""
        if not supports(self.ops, name):
            return default
        try:
            return int(getattr(self.ops, name)())
        except PeerError as exc:  # e.g. a vhost-user client whose back-end lacks the vDPA extension
            log.info("%s: %s unavailable (%s), taking %d", self.name, name, exc, default)
            return default

    # ===== NodeHandler =====
    def ioctl(self, request: int, arg: int, caller: Caller) -> int:
        """The ioctl's result (0); raises PeerError carrying the errno the kernel would answer."""
        return self._serve("ioctls", _request_name(request), lambda: self._ioctl(request & 0xFFFFFFFF, arg, caller))

    def write(self, addr: int, length: int, caller: Caller) -> int:
        """An IOTLB message written at ``addr``; returns the bytes the kernel reports written."""
        return self._serve("writes", "IOTLB", lambda: self._write(addr, length, caller))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self._reset("close", clean_map=True)
            self._iotlb.clear()
            self._in_batch = False
            self._collect()
            self._set_config_call(None)
            for fd in self._err:
                _close(fd)
            self._err = [None] * self.nvqs
            self.closed = True

    def __enter__(self) -> VhostVdpaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ===== bookkeeping =====
    def _serve(self, kind: str, what: str, handler: Callable[[], int]) -> int:
        start = time.perf_counter()
        with self._lock:
            try:
                if self.closed:
                    raise PeerError(f"{self.name}: the file is closed", errno=errno.EBADF)
                return handler()
            except PeerError as exc:
                self.stats.failures += 1
                log.info("%s: %s refused (%s): %s", self.name, what, errno.errorcode.get(exc.errno, exc.errno), exc)
                raise
            except (VdpasimError, OSError, ValueError, OverflowError, struct.error) as exc:
                self.stats.failures += 1
                number = getattr(exc, "errno", None) or errno.EINVAL
                log.warning("%s: %s failed (%s): %s", self.name, what, errno.errorcode.get(number, number), exc)
                raise PeerError(f"{self.name}: {what}: {exc}", errno=number) from exc
            finally:
                setattr(self.stats, kind, getattr(self.stats, kind) + 1)
                self.stats.requests[what] = self.stats.requests.get(what, 0) + 1
                self.stats.seconds += time.perf_counter() - start

    def _status(self) -> int:
        """The device's status, read from it (it may have set NEEDS_RESET on its own)."""
        status = self._known = self.ops.get_status() & 0xFF
        return status

    def _driver_bits(self) -> int:
        """The status for FEATURES_OK / DRIVER_OK checks. Only the driver sets or clears those two bits (the
        device adds NEEDS_RESET at most), so once the server knows the status it asks the device no more:
        over the bridge each ask is a vhost-user round trip, and the vring ioctls check DRIVER_OK each time."""
        return self._known if self._known is not None else self._status()

    def _status_before_change(self) -> int:
        """The status a SET_STATUS is checked against: the mirror before DRIVER_OK (no ring runs, so the device
        cannot have set NEEDS_RESET), the device's own afterwards."""
        known = self._known
        if known is not None and not known & VIRTIO_CONFIG_S_DRIVER_OK:
            return known
        return self._status()

    def _backend_has(self, bit: int) -> bool:
        return bool(self.acked_backend_features >> bit & 1)

    def _reset(self, why: str, *, clean_map: bool | None = None) -> None:
        """vdpa_reset: the device forgets its state, and its map unless IOTLB_PERSIST was acked."""
        self._known = None
        self.ops.reset()
        self._known = 0
        self.suspended = False
        self._features_valid = False
        if clean_map is None:
            clean_map = not self._backend_has(a.VHOST_BACKEND_F_IOTLB_PERSIST)
        if clean_map:
            self.ops.set_map(RegionTable(), RingAddressSpace.GUEST)
            self._committed = ()
            self._collect()
        for fds in (self._kick, self._call):
            for i, fd in enumerate(fds):
                _close(fd)
                fds[i] = None
        log.debug("%s: device reset (%s)", self.name, why)

    # ===== ioctls =====
    def _ioctl(self, request: int, arg: int, caller: Caller) -> int:
        if request == a.VHOST_SET_BACKEND_FEATURES:
            return self._set_backend_features(arg, caller)
        handler = self._DEVICE_IOCTLS.get(request)
        if handler is not None:
            return handler(self, arg, caller)
        if request in (a.VHOST_SET_LOG_BASE, a.VHOST_SET_LOG_FD):
            raise PeerError("no dirty-page log on vhost-vdpa (ENOIOCTLCMD)", errno=errno.ENOTTY)
        # vhost_dev_ioctl
        if request == a.VHOST_SET_OWNER:
            if self.owned:
                raise PeerError("the device already has an owner", errno=errno.EBUSY)
            self.owned = True
            return 0
        if not self.owned:
            raise PeerError("no SET_OWNER yet", errno=errno.EPERM)
        if request == a.VHOST_SET_MEM_TABLE:
            return self._set_mem_table(arg, caller)
        return self._vring_ioctl(request, arg, caller)

    def _set_backend_features(self, arg: int, caller: Caller) -> int:
        (features,) = _U64.unpack(caller.read(arg, 8))
        unknown = features & ~_BACKEND_FEATURES_KNOWN
        if unknown:
            raise PeerError(f"unknown backend features {unknown:#x}", errno=errno.EOPNOTSUPP)
        for bit, op in ((a.VHOST_BACKEND_F_SUSPEND, "suspend"), (a.VHOST_BACKEND_F_RESUME, "resume")):
            if features >> bit & 1 and not supports(self.ops, op):
                raise PeerError(f"backend feature bit {bit}: the device has no {op}", errno=errno.EOPNOTSUPP)
        if features >> a.VHOST_BACKEND_F_DESC_ASID & 1:
            if not features >> a.VHOST_BACKEND_F_IOTLB_ASID & 1:
                raise PeerError("DESC_ASID without IOTLB_ASID", errno=errno.EINVAL)
            if not supports(self.ops, "get_vq_desc_group"):
                raise PeerError("DESC_ASID: the device has no descriptor groups", errno=errno.EOPNOTSUPP)
        if features >> a.VHOST_BACKEND_F_IOTLB_PERSIST & 1 and not self._persistent_map():
            raise PeerError("IOTLB_PERSIST: the device clears its map on reset", errno=errno.EOPNOTSUPP)
        self.acked_backend_features = features
        return 0

    def _persistent_map(self) -> bool:
        # vhost_vdpa_has_persistent_map: every DeviceOps has set_map and none has reset_map.
        return bool(self.parent_backend_features >> a.VHOST_BACKEND_F_IOTLB_PERSIST & 1)

    def _offered_backend_features(self) -> int:
        bits = BACKEND_FEATURES_ALWAYS | self.parent_backend_features
        if supports(self.ops, "suspend"):
            bits |= 1 << a.VHOST_BACKEND_F_SUSPEND
        if supports(self.ops, "resume"):
            bits |= 1 << a.VHOST_BACKEND_F_RESUME
        if supports(self.ops, "get_vq_desc_group"):
            bits |= 1 << a.VHOST_BACKEND_F_DESC_ASID
        return bits

    def _put(self, caller: Caller, arg: int, layout: struct.Struct, *values: int) -> int:
        caller.write(arg, layout.pack(*values))
        return 0

    def _get_device_id(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U32, self.ops.get_device_id() & 0xFFFFFFFF)

    def _get_status(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U8, self._status())

    def _set_status(self, arg: int, caller: Caller) -> int:
        (status,) = _U8.unpack(caller.read(arg, 1))
        if status == 0:
            self._reset("status 0")
            return 0
        old = self._status_before_change()
        if old & ~status:
            raise PeerError(f"status {status:#x} clears bits {old & ~status:#x} of {old:#x}", errno=errno.EINVAL)
        # A device may refuse FEATURES_OK (and then keeps neither it nor DRIVER_OK): ask it next time.
        self._known = None if status & ~old & VIRTIO_CONFIG_S_FEATURES_OK else status
        try:
            self.ops.set_status(status)
        except PeerError as exc:  # vdpa_set_status cannot fail: the driver reads the status back
            self._known = None
            log.info("%s: the device did not take status %#x: %s", self.name, status, exc)
        return 0

    def _config_header(self, arg: int, caller: Caller) -> tuple[int, int]:
        offset, length = a.VHOST_VDPA_CONFIG.unpack(caller.read(arg, a.VHOST_VDPA_CONFIG.size))
        size = self.ops.get_config_size()
        if length == 0 or offset > size:
            raise PeerError(f"config access {offset}+{length} of a {size}-byte config space", errno=errno.EINVAL)
        if length > size - offset:
            # E2BIG in vhost_vdpa_config_validate; its callers answer EINVAL for every refusal.
            raise PeerError(f"config access {offset}+{length} past the {size}-byte config space", errno=errno.EINVAL)
        return offset, length

    def _get_config(self, arg: int, caller: Caller) -> int:
        offset, length = self._config_header(arg, caller)
        if not self._features_valid:  # vdpa_get_config: a config read before features means a legacy guest
            self._features_valid = True
            try:
                self.ops.set_driver_features(0)
            except PeerError as exc:
                log.debug("%s: implicit SET_FEATURES(0) refused: %s", self.name, exc)
        data = self.ops.get_config(offset, length)
        caller.write(arg + a.VHOST_VDPA_CONFIG.size, data)
        return 0

    def _set_config(self, arg: int, caller: Caller) -> int:
        offset, length = self._config_header(arg, caller)
        data = caller.read(arg + a.VHOST_VDPA_CONFIG.size, length)
        try:
            self.ops.set_config(offset, data)
        except PeerError as exc:  # vdpa_set_config cannot fail
            log.info("%s: config write %d+%d ignored by the device: %s", self.name, offset, length, exc)
        return 0

    def _get_features(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U64, self.ops.get_device_features() & _U64_MAX)

    def _set_features(self, arg: int, caller: Caller) -> int:
        if self._driver_bits() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise PeerError("features are frozen once FEATURES_OK is set", errno=errno.EBUSY)
        (features,) = _U64.unpack(caller.read(arg, 8))
        self._features_valid = True
        try:
            self.ops.set_driver_features(features)
        except PeerError as exc:
            raise PeerError(f"the device refused features {features:#x}: {exc}", errno=errno.EINVAL) from exc
        return 0

    def _get_vring_num(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U16, self.ops.get_vq_num_max() & 0xFFFF)

    def _get_group_num(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U32, self.ngroups)

    def _get_as_num(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U32, self.nas)

    def _set_config_call_ioctl(self, arg: int, caller: Caller) -> int:
        (fd,) = _I32.unpack(caller.read(arg, 4))
        if fd == a.VHOST_FILE_UNBIND:
            self._set_config_call(None)
            return 0
        try:
            ours = self._take_eventfd(fd, caller)
        except PeerError:
            self._set_config_call(None)  # the kernel swapped the old eventfd out before failing
            raise
        self._set_config_call(ours)
        return 0

    def _set_config_call(self, fd: int | None) -> None:
        old, self._config_call = self._config_call, fd
        if supports(self.ops, "set_config_cb") and (fd is not None or old is not None):
            self.ops.set_config_cb(fd)
        if old is not None and old != fd:
            _close(old)

    def _get_backend_features(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U64, self._offered_backend_features())

    def _get_iova_range(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, a.VHOST_VDPA_IOVA_RANGE, self.iova_first, self.iova_last)

    def _get_config_size(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U32, self.ops.get_config_size())

    def _get_vqs_count(self, arg: int, caller: Caller) -> int:
        return self._put(caller, arg, _U32, self.nvqs)

    def _suspend(self, arg: int, caller: Caller) -> int:
        if not self._driver_bits() & VIRTIO_CONFIG_S_DRIVER_OK:
            return 0
        if not supports(self.ops, "suspend"):
            raise PeerError("the device cannot suspend", errno=errno.EOPNOTSUPP)
        self.ops.suspend()
        self.suspended = True
        return 0

    def _resume(self, arg: int, caller: Caller) -> int:
        if not self._driver_bits() & VIRTIO_CONFIG_S_DRIVER_OK:
            return 0
        if not supports(self.ops, "resume"):
            raise PeerError("the device cannot resume", errno=errno.EOPNOTSUPP)
        self.ops.resume()
        self.suspended = False
        return 0

    _DEVICE_IOCTLS: ClassVar[dict[int, Callable[[VhostVdpaServer, int, Caller], int]]] = {
        a.VHOST_VDPA_GET_DEVICE_ID: _get_device_id,
        a.VHOST_VDPA_GET_STATUS: _get_status,
        a.VHOST_VDPA_SET_STATUS: _set_status,
        a.VHOST_VDPA_GET_CONFIG: _get_config,
        a.VHOST_VDPA_SET_CONFIG: _set_config,
        a.VHOST_GET_FEATURES: _get_features,
        a.VHOST_SET_FEATURES: _set_features,
        a.VHOST_VDPA_GET_VRING_NUM: _get_vring_num,
        a.VHOST_VDPA_GET_GROUP_NUM: _get_group_num,
        a.VHOST_VDPA_GET_AS_NUM: _get_as_num,
        a.VHOST_VDPA_SET_CONFIG_CALL: _set_config_call_ioctl,
        a.VHOST_GET_BACKEND_FEATURES: _get_backend_features,
        a.VHOST_VDPA_GET_IOVA_RANGE: _get_iova_range,
        a.VHOST_VDPA_GET_CONFIG_SIZE: _get_config_size,
        a.VHOST_VDPA_GET_VQS_COUNT: _get_vqs_count,
        a.VHOST_VDPA_SUSPEND: _suspend,
        a.VHOST_VDPA_RESUME: _resume,
    }

    def _set_mem_table(self, arg: int, caller: Caller) -> int:
        nregions, padding = _VHOST_MEMORY.unpack(caller.read(arg, _VHOST_MEMORY.size))
        if padding:
            raise PeerError("vhost_memory padding is not 0", errno=errno.EOPNOTSUPP)
        if nregions > VHOST_MAX_MEM_REGIONS:
            raise PeerError(f"{nregions} memory regions, at most {VHOST_MAX_MEM_REGIONS}", errno=errno.E2BIG)
        raw = caller.read(arg + _VHOST_MEMORY.size, nregions * _VHOST_MEMORY_REGION.size) if nregions else b""
        for guest, size, _user, _flags in _VHOST_MEMORY_REGION.iter_unpack(raw):
            if size == 0 or guest + size - 1 > _U64_MAX:
                raise PeerError(f"memory region {guest:#x}+{size:#x} is empty or wraps", errno=errno.EFAULT)
        log.debug(
            "%s: SET_MEM_TABLE of %d regions accepted and unused (vDPA maps through the IOTLB)", self.name, nregions
        )
        return 0

    # ----- vring ioctls (vhost_vdpa_vring_ioctl, then vhost_vring_ioctl) -----
    def _vring_ioctl(self, request: int, arg: int, caller: Caller) -> int:
        # The kernel reads the index (4 bytes), then the whole argument. One read of 8 bytes serves both for the
        # vhost_vring_state requests; where it faults, the index alone is read, so errors come in the kernel's order.
        try:
            head: bytes | None = caller.read(arg, 8)
        except PeerError:
            head = None
        (idx,) = _U32.unpack_from(head) if head is not None else _U32.unpack(caller.read(arg, 4))
        if idx >= self.nvqs:
            raise PeerError(f"ring {idx}: the device has {self.nvqs}", errno=errno.ENOBUFS)

        def state() -> int:  # the vhost_vring_state's num
            return a.VHOST_VRING_STATE.unpack(head if head is not None else caller.read(arg, 8))[1]

        ops = self.ops
        if request == a.VHOST_VDPA_SET_VRING_ENABLE:
            num = state()
            ops.set_vq_ready(idx, bool(num))
            return 0
        if request in (a.VHOST_VDPA_GET_VRING_GROUP, a.VHOST_VDPA_GET_VRING_DESC_GROUP):
            op = "get_vq_group" if request == a.VHOST_VDPA_GET_VRING_GROUP else "get_vq_desc_group"
            if not supports(ops, op):
                raise PeerError(f"the device has no {op}", errno=errno.EOPNOTSUPP)
            group = getattr(ops, op)(idx)
            if not 0 <= group < self.ngroups:
                raise PeerError(f"ring {idx} in group {group} of {self.ngroups}", errno=errno.EIO)
            return self._put(caller, arg, a.VHOST_VRING_STATE, idx, group)
        if request == a.VHOST_VDPA_SET_GROUP_ASID:
            asid = state()
            if asid >= self.nas:
                raise PeerError(f"address space {asid} of {self.nas}", errno=errno.EINVAL)
            if not supports(ops, "set_group_asid"):
                raise PeerError("the device has no set_group_asid", errno=errno.EOPNOTSUPP)
            ops.set_group_asid(idx, asid)  # type: ignore[attr-defined]
            return 0
        if request == a.VHOST_VDPA_GET_VRING_SIZE:
            if not supports(ops, "get_vq_size"):
                raise PeerError("the device has no get_vq_size", errno=errno.EOPNOTSUPP)
            return self._put(caller, arg, a.VHOST_VRING_STATE, idx, ops.get_vq_size(idx) & 0xFFFFFFFF)  # type: ignore[attr-defined]
        packed = bool(ops.get_driver_features() >> VIRTIO_F_RING_PACKED & 1)
        running = bool(self._driver_bits() & VIRTIO_CONFIG_S_DRIVER_OK) and not self.suspended
        if request == a.VHOST_SET_VRING_NUM:
            num = state()
            if not num or num > 0xFFFF or num & (num - 1):
                raise PeerError(f"ring {idx}: size {num} is not a power of 2 up to 32768", errno=errno.EINVAL)
            ops.set_vq_num(idx, num)
            return 0
        if request == a.VHOST_SET_VRING_ADDR:
            return self._set_vring_addr(idx, arg, caller, running)
        if request == a.VHOST_SET_VRING_BASE:
            num = state()
            if not packed and num > 0xFFFF:
                raise PeerError(f"ring {idx}: split base {num:#x} over 0xffff", errno=errno.EINVAL)
            if running:
                raise PeerError(f"ring {idx}: base set after DRIVER_OK without SUSPEND", errno=errno.EINVAL)
            ops.set_vq_state(idx, PackedState.decode(num) if packed else SplitState(num))
            return 0
        if request == a.VHOST_GET_VRING_BASE:
            state = ops.get_vq_state(idx)
            num = state.encode() if isinstance(state, PackedState) else state.last_avail & 0xFFFF
            return self._put(caller, arg, a.VHOST_VRING_STATE, idx, num)
        if request in (a.VHOST_SET_VRING_KICK, a.VHOST_SET_VRING_CALL, a.VHOST_SET_VRING_ERR):
            return self._set_vring_file(request, idx, arg, caller, head)
        if request == VHOST_SET_VRING_BUSYLOOP_TIMEOUT:
            self._busyloop[idx] = state()
            return 0
        if request == VHOST_GET_VRING_BUSYLOOP_TIMEOUT:
            return self._put(caller, arg, a.VHOST_VRING_STATE, idx, self._busyloop[idx])
        raise PeerError(f"unknown request {request:#x}", errno=errno.ENOTTY)

    def _set_vring_addr(self, idx: int, arg: int, caller: Caller, running: bool) -> int:
        _, flags, desc, used, avail, log_addr = a.VHOST_VRING_ADDR.unpack(caller.read(arg, a.VHOST_VRING_ADDR.size))
        if flags & ~(1 << a.VHOST_VRING_F_LOG):
            raise PeerError(f"ring {idx}: address flags {flags:#x}", errno=errno.EOPNOTSUPP)
        if avail & 1 or used & 3 or log_addr & 3:
            raise PeerError(f"ring {idx}: misaligned avail {avail:#x} / used {used:#x} / log {log_addr:#x}")
        if running:
            raise PeerError(f"ring {idx}: addresses set after DRIVER_OK without SUSPEND", errno=errno.EINVAL)
        try:
            self.ops.set_vq_address(idx, desc, avail, used)
        except PeerError as exc:
            raise PeerError(f"ring {idx}: the device refused the addresses: {exc}", errno=errno.EINVAL) from exc
        return 0

    def _take_eventfd(self, number: int, caller: Caller) -> int:
        if number < 0:
            raise PeerError(f"fd {number}", errno=errno.EBADF)
        fd = caller.take_fd(number)
        if not _is_eventfd(fd):
            _close(fd)
            raise PeerError(f"fd {number} is not an eventfd", errno=errno.EINVAL)
        return fd

    def _set_vring_file(self, request: int, idx: int, arg: int, caller: Caller, head: bytes | None) -> int:
        raw = head if head is not None and a.VHOST_VRING_FILE.size == 8 else caller.read(arg, a.VHOST_VRING_FILE.size)
        _, number = a.VHOST_VRING_FILE.unpack(raw)
        fd = None if number == a.VHOST_FILE_UNBIND else self._take_eventfd(number, caller)
        table = {a.VHOST_SET_VRING_KICK: self._kick, a.VHOST_SET_VRING_CALL: self._call}.get(request, self._err)
        try:
            if request == a.VHOST_SET_VRING_KICK:
                self.ops.set_vq_kick(idx, fd)
            elif request == a.VHOST_SET_VRING_CALL:
                self.ops.set_vq_call(idx, fd)
        except BaseException:
            _close(fd)
            raise
        old, table[idx] = table[idx], fd
        if old is not None and old != fd:
            _close(old)
        return 0

    # ===== IOTLB writes =====
    def _write(self, addr: int, length: int, caller: Caller) -> int:
        wanted = max(0, min(length, iotlb.NEEDED_BYTES))
        try:
            data = caller.read(addr, wanted) if wanted else b""
        except PeerError as exc:
            # copy_from_iter stops short at the fault, and vhost_chr_write_iter answers a short copy with EINVAL.
            raise PeerError(f"IOTLB message at {addr:#x} unreadable: {exc}", errno=errno.EINVAL) from exc
        message = iotlb.parse(data, self._backend_has(a.VHOST_BACKEND_F_IOTLB_ASID))
        try:
            self._handle(message, caller)
        except PeerError as exc:
            if isinstance(exc, IotlbRejected):
                raise
            raise IotlbRejected(f"IOTLB {message.type_name}: {exc}", cause=exc.errno) from exc
        return iotlb.MESSAGE_SIZE

    def _handle(self, msg: iotlb.IotlbMessage, caller: Caller) -> None:
        """vhost_vdpa_process_iotlb_msg."""
        if not self.owned:
            raise PeerError("no SET_OWNER yet", errno=errno.EPERM)
        asid = msg.asid
        if msg.type in (a.VHOST_IOTLB_UPDATE, a.VHOST_IOTLB_BATCH_BEGIN):
            if asid >= self.nas:
                raise PeerError(f"address space {asid} of {self.nas}", errno=errno.EINVAL)
            mappings = self._iotlb.setdefault(asid, [])
        else:
            mappings = self._iotlb.get(asid)
        if self._in_batch and self._batch_asid != asid:
            raise PeerError(f"asid {asid} inside a batch of asid {self._batch_asid}", errno=errno.EINVAL)
        if mappings is None:
            raise PeerError(f"no mappings in address space {asid}", errno=errno.EINVAL)
        if msg.type == a.VHOST_IOTLB_UPDATE:
            self._update(msg, mappings, caller)
        elif msg.type == a.VHOST_IOTLB_INVALIDATE:
            self.stats.invalidates += 1
            gone = [m for m in mappings if m.iova <= msg.last and m.last >= msg.iova]
            if gone:
                mappings[:] = [m for m in mappings if m not in gone]
            if not self._in_batch:
                self._commit(asid, strict=False)
            self._collect()
        elif msg.type == a.VHOST_IOTLB_BATCH_BEGIN:
            self._batch_asid = asid
            self._in_batch = True
        elif msg.type == a.VHOST_IOTLB_BATCH_END:
            if self._in_batch:
                self._commit(asid, strict=False)
            self._in_batch = False
            self._collect()
        else:
            raise PeerError(f"IOTLB message type {msg.type_name} is not handled by vhost-vdpa", errno=errno.EINVAL)

    def _update(self, msg: iotlb.IotlbMessage, mappings: list[_Mapping], caller: Caller) -> None:
        """vhost_vdpa_process_iotlb_update, then vhost_vdpa_va_map."""
        self.stats.updates += 1
        if (
            msg.iova < self.iova_first
            or not msg.size
            or msg.iova > _U64_MAX - msg.size + 1
            or msg.iova + msg.size - 1 > self.iova_last
        ):
            raise PeerError(
                f"UPDATE {msg.iova:#x}+{msg.size:#x} outside the IOVA range "
                f"[{self.iova_first:#x}, {self.iova_last:#x}] or wrapping",
                errno=errno.EINVAL,
            )
        last = msg.iova + msg.size - 1
        clash = next((m for m in mappings if m.iova <= last and m.last >= msg.iova), None)
        if clash is not None:
            raise PeerError(
                f"UPDATE {msg.iova:#x}+{msg.size:#x} overlaps the mapping at {clash.iova:#x}..{clash.last:#x}",
                errno=errno.EEXIST,
            )
        if msg.perm not in iotlb.PERMS:
            raise PeerError(f"UPDATE with permission {msg.perm:#x}", errno=errno.EINVAL)
        try:
            fd, offset = caller.map_file(msg.uaddr, msg.size)
        except PeerError as exc:
            self.stats.skipped += 1
            log.info(
                "%s: UPDATE %#x+%#x skipped, uaddr %#x is not a shared file mapping: %s",
                self.name,
                msg.iova,
                msg.size,
                msg.uaddr,
                exc,
            )
            return
        try:
            region = Region.from_fd(
                fd,
                guest_addr=msg.iova,
                size=msg.size,
                offset=offset,
                writable=bool(msg.perm & a.VHOST_ACCESS_WO),
                keep_fd=True,
            )
        except (VdpasimError, OSError, ValueError, OverflowError) as exc:
            number = exc.errno if isinstance(exc, OSError | PeerError) and exc.errno else errno.EINVAL
            raise PeerError(
                f"UPDATE {msg.iova:#x}+{msg.size:#x}: cannot map uaddr {msg.uaddr:#x}: {exc}", errno=number
            ) from exc
        finally:
            _close(fd)
        self._regions.append(region)
        mapping = _Mapping(msg.iova, last, msg.uaddr, msg.perm, region)
        mappings.append(mapping)
        mappings.sort(key=lambda m: m.iova)
        if not self._in_batch:
            try:
                self._commit(msg.asid, strict=True)
            except PeerError:
                mappings.remove(mapping)
                self._collect()
                raise

    def _commit(self, asid: int, *, strict: bool) -> None:
        """Give the device the address space's mappings (``ops.set_map``); only address space 0 is its memory."""
        if asid != 0:
            log.debug("%s: address space %d changed; the device maps only address space 0", self.name, asid)
            return
        regions = tuple(m.region for m in self._iotlb.get(0, ()))
        try:
            self.ops.set_map(RegionTable(regions), RingAddressSpace.GUEST)
        except (PeerError, VdpasimError) as exc:
            if strict:
                raise PeerError(f"the device refused the memory map: {exc}", errno=exc.errno) from exc
            log.warning("%s: the device refused the memory map: %s", self.name, exc)  # ignored, as the kernel does
            return
        self.stats.commits += 1
        self._committed = regions

    def _collect(self) -> None:
        """Close every region the device cannot see and the IOTLB no longer holds."""
        held = {id(m.region) for mappings in self._iotlb.values() for m in mappings}
        held.update(id(r) for r in self._committed)
        keep = []
        for region in self._regions:
            if id(region) in held:
                keep.append(region)
            else:
                region.close()
        self._regions = keep

    # ===== for tests and the compare report =====
    def mappings(self, asid: int = 0) -> list[tuple[int, int, int, int]]:
        """(iova, size, uaddr, perm) of each mapping of an address space."""
        with self._lock:
            return [(m.iova, m.last - m.iova + 1, m.uaddr, m.perm) for m in self._iotlb.get(asid, ())]

    def fds(self) -> dict[str, list[int | None]]:
        with self._lock:
            return {
                "kick": list(self._kick),
                "call": list(self._call),
                "err": list(self._err),
                "config": [self._config_call],
            }
