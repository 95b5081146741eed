"""``vdpasim bench e2e``: a vdpasim net device against DPDK's own vhost-user back-end, end to end.

The front-end is DPDK's ``dpdk-testpmd`` with a ``net_virtio_user`` port (a vhost-user front-end, so
it plays the guest driver) in ``flowgen`` forwarding mode: one forwarding lcore transmits bursts of
generated UDP frames and receives (and frees) whatever comes back. Behind the socket is either

* **vdpasim**: a ``NetDevice`` in loopback mode (TX frames come back on RX through the receive
  filter, one copy each) served by ``VhostUserServer`` in this process, or
* **peer**: a second ``dpdk-testpmd`` with a ``net_vhost`` port (DPDK's vhost library, the back-end
  users would otherwise pick) in ``io`` forwarding mode, every frame sent back out the same port.

The round-trip rate is the front-end port's receive rate: every frame the front-end receives left its
TX queue, went through the back-end and came back. It is read from testpmd's own statistics: the
``Rx-pps`` of ``show port stats 0`` (interactive mode, commands over stdin), which testpmd averages
over the interval since the previous ``show port stats`` with its own clock. One ``show`` after a
warm-up interval starts the measurement, a second one ``seconds`` later ends it.

Placement on this 2-CPU machine: the front-end's main and forwarding lcores share one CPU; the back-end
(this Python process with the device's data-path thread, or the peer testpmd) is pinned to the other.
Runs alternate between the two back-ends (order swapped every run) inside one invocation; the medians
are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .common import alternation, pick_cpus, print_json, progress_printer, require_program

__all__ = ["E2EError", "Result", "find_testpmd", "run_benchmark", "command", "DEVICE_MAC"]

# testpmd 22.11's flowgen sends every frame from 00:01:02:03:04:00 to 00:01:02:03:04:01 (fixed in flowgen.c;
# --eth-peer does not change it): the device takes that MAC so its receive filter accepts them.
DEVICE_MAC = "00:01:02:03:04:01"
# DPDK 22.11's testpmd is in dpdk-dev; its vhost and virtio_user drivers are packages of their own.
DPDK_PACKAGES = ("dpdk", "dpdk-dev", "librte-net-vhost23", "librte-net-virtio23")
MEMORY_MB = 256  # per testpmd: the memory the vhost-user back-end maps through SET_MEM_TABLE
HUGEPAGE_KB = 2048
# Two testpmds run at once (the front-end and the peer), plus slack for EAL's own allocations.
HUGEPAGES = 2 * MEMORY_MB * 1024 // HUGEPAGE_KB + 64
_HUGEPAGE_SYSFS = f"/sys/kernel/mm/hugepages/hugepages-{HUGEPAGE_KB}kB"
MBUFS = 8192
QUEUE_SIZE = 256
START_TIMEOUT = 30.0  # seconds for a testpmd to start its port (the first run may wait for Numba)
_PPS = re.compile(r"Rx-pps:\s+(\d+)")
_RX_PACKETS = re.compile(r"RX-packets:\s+(\d+)")
_STARTED = re.compile(r"packet forwarding - ports=(\d+)")


class E2EError(RuntimeError):
    """A testpmd failed to start or to report; the message carries the tail of its output."""


@dataclass
class Result:
    ring: str
    packet_bytes: int
    vdpasim: list[float] = field(default_factory=list)  # Mpps per run
    peer: list[float] = field(default_factory=list)

    @property
    def case(self) -> str:
        return f"{self.ring}-{self.packet_bytes}"

    @property
    def vdpasim_mpps(self) -> float:
        return statistics.median(self.vdpasim)

    @property
    def peer_mpps(self) -> float:
        return statistics.median(self.peer)

    @property
    def ratio(self) -> float:
        return self.vdpasim_mpps / self.peer_mpps if self.peer_mpps else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case,
            "packet_bytes": self.packet_bytes,
            "ring": self.ring,
            "vdpasim_mpps": round(self.vdpasim_mpps, 4),
            "peer_mpps": round(self.peer_mpps, 4),
            "ratio": round(self.ratio, 4),
            "runs": len(self.vdpasim),
            "vdpasim_runs_mpps": [round(x, 4) for x in self.vdpasim],
            "peer_runs_mpps": [round(x, 4) for x in self.peer],
        }


def find_testpmd(say: Callable[[str], None] = lambda text: None) -> str:
    return require_program("dpdk-testpmd", DPDK_PACKAGES, say)


# --- one testpmd ---


class Testpmd:
    """A dpdk-testpmd process, its output collected line by line by a reader thread."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        # testpmd's stdout is a pipe: line-buffer it (stdbuf) so replies arrive as they are printed.
        stdbuf = shutil.which("stdbuf")
        self.proc = subprocess.Popen(
            ([stdbuf, "-oL"] if stdbuf else []) + argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name=f"testpmd-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self.error(f"stdin closed ({exc})") from None

    def expect(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self.error(f"no {pattern.pattern!r} within {timeout:.0f} s") from None
            if line is None:
                raise self.error(f"exited (status {self.proc.wait()}) before {pattern.pattern!r}")
            if match := pattern.search(line):
                return match

    def error(self, what: str) -> E2EError:
        tail = "\n".join(self.lines[-25:])
        return E2EError(f"{self.name} testpmd: {what}; its last output:\n{tail}")

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def _eal(testpmd: str, cpu: int, prefix: str, vdev: str, huge_dir: str | None) -> list[str]:
    # Main lcore and forwarding lcore on one CPU, no PCI scan. Memory: one file of hugepages (a vhost-user
    # memory table has room for 8 regions, one file per page would overflow it), or plain memory.
    memory = ["--huge-dir", huge_dir, "--single-file-segments"] if huge_dir else ["--no-huge"]
    return [
        testpmd,
        "--no-pci",
        *memory,
        "-m",
        str(MEMORY_MB),
        f"--file-prefix={prefix}",
        "--lcores",
        f"0@{cpu},1@{cpu}",
        "--log-level=lib.eal:error",
        "--vdev",
        vdev,
        "--",
    ]


@contextlib.contextmanager
def hugepages(say: Callable[[str], None]) -> Iterator[str | None]:
    """Reserve the testpmds' hugepages and mount hugetlbfs for the bench, as DPDK is meant to run; yields
    the mount point, or None when this machine cannot (not root, no hugepage support, too little free
    memory): the testpmds then run with ``--no-huge``. Everything changed is put back afterwards."""
    with contextlib.ExitStack() as undo:
        try:
            mount_point = _reserve_hugepages(undo)
        except (OSError, subprocess.CalledProcessError) as exc:
            undo.close()
            say(f"no hugepages ({exc}): testpmd runs with --no-huge")
            yield None
            return
        say(f"{HUGEPAGES} hugepages of {HUGEPAGE_KB} KiB reserved, hugetlbfs at {mount_point}")
        yield mount_point


def _reserve_hugepages(undo: contextlib.ExitStack) -> str:
    nr_pages = Path(_HUGEPAGE_SYSFS, "nr_hugepages")
    # Relative changes: another bench may reserve and release its own pages meanwhile.
    nr_pages.write_text(str(int(nr_pages.read_text()) + HUGEPAGES))
    undo.callback(lambda: nr_pages.write_text(str(max(0, int(nr_pages.read_text()) - HUGEPAGES))))
    free = int(Path(_HUGEPAGE_SYSFS, "free_hugepages").read_text())
    if free < HUGEPAGES:
        raise OSError(f"the kernel found {free} free 2 MiB pages, {HUGEPAGES} are needed")
    mount_point = tempfile.mkdtemp(prefix="vdpasim-hugepages-")
    undo.callback(os.rmdir, mount_point)
    mount = ["mount", "-t", "hugetlbfs", "-o", f"pagesize={HUGEPAGE_KB}k", "nodev", mount_point]
    subprocess.run(mount, check=True, capture_output=True)
    undo.callback(subprocess.run, ["umount", mount_point], capture_output=True)
    return mount_point


def _remove_runtime_dir(prefix: str) -> None:
    """EAL leaves its runtime directory (config, sockets) behind; remove ours."""
    base = "/var/run/dpdk" if os.geteuid() == 0 else os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")
    shutil.rmtree(os.path.join(base, prefix), ignore_errors=True)


@contextlib.contextmanager
def peer_backend(testpmd: str, socket_path: str, cpu: int, prefix: str, huge_dir: str | None) -> Iterator[Testpmd]:
    """dpdk-testpmd with a net_vhost port serving ``socket_path``, io forwarding back out the same port."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    argv = [
        *_eal(testpmd, cpu, prefix, f"net_vhost0,iface={socket_path},queues=1", huge_dir),
        "--forward-mode=io",
        "--port-topology=loop",
        "--nb-cores=1",
        f"--total-num-mbufs={MBUFS}",
        "--auto-start",
    ]
    backend = Testpmd(argv, "peer back-end")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(socket_path):
            if backend.proc.poll() is not None or time.monotonic() > deadline:
                raise backend.error("did not create its vhost-user socket")
            time.sleep(0.02)
        yield backend
    finally:
        backend.close()  # non-interactive testpmd exits at end of stdin ("Press enter to exit")
        _remove_runtime_dir(prefix)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def frontend_run(
    testpmd: str,
    socket_path: str,
    *,
    ring: str,
    packet_bytes: int,
    cpu: int,
    prefix: str,
    seconds: float,
    warmup: float,
    huge_dir: str | None,
    start_timeout: float = START_TIMEOUT,
) -> float:
    """One measurement: a virtio_user front-end in flowgen mode; returns its receive rate in Mpps."""
    vdev = f"net_virtio_user0,path={socket_path},queues=1,queue_size={QUEUE_SIZE},packed_vq={int(ring == 'packed')}"
    argv = [
        *_eal(testpmd, cpu, prefix, vdev, huge_dir),
        "-i",
        "--forward-mode=flowgen",
        f"--txpkts={packet_bytes}",
        "--nb-cores=1",
        f"--total-num-mbufs={MBUFS}",
    ]
    front = Testpmd(argv, f"front-end ({ring} {packet_bytes} B)")
    try:
        front.send("start")
        ports = int(front.expect(_STARTED, start_timeout).group(1))
        if ports != 1:
            raise front.error("no port: the virtio_user device did not probe")
        # The first frames may wait for the back-end's kernels to compile (a cold cache): seconds.
        deadline = time.monotonic() + start_timeout
        while _received(front) == 0:
            if time.monotonic() > deadline:
                raise front.error(f"no frame came back within {start_timeout:.0f} s")
            time.sleep(0.1)
        time.sleep(warmup)
        front.send("show port stats 0")  # starts testpmd's interval
        front.expect(_PPS, 10)
        time.sleep(seconds)
        front.send("show port stats 0")
        front.expect(_RX_PACKETS, 10)
        pps = int(front.expect(_PPS, 10).group(1))
        front.send("stop")
        front.send("quit")
        return pps / 1e6
    finally:
        front.close()
        _remove_runtime_dir(prefix)


def _received(front: Testpmd) -> int:
    """Frames the front-end port has received so far."""
    front.send("show port stats 0")
    received = int(front.expect(_RX_PACKETS, 10).group(1))
    front.expect(_PPS, 10)  # the rest of the report, so the next command's answer is read, not this one's
    return received


# --- the vdpasim side ---


@contextlib.contextmanager
def vdpasim_backend(socket_path: str, *, busy_poll: bool) -> Iterator[object]:
    """A loopback NetDevice served over vhost-user in this process (pinned by the caller)."""
    from bridge.vhost_user.server import VhostUserServer

    from ..config import NetConfig
    from ..devices.net import NetDevice

    device = NetDevice(NetConfig(name="bench-e2e", mac=DEVICE_MAC, mode="loopback", busy_poll=busy_poll))
    server = VhostUserServer(device, socket_path)
    server.start()
    try:
        yield device
    finally:
        server.stop()
        device.close()


# --- the benchmark ---


def run_benchmark(
    rings: Iterable[str] = ("split", "packed"),
    sizes: Iterable[int] = (64, 1500),
    *,
    runs: int = 5,
    seconds: float = 2.0,
    warmup: float = 1.0,
    busy_poll: bool = True,
    huge: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Alternate vdpasim and the DPDK peer for every (ring, size); ``runs`` measurements per side."""
    if runs < 1:
        raise UsageError("runs must be at least 1")
    if seconds <= 0:
        raise UsageError("seconds must be positive")
    say = progress or (lambda text: None)
    testpmd = find_testpmd(say)
    back_cpu, front_cpu = pick_cpus()
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {back_cpu})  # this thread, and every thread started from now on (the device's)
    workdir = tempfile.mkdtemp(prefix="vdpasim-e2e-")
    vdpasim_sock = os.path.join(workdir, "vdpasim.sock")
    peer_sock = os.path.join(workdir, "peer.sock")
    serial = iter(range(1 << 30))

    def prefix() -> str:
        return f"vdpasim-e2e-{os.getpid()}-{next(serial)}"

    def measure(side: str, ring: str, size: int, seconds: float, start_timeout: float = START_TIMEOUT) -> float:
        args = dict(ring=ring, packet_bytes=size, cpu=front_cpu, seconds=seconds, warmup=warmup, huge_dir=huge_dir)
        if side == "vdpasim":
            return frontend_run(testpmd, vdpasim_sock, prefix=prefix(), start_timeout=start_timeout, **args)
        with peer_backend(testpmd, peer_sock, back_cpu, prefix(), huge_dir):
            return frontend_run(testpmd, peer_sock, prefix=prefix(), start_timeout=start_timeout, **args)

    results = []
    try:
        with contextlib.ExitStack() as stack:
            huge_dir = stack.enter_context(hugepages(say)) if huge else None
            stack.enter_context(vdpasim_backend(vdpasim_sock, busy_poll=busy_poll))
            rings, sizes = list(rings), list(sizes)
            # Untimed: the device's kernels load (or compile, the first time: many seconds) on first use.
            say("warming up (the device's compiled kernels)")
            for ring in rings:
                measure("vdpasim", ring, sizes[0], 0.2, start_timeout=120)
            for ring in rings:
                for size in sizes:
                    result = Result(ring, size)
                    for run in range(runs):
                        for side in alternation(run):
                            say(f"{result.case}: run {run + 1}/{runs}, {side}")
                            getattr(result, side).append(measure(side, ring, size, seconds))
                        say(
                            f"{result.case}: run {run + 1}/{runs}: vdpasim {result.vdpasim[-1]:.2f} Mpps, "
                            f"peer {result.peer[-1]:.2f} Mpps"
                        )
                    results.append(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.sched_setaffinity(0, affinity)
    return results


def command(args: argparse.Namespace) -> int:
    """The ``vdpasim bench e2e`` handler: progress on stderr, a JSON list or a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    errors = Console(stderr=True)
    progress = progress_printer(errors)
    try:
        results = run_benchmark(
            args.ring or ["split", "packed"],
            args.size or [64, 1500],
            runs=args.runs,
            seconds=args.seconds,
            warmup=args.warmup,
            busy_poll=not args.no_busy_poll,
            huge=not args.no_huge,
            progress=progress,
        )
    except (UsageError, E2EError) as exc:
        errors.print(f"vdpasim bench e2e: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    mode = "kicks" if args.no_busy_poll else "busy-poll"
    title = f"testpmd virtio_user flowgen round trip, medians of {args.runs} alternations (vdpasim: {mode})"
    if args.plot:
        from .plot import plot_medians

        sides = {"vdpasim": [r.vdpasim for r in results], "DPDK vhost": [r.peer for r in results]}
        plot_medians(args.plot, title, "Mpps", [r.case for r in results], sides)
    if args.json:
        print_json(r.as_dict() for r in results)
        return 0
    table = Table(title=title)
    for name in ("ring", "bytes", "vdpasim Mpps", "DPDK vhost Mpps", "vdpasim/DPDK", "vdpasim range", "DPDK range"):
        table.add_column(name, justify="left" if name == "ring" else "right")
    for r in results:
        table.add_row(
            r.ring,
            str(r.packet_bytes),
            f"{r.vdpasim_mpps:.2f}",
            f"{r.peer_mpps:.2f}",
            f"{r.ratio:.2f}",
            f"{min(r.vdpasim):.2f}-{max(r.vdpasim):.2f}",
            f"{min(r.peer):.2f}-{max(r.peer):.2f}",
        )
    Console().print(table)
    return 0
