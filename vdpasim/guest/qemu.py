"""Boot the test guest under QEMU (TCG), run one or more named workloads, and collect their results.

A boot is one QEMU process: the guest's /init runs the workloads named on the kernel command line,
prints ``VDPASIM-RESULT <json>`` lines and ``VDPASIM-DONE rc=N`` on the serial console and powers
off. The console goes to a log file (kept for post-mortems); the result lines are parsed from it.
QEMU is always ended by its PID: on a timeout, on an exception in the caller, or at ``stop()``.

Why the command line looks as it does (see docs/guest.md): ``-accel tcg`` because KVM is not usable
on the machines this runs on; ``-cpu max`` because numpy (run from the shared host root) needs more
than qemu64; ``-nodefaults -nic none`` so only the devices a test adds exist; guest RAM as a shared
memfd (``shared_memory=True``) for vhost-user back-ends, which map it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ..errors import UsageError, VdpasimError
from .build import GuestImage

__all__ = [
    "BootResult",
    "GuestRunError",
    "GuestVM",
    "boot",
    "drive_args",
    "kernel_cmdline",
    "parse_console",
    "vhost_user_net_args",
    "virtio_net_args",
    "HOST_ROOT_ARGS",
]

QEMU = "qemu-system-x86_64"
RESULT_MARK = "VDPASIM-RESULT "
KMSG_MARK = "VDPASIM-KMSG "
_DONE = re.compile(r"VDPASIM-DONE rc=(\d+)")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/+=@%-]*$")
# The host's / read-only over virtio-9p; /init mounts it at /host when vdpasim.hostroot=1.
HOST_ROOT_ARGS = (
    "-virtfs",
    "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
)


def virtio_net_args(netdev: str, *, mac: str | None = None, vhost_user: bool = False, mq: bool = False) -> list[str]:
    """``-netdev NETDEV -device virtio-net-pci`` for a NETDEV spec with ``id=net0`` (e.g. "user,id=net0").

    ``romfile=`` keeps the iPXE option ROM from driving the NIC before the kernel does. With
    ``vhost_user``, ``vectors=0`` avoids QEMU 7.2's TCG segfault in msix_set_vector_notifiers when a
    Linux guest starts a vhost-user-net device with MSI-X (docs/guest.md).
    """
    device = "virtio-net-pci,netdev=net0,romfile="
    if mac:
        device += f",mac={mac}"
    if vhost_user:
        device += ",vectors=0"
    if mq:
        device += ",mq=on"
    return ["-netdev", netdev, "-device", device]


def vhost_user_net_args(socket_path: str | os.PathLike[str], *, queues: int = 1, mac: str | None = None) -> list[str]:
    """A virtio-net-pci NIC backed by the vhost-user back-end listening on ``socket_path``.

    Needs ``shared_memory=True`` on the GuestVM: the back-end maps guest RAM from the memfd.
    """
    return [
        "-chardev",
        f"socket,id=vhostuser0,path={socket_path}",
        *virtio_net_args(
            f"vhost-user,id=net0,chardev=vhostuser0,queues={queues}", mac=mac, vhost_user=True, mq=queues > 1
        ),
    ]


def drive_args(path: str | os.PathLike[str], *, discard: bool = True, read_only: bool = False) -> list[str]:
    """A virtio-blk-pci disk on a raw image file; ``discard=unmap`` passes guest discards to the file."""
    drive = f"file={path},format=raw,if=none,id=disk0"
    if discard:
        drive += ",discard=unmap"
    if read_only:
        drive += ",readonly=on"
    return ["-drive", drive, "-device", "virtio-blk-pci,drive=disk0"]


class GuestRunError(VdpasimError):
    """The guest did not finish its workloads as expected; the message ends with the console's tail."""


