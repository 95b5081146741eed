"""``vdpasim bench bypass`` end to end: one short case, a real daemon, the harness on both doors.

No speed is asserted: the command must start the device through the supervisor (traps answered) and straight
over vhost-user (none), pass frames through both doors with every frame checked by the driver, and show that
the bypass's data path traps nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vdpasim.testing.daemon import process_gone

START_KEYS = {"door", "starts", "wall_ms", "answered", "passed", "supervisor_ms", "server_ms", "ioctls", "writes"}
TRAFFIC_KEYS = {"case", "ring", "packet_bytes", "direct_mpps", "bypass_mpps", "ratio", "frames_checked", "trap_growth"}
TRAFFIC_KEYS |= {"stalled_runs", "bad_frames", "direct_runs_mpps", "bypass_runs_mpps"}


def test_one_short_case_end_to_end():
    argv = ["bench", "bypass", "--json", "--runs", "1", "--starts", "2", "--seconds", "0.3", "--size", "64"]
    done = subprocess.run(
        [sys.executable, "-m", "vdpasim.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["start_steps"]) >= 5  # what a device start includes, said in the report

    direct, bypass = report["control_plane"]
    assert direct.keys() >= START_KEYS and bypass.keys() >= START_KEYS
    assert (direct["door"], bypass["door"]) == ("direct", "bypass")
    assert direct["starts"] == bypass["starts"] == 2
    assert direct["answered"] == 0 and direct["supervisor_ms"] == 0
    assert bypass["answered"] > 0  # the open, the ioctls and the IOTLB writes of one start
    assert bypass["ioctls"] > 10 and bypass["writes"] >= 1
    assert bypass["by_syscall"].get("openat", 0) >= 1
    assert bypass["supervisor_ms"] > 0 and bypass["wall_ms"] > 0

    (traffic,) = report["data_path"]
    assert traffic.keys() >= TRAFFIC_KEYS
    assert traffic["case"] == "split-64" and traffic["runs"] == 1
    assert traffic["direct_mpps"] > 0 and traffic["bypass_mpps"] > 0
    assert traffic["ratio"] == pytest.approx(traffic["bypass_mpps"] / traffic["direct_mpps"], rel=1e-3)
    assert traffic["frames_checked"] > 0 and traffic["bad_frames"] == 0
    assert traffic["trap_growth"] == [0]  # the data path never reaches the supervisor
    assert "split-64: run 1/1" in done.stderr  # progress while it runs
    assert not any(os.path.exists(path) for path in report["device"]["sockets"])  # the bench's daemons are gone,
    assert all(process_gone(pid) for pid in report["device"]["daemon_pids"])  # and their sockets
