"""A virtio-net guest driver for tests: feature negotiation, queues, frames and control commands.

It drives a device only through the vDPA device operations, the way a VMM would: status writes,
``set_map`` with the guest memory table, ring addresses, real kick and call eventfds. The device's
data-path thread serves the rings; the driver (the calling thread) posts buffers, kicks when the
device asks for it and waits on the call eventfds, so every test crosses threads and shared memory.

Also here: builders for the frames the tests send (Ethernet, ARP request, ICMP echo request) and
the Internet checksum, written from RFC 826/791/792/1071 so replies are checked independently of
the device's code.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass

from ..config import NetConfig
from ..devices.net import NetDevice
from ..errors import UsageError
from ..ops import DeviceOps
from ..virtio import constants as c
from .driver import DriverQueue, GuestMemory, UsedBuffer

__all__ = [
    "VNET_HDR",
    "BROADCAST",
    "ethernet",
    "inet_checksum",
    "arp_request",
    "icmp_echo_request",
    "ReceivedFrame",
    "NetDriver",
    "NetHarness",
]

VNET_HDR = bytes(c.VIRTIO_NET_HDR_LEN)  # struct virtio_net_hdr_v1, no offloads
BROADCAST = b"\xff" * 6
_ETH_P_ARP = 0x0806
_ETH_P_IP = 0x0800
_STATUS_UP = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def inet_checksum(data: bytes) -> int:
    """RFC 1071: one's complement of the one's complement sum of 16-bit big-endian words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """Who has ``target_ip``? Tell ``src_ip`` (RFC 826, Ethernet/IPv4), broadcast."""
    arp = struct.pack("!HHBBH", 1, _ETH_P_IP, 6, 4, 1) + src_mac + src_ip + bytes(6) + target_ip
    return ethernet(BROADCAST, src_mac, _ETH_P_ARP, arp)


