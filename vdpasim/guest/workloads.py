"""Host-side knowledge of the guest's workloads: the frames ``net-loopback`` sends, and block checks.

The guest's ``vdpasim-pktloop`` (c/pktloop.c) builds every frame from (seed, seq, lengths, MACs)
alone; ``loopback_frame`` builds the same bytes here, so a test can check the per-frame digests the
guest printed, or look for the very frames in a device's rings or a packet capture.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = [
    "ETH_P_VDPASIM",
    "FOREIGN_MAC",
    "LOOPBACK_HEADER_LEN",
    "WORKLOADS",
    "fnv1a64",
    "loopback_frame",
    "loopback_frame_len",
    "loopback_kind",
    "file_range_sha256",
]

WORKLOADS = ("selftest", "ping", "net-loopback", "blk", "script")
ETH_P_VDPASIM = 0x88B5  # IEEE 802 local experimental EtherType 1
FOREIGN_MAC = bytes.fromhex("025e10000001")
LOOPBACK_HEADER_LEN = 30
LOOPBACK_KINDS = ("own", "broadcast", "foreign")
_M32 = 0xFFFFFFFF


def fnv1a64(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _mix32(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def loopback_kind(seq: int) -> str:
    return LOOPBACK_KINDS[seq % 3]


def loopback_frame_len(seed: int, seq: int, min_len: int = 60, max_len: int = 1514) -> int:
    return min_len + _mix32(seed ^ ((seq * 0x9E3779B9) & _M32)) % (max_len - min_len + 1)


def loopback_frame(mac: bytes, seed: int, seq: int, min_len: int = 60, max_len: int = 1514) -> bytes:
    """Frame ``seq`` of a net-loopback run on an interface whose MAC is ``mac`` (6 bytes)."""
    length = loopback_frame_len(seed, seq, min_len, max_len)
    kind = seq % 3
    dst = (mac, b"\xff" * 6, FOREIGN_MAC)[kind]
    head = (
        dst
        + mac
        + ETH_P_VDPASIM.to_bytes(2, "big")
        + b"VDPS"
        + seq.to_bytes(4, "big")
        + seed.to_bytes(4, "big")
        + length.to_bytes(2, "big")
        + bytes((kind, 0))
    )
    state = _mix32(seed + seq) | 1
    body = bytearray(length - LOOPBACK_HEADER_LEN)
    for i in range(len(body)):
        state ^= (state << 13) & _M32
        state ^= state >> 17
        state ^= (state << 5) & _M32
        body[i] = state & 0xFF
    return head + bytes(body)


def file_range_sha256(path: Path, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of ``path`` from ``offset`` (a blk workload's backing file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:  # past the end of a sparse/short file reads as zeros, as the device does
                chunk = bytes(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()
