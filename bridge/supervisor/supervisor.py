"""Run a program under a seccomp user-notification filter and answer its calls on simulated char devices.

``Supervisor(argv, nodes)`` starts ``argv`` with a filter that traps ``openat`` for writing (O_WRONLY or O_RDWR,
any path: the filter cannot read strings; a node opened O_RDONLY is not found, ENOENT), vhost ioctls (type byte
0xAF) and ``write`` on the fixed fd numbers where simulated devices are installed.
The supervisor thread answers each trapped call:
* openat of a path in ``nodes``: the node's handler is opened and a placeholder (/dev/null: a doorbell mmap on
  it fails cleanly, so QEMU falls back to eventfd kicks) is installed in the target at a fixed fd number that
  the filter knows; any other path continues untouched;
* close of such an fd: the handler is closed (as a char device's release), the placeholder really closed;
* ioctl/write on such an fd: handed to the node's handler with a ``TargetMemory`` of the calling thread, whose
  result or errno the call returns; on any other fd: continues untouched.
Only the process tree started here is ever trapped (the filter is inherited across fork and exec, never
installed elsewhere). Every pointer read from the target is read once, with process_vm_readv (writes with
process_vm_writev: like the kernel's copy_to_user, they respect the target's page protections; no fd is kept,
so an exec in the target cannot leave a stale view), and acted on only while SECCOMP_IOCTL_NOTIF_ID_VALID says
the call still waits.

The per-call path is kept lean, since a VMM's device start is dozens of trapped calls: a thread's process is
remembered (checked with one stat of /proc/TGID/task/TID instead of parsing /proc/TID/status), and the pidfd
the supervisor holds on a process with a node open serves take_fd.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from vdpasim.errors import PeerError

from . import seccomp
from .netlink import NetlinkBypass

__all__ = ["Supervisor", "NodeHandler", "TargetMemory", "FIRST_NODE_FD"]

log = logging.getLogger("vdpasim.supervisor")

FIRST_NODE_FD = 900  # simulated device fds live at 900, 901, ... in the target
MAX_NODES = 16
_PATH_MAX = 4096


class TargetMemory:
    """The calling thread's address space (through /proc/TID/mem; faults become EFAULT) and its process's fds
    and file mappings: what a char-device server needs from its caller (bridge/vhost_vdpa/server.py ``Caller``)."""

    def __init__(self, tid: int, tgid: int | None = None, pidfd: int | None = None) -> None:
        self.tid = tid
        self.tgid = tid if tgid is None else tgid
        self.pidfd = pidfd  # the supervisor's pidfd of tgid, if it holds one (not ours to close)

    def take_fd(self, number: int) -> int:
        """A duplicate, in this process, of the caller's fd ``number`` (pidfd_getfd: as the kernel's
        eventfd_ctx_fdget takes a reference to the caller's file)."""
        pidfd = self.pidfd
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(self.tgid)
            except OSError as exc:
                raise PeerError(f"process {self.tgid} is gone", errno=errno.ESRCH) from exc
        try:
            return _pidfd_getfd(pidfd, number)
        except OSError as exc:
            raise PeerError(f"fd {number} of process {self.tgid}: {exc.strerror}", errno=errno.EBADF) from exc
        finally:
            if pidfd != self.pidfd:
                os.close(pidfd)

    def map_file(self, addr: int, length: int) -> tuple[int, int]:
        """(fd, file offset) of the shared file mapping holding [addr, addr+length) whole in the caller.

        How a VMM address in an IOTLB update becomes memory we can map too: guest RAM must be a shared
        file mapping (QEMU ``memory-backend-memfd,share=on`` or ``memory-backend-file,share=on``); private
        or anonymous memory is refused with EFAULT and says so. The fd comes from /proc/TGID/map_files.
        """
        mapping = _find_mapping(self.tgid, addr, length)
        if mapping is None:
            raise PeerError(
                f"{addr:#x}+{length:#x} is not inside one mapping of process {self.tgid}", errno=errno.EFAULT
            )
        start, end, perms, offset, path = mapping
        if perms[3] != "s" or not path.startswith("/"):
            raise PeerError(
                f"{addr:#x}+{length:#x} in process {self.tgid} is private memory ({perms} {path or 'anonymous'}): "
                "guest RAM must be a shared file mapping (memory-backend-memfd,share=on)",
                errno=errno.EFAULT,
            )
        mode = os.O_RDWR if perms[1] == "w" else os.O_RDONLY
        try:
            fd = os.open(f"/proc/{self.tgid}/map_files/{start:x}-{end:x}", mode | os.O_CLOEXEC)
        except OSError as exc:
            reason = f"cannot open the file behind {addr:#x} ({path}): {exc.strerror}"
            raise PeerError(reason, errno=errno.EFAULT) from exc
        return fd, offset + addr - start

    def read(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        buffer = ctypes.create_string_buffer(length)
        if _vm_copy(_process_vm_readv, self.tid, ctypes.addressof(buffer), addr, length) != length:
            raise PeerError(f"cannot read {length} bytes at {addr:#x} in thread {self.tid}", errno=errno.EFAULT)
        return buffer.raw

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        buffer = ctypes.create_string_buffer(bytes(data), len(data))
        if _vm_copy(_process_vm_writev, self.tid, ctypes.addressof(buffer), addr, len(data)) != len(data):
            raise PeerError(f"cannot write {len(data)} bytes at {addr:#x} in thread {self.tid}", errno=errno.EFAULT)

    def read_string(self, addr: int, limit: int = _PATH_MAX) -> bytes:
        """A NUL-terminated string, read in page-bounded pieces so a string near unmapped memory still reads."""
        out = b""
        while len(out) < limit:
            chunk = min(4096 - (addr + len(out)) % 4096, limit - len(out))
            piece = self.read(addr + len(out), chunk)
            end = piece.find(b"\0")
            if end >= 0:
                return out + piece[:end]
            out += piece
        raise PeerError(f"string at {addr:#x} longer than {limit} bytes", errno=errno.ENAMETOOLONG)


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


def _vm_copy(call: ctypes._CFuncPtr, tid: int, local: int, remote: int, length: int) -> int:
    """Bytes copied between our ``local`` buffer and the thread's ``remote`` address; -1 on a fault."""
    if remote < 0 or remote + length > 1 << 64:
        return -1
    ours, theirs = _Iovec(local, length), _Iovec(remote, length)
    return call(tid, ctypes.byref(ours), 1, ctypes.byref(theirs), 1, 0)


def _pidfd_getfd(pidfd: int, number: int) -> int:
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, number, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    os.set_inheritable(fd, False)
    return fd


def _find_mapping(tgid: int, addr: int, length: int) -> tuple[int, int, str, int, str] | None:
    """(start, end, perms, file offset, path) of the mapping in /proc/TGID/maps holding [addr, addr+length)."""
    if length <= 0 or addr < 0:
        return None
    try:
        with open(f"/proc/{tgid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= addr < end:
                    if addr + length > end:
                        return None
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return start, end, fields[1], int(fields[2], 16), path
    except (OSError, ValueError, IndexError):
        return None
    return None


_SYSCALL_NAMES = {number: name for name, number in seccomp.SYSCALLS.items()}


class NodeHandler(Protocol):
    """One opened simulated char device, as the program sees its fd."""

    def ioctl(self, request: int, arg: int, memory: TargetMemory) -> int:
        """The ioctl's return value; raise PeerError for an errno."""

    def write(self, addr: int, length: int, memory: TargetMemory) -> int:
        """Bytes consumed; raise PeerError for an errno."""

    def close(self) -> None: ...


class NodeFactory(Protocol):
    def open(self, flags: int) -> NodeHandler:
        """A new handler; raise PeerError (e.g. EBUSY for a second open) to fail the open."""


class NodeDirectory(Protocol):
    """Which paths are simulated nodes: looked up at each open, so nodes may come and go while the program runs."""

    def get(self, path: str) -> NodeFactory | None: ...


class Supervisor:
    def __init__(
        self, argv: Sequence[str], nodes: NodeDirectory | Mapping[str, NodeFactory], *,
        netlink: NetlinkBypass | None = None, **popen: object
    ) -> None:  # fmt: skip
        self.nodes = nodes
        self.netlink = netlink  # with it, NETLINK_GENERIC sockets are emulated (netlink.py)
        self._slots: dict[str, int] = {}  # node path -> its fixed fd number's offset from FIRST_NODE_FD
        self.open_nodes: dict[tuple[int, int], NodeHandler] = {}  # (tgid, fd) -> handler
        self.calls = 0  # trapped calls answered, and the time spent answering them
        self.busy_seconds = 0.0
        self.passed = 0  # of those, calls let through untouched (openat of other paths, ioctls on other fds)
        self.calls_by_syscall: dict[str, int] = {}  # openat counts the opens for writing (read-only ones never trap)
        self.seconds_by_syscall: dict[str, float] = {}
        self._closed = False
        self._tgids: dict[int, int] = {}  # thread -> its process, as last seen (checked at each use)
        # openat: only opens for writing (O_WRONLY or O_RDWR, the access mode bits) can be of a node: a VMM opens
        # /dev/vhost-vdpa-N O_RDWR, and the read-only opens (shared libraries, Python's imports, config files:
        # nearly all of a program's opens) then run without a round trip through here.
        rules = [
            seccomp.Rule("openat", arg_any_bits=(2, os.O_WRONLY | os.O_RDWR)),
            seccomp.Rule("ioctl", ioctl_type=0xAF),
        ]
        for i in range(MAX_NODES):
            rules += [seccomp.Rule(call, arg0=FIRST_NODE_FD + i) for call in ("write", "close")]
        if netlink is not None:
            rules += netlink.rules()
        program = seccomp.build_filter(rules)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._placeholder = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

        def confine() -> None:  # runs in the child between fork and exec
            listener = seccomp.install_filter(program)
            theirs.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener]).tobytes())])
            os.close(listener)

        pass_fds = (*popen.pop("pass_fds", ()), theirs.fileno())  # type: ignore[misc]
        self.process = subprocess.Popen(list(argv), preexec_fn=confine, pass_fds=pass_fds, **popen)  # type: ignore[call-overload]
        theirs.close()
        _, ancillary, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        ours.close()
        if not ancillary:
            self.process.kill()
            raise OSError("the confined program did not hand over its seccomp listener")
        self.listener = array.array("i", ancillary[0][2])[0]
        self._thread = threading.Thread(target=self._loop, name="vdpasim-supervisor", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._thread.join(5)
        return code

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self._thread.join(5)
        for handler in self.open_nodes.values():
            handler.close()
        self.open_nodes.clear()
        if self.netlink is not None:
            self.netlink.close()
        with contextlib.suppress(OSError):
            os.close(self.listener)
        with contextlib.suppress(OSError):
            os.close(self._placeholder)

    # ----- the loop -----
    def _loop(self) -> None:
        """Answer trapped calls; release the nodes a process held when it dies (it closes no fd then)."""
        self._poller = select.poll()
        self._poller.register(self.listener, select.POLLIN)
        self._pidfds: dict[int, int] = {}  # pidfd -> tgid, for every process holding a node open
        while True:
            for fd, events in self._poller.poll():
                if fd != self.listener:
                    self._release(self._pidfds.pop(fd))
                    self._poller.unregister(fd)
                    os.close(fd)
                elif events & select.POLLIN:
                    self._receive()
                elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    for tgid in {tgid for tgid, _ in self.open_nodes}:
                        self._release(tgid)  # every process of the tree exited (or we were closed)
                    return

    def _receive(self) -> None:
        try:
            notification = seccomp.receive(self.listener)
        except OSError:
            return  # the caller went away before we read it (ENOENT), or the listener is closing
        self.calls += 1
        name = _SYSCALL_NAMES.get(notification.nr, str(notification.nr))
        self.calls_by_syscall[name] = self.calls_by_syscall.get(name, 0) + 1
        started = time.perf_counter()
        try:
            self._answer(notification)
        except Exception:  # a bug here must not leave the target blocked forever
            log.exception("answering %s", notification)
            seccomp.respond(self.listener, notification.id, error=errno.EIO)
        spent = time.perf_counter() - started
        self.busy_seconds += spent
        self.seconds_by_syscall[name] = self.seconds_by_syscall.get(name, 0.0) + spent

    def _watch(self, tgid: int) -> None:
        if tgid in self._pidfds.values():
            return
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(tgid)
            self._pidfds[pidfd] = tgid
            self._poller.register(pidfd, select.POLLIN)

    def _release(self, tgid: int) -> None:
        for key in [key for key in self.open_nodes if key[0] == tgid]:
            log.info("process %d exited holding fd %d: releasing it", tgid, key[1])
            self.open_nodes.pop(key).close()

    def _tgid(self, tid: int) -> int:
        known = self._tgids.get(tid)
        if known is not None:
            try:
                os.stat(f"/proc/{known}/task/{tid}")  # still that process's thread (a tid may be reused)
                return known
            except OSError:
                del self._tgids[tid]
        with contextlib.suppress(OSError), open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    tgid = self._tgids[tid] = int(line.split()[1])
                    if len(self._tgids) > 4096:  # threads come and go: forget the oldest
                        del self._tgids[next(iter(self._tgids))]
                    return tgid
        raise ProcessLookupError(tid)

    def _pidfd_of(self, tgid: int) -> int | None:
        for pidfd, holder in self._pidfds.items():
            if holder == tgid:
                return pidfd
        return None

    def _answer(self, n: seccomp.Notification) -> None:
        name = _SYSCALL_NAMES.get(n.nr)
        try:
            if self.netlink is not None and self.netlink.owns(name, n.args):
                tgid = self._tgid(n.pid)
                self.netlink.answer(self.listener, n, name, TargetMemory(n.pid, tgid), tgid)  # type: ignore[arg-type]
                return
            if name == "openat":
                self._openat(n, TargetMemory(n.pid))
                return
            tgid = self._tgid(n.pid)
            handler = self.open_nodes.get((tgid, n.args[0] & 0xFFFFFFFF))
            memory = TargetMemory(n.pid, tgid, self._pidfd_of(tgid))
            if handler is None:
                self.passed += 1
                seccomp.respond_continue(self.listener, n.id)
                return
            if name == "close":
                del self.open_nodes[(tgid, n.args[0] & 0xFFFFFFFF)]
                handler.close()
                seccomp.respond_continue(self.listener, n.id)  # the kernel closes the placeholder
                return
            if name == "ioctl":
                result = handler.ioctl(n.args[1] & 0xFFFFFFFF, n.args[2], memory)
            else:
                result = handler.write(n.args[1], n.args[2], memory)
        except PeerError as exc:
            log.info("%s by %d: %s", name, n.pid, exc)
            seccomp.respond(self.listener, n.id, error=exc.errno)
            return
        except ProcessLookupError:
            return  # the caller died
        seccomp.respond(self.listener, n.id, result)

    def _openat(self, n: seccomp.Notification, memory: TargetMemory) -> None:
        path = memory.read_string(n.args[1]).decode(errors="replace")
        factory = self.nodes.get(path)
        if factory is None or not seccomp.id_valid(self.listener, n.id):
            self.passed += 1
            seccomp.respond_continue(self.listener, n.id)
            return
        tgid = self._tgid(n.pid)
        if path not in self._slots:
            if len(self._slots) == MAX_NODES:
                raise PeerError(f"{path}: more than {MAX_NODES} simulated nodes opened", errno=errno.ENFILE)
            self._slots[path] = len(self._slots)
        number = FIRST_NODE_FD + self._slots[path]
        if (tgid, number) in self.open_nodes:
            raise PeerError(f"{path} is already open", errno=errno.EBUSY)  # exclusive, as vhost-vdpa
        handler = factory.open(n.args[2])
        self.open_nodes[(tgid, number)] = handler
        self._watch(tgid)
        seccomp.add_fd(self.listener, n.id, self._placeholder, target_fd=number, send=True)
        log.info("%s opened by %d as fd %d", path, tgid, number)
