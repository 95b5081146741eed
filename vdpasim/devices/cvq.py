"""The virtio-net control queue (VIRTIO 1.2 §5.1.6.5): parse a command, apply it, write the ack byte.

A request is one chain: device-readable ``u8 class, u8 command, command data``, then a device-writable
``u8 ack``. This is a slow path, so it is plain Python over the iov rows the compiled ring code pops;
only the ring operations (pop, push, publish, notify) are the shared kernels.

As rust-vmm's virtio-blk does for requests, parsing yields a typed command or a ``CtrlError`` that
says what was wrong, applying it can refuse too, and every request gets an ack byte: a malformed or
unknown command is answered ``VIRTIO_NET_ERR`` and counted, never raised into the data path.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DeviceRequestError
from ..jit.chain import IOV_ADDR, IOV_LEN
from ..jit.log import log_host
from ..jit.vq import vq_enable_notify, vq_has_avail, vq_needs_notify, vq_pop, vq_publish, vq_push
from ..rings.state import RingStatus
from ..virtio import constants as c
from ..virtqueue import Virtqueue

__all__ = [
    "CtrlError",
    "MacAddrSet",
    "MacTableSet",
    "RxModeSet",
    "VqPairsSet",
    "CtrlCommand",
    "RxFilter",
    "MAX_REQUEST_BYTES",
    "parse_ctrl",
    "read_request",
    "ControlQueue",
]

# The largest command accepted: a MAC table of a few thousand entries. Longer requests are refused
# without copying them (a guest must not make the device allocate gigabytes).
MAX_REQUEST_BYTES = 64 * 1024


class CtrlError(DeviceRequestError):
    """A control command the device refuses; answered with VIRTIO_NET_ERR."""


@dataclass(frozen=True)
class MacAddrSet:
    """VIRTIO_NET_CTRL_MAC_ADDR_SET: the device's (filter) MAC, also shown in config space."""

    mac: bytes


@dataclass(frozen=True)
class MacTableSet:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET: the extra unicast and multicast addresses to receive."""

    unicast: tuple[bytes, ...]
    multicast: tuple[bytes, ...]


@dataclass(frozen=True)
class RxModeSet:
    """VIRTIO_NET_CTRL_RX_PROMISC or _ALLMULTI on or off."""

    command: int
    on: bool


@dataclass(frozen=True)
class VqPairsSet:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: how many queue pairs the device serves."""

    pairs: int


CtrlCommand = MacAddrSet | MacTableSet | RxModeSet | VqPairsSet

_RX_COMMANDS = {c.VIRTIO_NET_CTRL_RX_PROMISC: "PROMISC", c.VIRTIO_NET_CTRL_RX_ALLMULTI: "ALLMULTI"}


def _need(features: int, bit: int, what: str, name: str) -> None:
    if not features >> bit & 1:
        raise CtrlError(f"{what} needs {name}, which was not negotiated")


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise CtrlError(f"{what}: {len(data)} data bytes, expected {size}")


def _mac_table(data: bytes, offset: int, what: str) -> tuple[tuple[bytes, ...], int]:
    """One ``struct virtio_net_ctrl_mac { le32 entries; u8 macs[entries][6]; }`` at ``offset``."""
    if len(data) < offset + 4:
        raise CtrlError(f"MAC_TABLE_SET: the {what} table has no entry count")
    (entries,) = struct.unpack_from("<I", data, offset)
    start = offset + 4
    end = start + 6 * entries
    if end > len(data):
        raise CtrlError(f"MAC_TABLE_SET: the {what} table claims {entries} entries, the request is too short")
    return tuple(data[i : i + 6] for i in range(start, end, 6)), end


def parse_ctrl(request: bytes, features: int, max_vqp: int) -> CtrlCommand:
    """The command in the device-readable bytes of a request, checked against the negotiated features."""
    if len(request) < 2:
        raise CtrlError(f"request of {len(request)} bytes has no class and command")
    klass, command = request[0], request[1]
    data = request[2:]
    if klass == c.VIRTIO_NET_CTRL_MAC and command == c.VIRTIO_NET_CTRL_MAC_ADDR_SET:
        _need(features, c.VIRTIO_NET_F_CTRL_MAC_ADDR, "MAC_ADDR_SET", "VIRTIO_NET_F_CTRL_MAC_ADDR")
        _exact(data, 6, "MAC_ADDR_SET")
        return MacAddrSet(bytes(data))
    if klass == c.VIRTIO_NET_CTRL_MAC and command == c.VIRTIO_NET_CTRL_MAC_TABLE_SET:
        _need(features, c.VIRTIO_NET_F_CTRL_RX, "MAC_TABLE_SET", "VIRTIO_NET_F_CTRL_RX")
        unicast, offset = _mac_table(data, 0, "unicast")
        multicast, offset = _mac_table(data, offset, "multicast")
        if offset != len(data):
            raise CtrlError(f"MAC_TABLE_SET: {len(data) - offset} bytes after the multicast table")
        return MacTableSet(unicast, multicast)
    if klass == c.VIRTIO_NET_CTRL_RX and command in _RX_COMMANDS:
        _need(features, c.VIRTIO_NET_F_CTRL_RX, f"RX {_RX_COMMANDS[command]}", "VIRTIO_NET_F_CTRL_RX")
        _exact(data, 1, f"RX {_RX_COMMANDS[command]}")
        return RxModeSet(command, data[0] != 0)
    if klass == c.VIRTIO_NET_CTRL_MQ and command == c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
        _need(features, c.VIRTIO_NET_F_MQ, "MQ_VQ_PAIRS_SET", "VIRTIO_NET_F_MQ")
        _exact(data, 2, "MQ_VQ_PAIRS_SET")
        (pairs,) = struct.unpack("<H", data)
        if not c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= max_vqp:
            raise CtrlError(f"MQ_VQ_PAIRS_SET: {pairs} pairs, the device has 1..{max_vqp}")
        return VqPairsSet(pairs)
    raise CtrlError(f"unsupported control command class {klass} command {command}")


