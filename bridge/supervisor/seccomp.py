"""seccomp user notification: the filter, the listener and the notification ABI (x86-64).

Facts this module relies on (linux include/uapi/linux/seccomp.h, seccomp(2), seccomp_unotify(2)):
* A filter installed with SECCOMP_FILTER_FLAG_NEW_LISTENER returns a listener fd; each syscall the filter
  answers with SECCOMP_RET_USER_NOTIF blocks its thread until the listener sends a response.
* The installing thread needs no_new_privs (or CAP_SYS_ADMIN); the filter survives execve and is inherited
  by children, so the supervisor sees the whole process tree it started, and nothing else.
* ``notif.pid`` is the id of the thread that made the call. Anything read from that thread's memory can be
  changed by its other threads afterwards (TOCTOU): read pointers once, then check SECCOMP_IOCTL_NOTIF_ID_VALID
  before acting on what was read, and never trust a value read twice to be the same.
* SECCOMP_USER_NOTIF_FLAG_CONTINUE lets the kernel run the call as if never trapped: for the calls we do
  not own. SECCOMP_IOCTL_NOTIF_ADDFD installs one of our fds in the target (SETFD picks its number, SEND
  answers the call with that number in one step).
* WAIT_KILLABLE_RECV (5.19+): once a notification was received, only a fatal signal interrupts the wait,
  so a signal in the target cannot make it replay a call the supervisor already acted on.
* If the listener closes, every trapped call fails with ENOSYS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AUDIT_ARCH_X86_64",
    "Notification",
    "Rule",
    "build_filter",
    "install_filter",
    "receive",
    "respond",
    "respond_continue",
    "add_fd",
    "id_valid",
    "SYSCALLS",
]

AUDIT_ARCH_X86_64 = 0xC000003E
SYSCALLS = {"read": 0, "write": 1, "close": 3, "ioctl": 16, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
            "recvmsg": 47, "socket": 41, "bind": 49, "getsockname": 51, "setsockopt": 54, "openat": 257,
            "mmap": 9, "readv": 19, "writev": 20, "connect": 42, "accept": 43, "shutdown": 48, "listen": 50,
            "getpeername": 52, "getsockopt": 55, "accept4": 288, "recvmmsg": 299, "sendmmsg": 307}  # fmt: skip

_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
_PR_SET_NO_NEW_PRIVS = 38

_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_SECCOMP_RET_KILL_PROCESS = 0x80000000

_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_SECCOMP_ADDFD_FLAG_SETFD = 1
_SECCOMP_ADDFD_FLAG_SEND = 2

# struct seccomp_notif: u64 id; u32 pid; u32 flags; struct seccomp_data {s32 nr; u32 arch; u64 ip; u64 args[6]}.
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")  # seccomp_notif_resp: u64 id; s64 val; s32 error; u32 flags
_ADDFD = struct.Struct("<QIIII")  # seccomp_notif_addfd: u64 id; u32 flags, srcfd, newfd, newfd_flags


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, _NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, _RESP.size)
SECCOMP_IOCTL_NOTIF_ID_VALID = _iow(2, 8)
SECCOMP_IOCTL_NOTIF_ADDFD = _iow(3, _ADDFD.size)

# Classic BPF opcodes used by the filter.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_ALU_RSH_K = 0x74
_ALU_AND_K = 0x54
# Offsets in struct seccomp_data.
_NR, _ARCH = 0, 4


def _arg_low(n: int) -> int:
    return 16 + 8 * n  # low 32 bits of args[n] (little-endian)


def _arg_high(n: int) -> int:
    return 16 + 8 * n + 4


@dataclass(frozen=True)
class Rule:
    """Trap ``syscall``; with ``ioctl_type``, only ioctls whose request has that type byte (bits 8-15);
    with ``arg0``, only calls whose first argument (an fd) is that number, both 32-bit halves compared;
    with ``arg0_range`` (first, end), only calls whose first argument's low 32 bits (the ``int fd`` the kernel
    uses) lie in [first, end); with ``args_low``, only calls whose arguments' low 32 bits (``int`` arguments,
    as socket()'s domain and protocol) equal the given values: ``((index, value), ...)``; with ``arg_any_bits``
    (index, mask), only calls whose argument has one of the ``mask`` bits set (openat's access mode)."""

    syscall: str
    ioctl_type: int | None = None
    arg0: int | None = None
    arg0_range: tuple[int, int] | None = None
    args_low: tuple[tuple[int, int], ...] = ()
    arg_any_bits: tuple[int, int] | None = None


def build_filter(rules: Iterable[Rule]) -> bytes:
    """A classic-BPF program: other architectures are killed, matching calls notify, everything else runs."""
    program: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS),
    ]
    for rule in rules:
        checks: list[tuple[int, int, int, int]] = [(_LD_W_ABS, 0, 0, _NR), (_JEQ_K, 0, 0, SYSCALLS[rule.syscall])]
        if rule.ioctl_type is not None:
            checks += [
                (_LD_W_ABS, 0, 0, _arg_low(1)),
                (_ALU_RSH_K, 0, 0, 8),
                (_ALU_AND_K, 0, 0, 0xFF),
                (_JEQ_K, 0, 0, rule.ioctl_type),
            ]
        if rule.arg0 is not None:
            checks += [
                (_LD_W_ABS, 0, 0, _arg_low(0)),
                (_JEQ_K, 0, 0, rule.arg0 & 0xFFFFFFFF),
                (_LD_W_ABS, 0, 0, _arg_high(0)),
                (_JEQ_K, 0, 0, rule.arg0 >> 32 & 0xFFFFFFFF),
            ]
        for index, value in rule.args_low:
            checks += [(_LD_W_ABS, 0, 0, _arg_low(index)), (_JEQ_K, 0, 0, value & 0xFFFFFFFF)]
        if rule.arg_any_bits is not None:
            index, mask = rule.arg_any_bits
            # equal to 0 after the mask: the rule fails (jt, marked by jt=1 here, fixed below)
            checks += [(_LD_W_ABS, 0, 0, _arg_low(index)), (_ALU_AND_K, 0, 0, mask), (_JEQ_K, 1, 0, 0)]
        if rule.arg0_range is not None:
            first, end = rule.arg0_range
            # below ``first`` fails (jf); at or above ``end`` fails too (jt, marked by jt=1 here, fixed below)
            checks += [(_LD_W_ABS, 0, 0, _arg_low(0)), (_JGE_K, 0, 0, first), (_JGE_K, 1, 0, end)]
        # A failed comparison jumps past the rest of the rule and its notify (jumps count from the next insn).
        for i, (code, jt, _, k) in enumerate(checks):
            if code in (_JEQ_K, _JGE_K) and not jt:
                checks[i] = (code, 0, len(checks) - i, k)
            elif code in (_JEQ_K, _JGE_K):
                checks[i] = (code, len(checks) - i, 0, k)
        program += checks
        program.append((_RET_K, 0, 0, _SECCOMP_RET_USER_NOTIF))
    program.append((_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    return b"".join(struct.pack("<HBBI", *insn) for insn in program)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def install_filter(program: bytes) -> int:
    """In the process to confine (before exec): no_new_privs, the filter; returns the listener fd."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = ctypes.create_string_buffer(program)
    fprog = struct.pack("<HxxxxxxQ", len(program) // 8, ctypes.addressof(code))
    prog = ctypes.create_string_buffer(fprog)
    flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER | _SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    listener = _libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, flags, prog)
    if listener < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")
    return listener


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # the calling thread
    nr: int
    arch: int
    args: tuple[int, ...]


def receive(listener: int) -> Notification:
    """The next trapped call (blocks). ENOENT means the caller died before we read it: try again."""
    buf = bytearray(_NOTIF.size)
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf)
    ident, pid, _, nr, arch, _, *args = _NOTIF.unpack(buf)
    return Notification(ident, pid, nr, arch, tuple(args))


def respond(listener: int, ident: int, value: int = 0, error: int = 0) -> None:
    """Complete a trapped call: ``value`` is its return value, or ``error`` a positive errno (-error returned)."""
    _send(listener, _RESP.pack(ident, value if not error else 0, -error, 0))


def respond_continue(listener: int, ident: int) -> None:
    """Let the kernel run the call as if it had not been trapped."""
    _send(listener, _RESP.pack(ident, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE))


def _send(listener: int, response: bytes) -> None:
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, bytearray(response))
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # the target died or was interrupted meanwhile: nothing to answer
            raise


def add_fd(
    listener: int, ident: int, fd: int, *, target_fd: int | None = None, send: bool = False, cloexec: bool = False
) -> int:
    """Install ``fd`` in the target (as ``target_fd`` if given, close-on-exec with ``cloexec``); with ``send`` it
    also answers the call. Returns the fd number in the target."""
    flags = (_SECCOMP_ADDFD_FLAG_SETFD if target_fd is not None else 0) | (_SECCOMP_ADDFD_FLAG_SEND if send else 0)
    request = bytearray(_ADDFD.pack(ident, flags, fd, target_fd or 0, os.O_CLOEXEC if cloexec else 0))
    return fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, request, True)


def id_valid(listener: int, ident: int) -> bool:
    """Whether the call is still waiting: check after reading the target's memory, before acting on it."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("<Q", ident)))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
