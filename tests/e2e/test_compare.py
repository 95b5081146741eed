"""``vdpasim compare`` end to end: the real command boots QEMU 7.2 on both doors for net and blk and reports.

The report must say the results are equal (it compares frames, digests, device counters and the image
file's bytes), carry the figures of each door, and the plot must be a PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vdpasim.guest import build_guest


def test_compare_reports_equal_results_on_both_doors(tmp_path: Path) -> None:
    build_guest()  # cached: the command finds the image ready
    report, plot = tmp_path / "report.json", tmp_path / "figures.png"
    argv = ["--pings", "5", "--frames", "300", "--blk-mb", "2", "--json", str(report), "--plot", str(plot)]
    done = subprocess.run(
        [sys.executable, "-m", "vdpasim", "compare", *argv, "--logs", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "results equal on both doors" in done.stdout

    net, blk = json.loads(report.read_text())
    for section in (net, blk):
        assert section["equal"] is True and section["differences"] == []
        assert set(section["runs"]) == {"vhost-user", "vhost-vdpa"}
        assert all(run["problems"] == [] for run in section["runs"].values())
    user, vdpa = net["runs"]["vhost-user"], net["runs"]["vhost-vdpa"]
    assert user["results"]["ping transmitted/received"] == [5, 5]
    assert user["results"]["loopback sent/received"] == [300, 200]
    assert vdpa["results"]["loopback digest back"] == user["results"]["loopback digest back"]
    # Only the vhost-vdpa door has ioctls and traps; both doors reach DRIVER_OK and move frames.
    assert vdpa["figures"]["vhost-vdpa ioctls"] > 30 and vdpa["figures"]["trapped syscalls"] > 0
    assert "vhost-vdpa ioctls" not in user["figures"]
    for run in (user, vdpa):
        assert 0 < run["figures"]["time to DRIVER_OK (s)"] < 60 and run["figures"]["loopback frames/s"] > 0
    assert blk["runs"]["vhost-vdpa"]["results"]["image holds the guest's bytes"] is True
    assert "reverse bridge" in blk["note"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
