"""``vdpasim bench blk`` end to end: one short case against a vdpasim child process and qemu-storage-daemon.

No speed is asserted: both back-ends must complete verified I/O and the command must print the JSON the
issue asks for; and a block corrupted behind a back-end's back must stop the benchmark. qemu-storage-daemon
comes from Debian's qemu-system-common (a dependency of qemu-system-x86, which scripts/setup.sh installs):
without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vdpasim.bench import blk
from vdpasim.errors import UsageError

KEYS = {
    "case",
    "op",
    "queue_depth",
    "vdpasim_iops",
    "peer_iops",
    "ratio",
    "vdpasim_p50_us",
    "vdpasim_p99_us",
    "peer_p50_us",
    "peer_p99_us",
    "runs",
}


def test_one_short_case_gives_sane_json(tmp_path) -> None:
    # A child process: the bench pins itself to one CPU and its back-ends to the other.
    plot = tmp_path / "blk.png"
    argv = ["bench", "blk", "--json", "--runs", "1", "--seconds", "0.3", "--warmup", "0.1", "--disk-mib", "8"]
    argv += ["--plot", str(plot)]
    done = subprocess.run(
        [sys.executable, "-m", "vdpasim.cli", *argv, "--op", "read", "--qd", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result.keys() >= KEYS
    assert (result["case"], result["op"], result["queue_depth"], result["runs"]) == ("randread-qd4", "read", 4, 1)
    assert result["vdpasim_iops"] > 0 and result["peer_iops"] > 0
    assert result["ratio"] == pytest.approx(result["vdpasim_iops"] / result["peer_iops"], rel=1e-3)
    for side in ("vdpasim", "peer"):
        assert 0 < result[f"{side}_p50_us"] <= result[f"{side}_p99_us"]
    assert "randread-qd4: run 1/1" in done.stderr  # progress while it runs
    assert "reading back all 2048 blocks" in done.stderr  # the final verification ran on both
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _disk_file(backend: blk.Backend) -> str:
    """A path to the bytes of the back-end's disk: the peer's image, or the vdpasim child's RAM-disk memfd."""
    if backend.image is not None:
        return backend.image
    fds = f"/proc/{backend.proc.pid}/fd"
    for name in os.listdir(fds):
        if os.readlink(os.path.join(fds, name)).startswith("/memfd:vdpasim-blk-"):
            return os.path.join(fds, name)
    raise AssertionError("the vdpasim child has no RAM-disk memfd")


@pytest.mark.parametrize("side", ["vdpasim", "qemu-storage-daemon"])
def test_a_block_corrupted_behind_the_back_end_is_caught(side: str) -> None:
    """Bytes changed on the disk itself (not through the device) fail the read that meets them."""

    def corrupt(backend: blk.Backend) -> None:
        if backend.name == side:
            with open(_disk_file(backend), "r+b") as disk:
                disk.seek(7 * blk.BLOCK + 8)
                disk.write(b"\xa5" * 8)  # the tag's hash, not its block number

    with pytest.raises(blk.BlkBenchError, match=rf"^{side}: .* blocks with wrong data \(first: block 7\)"):
        blk.run_benchmark(["read"], [4], runs=1, seconds=0.1, warmup=0, disk_mib=1, corrupt=corrupt)


def test_the_tag_check_refuses_any_other_block_epoch_or_bytes() -> None:
    buffer = np.zeros(blk.BLOCK, dtype=np.uint8)
    addr = buffer.ctypes.data
    words = buffer.view(np.int64)
    words[0], words[1] = 42, blk._tag(9, 42, 3)
    assert blk.block_tag_ok(addr, 42, 3, 9)
    assert not blk.block_tag_ok(addr, 43, 3, 9)  # another block's
    assert not blk.block_tag_ok(addr, 42, 2, 9)  # an older write's
    assert not blk.block_tag_ok(addr, 42, 3, 8)  # another seed's
    buffer[12] ^= 1
    assert not blk.block_tag_ok(addr, 42, 3, 9)


def test_options_are_checked_before_anything_starts() -> None:
    with pytest.raises(UsageError, match="queue depth 65"):
        blk.run_benchmark(["read"], [65])
    with pytest.raises(UsageError, match="unknown op"):
        blk.run_benchmark(["trim"], [1])


def test_missing_qsd_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt-get install qemu-system-x86"):
        blk.find_qsd()
