"""Per-device state that outlives the daemon: one versioned, checksummed file per device in the runtime directory.

A daemon killed with SIGKILL loses everything it held in memory. What it needs to serve the same
devices again is kept in ``<runtime>/<name>.state`` (mode 0600), rewritten atomically (a temporary
file renamed over the old one: a reader sees the old file or the new one, never half of either):

* what re-creates the device exactly: its management device, the ``dev add`` request (kernel
  attributes and vdpasim's extension values), the MAC it has now (``dev set`` may have changed it),
  the vhost-user socket path and the ``/dev/vhost-vdpa-N`` number it was given, and for a RAM disk
  the file under the runtime directory that holds the disk (docs/reliability.md);
* what the driver had negotiated when the file was written: driver features, status, config
  generation (informative on the vhost-user path, where the front-end negotiates again after a
  reconnect; the vhost-vdpa bypass path replays it);
* every queue's counters (vstats) and ring positions, written at a modest rate (``CHECKPOINT_SECONDS``)
  and at every change of the device's life cycle, never per packet.

Layout: a 20-byte header, then the payload (UTF-8 JSON, one object)::

    magic    8 bytes  b"VDPASTAT"
    version  u32 LE   FORMAT_VERSION
    length   u32 LE   payload bytes
    crc32    u32 LE   zlib.crc32 of the payload

``decode`` refuses, with a ``StateError`` naming the file and what is wrong, a file that is not a
vdpasim state file (magic), a layout this code does not read (version), a truncated or overlong file,
a payload whose checksum does not match, a payload that is not the expected JSON object, and a
*foreign* file: one written for another runtime directory or another device name than the file name
says (a file copied from elsewhere would re-create a device on sockets and disks that are not ours).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import VdpasimError

__all__ = [
    "CHECKPOINT_SECONDS",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "STATE_SUFFIX",
    "DeviceState",
    "StateError",
    "decode",
    "encode",
    "read_state",
    "remove_state",
    "state_path",
    "write_state",
]

MAGIC = b"VDPASTAT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIII")  # magic, version, payload length, crc32 of the payload
STATE_SUFFIX = ".state"
CHECKPOINT_SECONDS = 0.1  # how often a changed device's counters and positions are written
MAX_PAYLOAD = 1 << 20  # a device's state is a few KiB; a larger length field is corruption


class StateError(VdpasimError):
    """A state file that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: os.PathLike[str] | str, reason: str) -> None:
        super().__init__(f"state file {os.fspath(path)}: {reason}", errno=errno.EINVAL)
        self.path = Path(path)
        self.reason = reason


@dataclass
class DeviceState:
    """Everything a restarted daemon needs to serve one device again, and what the device had reached."""

    name: str
    mgmtdev: str
    runtime_dir: str
    # The dev add request: kernel attributes (mac as text) and vdpasim's extension values (JSON-safe, see
    # ``_jsonable``), so the device is rebuilt through the same bus rules as at its first add.
    request: dict[str, Any] = field(default_factory=dict)
    mac: str | None = None  # the MAC now (dev set changes it)
    vhost_user_socket: str | None = None
    vhost_user_role: str = "server"  # "client": the daemon connects to a front-end listening on the socket
    vhost_vdpa_node: int | None = None
    ram_disk: str | None = None  # a RAM blk device's disk file, under the runtime directory
    # What the driver had reached (at the last checkpoint).
    driver_features: int = 0
    status: int = 0
    generation: int = 0
    queues: list[dict[str, int]] = field(default_factory=list)  # counters and positions per queue
    created_at: float = 0.0  # time.time() of the dev add (restored devices keep the bus order by it)
    restarts: int = 0  # how many daemons have re-created this device from the file
    written_by: int = 0  # pid of the daemon that wrote it
    written_at: float = 0.0  # time.time()
    sequence: int = 0  # writes of this device's file, across daemons


def state_path(runtime_dir: os.PathLike[str] | str, name: str) -> Path:
    return Path(runtime_dir) / f"{name}{STATE_SUFFIX}"


