"""``vdpasim compare``: one device model, one guest workload, two doors — vhost-user and vhost-vdpa.

Net: a virtio-net device is served on a vhost-user socket, and an unmodified QEMU 7.2 boots the test guest
twice per door: ``-netdev vhost-user`` on the socket, then ``-netdev vhost-vdpa,vhostdev=/dev/vhost-vdpa-0``
under the bypass supervisor (what ``vdpasim run`` does), where each ioctl and IOTLB write is served by the
vhost-vdpa server bridged to the same socket. Each door runs a ping to the device's responder and a
loopback of numbered frames. The results must be equal (frames, bytes, digests, device counters); the
figures (time to DRIVER_OK, throughput, control messages and their time) are what differs.

Blk: QEMU 7.2 from Debian has no vhost-vdpa block front-end (no libblkio, no vhost-vdpa-device-pci), so the
second door for a disk is QEMU's vhost-user-blk in front of the reverse bridge (``vdpasim bridge``: a
vhost-user server over a vhost-vdpa client), itself under the bypass: the guest's blocks travel QEMU →
vhost-user → bridge → vhost-vdpa ioctls → bridge → vhost-user → device. The report says so.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_parser", "compare_net", "PathRun", "Report"]

MAC = "52:54:00:5e:00:01"
PEER_IP = "10.0.0.2"
GUEST_ADDR = "10.0.0.1/24"
TRANSPORTS = ("vhost-user", "vhost-vdpa")


@dataclass
class PathRun:
    """What one door produced: results (must match the other door's) and figures (may differ)."""

    transport: str
    results: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float | int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    kind: str  # "net" or "blk"
    runs: dict[str, PathRun]
    note: str = ""
    repeat: int = 1

    def differences(self) -> list[str]:
        """Result keys whose values differ between the doors (empty: the results are equal)."""
        first, *others = self.runs.values()
        keys = sorted({key for run in self.runs.values() for key in run.results})
        return [key for key in keys if any(run.results.get(key) != first.results.get(key) for run in others)]

    @property
    def equal(self) -> bool:
        return not self.differences() and not any(run.problems for run in self.runs.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "note": self.note,
            "repeat": self.repeat,
            "equal": self.equal,
            "differences": self.differences(),
            "runs": {name: asdict(run) for name, run in self.runs.items()},
        }


# ----- one door -----
class _DriverOkClock:
    """Time from QEMU's start to the device's DRIVER_OK, watched from a thread (the device is in this process)."""

    def __init__(self, status: Callable[[], int]) -> None:
        from .virtio.constants import VIRTIO_CONFIG_S_DRIVER_OK

        self.seconds: float | None = None
        self._stop = threading.Event()
        started = time.monotonic()

        def watch() -> None:
            while not self._stop.wait(0.002):
                if status() & VIRTIO_CONFIG_S_DRIVER_OK:
                    self.seconds = time.monotonic() - started
                    return

        self._thread = threading.Thread(target=watch, name="driver-ok-clock", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


def _control_figures(rig: Any) -> dict[str, float | int | None]:
    """Control-plane counts and time: vhost-user requests the device's server served, and on vhost-vdpa
    the ioctls and IOTLB writes of the bridge and the supervisors' traps (QEMU's, or the reverse bridge's)."""
    figures: dict[str, float | int | None] = {
        "vhost-user messages": sum(b.server.requests for b in rig.backends),
        "vhost-user messages ms": round(sum(b.server.busy_seconds for b in rig.backends) * 1e3, 2),
    }
    supervisors = [s for s in (rig.supervisor, *rig.bridges) if s is not None]
    if supervisors:
        stats = [server.stats for node in rig.nodes.values() for server in node.servers]
        figures.update({
            "vhost-vdpa ioctls": sum(s.ioctls for s in stats),
            "IOTLB writes": sum(s.writes for s in stats),
            "ioctls + writes ms": round(sum(s.seconds for s in stats) * 1e3, 2),
            "trapped syscalls": sum(s.calls for s in supervisors),
            "of which openat (passed on)": sum(s.calls_by_syscall.get("openat", 0) for s in supervisors),
            "trapped syscalls ms": round(sum(s.busy_seconds for s in supervisors) * 1e3, 2),
        })  # fmt: skip
    return figures


def _boot_net(image: Any, transport: str, log_dir: Path, mode: str, workload: str, params: Mapping[str, object]):  # type: ignore[no-untyped-def]
    from .config import NetConfig
    from .testing.vhost_user import VhostUserRig

    # vectors=0 on both doors: the guest drives the same NIC (vhost-user-net needs it under TCG).
    with VhostUserRig(image, log_dir / f"{transport}-{workload}", transport=transport, vhost_vdpa_vectors=0) as rig:
        device = rig.add_net(NetConfig(name=f"cmp-{mode}", mode=mode, peer_ip=PEER_IP, mac=MAC))
        clock = _DriverOkClock(device.get_status)
        try:
            run = rig.run(workload, params)
        finally:
            driver_ok = clock.stop()
        return run, driver_ok, _control_figures(rig)


def _net_path(image: Any, transport: str, log_dir: Path, pings: int, frames: int) -> PathRun:
    from .guest.workloads import loopback_frame_len, loopback_kind

    path = PathRun(transport)
    ping_params = {"peer": PEER_IP, "addr": GUEST_ADDR, "count": pings, "interval": 0.05}
    ping_run, ping_driver_ok, control = _boot_net(image, transport, log_dir, "responder", "ping", ping_params)
    # A window of 64 frames in flight (the device's receive ring holds 256): no overrun can drop a frame,
    # so what comes back does not depend on how fast each door happens to run.
    loop_params = {"count": frames, "seed": 5, "timeout_ms": 1500, "frames": 0, "window": 64}
    loop_run, _, _ = _boot_net(image, transport, log_dir, "loopback", "net-loopback", loop_params)
    for name, run in (("ping", ping_run), ("loopback", loop_run)):
        try:
            run.check()
        except Exception as exc:  # GuestRunError and friends: reported, not raised, so both doors show
            path.problems.append(f"{name}: {exc}")
    ping = _result(ping_run, "ping")
    loop = _result(loop_run, "net-loopback")
    dev = "cmp-loopback"
    vstats = loop_run.vstats.get(dev, {})
    path.results = {
        "ping transmitted/received": (ping.get("transmitted"), ping.get("received")),
        "loopback sent/received": (loop.get("sent"), loop.get("received")),
        "loopback digest sent": loop.get("digest_sent"),
        "loopback digest back": loop.get("digest_back"),
        "loopback missing (foreign MAC)": len(loop.get("missing", [])),
        "device tx packets/bytes": _pair(vstats.get(1, {}), "tx packets", "tx bytes"),
        "device rx packets/bytes": _pair(vstats.get(0, {}), "rx packets", "rx bytes"),
        "device rx drops": vstats.get(0, {}).get("rx drops"),
        "device rx overruns": vstats.get(0, {}).get("rx overruns"),
        "guest rx/tx packets": _guest_counts(loop_run),
    }
    back = [seq for seq in range(frames) if loopback_kind(seq) != "foreign"]
    back_bytes = sum(loopback_frame_len(5, seq) for seq in back)
    seconds = (loop.get("last_rx_ms") or 0) / 1e3
    path.figures = {
        "time to DRIVER_OK (s)": _round(ping_driver_ok, 3),
        "ping boot (s)": round(ping_run.boot.seconds, 2),
        "ping rtt avg (ms)": (ping.get("rtt_ms") or {}).get("avg"),
        "loopback frames/s": round(len(back) / seconds) if seconds else None,
        "loopback Mbit/s": round(back_bytes * 8 / seconds / 1e6, 2) if seconds else None,
        **control,  # of the ping boot: one device start-up and run
    }
    return path


def _result(run: Any, kind: str) -> dict[str, Any]:
    try:
        return dict(run.result(kind))
    except Exception:
        return {}


def _pair(stats: Mapping[str, int], a: str, b: str) -> tuple[int | None, int | None]:
    return stats.get(a), stats.get(b)


def _guest_counts(run: Any) -> tuple[int | None, int | None]:
    stats = _result(run, "netstats").get("stats", {})
    return stats.get("rx_packets"), stats.get("tx_packets")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def compare_net(image: Any, log_dir: Path, *, pings: int = 10, frames: int = 2000, repeat: int = 1) -> Report:
    runs = _alternate(repeat, lambda transport, i: _net_path(image, transport, log_dir / f"net{i}", pings, frames))
    return Report("net", runs, "QEMU 7.2: -netdev vhost-user vs -netdev vhost-vdpa (kernel bypass)", repeat)


def _alternate(repeat: int, one: Callable[[str, int], PathRun]) -> dict[str, PathRun]:
    """``repeat`` runs of each door, alternating (a noisy machine hits both alike), merged: the results of
    every run must be the first's, and each figure is the median over the runs."""
    all_runs: dict[str, list[PathRun]] = {transport: [] for transport in TRANSPORTS}
    for i in range(repeat):
        for transport in TRANSPORTS:
            all_runs[transport].append(one(transport, i))
    return {transport: _merge(runs) for transport, runs in all_runs.items()}


def _merge(runs: list[PathRun]) -> PathRun:
    first = runs[0]
    merged = PathRun(first.transport, dict(first.results), {}, [p for run in runs for p in run.problems])
    for i, run in enumerate(runs[1:], 2):
        differing = sorted(k for k in first.results if run.results.get(k) != first.results[k])
        if differing:
            merged.problems.append(f"run {i} differs from run 1 in: {', '.join(differing)}")
    for key in first.figures:
        values = [run.figures.get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, int | float)]
        merged.figures[key] = statistics.median(numbers) if len(numbers) == len(values) else first.figures[key]
    return merged


def _blk_path(image: Any, transport: str, log_dir: Path, disk_mb: int, region_mb: int) -> PathRun:
    from .config import BlkConfig
    from .guest.workloads import file_range_sha256
    from .testing.vhost_user import VhostUserRig

    path = PathRun(transport)
    offset, length = 4 << 20, region_mb << 20
    with tempfile.TemporaryDirectory(prefix="vdpasim-compare-blk-") as workdir:
        disk = Path(workdir) / "disk.img"
        original = random.Random(7).randbytes(disk_mb << 20)  # the same image on both doors
        disk.write_bytes(original)
        with VhostUserRig(image, log_dir / f"{transport}-blk", transport=transport) as rig:
            rig.add_blk(BlkConfig(name="cmp-blk", path=str(disk)))
            run = rig.run("blk", {"offset": offset, "size": length})
            control = _control_figures(rig)
        try:
            run.check()
        except Exception as exc:
            path.problems.append(f"blk: {exc}")
        blk = _result(run, "blk")
        data = disk.read_bytes()
        quarter = length // 4
        end = offset + length
        counters = run.counters.get("cmp-blk", [])
        path.results = {
            "guest read back its pattern": blk.get("readback_sha256") == blk.get("pattern_sha256") is not None,
            "image holds the guest's bytes": file_range_sha256(disk, offset, length) == blk.get("final_sha256"),
            "write-zeroes range reads zero": data[offset + 2 * quarter : offset + 3 * quarter] == bytes(quarter),
            "discarded range reads zero": data[offset + 3 * quarter : end] == bytes(quarter),
            "rest of the image untouched": data[:offset] == original[:offset] and data[end:] == original[end:],
            "flush ok": (blk.get("flush") or {}).get("ok"),
            "device errors": sum(q["errors"] for q in counters),
        }
    write_ms, read_ms = blk.get("write_ms") or 0, blk.get("read_ms") or 0
    path.figures = {  # no time to DRIVER_OK: SeaBIOS drives a virtio-blk disk to DRIVER_OK at once, to boot from it
        "boot (s)": round(run.boot.seconds, 2),
        "write + flush MB/s": round(region_mb / (write_ms / 1e3), 1) if write_ms else None,
        "read MB/s": round(region_mb / (read_ms / 1e3), 1) if read_ms else None,
        "device requests": sum(q["successes"] for q in counters),
        **control,
    }
    return path


def compare_blk(image: Any, log_dir: Path, *, disk_mb: int = 32, region_mb: int = 8, repeat: int = 1) -> Report:
    runs = _alternate(repeat, lambda transport, i: _blk_path(image, transport, log_dir / f"blk{i}", disk_mb, region_mb))
    note = (
        "QEMU 7.2 vhost-user-blk on the device's socket vs on the reverse bridge, whose vhost-vdpa client drives "
        "the device's /dev/vhost-vdpa-N under the bypass (Debian's QEMU 7.2 has no vhost-vdpa block front-end: "
        "no libblkio, no vhost-vdpa-device-pci)"
    )
    return Report("blk", runs, note, repeat)


# ----- output -----
def render(report: Report, console: Console) -> None:
    names = list(report.runs)
    results = Table(title=f"{report.kind}: results (must be equal) — {report.note}")
    results.add_column("result")
    for name in names:
        results.add_column(name, justify="right")
    results.add_column("equal")
    differing = set(report.differences())
    keys = sorted({key for run in report.runs.values() for key in run.results})
    for key in keys:
        cells = [_cell(report.runs[name].results.get(key)) for name in names]
        results.add_row(key, *cells, "[red]no[/]" if key in differing else "[green]yes[/]")
    console.print(results)
    medians = f", medians of {report.repeat} boots per door" if report.repeat > 1 else ""
    figures = Table(title=f"{report.kind}: figures{medians}")
    figures.add_column("figure")
    for name in names:
        figures.add_column(name, justify="right")
    for key in dict.fromkeys(key for run in report.runs.values() for key in run.figures):
        figures.add_row(key, *[_cell(report.runs[name].figures.get(key)) for name in names])
    console.print(figures)
    for name, run in report.runs.items():
        for problem in run.problems:
            console.print(f"[red]{name}: {problem}[/]")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple | list):
        return " / ".join(_cell(v) for v in value)
    return str(value)


