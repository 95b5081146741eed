"""The test guest boots under real QEMU 7.2 (TCG) and its workloads report what really happened.

These prove the image and the workloads against QEMU's own devices (slirp, a datagram socket that
loops frames back, a raw file behind virtio-blk) before any vdpasim back-end is attached to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vdpasim.errors import UsageError
from vdpasim.guest import GuestImage, GuestVM, boot, build_guest, kernel_cmdline
from vdpasim.guest.qemu import drive_args, parse_console, virtio_net_args
from vdpasim.guest.workloads import FOREIGN_MAC, file_range_sha256, fnv1a64, loopback_frame, loopback_frame_len

REQUIRED_MODULES = {"virtio_net", "virtio_blk", "vduse", "vhost_vdpa", "virtio_vdpa", "vdpa", "9pnet_virtio"}


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (each boot's console log path is unique)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _assert_qemu_gone(vm: GuestVM) -> None:
    assert vm.proc is not None and vm.proc.returncode is not None
    assert not Path(f"/proc/{vm.pid}").exists()
    assert _processes_mentioning(str(vm.log_path)) == []


def test_selftest_boots_the_6_12_kernel_with_the_vdpa_modules(image: GuestImage, tmp_path: Path) -> None:
    vm = GuestVM(image, "selftest", log_path=tmp_path / "console.log", timeout=90)
    with vm:
        result = vm.wait()
    result.check()
    selftest = result.result("selftest")
    assert selftest["kernel"].startswith("6.12.")
    assert selftest["kernel"] == image.kernel_version
    assert set(selftest["modules"]) >= REQUIRED_MODULES
    assert selftest["modules_failed"] == []
    assert selftest["vdpa_bus"] is True and selftest["vduse_control"] is True
    assert selftest["net"] == ["lo"]  # -nic none: no NIC at all
    status = result.result("status")
    assert (status["workload"], status["rc"]) == ("selftest", 0)
    assert result.returncode == 0 and result.guest_rc == 0 and not result.timed_out
    assert "VDPASIM-DONE rc=0" in (tmp_path / "console.log").read_text()
    _assert_qemu_gone(vm)


def test_ping_over_slirp_and_blk_on_a_file(image: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    size, length = 8 << 20, 1 << 20
    original = os.urandom(size)
    disk.write_bytes(original)
    args = [*virtio_net_args("user,id=net0"), *drive_args(disk)]
    vm = GuestVM(
        image, "ping,blk", {"ping_count": 5, "blk_size": length}, args, log_path=tmp_path / "c.log", timeout=120
    )
    with vm:
        result = vm.wait()
    result.check()

    ping = result.result("ping")
    assert (ping["peer"], ping["transmitted"], ping["received"], ping["loss_pct"]) == ("10.0.2.2", 5, 5, 0)
    assert 0 < ping["rtt_ms"]["min"] <= ping["rtt_ms"]["avg"] <= ping["rtt_ms"]["max"]
    stats = result.result("netstats")["stats"]
    assert stats["tx_packets"] >= 5 and stats["rx_packets"] >= 5  # echo + ARP
    assert stats["rx_errors"] == stats["tx_errors"] == stats["rx_dropped"] == 0

    blk = result.result("blk")
    assert blk["ok"] is True and blk["write_rc"] == 0 and blk["flush"]["ok"] is True
    assert blk["size"] == size and blk["length"] == length
    assert blk["readback_sha256"] == blk["pattern_sha256"]
    # The host's view of the backing file agrees with every checksum the guest printed.
    assert file_range_sha256(disk, 0, length) == blk["final_sha256"]
    assert file_range_sha256(disk, 0, length // 2) == blk["head_sha256"]
    quarter = length // 4
    assert blk["zeroout"]["result"]["ok"] is True and blk["zeroout"]["is_zero"] is True
    assert disk.read_bytes()[2 * quarter : 3 * quarter] == bytes(quarter)
    assert blk["discard"]["result"]["ok"] is True  # QEMU offers DISCARD and punches a hole in the file
    if blk["discard"]["is_zero"]:
        assert disk.read_bytes()[3 * quarter : length] == bytes(quarter)
    assert disk.read_bytes()[length:] == original[length:]  # nothing outside the region was touched
    assert blk["queue"]["discard_max_bytes"] > 0 and blk["stat"]["flush_ios"] >= 1
    _assert_qemu_gone(vm)


def test_net_loopback_frames_come_back_byte_for_byte(image: GuestImage, tmp_path: Path) -> None:
    # A unix datagram socket that sends to its own address: every frame the NIC sends comes back.
    sock = tmp_path / "loop.sock"
    netdev = f"dgram,id=net0,local.type=unix,local.path={sock},remote.type=unix,remote.path={sock}"
    mac = "52:54:00:12:34:99"
    count, seed = 24, 5
    params = {"count": count, "seed": seed, "promisc": 1, "queues": 1}
    result = boot(image, "net-loopback", params, virtio_net_args(netdev, mac=mac), log_path=tmp_path / "c.log")
    result.check()

    channels = result.result("channels")
    assert (channels["max_combined"], channels["combined"]) == (1, 1)
    loop = result.result("net-loopback")
    assert loop["mac"] == mac and loop["foreign_mac"] == FOREIGN_MAC.hex(":")
    assert (loop["sent"], loop["received"], loop["corrupt"], loop["missing"]) == (count, count, 0, [])
    assert loop["kinds"] == {k: {"sent": 8, "back": 8} for k in ("own", "broadcast", "foreign")}
    assert loop["digest_back"] == loop["digest_sent"]
    own = bytes.fromhex(mac.replace(":", ""))
    frames = [loopback_frame(own, seed, seq) for seq in range(count)]
    assert loop["frames"] == [[seq, len(f), f"{fnv1a64(f):016x}", 1] for seq, f in enumerate(frames)]
    digest = 0xCBF29CE484222325
    for f in frames:
        digest = fnv1a64(f, digest)
    assert loop["digest_sent"] == f"{digest:016x}"
    # The guest's interface counters saw exactly these frames (IPv6 is off: no stray traffic).
    stats = result.result("netstats")["stats"]
    total = sum(loopback_frame_len(seed, seq) for seq in range(count))
    assert (stats["tx_packets"], stats["tx_bytes"]) == (count, total)
    assert (stats["rx_packets"], stats["rx_bytes"]) == (count, total)


def test_timeout_ends_qemu_by_pid(image: GuestImage, tmp_path: Path) -> None:
    vm = GuestVM(image, "selftest", log_path=tmp_path / "c.log", timeout=0.5)
    with vm:
        result = vm.wait()
    assert result.timed_out and result.returncode is None and result.guest_rc is None
    with pytest.raises(Exception, match="timed out"):
        result.check()
    _assert_qemu_gone(vm)


def test_concurrent_builds_share_one_image(image: GuestImage, tmp_path: Path) -> None:
    """Two builders racing on an empty cache: one builds, the other waits and uses the same image."""
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    for deb in (image.directory.parent.parent / "debs").glob("*.deb"):
        (debs / deb.name).symlink_to(deb)  # no download, no 100 MB copy
    env = {**os.environ, "VDPASIM_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "vdpasim.cli", "guest", "build"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    keys = {json.loads(out)["key"] for out, _ in outs}
    assert keys == {image.manifest["key"]}
    assert sum("built in" in err for _, err in outs) == 1
    guest = tmp_path / "cache" / "guest"
    assert sorted(p.name for p in guest.iterdir() if not p.name.startswith(".")) == [image.manifest["key"]]
    assert [p.name for p in guest.iterdir() if p.name.startswith(".build")] == []
    built = guest / image.manifest["key"]
    assert (built / "vmlinuz").read_bytes() == image.kernel.read_bytes()
    assert (built / "initrd.img").read_bytes() == image.initrd.read_bytes()  # reproducible: fixed mtimes


def test_kernel_cmdline_and_console_parsing() -> None:
    line = kernel_cmdline(["ping", "blk"], {"count": 3, "promisc": True, "addr": "10.0.0.1/24"})
    assert line == (
        "console=ttyS0 quiet panic=-1 vdpasim.workload=ping,blk vdpasim.count=3 vdpasim.promisc=1 "
        "vdpasim.addr=10.0.0.1/24"
    )
    with pytest.raises(UsageError, match="no blanks or quotes"):
        kernel_cmdline("ping", {"peer": "10.0.0.2 init=/bin/sh"})
    console = (
        "[    1.0] boot noise\r\n"
        'VDPASIM-RESULT {"type":"ping","received":3}\r\n'
        "[    2.0] virtio_net: warning VDPASIM-RESULT {broken\r\n"
        "VDPASIM-KMSG [    1.5] something odd\r\n"
        "VDPASIM-DONE rc=1\r\n"
    )
    results, kmsg, rc = parse_console(console)
    assert results == [{"type": "ping", "received": 3}, {"type": "unparsable", "text": "{broken"}]
    assert kmsg == ["[    1.5] something odd"] and rc == 1