def _jsonable(value: Any) -> Any:
    """Extension values as JSON: bytes become {"hex": ...}; str, int, bool and None stay."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def from_jsonable(value: Any) -> Any:
    """The inverse of ``_jsonable``."""
    if isinstance(value, dict):
        if set(value) == {"hex"} and isinstance(value["hex"], str):
            return bytes.fromhex(value["hex"])
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def encode(state: DeviceState) -> bytes:
    """Header and payload of ``state``."""
    document = asdict(state)
    document["request"] = _jsonable(state.request)
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "mgmtdev": (str,),
    "runtime_dir": (str,),
    "request": (dict,),
    "mac": (str, type(None)),
    "vhost_user_socket": (str, type(None)),
    "vhost_user_role": (str,),
    "vhost_vdpa_node": (int, type(None)),
    "ram_disk": (str, type(None)),
    "driver_features": (int,),
    "status": (int,),
    "generation": (int,),
    "queues": (list,),
    "created_at": (int, float),
    "restarts": (int,),
    "written_by": (int,),
    "written_at": (int, float),
    "sequence": (int,),
}


def decode(
    data: bytes,
    path: os.PathLike[str] | str,
    *,
    runtime_dir: os.PathLike[str] | str | None = None,
    name: str | None = None,
) -> DeviceState:
    """The state in ``data`` (the contents of ``path``); StateError if the file cannot be used.

    ``runtime_dir`` and ``name``, when given, must be what the file says: else it is a foreign file.
    """
    if len(data) < HEADER.size:
        if data[: len(MAGIC)] != MAGIC[: len(data)]:
            raise StateError(path, "not a vdpasim state file (bad magic)")
        raise StateError(path, f"truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(path, f"not a vdpasim state file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise StateError(path, f"format version {version}; this vdpasim reads version {FORMAT_VERSION}")
    if length > MAX_PAYLOAD:
        raise StateError(path, f"corrupt header: payload length {length} (at most {MAX_PAYLOAD})")
    have = len(data) - HEADER.size
    if have < length:
        raise StateError(path, f"truncated: the header announces {length} payload bytes, the file has {have}")
    if have > length:
        raise StateError(path, f"{have - length} stray bytes after the {length}-byte payload")
    payload = data[HEADER.size :]
    actual = zlib.crc32(payload)
    if actual != crc:
        raise StateError(path, f"checksum mismatch (stored {crc:#010x}, computed {actual:#010x}): the file is corrupt")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(path, f"payload is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise StateError(path, "payload is not a JSON object")
    known = {f.name for f in fields(DeviceState)}
    for key in ("name", "mgmtdev", "runtime_dir"):
        if key not in document:
            raise StateError(path, f"payload has no {key!r}")
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in known:
            continue  # a later minor addition: ignore what we do not know
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            raise StateError(path, f"field {key!r} has the wrong type ({type(value).__name__})")
        values[key] = value
    values["request"] = from_jsonable(values.get("request", {}))
    state = DeviceState(**values)
    if runtime_dir is not None and os.path.normpath(state.runtime_dir) != os.path.normpath(os.fspath(runtime_dir)):
        raise StateError(
            path, f"foreign file: written for runtime directory {state.runtime_dir}, not {os.fspath(runtime_dir)}"
        )
    if name is not None and state.name != name:
        raise StateError(path, f"foreign file: it describes device {state.name!r}, its name says {name!r}")
    return state


def read_state(path: os.PathLike[str] | str, *, runtime_dir: os.PathLike[str] | str | None = None) -> DeviceState:
    """Read and check one state file (the device name must match the file name)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise StateError(path, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateError(path, f"foreign file: it belongs to uid {st.st_uid}")
        if st.st_size > HEADER.size + MAX_PAYLOAD:
            raise StateError(path, f"{st.st_size} bytes is too large for a state file")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    name = path.name[: -len(STATE_SUFFIX)] if path.name.endswith(STATE_SUFFIX) else None
    return decode(b"".join(chunks), path, runtime_dir=runtime_dir, name=name)


def write_state(path: os.PathLike[str] | str, state: DeviceState) -> None:
    """Replace ``path`` with ``state`` atomically (temporary file, then rename), mode 0600."""
    path = Path(path)
    state.written_by = os.getpid()
    state.written_at = time.time()
    state.sequence += 1
    data = encode(state)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def remove_state(path: os.PathLike[str] | str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
