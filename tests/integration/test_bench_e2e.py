"""``vdpasim bench e2e`` end to end: one short case against real dpdk-testpmd processes.

No speed is asserted: the command must run both back-ends, read a receive rate from testpmd for each,
and print the JSON object the issue asks for. DPDK's testpmd comes from Debian's `dpdk` package, which
scripts/setup.sh installs: without it this test fails, it does not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = {"case", "packet_bytes", "ring", "vdpasim_mpps", "peer_mpps", "ratio"}


def test_one_short_case_gives_sane_json(tmp_path):
    # A child process: the bench pins itself (and the device's thread) to one CPU.
    plot = tmp_path / "e2e.png"
    argv = ["bench", "e2e", "--json", "--runs", "1", "--seconds", "0.5", "--warmup", "0.3", "--ring", "split"]
    argv += ["--plot", str(plot)]
    done = subprocess.run(
        [sys.executable, "-m", "vdpasim.cli", *argv, "--size", "64"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert isinstance(results, list) and len(results) == 1
    (result,) = results
    assert result.keys() >= KEYS
    assert result["case"] == "split-64"
    assert result["ring"] == "split"
    assert result["packet_bytes"] == 64
    assert result["vdpasim_mpps"] > 0
    assert result["peer_mpps"] > 0
    assert result["ratio"] == pytest.approx(result["vdpasim_mpps"] / result["peer_mpps"], rel=1e-3)
    assert "split-64: run 1/1" in done.stderr  # progress while it runs
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_testpmd_says_how_to_install(monkeypatch):
    from vdpasim.bench import e2e
    from vdpasim.errors import UsageError

    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt-get install dpdk dpdk-dev librte-net-vhost23 librte-net-virtio23"):
        e2e.find_testpmd()