@dataclass
class BootResult:
    command: list[str]
    returncode: int | None  # QEMU's exit status (None: it had to be killed)
    guest_rc: int | None  # from VDPASIM-DONE (None: the guest never got there)
    results: list[dict]
    kmsg: list[str]
    console: str
    log_path: Path
    timed_out: bool
    seconds: float
    qemu_output: str = ""

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.results if r.get("type") == kind]

    def result(self, kind: str) -> dict:
        """The first result line of type ``kind``."""
        found = self.of_type(kind)
        if not found:
            raise GuestRunError(f"no {kind!r} result from the guest\n{self.tail()}")
        return found[0]

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.console.splitlines()[-lines:])
        out = f"--- console ({self.log_path}) ---\n{text}"
        if self.qemu_output.strip():
            out += f"\n--- qemu ---\n{self.qemu_output.strip()[-2000:]}"
        return out

    def check(self) -> BootResult:
        """Raise GuestRunError unless the guest finished every workload with rc=0 and QEMU exited cleanly."""
        if self.timed_out:
            raise GuestRunError(f"guest timed out after {self.seconds:.0f} s\n{self.tail()}")
        if self.guest_rc != 0 or self.returncode != 0:
            raise GuestRunError(f"guest rc={self.guest_rc}, qemu rc={self.returncode}\n{self.tail()}")
        return self


def parse_console(text: str) -> tuple[list[dict], list[str], int | None]:
    """(results, kernel warnings, guest rc) from a console log. Unparsable result lines are kept as
    ``{"type": "unparsable", "text": ...}`` so that nothing the guest said is silently lost."""
    results: list[dict] = []
    kmsg: list[str] = []
    rc = None
    for line in text.splitlines():
        line = line.rstrip("\r")
        at = line.find(RESULT_MARK)
        if at >= 0:
            payload = line[at + len(RESULT_MARK) :]
            try:
                results.append(json.loads(payload))
            except json.JSONDecodeError:
                results.append({"type": "unparsable", "text": payload})
            continue
        at = line.find(KMSG_MARK)
        if at >= 0:
            kmsg.append(line[at + len(KMSG_MARK) :])
            continue
        m = _DONE.search(line)
        if m:
            rc = int(m.group(1))
    return results, kmsg, rc


def kernel_cmdline(workload: str | Sequence[str], params: Mapping[str, object] | None = None) -> str:
    """The guest kernel's command line: console on ttyS0, exit on panic, workload parameters."""
    names = workload if isinstance(workload, str) else ",".join(workload)
    words = ["console=ttyS0", "quiet", "panic=-1", f"vdpasim.workload={names}"]
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            value = int(value)
        text = str(value)
        if not re.fullmatch(r"[a-z0-9_]+", key) or not _SAFE_VALUE.match(text):
            raise UsageError(f"guest parameter {key}={text!r}: keys are [a-z0-9_], values have no blanks or quotes")
        words.append(f"vdpasim.{key}={text}")
    return " ".join(words)


