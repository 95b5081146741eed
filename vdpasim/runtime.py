"""The runtime directory: where a daemon keeps its lock, control socket, log and vhost-user sockets.

One directory per daemon, private to its user, so two daemons never collide and nobody else can
drive their devices:

* ``VDPASIM_RUNTIME_DIR`` selects it; else ``$XDG_RUNTIME_DIR/vdpasim``; else ``/run/vdpasim``.
  Every command resolves it the same way (``runtime_dir()``), so a CLI talks to the daemon of the
  directory its environment names.
* It is created 0700. An existing one must be a real directory (not a symlink), owned by us, with
  no group or other access; anything else is refused, never "fixed", since it may not be ours.
* ``daemon.pid`` is both the pidfile and the lock: the daemon holds an exclusive ``flock`` on it for
  its whole life. A second daemon on the same directory cannot take it and stops. The lock is
  released by the kernel when the process dies, however it dies, so a stale pidfile never blocks a
  restart; a clean exit unlinks it while still holding the lock (a daemon that opened the old file
  notices the unlinked inode and retries on a fresh one).
* Sockets: ``control.sock`` and ``<device>.vhost-user.sock``, created 0600. Whoever holds the lock
  owns every socket in the directory, so leftovers of a killed daemon are removed at start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from .errors import UsageError, VdpasimError

__all__ = [
    "ENV_RUNTIME_DIR",
    "CONTROL_SOCKET",
    "PID_FILE",
    "LOG_FILE",
    "VHOST_USER_SUFFIX",
    "SUN_PATH_MAX",
    "RuntimeDirError",
    "DaemonRunning",
    "RuntimeDir",
    "runtime_dir",
]

ENV_RUNTIME_DIR = "VDPASIM_RUNTIME_DIR"
CONTROL_SOCKET = "control.sock"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
VHOST_USER_SUFFIX = ".vhost-user.sock"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1: a longer path cannot be bound


class RuntimeDirError(VdpasimError):
    """The runtime directory cannot be used (wrong owner or mode, not creatable...)."""


class DaemonRunning(VdpasimError):
    """Another daemon holds the directory's lock."""

    errno = errno.EBUSY

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def runtime_dir(environ: os._Environ[str] | dict[str, str] | None = None) -> RuntimeDir:
    """The runtime directory the environment names (not created here)."""
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_RUNTIME_DIR)
    if chosen:
        return RuntimeDir(Path(chosen))
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return RuntimeDir(Path(xdg) / "vdpasim")
    return RuntimeDir(Path("/run/vdpasim"))


class RuntimeDir:
    """Paths in one runtime directory, its checks, and the daemon lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(path))  # absolute: a daemon runs from / and sockets are shown to users
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RuntimeDir({str(self.path)!r})"

    # ----- paths -----
    @property
    def control_socket(self) -> Path:
        return self.path / CONTROL_SOCKET

    @property
    def pid_file(self) -> Path:
        return self.path / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    def vhost_user_socket(self, device: str) -> Path:
        """Where device ``device`` is served; refused if the path would not fit a UNIX socket address."""
        if not device or "/" in device or device in (".", ".."):
            raise UsageError(f"{device!r} cannot name a socket file")
        path = self.path / f"{device}{VHOST_USER_SUFFIX}"
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise RuntimeDirError(
                f"socket path {path} is longer than the {SUN_PATH_MAX} bytes a UNIX socket allows: "
                f"use a shorter device name or {ENV_RUNTIME_DIR}",
                errno=errno.ENAMETOOLONG,
            )
        return path

    # ----- the directory itself -----
    def ensure(self) -> Path:
        """Create the directory 0700 if missing (parents too), then check it is private to us."""
        try:
            os.makedirs(self.path.parent, mode=0o700, exist_ok=True)
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)  # mkdir's mode passes through the umask; make it exact
        except FileExistsError:
            pass
        except OSError as exc:
            raise RuntimeDirError(
                f"cannot create runtime directory {self.path}: {exc.strerror}; "
                f"set {ENV_RUNTIME_DIR} (or XDG_RUNTIME_DIR) to a directory you own",
                errno=exc.errno,
            ) from None
        self.check()
        return self.path

    def connect_control(self) -> socket.socket | None:
        """A connection to the daemon's control socket, or None if none serves it; never through an unsafe
        directory, where someone else's socket could pose as our daemon (RuntimeDirError)."""
        if os.path.lexists(self.path):
            self.check()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(self.control_socket))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        return sock

    def check(self) -> None:
        """Refuse a directory that is a symlink, not ours, or open to group or others."""
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            raise RuntimeDirError(f"runtime directory {self.path}: {exc.strerror}", errno=exc.errno) from None
        if stat.S_ISLNK(st.st_mode):
            raise RuntimeDirError(f"runtime directory {self.path} is a symbolic link; refusing it")
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeDirError(f"runtime directory {self.path} is not a directory")
        if st.st_uid != os.geteuid():
            raise RuntimeDirError(
                f"runtime directory {self.path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})",
                errno=errno.EPERM,
            )
        if st.st_mode & 0o077:
            raise RuntimeDirError(
                f"runtime directory {self.path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may "
                "enter it; it must be 0700",
                errno=errno.EPERM,
            )

    # ----- the daemon lock (also the pidfile) -----
    def acquire(self) -> None:
        """Take the daemon lock and write our pid; raise DaemonRunning if another daemon holds it."""
        if self._lock_fd is not None:
            raise UsageError("the runtime lock is already held")
        while True:
            fd = os.open(self.pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                owner = f"pid {pid}" if pid else "another process"
                raise DaemonRunning(f"a vdpasim daemon ({owner}) already serves {self.path}", pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have unlinked the file between our open and our flock: then we
            # locked an orphan inode nobody else will see. Start again on the file now at the path.
            try:
                same = os.stat(self.pid_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Unlink the pidfile while still holding the lock, then drop the lock."""
        fd = self._lock_fd
        if fd is None:
            return
        self._lock_fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_file)
        os.close(fd)

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._lock_fd is not None

    def daemon_pid(self) -> int | None:
        """The pid of the daemon holding this directory's lock, or None if no daemon holds it."""
        try:
            fd = os.open(self.pid_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd) or None
            return None  # we got the lock: nobody holds it (and ours goes with the close below)
        finally:
            os.close(fd)

    def remove_stale_sockets(self) -> list[Path]:
        """Remove the sockets a previous daemon left (call only while holding the lock)."""
        if not self.locked:
            raise UsageError("only the lock holder may remove sockets")
        removed = []
        for entry in self.path.iterdir():
            if entry.name == CONTROL_SOCKET or entry.name.endswith(VHOST_USER_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(entry.lstat().st_mode):
                        entry.unlink()
                        removed.append(entry)
        return removed


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