@dataclass
class RxFilter:
    """What the receive filter lets through, as the control queue left it.

    The default is the kernel vdpa_sim_net's filter: the device MAC, broadcast and every multicast.
    ``allmulti`` starts on for that reason; a driver turning it off makes the multicast table count.
    """

    mac: bytes
    promisc: bool = False
    allmulti: bool = True
    unicast: tuple[bytes, ...] = ()
    multicast: tuple[bytes, ...] = ()

    def apply(self, command: MacAddrSet | MacTableSet | RxModeSet) -> None:
        if isinstance(command, MacAddrSet):
            self.mac = command.mac
        elif isinstance(command, MacTableSet):
            self.unicast, self.multicast = command.unicast, command.multicast
        elif command.command == c.VIRTIO_NET_CTRL_RX_PROMISC:
            self.promisc = command.on
        else:
            self.allmulti = command.on


def read_request(iov: np.ndarray, readable: int) -> bytes:
    """The device-readable bytes of a popped chain (rows [0, readable) of its iov)."""
    total = int(iov[:readable, IOV_LEN].sum())
    if total > MAX_REQUEST_BYTES:
        raise CtrlError(f"request of {total} bytes is longer than {MAX_REQUEST_BYTES}")
    # The rows are host addresses inside guest memory, bounds-checked by the pop.
    return b"".join(ctypes.string_at(int(iov[i, IOV_ADDR]), int(iov[i, IOV_LEN])) for i in range(readable))


_OK = int(RingStatus.OK)
_ACK_OK = bytes([c.VIRTIO_NET_OK])
_ACK_ERR = bytes([c.VIRTIO_NET_ERR])


class ControlQueue:
    """Serves one control queue: pops each request, hands the parsed command to ``apply``, acks it.

    ``apply`` is the device's: it raises ``CtrlError`` to refuse a well-formed command. Counters go to
    the queue record as vdpa_sim_net's "cvq requests/successes/errors".
    """

    def __init__(self, apply: Callable[[CtrlCommand], None], log: Callable[..., None]) -> None:
        self.apply = apply
        self.log = log

    def handle(self, request: bytes, features: int, max_vqp: int) -> int:
        """The ack for one request: VIRTIO_NET_OK once applied, VIRTIO_NET_ERR with the reason logged."""
        try:
            self.apply(parse_ctrl(request, features, max_vqp))
        except CtrlError as error:
            self.log("control command refused: %s", error)
            return c.VIRTIO_NET_ERR
        return c.VIRTIO_NET_OK

    def serve(self, vq: Virtqueue, rows: np.ndarray, features: int, max_vqp: int, budget: int = 64) -> tuple[int, bool]:
        """Process up to ``budget`` requests. Returns (ring status, whether to notify the driver).

        A ring fault (malformed chain) is left in the queue record for the device to turn into
        NEEDS_RESET; the status says so.
        """
        q = vq.record
        iov = vq.iov
        status = _OK
        done = 0
        while done < budget:
            status, head, ndesc, n, readable = vq_pop(q, rows, iov)
            if status != _OK:
                break
            done += 1
            q["requests"] += 1
            # The ack is the first device-writable byte; a request without one is refused unapplied.
            ack = c.VIRTIO_NET_ERR
            try:
                if readable == n:
                    raise CtrlError("request has no device-writable ack byte")
                request = read_request(iov, readable)
            except CtrlError as error:
                self.log("control command refused: %s", error)
            else:
                ack = self.handle(request, features, max_vqp)
            written = 0
            if readable < n:
                ack_addr = int(iov[readable, IOV_ADDR])
                ctypes.memmove(ack_addr, _ACK_OK if ack == c.VIRTIO_NET_OK else _ACK_ERR, 1)
                if q["log"]:
                    log_host(q, rows, ack_addr, 1)
                written = 1
            q["successes" if ack == c.VIRTIO_NET_OK else "errors"] += 1
            vq_push(q, head, ndesc, written)
        vq_publish(q)
        notify = done > 0 and bool(vq_needs_notify(q))
        if status == RingStatus.EMPTY:
            status = _OK
        return int(status), notify

    @staticmethod
    def arm(vq: Virtqueue) -> bool:
        """Ask the driver for a kick on the next request; True if one is already there."""
        vq_enable_notify(vq.record)
        return bool(vq_has_avail(vq.record))