@dataclass
class GuestVM:
    """One QEMU run of the guest. Use as a context manager, or call ``start()`` and ``stop()``."""

    image: GuestImage
    workload: str | Sequence[str] = "selftest"
    params: Mapping[str, object] | None = None
    args: Sequence[str] = ()
    log_path: Path | None = None
    timeout: float = 120.0
    memory_mb: int = 1024
    smp: int = 2
    cpu: str = "max"
    accel: str = "tcg"  # "tcg,thread=single": one host thread runs every vCPU (see docs/vhost-user.md)
    shared_memory: bool = False
    # False lets a reset reboot the guest (QMP system_reset); a guest panic then reboots too, until the timeout.
    no_reboot: bool = True
    qmp_path: Path | None = None  # a QMP socket (QEMU listens), for ``qmp()``
    host_root: bool = False
    pass_fds: Sequence[int] = ()
    qemu: str = QEMU
    # Starts QEMU: subprocess.Popen, or a wrapper that runs it under the bypass supervisor (vhost-vdpa).
    launcher: Callable[..., subprocess.Popen] = subprocess.Popen
    proc: subprocess.Popen | None = field(default=None, init=False)
    _started: float = field(default=0.0, init=False)

    def command(self) -> list[str]:
        params = dict(self.params or {})
        if self.host_root:
            params.setdefault("hostroot", 1)
        cmd = [
            self.qemu,
            "-accel",
            self.accel,
            "-cpu",
            self.cpu,
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.smp),
            "-nodefaults",
            "-no-user-config",
            "-nic",
            "none",
            "-display",
            "none",
            "-monitor",
            "none",
            "-chardev",
            f"file,id=console,path={self.log_path}",
            "-serial",
            "chardev:console",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            kernel_cmdline(self.workload, params),
        ]
        if self.no_reboot:
            cmd.append("-no-reboot")
        if self.qmp_path is not None:
            cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.shared_memory:
            cmd += [
                "-object",
                f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
                "-numa",
                "node,memdev=mem",
            ]
        if self.host_root:
            cmd += HOST_ROOT_ARGS
        return cmd + list(self.args)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise UsageError("the guest is not running")
        return self.proc.pid

    def start(self) -> GuestVM:
        if self.proc is not None:
            raise UsageError("the guest was already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vdpasim-guest-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.write_bytes(b"")
        qemu_log = open(self._qemu_log_path(), "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = self.launcher(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(self.pass_fds),
                start_new_session=True,  # a terminal's ^C reaches us, and we end QEMU ourselves
            )
        except FileNotFoundError as e:
            raise VdpasimError(f"{self.qemu} not found: run scripts/setup.sh (Debian qemu-system-x86)") from e
        finally:
            qemu_log.close()
        self._started = time.monotonic()
        return self

    def _qemu_log_path(self) -> Path:
        assert self.log_path is not None
        return self.log_path.with_name(self.log_path.name + ".qemu")

    def console(self) -> str:
        if self.log_path is None:
            return ""
        return self.log_path.read_bytes().decode(errors="replace")

    def qmp(self, command: str, **arguments: object) -> object:
        """Run one QMP command (a new connection each time: QEMU serves one at a time); its ``return``."""
        if self.qmp_path is None:
            raise UsageError("the guest was started without a QMP socket (qmp_path)")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # the greeting
            for request in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                stream.write(json.dumps(request).encode() + b"\n")
                stream.flush()
                while "event" in (reply := json.loads(stream.readline())):
                    pass  # events (STOP, RESUME, RESET...) may come before the answer
                if "error" in reply:
                    raise VdpasimError(f"QMP {request['execute']}: {reply['error'].get('desc')}")
            return reply.get("return")

    def wait_for(self, text: str, timeout: float | None = None, *, count: int = 1) -> bool:
        """Wait until ``text`` appears ``count`` times on the console (True), or QEMU exits or the timeout
        passes (False)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.console().count(text) >= count:
                return True
            if self.proc is None or self.proc.poll() is not None:
                return self.console().count(text) >= count
            time.sleep(0.05)
        return False

    def wait(self, timeout: float | None = None) -> BootResult:
        """Wait for QEMU to exit (the guest powers off after its workloads); kill it on timeout."""
        if self.proc is None:
            raise UsageError("the guest is not running")
        left = (self.timeout if timeout is None else timeout) - (time.monotonic() - self._started)
        timed_out = False
        try:
            self.proc.wait(timeout=max(left, 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop()
        return self._result(timed_out)

    def stop(self) -> None:
        """End QEMU by its PID: SIGTERM, then SIGKILL if it lingers; always reaped."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _result(self, timed_out: bool) -> BootResult:
        assert self.proc is not None and self.log_path is not None
        console = self.console()
        results, kmsg, guest_rc = parse_console(console)
        qemu_log = self._qemu_log_path()
        return BootResult(
            command=[str(a) for a in self.proc.args],  # type: ignore[union-attr]
            returncode=None if timed_out else self.proc.returncode,
            guest_rc=guest_rc,
            results=results,
            kmsg=kmsg,
            console=console,
            log_path=self.log_path,
            timed_out=timed_out,
            seconds=time.monotonic() - self._started,
            qemu_output=qemu_log.read_text(errors="replace") if qemu_log.exists() else "",
        )

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def boot(
    image: GuestImage,
    workload: str | Sequence[str] = "selftest",
    params: Mapping[str, object] | None = None,
    args: Sequence[str] = (),
    **options: object,
) -> BootResult:
    """Boot, run ``workload`` to completion (or timeout) and return what the guest reported."""
    with GuestVM(image, workload, params, args, **options) as vm:  # type: ignore[arg-type]
        return vm.wait()
