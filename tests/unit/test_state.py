"""vdpasim/state.py: the per-device state file's layout, and every way a file is refused."""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from pathlib import Path

import pytest

from vdpasim.state import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    DeviceState,
    StateError,
    decode,
    encode,
    read_state,
    remove_state,
    state_path,
    write_state,
)


def _state(runtime: Path, name: str = "net0") -> DeviceState:
    return DeviceState(
        name=name,
        mgmtdev="vdpasim_net",
        runtime_dir=str(runtime),
        request={
            "mac": "02:00:00:00:00:01",
            "mtu": 9000,
            "max_vqp": None,
            "device_features": None,
            "extension": {"mode": "responder", "peer_ip": "10.0.0.2", "peer_mac": b"\x02\0\0\0\0\x09"},
        },
        mac="02:00:00:00:00:07",
        vhost_user_socket=str(runtime / f"{name}.vhost-user.sock"),
        vhost_vdpa_node=3,
        driver_features=1 << 32 | 1 << 5,
        status=0xF,
        generation=4,
        queues=[{"packets": 10, "bytes": 980, "last_avail": 65535}, {"packets": 12, "last_avail": 12}],
        restarts=2,
    )


def _with_payload(document: dict, *, version: int = FORMAT_VERSION) -> bytes:
    payload = json.dumps(document).encode()
    return HEADER.pack(MAGIC, version, len(payload), zlib.crc32(payload)) + payload


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    state = _state(tmp_path)
    path = state_path(tmp_path, "net0")
    write_state(path, state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.sequence == 1 and state.written_by == os.getpid() and state.written_at > 0
    back = read_state(path, runtime_dir=tmp_path)
    assert back == state
    assert back.request["extension"]["peer_mac"] == b"\x02\0\0\0\0\x09"  # bytes survive the JSON
    write_state(path, back)
    assert read_state(path).sequence == 2
    assert [p.name for p in tmp_path.iterdir()] == ["net0.state"]  # no temporary file left behind
    remove_state(path)
    remove_state(path)  # idempotent
    assert not path.exists()


def test_header_layout(tmp_path: Path) -> None:
    data = encode(_state(tmp_path))
    magic, version, length, crc = struct.unpack_from("<8sIII", data)
    assert (magic, version, length) == (b"VDPASTAT", 1, len(data) - 20)
    assert crc == zlib.crc32(data[20:])
    assert json.loads(data[20:])["name"] == "net0"


def test_another_version_is_refused(tmp_path: Path) -> None:
    data = bytearray(encode(_state(tmp_path)))
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    with pytest.raises(StateError, match=r"state file .*x\.state: format version 2; this vdpasim reads version 1"):
        decode(bytes(data), tmp_path / "x.state")


def test_a_flipped_bit_fails_the_checksum(tmp_path: Path) -> None:
    data = bytearray(encode(_state(tmp_path)))
    data[-3] ^= 0x01
    with pytest.raises(StateError, match=r"checksum mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)"):
        decode(bytes(data), "net0.state")


@pytest.mark.parametrize("keep", [0, 5, 19, 20, 21, 60])
def test_truncation_is_refused(tmp_path: Path, keep: int) -> None:
    data = encode(_state(tmp_path))
    with pytest.raises(StateError, match="truncated") as info:
        decode(data[:keep], tmp_path / "net0.state")
    assert str(tmp_path / "net0.state") in str(info.value)


def test_stray_bytes_after_the_payload_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="3 stray bytes after the"):
        decode(encode(_state(tmp_path)) + b"abc", "x.state")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x7fELF\x02\x01\x01" + bytes(40), "not a vdpasim state file"),
        (b"hello", "not a vdpasim state file"),
        (b"", "truncated"),
        (HEADER.pack(MAGIC, FORMAT_VERSION, 1 << 30, 0), "corrupt header: payload length"),
    ],
)
def test_foreign_bytes_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(StateError, match=reason):
        decode(data, "x.state")


def test_a_file_for_another_runtime_directory_or_device_is_foreign(tmp_path: Path) -> None:
    data = encode(_state(tmp_path / "elsewhere"))
    with pytest.raises(StateError, match="foreign file: written for runtime directory"):
        decode(data, "net0.state", runtime_dir=tmp_path)
    data = encode(_state(tmp_path))
    with pytest.raises(StateError, match="foreign file: it describes device 'net0', its name says 'net1'"):
        decode(data, "net1.state", runtime_dir=tmp_path, name="net1")
    (tmp_path / "net1.state").write_bytes(data)  # renamed by hand: read_state checks the name
    with pytest.raises(StateError, match="foreign file"):
        read_state(tmp_path / "net1.state")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ({"name": "x", "mgmtdev": "vdpasim_net"}, "no 'runtime_dir'"),
        ({"name": "x", "mgmtdev": "vdpasim_net", "runtime_dir": "/r", "status": "15"}, "'status' has the wrong type"),
        ({"name": "x", "mgmtdev": "vdpasim_net", "runtime_dir": "/r", "status": True}, "'status' has the wrong type"),
        ({"name": 7, "mgmtdev": "vdpasim_net", "runtime_dir": "/r"}, "'name' has the wrong type"),
    ],
)
def test_a_malformed_payload_is_refused(document: object, reason: str) -> None:
    with pytest.raises(StateError, match=reason):
        decode(_with_payload(document), "x.state")  # type: ignore[arg-type]


def test_a_payload_that_is_not_json(tmp_path: Path) -> None:
    payload = b"\xff{not json"
    data = HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload
    with pytest.raises(StateError, match="payload is not JSON"):
        decode(data, "x.state")


def test_unknown_fields_of_a_later_minor_revision_are_ignored() -> None:
    state = decode(_with_payload({"name": "x", "mgmtdev": "vdpasim_blk", "runtime_dir": "/r", "future": 1}), "x.state")
    assert (state.name, state.mgmtdev, state.queues) == ("x", "vdpasim_blk", [])


def test_a_missing_file_and_a_symbolic_link_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot open: No such file"):
        read_state(tmp_path / "gone.state")
    write_state(tmp_path / "real.state", _state(tmp_path, "real"))
    (tmp_path / "link.state").symlink_to(tmp_path / "real.state")
    with pytest.raises(StateError, match="cannot open"):
        read_state(tmp_path / "link.state")
