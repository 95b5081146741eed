"""Run a program under a seccomp user-notification filter and answer its calls on simulated char devices.

``Supervisor(argv, nodes)`` starts ``argv`` with a filter that traps ``openat`` (every path: the filter cannot
read strings), vhost ioctls (type byte 0xAF) and ``write`` on the fixed fd numbers where simulated devices are
installed. The supervisor thread answers each trapped call:
* openat of a path in ``nodes``: the node's handler is opened and a placeholder (/dev/null: a doorbell mmap on
  it fails cleanly, so QEMU falls back to eventfd kicks) is installed in the target at a fixed fd number that
  the filter knows; any other path continues untouched;
* close of such an fd: the handler is closed (as a char device's release), the placeholder really closed;
* ioctl/write on such an fd: handed to the node's handler with a ``TargetMemory`` of the calling thread, whose
  result or errno the call returns; on any other fd: continues untouched.
Only the process tree started here is ever trapped (the filter is inherited across fork and exec, never
installed elsewhere). Every pointer read from the target is read once, through /proc/TID/mem (opened after the
target's exec, per call), and acted on only while SECCOMP_IOCTL_NOTIF_ID_VALID says the call still waits.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import subprocess
import threading
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
    """The calling thread's address space, through /proc/TID/mem; faults become EFAULT."""

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def read(self, addr: int, length: int) -> bytes:
        try:
            with open(f"/proc/{self.tid}/mem", "rb", buffering=0) as mem:
                mem.seek(addr)
                data = mem.read(length)
        except (OSError, ValueError, OverflowError) as exc:
            raise PeerError(
                f"cannot read {length} bytes at {addr:#x} in thread {self.tid}", errno=errno.EFAULT
            ) from exc
        if len(data) != length:
            raise PeerError(f"short read at {addr:#x} in thread {self.tid}", errno=errno.EFAULT)
        return data

    def write(self, addr: int, data: bytes) -> None:
        try:
            with open(f"/proc/{self.tid}/mem", "r+b", buffering=0) as mem:
                mem.seek(addr)
                written = mem.write(data)
        except (OSError, ValueError, OverflowError) as exc:
            raise PeerError(
                f"cannot write {len(data)} bytes at {addr:#x} in thread {self.tid}", errno=errno.EFAULT
            ) from exc
        if written != len(data):
            raise PeerError(f"short write at {addr:#x} in thread {self.tid}", errno=errno.EFAULT)

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


class Supervisor:
    def __init__(
        self, argv: Sequence[str], nodes: Mapping[str, NodeFactory], *, netlink: NetlinkBypass | None = None,
        **popen: object
    ) -> None:  # fmt: skip
        if len(nodes) > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} simulated nodes")
        self.nodes = dict(nodes)
        self.netlink = netlink  # with it, NETLINK_GENERIC sockets are emulated (netlink.py)
        self.open_nodes: dict[tuple[int, int], NodeHandler] = {}  # (tgid, fd) -> handler
        self.calls = 0
        rules = [seccomp.Rule("openat"), seccomp.Rule("ioctl", ioctl_type=0xAF)]
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

        self.process = subprocess.Popen(list(argv), preexec_fn=confine, pass_fds=(theirs.fileno(),), **popen)  # type: ignore[call-overload]
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

    def close(self) -> None:
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
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if events.get(self.listener, 0) & (select.POLLHUP | select.POLLNVAL) and not events[self.listener] & (
                select.POLLIN
            ):
                return  # no process is left under the filter (POLLHUP), or the listener was closed
            try:
                notification = seccomp.receive(self.listener)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the caller went away before we read it
                return  # the listener is gone: every process of the tree exited
            self.calls += 1
            try:
                self._answer(notification)
            except Exception:  # a bug here must not leave the target blocked forever
                log.exception("answering %s", notification)
                seccomp.respond(self.listener, notification.id, error=errno.EIO)

    def _tgid(self, tid: int) -> int:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
        raise ProcessLookupError(tid)

    def _answer(self, n: seccomp.Notification) -> None:
        name = {v: k for k, v in seccomp.SYSCALLS.items()}.get(n.nr)
        memory = TargetMemory(n.pid)
        try:
            if self.netlink is not None and self.netlink.owns(name, n.args):
                self.netlink.answer(self.listener, n, name, memory, self._tgid(n.pid))  # type: ignore[arg-type]
                return
            if name == "openat":
                self._openat(n, memory)
                return
            tgid = self._tgid(n.pid)
            handler = self.open_nodes.get((tgid, n.args[0] & 0xFFFFFFFF))
            if handler is None:
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
            seccomp.respond_continue(self.listener, n.id)
            return
        tgid = self._tgid(n.pid)
        number = FIRST_NODE_FD + list(self.nodes).index(path)
        if (tgid, number) in self.open_nodes:
            raise PeerError(f"{path} is already open", errno=errno.EBUSY)  # exclusive, as vhost-vdpa
        handler = factory.open(n.args[2])
        self.open_nodes[(tgid, number)] = handler
        seccomp.add_fd(self.listener, n.id, self._placeholder, target_fd=number, send=True)
        log.info("%s opened by %d as fd %d", path, tgid, number)
