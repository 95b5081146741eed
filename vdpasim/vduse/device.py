"""Kernel mode: one simulated device served as a VDUSE device and added to the kernel's real vDPA bus.

Where the kernel has VDUSE (``/dev/vduse/control``), the kernel itself plays the vDPA device towards
its drivers (virtio_vdpa, vhost_vdpa): it keeps the features, config space and queue addresses, and
asks userspace only what it cannot know. So the device model here is driven from three places:

* ``VDUSE_CREATE_DEV`` hands the kernel the device's features, config space and queue count once;
* the message loop on ``/dev/vduse/$NAME`` answers SET_STATUS (the model follows every status change;
  at DRIVER_OK the queues are read back with VDUSE_VQ_GET_INFO and started), GET_VQ_STATE, and
  UPDATE_IOTLB (the IOVA space is re-read with VDUSE_IOTLB_GET_FD + mmap into a new RegionTable);
* the data path is the device model's own Numba path: kicks arrive on eventfds registered with
  VDUSE_VQ_SETUP_KICKFD, interrupts go back with VDUSE_VQ_INJECT_IRQ.

``VduseDevice.add`` then creates the vdpa device through the real ``vdpa`` netlink family
(VDPA_CMD_DEV_NEW, mgmtdev ``vduse``) and ``remove`` undoes all of it in reverse order.

The kernel's limits, checked before anything is created so the user gets a reason, not an errno:
VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM must be offered (VDUSE translates every address
through its own IOMMU domain); a net device may not offer VIRTIO_NET_F_CTRL_VQ (the kernel refuses a
control queue in userspace, so there is no MQ and no receive-filter commands either); a blk device may
not offer VIRTIO_BLK_F_CONFIG_WCE (its config space is read-only).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time
from pathlib import Path

from ..config import NET_SUPPORTED_FEATURES, NetConfig
from ..devices.core import SimDevice
from ..errors import UsageError, VdpasimError
from ..memory import Region, RegionTable
from ..ops import RingAddressSpace
from ..rings.state import PackedState, SplitState
from ..virtio import constants as c
from . import abi

__all__ = [
    "VduseDevice",
    "VDUSE_NET_UNSUPPORTED",
    "vduse_features",
    "vduse_net_config",
    "vduse_available",
    "find_char_node",
]

log = logging.getLogger("vdpasim.vduse")

# Net features a VDUSE device cannot offer: the control queue and everything that travels on it.
VDUSE_NET_UNSUPPORTED = sum(
    1 << bit
    for bit in (
        c.VIRTIO_NET_F_CTRL_VQ,
        c.VIRTIO_NET_F_CTRL_RX,
        c.VIRTIO_NET_F_CTRL_VLAN,
        c.VIRTIO_NET_F_CTRL_RX_EXTRA,
        c.VIRTIO_NET_F_GUEST_ANNOUNCE,
        c.VIRTIO_NET_F_MQ,
        c.VIRTIO_NET_F_CTRL_MAC_ADDR,
        c.VIRTIO_NET_F_RSS,
        c.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    )
)

_U64_MAX = (1 << 64) - 1
_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATUS_BITS = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER | c.VIRTIO_CONFIG_S_FEATURES_OK
_NODE_TIMEOUT = 10.0


def vduse_available() -> bool:
    return os.path.exists(abi.VDUSE_CONTROL_PATH)


def vduse_net_config(name: str, **values: object) -> NetConfig:
    """A net device VDUSE accepts: every feature the model has but the control queue and its users."""
    values.setdefault("device_features", NET_SUPPORTED_FEATURES & ~VDUSE_NET_UNSUPPORTED)
    return NetConfig.from_mapping({"name": name, **values})


def vduse_features(device: SimDevice) -> int:
    """The features to give VDUSE_CREATE_DEV for ``device``; UsageError naming the limit it breaks."""
    features = device.get_device_features()
    device_id = device.get_device_id()
    if not features >> c.VIRTIO_F_VERSION_1 & 1:
        raise UsageError(f"{device.name}: VDUSE devices must offer VIRTIO_F_VERSION_1 (modern virtio only)")
    if not features >> c.VIRTIO_F_ACCESS_PLATFORM & 1:
        raise UsageError(
            f"{device.name}: VDUSE devices must offer VIRTIO_F_ACCESS_PLATFORM: the kernel translates every "
            "address through its own IOMMU domain"
        )
    if device_id == c.VIRTIO_ID_NET and features & VDUSE_NET_UNSUPPORTED:
        raise UsageError(
            f"{device.name}: the kernel refuses a VDUSE net device with VIRTIO_NET_F_CTRL_VQ (no control "
            "queue in userspace), so no MQ, CTRL_RX, CTRL_MAC_ADDR... either: create it with "
            "vduse_net_config() or device_features without them"
        )
    if device_id == c.VIRTIO_ID_BLOCK and features >> c.VIRTIO_BLK_F_CONFIG_WCE & 1:
        raise UsageError(f"{device.name}: VDUSE blk devices may not offer VIRTIO_BLK_F_CONFIG_WCE (read-only config)")
    if device_id not in (c.VIRTIO_ID_NET, c.VIRTIO_ID_BLOCK):
        raise UsageError(f"{device.name}: the vduse management device serves net and block devices only")
    return features


def _udev_running() -> bool:
    return os.path.exists("/run/udev/control")


def find_char_node(name: str, timeout: float = _NODE_TIMEOUT) -> str:
    """The char node of VDUSE device ``name``, once it exists.

    With a udev daemon the node is udev's to create (and name): ask pyudev for it. Without one
    (containers, the test guest's busybox) devtmpfs usually made it already; if not, make it from the
    device number sysfs shows.
    """
    deadline = time.monotonic() + timeout
    sys_dev = Path("/sys/class/vduse") / name / "dev"
    while True:
        if _udev_running():
            import pyudev

            with contextlib.suppress(pyudev.DeviceNotFoundError):
                node = pyudev.Devices.from_name(pyudev.Context(), "vduse", name).device_node
                if node and os.path.exists(node):
                    return node
        else:
            path = os.path.join(abi.VDUSE_DEV_DIR, name)
            if os.path.exists(path):
                return path
            if sys_dev.exists():
                major, minor = (int(x) for x in sys_dev.read_text().split(":"))
                with contextlib.suppress(FileExistsError):
                    os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
                return path
        if time.monotonic() > deadline:
            raise VdpasimError(f"VDUSE device {name}: no char node after {timeout:.0f} s")
        time.sleep(0.02)


def _is_domain_file(fd: int) -> bool:
    """The kernel's own IOVA domain file (virtio_vdpa: bounce pages and coherent memory), not user memory."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[vduse-domain]"
    except OSError:
        return False


class VduseDevice:
    """``device`` served through VDUSE. ``create`` makes the VDUSE device, ``add`` puts it on the vDPA bus."""

    def __init__(self, device: SimDevice, *, vq_align: int = _PAGE) -> None:
        self.device = device
        self.name = device.name
        self.features = vduse_features(device)
        self.vq_align = vq_align
        self.fd: int | None = None
        self.added = False
        self.messages: dict[str, int] = {"SET_STATUS": 0, "GET_VQ_STATE": 0, "UPDATE_IOTLB": 0, "failed": 0}
        self._kicks: dict[int, int] = {}
        self._memory: RegionTable | None = None
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._status = 0

    # ----- life cycle -----
    def create(self) -> None:
        """VDUSE_CREATE_DEV, open the char node, VDUSE_VQ_SETUP every queue, serve messages."""
        config = self.device.config_space()
        request = abi.config_request(
            self.name,
            device_id=self.device.get_device_id(),
            vendor_id=self.device.get_vendor_id(),
            features=self.features,
            vq_num=self.device.get_vq_count(),
            vq_align=self.vq_align,
            config=config,
        )
        control = os.open(abi.VDUSE_CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(control, abi.VDUSE_SET_API_VERSION, struct.pack("Q", abi.VDUSE_API_VERSION))
            fcntl.ioctl(control, abi.VDUSE_CREATE_DEV, request)
        finally:
            os.close(control)
        try:
            self.fd = os.open(find_char_node(self.name), os.O_RDWR | os.O_CLOEXEC)
            for idx in range(self.device.get_vq_count()):
                vq = abi.vduse_vq_config(index=idx, max_size=self.device.get_vq_num_max())
                fcntl.ioctl(self.fd, abi.VDUSE_VQ_SETUP, vq)
        except BaseException:
            self._destroy()
            raise
        self.device.set_config_cb(self._config_changed)
        self._thread = threading.Thread(target=self._serve, name=f"vdpasim-vduse-{self.name}", daemon=True)
        self._thread.start()
        log.info("%s: VDUSE device created (%d queues)", self.name, self.device.get_vq_count())

    def add(self, vdpa: object | None = None) -> None:
        """``vdpa dev add name NAME mgmtdev vduse`` through the kernel's netlink family."""
        from ..bus.netlink import VdpaSocket

        sock = vdpa if vdpa is not None else VdpaSocket()
        try:
            sock.dev("add", name=self.name, mgmtdev="vduse")  # type: ignore[attr-defined]
        finally:
            if vdpa is None:
                sock.close()  # type: ignore[attr-defined]
        self.added = True

    def remove(self, vdpa: object | None = None) -> None:
        """Undo ``add`` and ``create``: DEV_DEL, stop serving, close the node, VDUSE_DESTROY_DEV."""
        if self.added:
            from ..bus.netlink import VdpaSocket

            sock = vdpa if vdpa is not None else VdpaSocket()
            try:
                sock.dev("del", name=self.name)  # type: ignore[attr-defined]
            finally:
                if vdpa is None:
                    sock.close()  # type: ignore[attr-defined]
            self.added = False
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        self.device.reset()
        self._drop_queues()
        self._drop_memory()
        self._destroy()

    def __enter__(self) -> VduseDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _destroy(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        control = os.open(abi.VDUSE_CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            name = ctypes.create_string_buffer(self.name.encode(), abi.VDUSE_NAME_MAX)
            # Still held by the bus (a driver just let go): the kernel answers EBUSY for a moment.
            for _ in range(50):
                try:
                    fcntl.ioctl(control, abi.VDUSE_DESTROY_DEV, name)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.05)
        finally:
            os.close(control)

    # ----- message loop -----
    def _serve(self) -> None:
        assert self.fd is not None
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        size = ctypes.sizeof(abi.vduse_dev_request)
        while True:
            events = dict(poller.poll())
            if self._stop in events:
                return
            if events.get(self.fd, 0) & select.POLLERR:
                log.error("%s: the kernel marked the device broken (a reply came too late)", self.name)
                return
            try:
                raw = os.read(self.fd, size)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                raise
            request = abi.vduse_dev_request.from_buffer_copy(raw)
            response = self.handle(request)
            os.write(self.fd, bytes(response))

    def handle(self, request: abi.vduse_dev_request) -> abi.vduse_dev_response:
        """Answer one kernel request; any refusal becomes VDUSE_REQ_RESULT_FAILED, logged with its reason."""
        response = abi.vduse_dev_response(request_id=request.request_id, result=abi.VDUSE_REQ_RESULT_OK)
        try:
            if request.type == abi.VDUSE_SET_STATUS:
                self.messages["SET_STATUS"] += 1
                if not self._set_status(request.s.status):
                    response.result = abi.VDUSE_REQ_RESULT_FAILED
            elif request.type == abi.VDUSE_GET_VQ_STATE:
                self.messages["GET_VQ_STATE"] += 1
                idx = request.vq_state.index
                response.vq_state.index = idx
                state = self.device.get_vq_state(idx)
                if isinstance(state, PackedState):
                    packed = response.vq_state.packed
                    packed.last_avail_idx, packed.last_avail_counter = state.last_avail, state.avail_wrap
                    packed.last_used_idx, packed.last_used_counter = state.used_idx, state.used_wrap
                else:
                    response.vq_state.split.avail_index = state.last_avail & 0xFFFF
            elif request.type == abi.VDUSE_UPDATE_IOTLB:
                self.messages["UPDATE_IOTLB"] += 1
                log.debug("%s: IOTLB changed in [%#x, %#x]", self.name, request.iova.start, request.iova.last)
                if self._memory is not None:
                    self._map_memory()
            else:
                log.warning("%s: unknown VDUSE request type %d", self.name, request.type)
                response.result = abi.VDUSE_REQ_RESULT_FAILED
        except Exception as exc:  # the kernel must get an answer whatever went wrong
            log.error("%s: VDUSE request %d failed: %s", self.name, request.type, exc)
            response.result = abi.VDUSE_REQ_RESULT_FAILED
        if response.result != abi.VDUSE_REQ_RESULT_OK:
            self.messages["failed"] += 1
        return response

    def _set_status(self, status: int) -> bool:
        device = self.device
        if status == 0:
            device.reset()
            self._drop_queues()
            self._drop_memory()
            self._status = 0
            return True
        added = status & ~self._status
        if added & c.VIRTIO_CONFIG_S_FEATURES_OK:
            features = struct.unpack("Q", fcntl.ioctl(self.fd, abi.VDUSE_DEV_GET_FEATURES, bytes(8)))[0]
            device.set_driver_features(features)
        before_driver_ok = status & ~c.VIRTIO_CONFIG_S_DRIVER_OK
        if before_driver_ok != device.get_status():
            device.set_status(before_driver_ok)
            if status & c.VIRTIO_CONFIG_S_FEATURES_OK and not device.get_status() & c.VIRTIO_CONFIG_S_FEATURES_OK:
                return False  # the model refused the driver's features (it logged why)
        if added & c.VIRTIO_CONFIG_S_DRIVER_OK:
            self._map_memory()
            self._start_queues()
            device.set_status(status)
        self._status = status
        return True

    # ----- queues -----
    def _start_queues(self) -> None:
        assert self.fd is not None
        device = self.device
        for idx in range(device.get_vq_count()):
            info = abi.vduse_vq_info(index=idx)
            fcntl.ioctl(self.fd, abi.VDUSE_VQ_GET_INFO, info)
            if not info.ready:
                continue
            device.set_vq_num(idx, info.num)
            device.set_vq_address(idx, info.desc_addr, info.driver_addr, info.device_addr)
            if device.get_driver_features() >> c.VIRTIO_F_RING_PACKED & 1:
                p = info.packed
                state: SplitState | PackedState = PackedState(
                    p.last_avail_idx, p.last_avail_counter, p.last_used_idx, p.last_used_counter
                )
            else:
                state = SplitState(info.split.avail_index)
            device.set_vq_state(idx, state)
            kick = self._kicks.get(idx)
            if kick is None:
                kick = self._kicks[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fcntl.ioctl(self.fd, abi.VDUSE_VQ_SETUP_KICKFD, abi.vduse_vq_eventfd(index=idx, fd=kick))
            device.set_vq_kick(idx, kick)
            device.set_vq_call(idx, self._injector(idx))
            device.set_vq_ready(idx, True)

    def _injector(self, idx: int):  # type: ignore[no-untyped-def]
        arg = struct.pack("I", idx)
        fd = self.fd

        def inject() -> None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, abi.VDUSE_VQ_INJECT_IRQ, arg)

        return inject

    def _drop_queues(self) -> None:
        for fd in self._kicks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._kicks.clear()

    def _config_changed(self) -> None:
        if self.fd is None:
            return
        config = self.device.config_space()
        data = bytearray(bytes(abi.vduse_config_data(offset=0, length=len(config))) + config)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, abi.VDUSE_DEV_SET_CONFIG, data)
            fcntl.ioctl(self.fd, abi.VDUSE_DEV_INJECT_CONFIG_IRQ)

    # ----- memory -----
    def read_iotlb(self) -> list[Region]:
        """Every IOVA range the kernel maps now, each mmapped from the fd VDUSE_IOTLB_GET_FD returns."""
        assert self.fd is not None
        regions: list[Region] = []
        start = 0
        while True:
            entry = abi.vduse_iotlb_entry(start=start, last=_U64_MAX)
            try:
                fd = fcntl.ioctl(self.fd, abi.VDUSE_IOTLB_GET_FD, entry)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    break  # nothing mapped at or above start
                raise
            try:
                regions.append(
                    Region.from_fd(
                        fd,
                        guest_addr=entry.start,
                        size=entry.last - entry.start + 1,
                        offset=entry.offset,
                        writable=bool(entry.perm & abi.VDUSE_ACCESS_WO),
                        keep_fd=_is_domain_file(fd),
                    )
                )
            finally:
                os.close(fd)
            if entry.last >= _U64_MAX:
                break
            start = entry.last + 1
        return self._with_bounce(regions)

    def _with_bounce(self, regions: list[Region]) -> list[Region]:
        """Add the bounce area of the kernel's IOVA domain when it is not in the IOTLB yet.

        virtio_vdpa's streaming DMA goes through bounce pages at IOVAs [0, bounce_size), but the kernel
        enters that range in its IOTLB only at the first streaming map, which comes after DRIVER_OK
        (the driver posts its first buffers once the device is live) and sends no UPDATE_IOTLB for it.
        Coherent mappings (the rings) come from the same domain file, whose mmap serves the bounce
        pages at file offset = IOVA: map the bounce area from there, so buffers are reachable at once.
        """
        if any(r.guest_addr == 0 for r in regions) or self.fd is None:
            return regions
        domain = next((r for r in regions if r.fd is not None), None)
        if domain is None:
            return regions
        try:
            size = int(Path(f"/sys/class/vduse/{self.name}/bounce_size").read_text())
        except (OSError, ValueError):
            size = min(r.guest_addr for r in regions)
        if size <= 0 or size > min(r.guest_addr for r in regions):
            return regions
        bounce = Region.from_fd(domain.fd, guest_addr=0, size=size, offset=0)
        for region in regions:
            if region.fd is not None:
                os.close(region.fd)
                region.fd = None
        return [bounce, *regions]

    def _map_memory(self) -> None:
        old = self._memory
        self._memory = RegionTable(self.read_iotlb())
        self.device.set_map(self._memory, RingAddressSpace.GUEST)
        if old is not None:
            old.close()  # the device has let go of it (set_map swaps with the data path parked)

    def _drop_memory(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None