def icmp_echo_request(
    src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, ident: int, seq: int, payload: bytes
) -> bytes:
    """An ICMP echo request (RFC 792) in an IPv4 packet (RFC 791) without options."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1234, 0x4000, 64, 1, 0, src_ip, dst_ip)
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return ethernet(dst_mac, src_mac, _ETH_P_IP, header + icmp)


@dataclass(frozen=True)
class ReceivedFrame:
    frame: bytes  # without the virtio-net header
    header: bytes  # the header the device wrote
    num_buffers: int  # from the header: how many used RX buffers carried the frame


class NetDriver:
    """The driver of one virtio-net device; see the module docstring.

    ``features`` defaults to everything the device offers except the layout and notification
    choices, which ``packed`` and ``event_idx`` add back. ``initialize()`` negotiates and starts.
    """

    def __init__(
        self,
        device: DeviceOps,
        memory: GuestMemory,
        *,
        features: int | None = None,
        packed: bool = False,
        event_idx: bool = False,
        queue_size: int = 64,
    ) -> None:
        offered = device.get_device_features()
        if features is None:
            layout = 1 << c.VIRTIO_F_RING_PACKED | 1 << c.VIRTIO_RING_F_EVENT_IDX
            features = offered & ~layout
            features |= packed << c.VIRTIO_F_RING_PACKED | event_idx << c.VIRTIO_RING_F_EVENT_IDX
        self.device = device
        self.memory = memory
        self.features = features
        self.queue_size = queue_size
        self.queues: dict[int, DriverQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.calls: dict[int, int] = {}  # interrupts received per queue
        self._pending: dict[int, list[UsedBuffer]] = {}

    # ----- geometry -----
    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def pairs(self) -> int:
        """Queue pairs the driver sets up: max_virtqueue_pairs with MQ, else 1 (§5.1.2)."""
        if not self.has(c.VIRTIO_NET_F_MQ):
            return 1
        return struct.unpack("<H", self.device.get_config(8, 2))[0]

    @property
    def cvq(self) -> int | None:
        return 2 * self.pairs if self.has(c.VIRTIO_NET_F_CTRL_VQ) else None

    @staticmethod
    def rx(pair: int = 0) -> int:
        return 2 * pair

    @staticmethod
    def tx(pair: int = 0) -> int:
        return 2 * pair + 1

    # ----- bring-up (VIRTIO 1.2 §3.1.1) -----
    def negotiate(self) -> int:
        """Steps 1-6: reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK; returns the status read back."""
        dev = self.device
        dev.set_status(0)
        dev.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        dev.set_status(_STATUS_UP)
        dev.set_driver_features(self.features)
        dev.set_status(_STATUS_UP | c.VIRTIO_CONFIG_S_FEATURES_OK)
        return dev.get_status()

    def initialize(self) -> None:
        status = self.negotiate()
        if not status & c.VIRTIO_CONFIG_S_FEATURES_OK:
            raise UsageError(f"the device refused features {self.features:#x}")
        dev = self.device
        dev.set_map(self.memory.table)
        indices = [i for p in range(self.pairs) for i in (self.rx(p), self.tx(p))]
        if self.cvq is not None:
            indices.append(self.cvq)
        for idx in indices:
            dq = DriverQueue(
                self.memory,
                self.queue_size,
                packed=self.has(c.VIRTIO_F_RING_PACKED),
                event_idx=self.has(c.VIRTIO_RING_F_EVENT_IDX),
                indirect=self.has(c.VIRTIO_RING_F_INDIRECT_DESC),
            )
            self.queues[idx] = dq
            self.kick_fds[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.call_fds[idx] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.calls[idx] = 0
            self._pending[idx] = []
            dev.set_vq_num(idx, self.queue_size)
            dev.set_vq_address(idx, dq.desc_addr, dq.driver_addr, dq.device_addr)
            dev.set_vq_kick(idx, self.kick_fds[idx])
            dev.set_vq_call(idx, self.call_fds[idx])
            dev.set_vq_ready(idx, True)
            self._rearm(dq)
        dev.set_status(_STATUS_UP | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)

    def close(self) -> None:
        for fd in (*self.kick_fds.values(), *self.call_fds.values()):
            os.close(fd)
        self.kick_fds.clear()
        self.call_fds.clear()

    # ----- buffers -----
    def kick(self, idx: int, *, force: bool = False) -> bool:
        """Notify the device if it asked for it (or ``force``); True if a kick was sent."""
        if self.queues[idx].kick_wanted() or force:
            os.eventfd_write(self.kick_fds[idx], 1)
            return True
        return False

    def post_rx(self, pair: int = 0, count: int = 1, size: int = 2048, *, segments: tuple[int, ...] = ()) -> list[int]:
        """Post ``count`` receive buffers of ``size`` bytes (or of several writable ``segments``)."""
        dq = self.queues[self.rx(pair)]
        ids = [dq.add([], list(segments) or [size]) for _ in range(count)]
        self.kick(self.rx(pair))
        return ids

    def send(self, pair: int, frames: list[bytes], *, indirect: bool = False, split_header: bool = False) -> list[int]:
        """Queue frames for transmission, each behind a zero virtio-net header, then kick once."""
        dq = self.queues[self.tx(pair)]
        if split_header:
            ids = [dq.add([VNET_HDR, frame], [], indirect=indirect) for frame in frames]
        else:
            ids = [dq.add([VNET_HDR + frame], [], indirect=indirect) for frame in frames]
        self.kick(self.tx(pair))
        return ids

    def _rearm(self, dq: DriverQueue) -> None:
        """Ask for an interrupt on the next used buffer (Linux virtqueue_enable_cb)."""
        if dq.event_idx:
            if dq.packed:
                dq.set_used_event(dq.next_used, dq.used_wrap)
            else:
                dq.set_used_event(dq.last_used)

    def wait_call(self, idx: int, timeout: float) -> bool:
        fd = self.call_fds[idx]
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        try:
            self.calls[idx] += os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def poll_used(self, idx: int) -> list[UsedBuffer]:
        """Whatever the device returned so far, without waiting."""
        dq = self.queues[idx]
        got = self._pending[idx] + dq.used()
        self._pending[idx] = []
        self._rearm(dq)
        return got + dq.used()

    def wait_used(self, idx: int, count: int, timeout: float = 60.0) -> list[UsedBuffer]:
        """Exactly ``count`` used buffers of queue ``idx``, waiting on its call eventfd for them."""
        dq = self.queues[idx]
        got = self._pending[idx]
        deadline = time.monotonic() + timeout
        while True:
            got += dq.used()
            if len(got) < count:
                self._rearm(dq)
                got += dq.used()  # re-check: the device may have published before seeing the request
            if len(got) >= count:
                self._pending[idx] = got[count:]
                return got[:count]
            if time.monotonic() > deadline:
                self._pending[idx] = got
                raise TimeoutError(
                    f"queue {idx}: {len(got)} of {count} used buffers after {timeout}s "
                    f"(device status {self.device.get_status():#x})"
                )
            self.wait_call(idx, 0.05)

    def receive(self, pair: int, count: int, timeout: float = 60.0) -> list[ReceivedFrame]:
        """``count`` frames from receive queue ``pair``, merging buffers as num_buffers says."""
        frames = []
        for _ in range(count):
            (first,) = self.wait_used(self.rx(pair), 1, timeout)
            header = first.data[: c.VIRTIO_NET_HDR_LEN]
            num_buffers = struct.unpack_from("<H", header, 10)[0] if len(header) == c.VIRTIO_NET_HDR_LEN else 0
            data = first.data[c.VIRTIO_NET_HDR_LEN :]
            if num_buffers > 1:
                data += b"".join(u.data for u in self.wait_used(self.rx(pair), num_buffers - 1, timeout))
            frames.append(ReceivedFrame(data, header, num_buffers))
        return frames

    def ctrl(self, klass: int, command: int, data: bytes = b"", *, ack_bytes: int = 1) -> int | None:
        """Send one control command and wait for it; the ack byte (None if the device wrote none)."""
        idx = self.cvq
        if idx is None:
            raise UsageError("VIRTIO_NET_F_CTRL_VQ was not negotiated")
        self.queues[idx].add([bytes([klass, command]) + data], [ack_bytes] if ack_bytes else [])
        self.kick(idx)
        (used,) = self.wait_used(idx, 1)
        return used.data[0] if used.len else None


class NetHarness:
    """Net devices and their drivers sharing one guest memory; ``close()`` ends all of them.

    ``add(name, packed=..., event_idx=..., features=..., queue_size=..., start=True, **config)``
    builds a ``NetDevice`` from ``NetConfig(name, **config)`` and its ``NetDriver``, started unless
    ``start`` is false.
    """

    def __init__(self, memory_size: int = 16 << 20) -> None:
        self.memory = GuestMemory(memory_size)
        self.made: list[tuple[NetDevice, NetDriver]] = []

    def add(
        self,
        name: str = "net0",
        *,
        packed: bool = False,
        event_idx: bool = False,
        features: int | None = None,
        queue_size: int = 64,
        start: bool = True,
        **config: object,
    ) -> tuple[NetDevice, NetDriver]:
        device = NetDevice(NetConfig.from_mapping({"name": name, **config}))
        driver = NetDriver(
            device, self.memory, features=features, packed=packed, event_idx=event_idx, queue_size=queue_size
        )
        self.made.append((device, driver))
        if start:
            driver.initialize()
        return device, driver

    def close(self) -> None:
        for device, driver in self.made:
            device.close()  # stops its data-path thread before the driver's eventfds go
            driver.close()
        self.made.clear()
        self.memory.close()

    def __enter__(self) -> NetHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