def plot(reports: list[Report], path: Path) -> None:
    """One bar chart per numeric figure, doors side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (report, key)
        for report in reports
        for key in dict.fromkeys(k for run in report.runs.values() for k in run.figures)
        if any(isinstance(run.figures.get(key), int | float) for run in report.runs.values())
    ]
    columns = 3
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (report, key) in zip(axes.flat, panels, strict=False):
        names = list(report.runs)
        values = [report.runs[name].figures.get(key) or 0 for name in names]
        ax.bar(names, values, color=["#4C72B0", "#DD8452", "#55A868"][: len(names)])
        ax.set_title(f"{report.kind}: {key}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- the command -----
def add_parser(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("compare", help="the same device and guest workload over vhost-user and vhost-vdpa")
    cmd.add_argument("--pings", type=int, default=10, help="pings per door (default 10)")
    cmd.add_argument("--frames", type=int, default=2000, help="loopback frames per door (default 2000)")
    cmd.add_argument("--blk-mb", type=int, default=8, help="MiB the blk workload writes and reads (default 8)")
    cmd.add_argument("--no-blk", action="store_true", help="compare the net device only")
    cmd.add_argument("--repeat", type=int, default=1, help="boots per door, alternating; figures are medians")
    cmd.add_argument("--json", metavar="FILE", help="write the report as JSON")
    cmd.add_argument("--plot", metavar="FILE.png", help="draw the figures")
    cmd.add_argument("--logs", metavar="DIR", help="keep the guests' console and QEMU logs here")
    cmd.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .guest.build import build_guest

    console = Console()
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="vdpasim-compare-"))
    with console.status("building the test guest (cached after the first time)"):
        image = build_guest()
    reports = []
    if args.repeat < 1:
        console.print("[red]--repeat must be at least 1[/]")
        return 2
    with console.status("net: booting the guest over vhost-user, then over vhost-vdpa"):
        reports.append(compare_net(image, log_dir, pings=args.pings, frames=args.frames, repeat=args.repeat))
    if not args.no_blk:
        with console.status("blk: booting the guest over vhost-user, then through the reverse bridge"):
            reports.append(compare_blk(image, log_dir, region_mb=args.blk_mb, repeat=args.repeat))
    for report in reports:
        render(report, console)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in reports], indent=2) + "\n")
    if args.plot:
        plot(reports, Path(args.plot))
    ok = all(report.equal for report in reports)
    console.print("[bold green]results equal on both doors[/]" if ok else "[bold red]results differ[/]")
    console.print(f"logs: {log_dir}")
    return 0 if ok else 1
