"""A daemon under test: start ``vdpasim daemon`` as a child process on a private runtime directory, run
``vdpasim`` commands against it, and end it by its PID (for the integration and end-to-end tests).

Every runtime directory is a fresh, short path under /tmp (UNIX socket paths are limited to 107 bytes),
so tests running in parallel never share a daemon, a socket or a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ..control import ControlClient
from ..runtime import ENV_RUNTIME_DIR, RuntimeDir

__all__ = ["VDPASIM", "DaemonProcess", "fresh_runtime", "process_gone", "end_daemon_of", "run_cli"]


def _vdpasim_command() -> list[str]:
    script = Path(sys.executable).with_name("vdpasim")  # the venv's console script, as users run it
    return [str(script)] if script.exists() else [sys.executable, "-m", "vdpasim.cli"]


VDPASIM = _vdpasim_command()


def fresh_runtime() -> RuntimeDir:
    """A runtime directory path that does not exist yet, in a new private parent under /tmp."""
    parent = tempfile.mkdtemp(prefix="vds-", dir="/tmp")
    return RuntimeDir(Path(parent) / "run")


def run_cli(runtime: RuntimeDir, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``vdpasim ARGS`` with ``VDPASIM_RUNTIME_DIR`` set to ``runtime``; text output captured."""
    env = {**os.environ, ENV_RUNTIME_DIR: str(runtime.path)}
    result = subprocess.run([*VDPASIM, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"vdpasim {' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (also when it is a zombie nobody reaps, as under some init processes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def end_daemon_of(runtime: RuntimeDir, timeout: float = 20.0) -> int | None:
    """End the daemon holding ``runtime``'s lock (not necessarily our child) by its pid: SIGTERM, then
    SIGKILL. Returns its pid, or None if none held the lock."""
    pid = runtime.daemon_pid()
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    return pid


class DaemonProcess:
    """``vdpasim daemon`` (foreground) as our child, logging to ``log_path``; a context manager."""

    def __init__(
        self, runtime: RuntimeDir | None = None, *, log_level: str = "debug", args: tuple[str, ...] = ()
    ) -> None:
        self.runtime = runtime or fresh_runtime()
        self.log_level = log_level
        self.args = args  # more ``vdpasim daemon`` options
        self.log_path = self.runtime.path.parent / f"daemon-{os.getpid()}-{id(self):x}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> DaemonProcess:
        env = {**os.environ, ENV_RUNTIME_DIR: str(self.runtime.path)}
        self.runtime.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*VDPASIM, "daemon", "--log-level", self.log_level, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the control socket answers; raise with the log if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while True:
            client = ControlClient.try_connect(self.runtime.control_socket)
            if client is not None:
                with client:
                    if client.request("daemon_get")["daemon"]["pid"] == self.pid:
                        return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(self.runtime, *args, check=check)

    def json(self, *args: str) -> Any:
        """``vdpasim -j ARGS``, parsed."""
        return json.loads(self.cli("-j", *args).stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the daemon by its pid and reap it (SIGKILL if it lingers); its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def cleanup(self) -> None:
        """Stop the daemon (and any daemon a command started on the same directory), remove the directory."""
        self.stop()
        end_daemon_of(self.runtime)
        shutil.rmtree(self.runtime.path.parent, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
