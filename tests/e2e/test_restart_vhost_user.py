"""The daemon killed with SIGKILL under a running QEMU 7.2 guest, and restarted on the same runtime directory.

QEMU connects with ``-chardev socket,...,reconnect=1``: when the daemon dies it sees the socket close,
stops the device's vhost-user back-end and tries the socket again every second. The restarted daemon
re-creates every device from its state file (vdpasim/state.py) on the same socket, so QEMU reconnects
and negotiates again without the guest noticing more than a pause:

* blk (vhost-user-blk-pci, one queue, a RAM disk that lives in the runtime directory): QEMU keeps the
  inflight buffer (INFLIGHT_SHMFD) and hands it to the new daemon, which resubmits the requests the dead
  one had taken and not completed. The guest's blk-verify workload (O_DIRECT pattern writes and
  read-backs) must see no failed request, no mismatch, and its kernel must log no I/O error;
* net (virtio-net-pci on vhost-user, the daemon's responder as the peer): the link drops and comes back;
  the guest's ping (every 50 ms) goes on after each restart; the frames lost are counted by the guest
  (ping) and by the device ("tx restart drops" in vstats), and both are reported.

The pause of each restart is measured from the kill to the first request (blk) or reply (net) the
restarted daemon serves, seen in its state file, and printed as median and max (run pytest with -s).
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdpasim.guest import GuestImage, GuestVM, build_guest
from vdpasim.guest.qemu import BootResult
from vdpasim.runtime import ENV_RUNTIME_DIR
from vdpasim.state import StateError, read_state
from vdpasim.testing.daemon import VDPASIM, DaemonProcess
from vdpasim.testing.vhost_user import vhost_vdpa_net_args, warm_up

CYCLES = 10
# How long the guest's workload runs: ten cycles take 20-40 s, more on a loaded machine, and each must find
# the workload still running (the test waits for the restarted daemon to serve it).
GUEST_SECONDS = 75
PEER_IP = "10.0.0.2"
MAC = "02:00:00:00:10:07"
# What QEMU 7.2 prints while its back-end is gone and it reconnects: expected here, and nothing else.
RECONNECT_LINES = re.compile(
    r"Failed to set msg fds|ring restore failed|Unexpected end-of-file before all data were read"
    r"|Unable to connect character device|Failed to connect to .*: (No such file or directory|Connection refused)"
    r"|Error reading from the vhost-user socket|Failed to read msg header"
)
KMSG_PROBLEMS = re.compile(r"I/O error|blk_update_request|Buffer I/O|timed? ?out|vda|virtio", re.IGNORECASE)


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    first = DaemonProcess(log_level="info")
    try:
        yield first.start()
    finally:
        first.cleanup()


def _served(daemon: DaemonProcess, name: str) -> int:
    """Buffers the device has served (all queues), as its state file says; -1 while it cannot be read."""
    try:
        state = read_state(daemon.runtime.path / f"{name}.state", runtime_dir=daemon.runtime.path)
    except StateError:
        return -1
    return sum(q.get("packets", 0) for q in state.queues)


def _wait_progress(daemon: DaemonProcess, name: str, timeout: float = 30.0, *, buffers: int = 1) -> float:
    """Wait until the device serves ``buffers`` more than it had at the call; the time it did."""
    baseline = _served(daemon, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if baseline < 0:
            baseline = _served(daemon, name)
        elif _served(daemon, name) >= baseline + buffers:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"{name}: nothing served within {timeout} s\n{daemon.log()[-3000:]}")


def _kill_restart_cycles(
    daemon: DaemonProcess, name: str, vm: GuestVM, rng: random.Random, cycles: int = CYCLES
) -> list[float]:
    """``cycles`` times: let the device serve a random while, kill -9 the daemon, start a new one on the
    same runtime directory; the pause of each (kill to the first buffer served after it), in seconds."""
    pauses = []
    current = daemon
    for cycle in range(cycles):
        time.sleep(rng.uniform(0.2, 1.2))
        assert vm.proc is not None and vm.proc.poll() is None, f"QEMU exited during cycle {cycle}"
        killed = time.monotonic()
        assert current.stop(signal.SIGKILL) == -signal.SIGKILL
        current = DaemonProcess(daemon.runtime, log_level="info", args=daemon.args).start()
        assert f"re-created 1 device(s) from their state files: {name}" in current.log(), current.log()
        pauses.append(_wait_progress(current, name) - killed)
    daemon.proc = current.proc  # the fixture's cleanup ends the last one
    daemon.log_path = current.log_path
    return pauses


def _all_logs(daemon: DaemonProcess) -> str:
    """The logs of every daemon that served the runtime directory (each DaemonProcess writes its own)."""
    return "".join(p.read_text(errors="replace") for p in sorted(daemon.runtime.path.parent.glob("daemon-*.log")))


def _resubmitted(log: str) -> str:
    counts = [int(n) for n in re.findall(r"resubmitting (\d+) requests left in flight", log)]
    return f"; {len(counts)} restarts found requests in flight, {sum(counts)} resubmitted"


def _report(what: str, pauses: list[float], extra: str = "") -> None:
    print(
        f"\n{what}: {len(pauses)} kill -9/restart cycles; pause per restart median {statistics.median(pauses):.2f} s, "
        f"max {max(pauses):.2f} s (all: {', '.join(f'{p:.2f}' for p in pauses)}){extra}"
    )


def _guest(
    image: GuestImage, tmp_path: Path, workload: str, params: dict, args: list[str], **options: object
) -> GuestVM:
    """The guest every test here boots: shared RAM for the back-end, one host thread for TCG, 150 s at most."""
    settings: dict = {"memory_mb": 512, "accel": "tcg,thread=single", "timeout": 150, **options}
    return GuestVM(image, workload, params, args, shared_memory=True, log_path=tmp_path / "console.log", **settings)


def _assert_blk_verify_clean(result: BootResult, restarts: int) -> dict:
    """The guest's blk-verify saw no failed request and no mismatch, ran more passes than there were restarts,
    and its kernel logged no I/O trouble; its result."""
    verify = result.result("blk-verify")
    assert (verify["write_errors"], verify["read_errors"], verify["mismatches"], verify["ok"]) == (0, 0, 0, True)
    assert verify["passes"] > restarts
    assert [line for line in result.kmsg if KMSG_PROBLEMS.search(line)] == []
    return verify


def _unexpected_qemu_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and not RECONNECT_LINES.search(line)]


def test_blk_survives_ten_kill9_restarts_under_o_direct_writes(
    image: GuestImage, daemon: DaemonProcess, tmp_path: Path
) -> None:
    warm_up_kernels()
    daemon.cli("dev", "add", "name", "rb0", "mgmtdev", "vdpasim_blk", "capacity", "16M")
    sock = daemon.runtime.path / "rb0.vhost-user.sock"
    args = [
        "-chardev", f"socket,id=vu0,path={sock},reconnect=1",
        "-device", "vhost-user-blk-pci,id=disk0,chardev=vu0,num-queues=1",
    ]  # fmt: skip
    vm = _guest(image, tmp_path, "blk-verify", {"verify_seconds": GUEST_SECONDS, "size": 1 << 20}, args)
    with vm:
        _wait_progress(daemon, "rb0", timeout=60, buffers=1000)  # blk-verify is writing (not just the probe)
        pauses = _kill_restart_cycles(daemon, "rb0", vm, random.Random(6))
        result = vm.wait()
    result.check()
    verify = _assert_blk_verify_clean(result, CYCLES)
    log = _all_logs(daemon)
    _report(
        "blk over vhost-user",
        pauses,
        f"; guest: {verify['passes']} passes, longest request {verify['longest_request_ms']:.0f} ms"
        + _resubmitted(log),
    )
    assert _unexpected_qemu_lines(result.qemu_output) == []
    assert log.count("re-created 1 device(s) from their state files: rb0") == CYCLES
    assert "Traceback" not in log and " ERROR " not in log, log


def test_blk_with_qemu_as_server_and_the_daemon_reconnecting(image: GuestImage, tmp_path: Path) -> None:
    """The reverse arrangement: QEMU listens (server=on,wait=off), the daemon's device connects to it
    (``vdpasim daemon --vhost-user client``) and, after each restart, connects again."""
    warm_up_kernels()
    with DaemonProcess(log_level="info", args=("--vhost-user", "client")) as daemon:
        daemon.cli("dev", "add", "name", "rc0", "mgmtdev", "vdpasim_blk", "capacity", "16M")
        sock = daemon.runtime.path / "rc0.qemu.sock"
        assert daemon.json("-x", "dev", "show", "rc0")["dev"]["rc0"]["vhost_user_socket"] == str(sock)
        args = [
            "-chardev", f"socket,id=vu0,path={sock},server=on,wait=off",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=vu0,num-queues=1",
        ]  # fmt: skip
        vm = _guest(
            image, tmp_path, "blk-verify", {"verify_seconds": 15, "size": 1 << 20, "seed": 3}, args, timeout=120
        )
        with vm:
            _wait_progress(daemon, "rc0", timeout=60, buffers=1000)
            pauses = _kill_restart_cycles(daemon, "rc0", vm, random.Random(8), cycles=3)
            result = vm.wait()
        result.check()
        verify = _assert_blk_verify_clean(result, len(pauses))
        log = _all_logs(daemon)
        _report(
            "blk, QEMU as server",
            pauses,
            f"; guest: longest request {verify['longest_request_ms']:.0f} ms" + _resubmitted(log),
        )
        assert "Traceback" not in log and " ERROR " not in log, log


def test_net_ping_resumes_after_ten_kill9_restarts(image: GuestImage, daemon: DaemonProcess, tmp_path: Path) -> None:
    warm_up_kernels()
    daemon.cli(
        "dev", "add", "name", "rn0", "mgmtdev", "vdpasim_net", "mac", MAC, "mode", "responder", "peer_ip", PEER_IP,
    )  # fmt: skip
    sock = daemon.runtime.path / "rn0.vhost-user.sock"
    args = [
        "-chardev", f"socket,id=vu0,path={sock},reconnect=1",
        "-netdev", "vhost-user,id=net0,chardev=vu0,queues=1",
        "-device", f"virtio-net-pci,netdev=net0,mac={MAC},romfile=,vectors=0",
    ]  # fmt: skip
    count = int(GUEST_SECONDS / 0.05)
    vm = _guest(
        image,
        tmp_path,
        "ping",
        {"peer": PEER_IP, "addr": "10.0.0.1/24", "count": count, "interval": 0.05, "wait": 1},
        args,
    )
    with vm:
        _wait_progress(daemon, "rn0", timeout=60, buffers=20)  # the guest is pinging
        pauses = _kill_restart_cycles(daemon, "rn0", vm, random.Random(7))
        result = vm.wait()
    result.check()
    ping = result.result("ping")
    guest = result.result("netstats")["stats"]
    tx = daemon.json("-x", "dev", "vstats", "show", "rn0", "qidx", "1")["vstats"]["rn0"]
    rx = daemon.json("-x", "dev", "vstats", "show", "rn0", "qidx", "0")["vstats"]["rn0"]
    lost = ping["transmitted"] - ping["received"]
    _report(
        "net over vhost-user",
        pauses,
        f"; ping: {ping['transmitted']} sent, {ping['received']} answered, {lost} lost ({ping['loss_pct']} %); "
        f"device: tx packets {tx['tx packets']}, tx restart drops {tx['tx restart drops']}, "
        f"tx drops {tx['tx drops']}, rx packets {rx['rx packets']}; guest tx_packets {guest['tx_packets']}",
    )
    assert ping["transmitted"] == count and ping["rc"] == 0
    # The ping went on after every restart: the device answered after the last one, and far more than the
    # requests sent in the pauses made it.
    assert ping["received"] >= count - sum(pauses) / 0.05 - 2 * CYCLES
    # Every frame the guest sent is counted once by the device: sent, or lost across a restart.
    assert tx["tx packets"] + tx["tx restart drops"] == guest["tx_packets"]
    assert tx["tx drops"] == tx["tx restart drops"] and tx["tx errors"] == 0
    assert _unexpected_qemu_lines(result.qemu_output) == []
    log = _all_logs(daemon)
    assert "Traceback" not in log and " ERROR " not in log, log


def test_a_corrupt_state_file_is_refused_and_the_device_can_be_added_again(daemon: DaemonProcess) -> None:
    daemon.cli("dev", "add", "name", "good0", "mgmtdev", "vdpasim_net")
    daemon.cli("dev", "add", "name", "bad0", "mgmtdev", "vdpasim_blk", "capacity", "1M")
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    path = daemon.runtime.path / "bad0.state"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x20  # one flipped bit in the payload
    path.write_bytes(bytes(data))

    again = DaemonProcess(daemon.runtime, log_level="info").start()
    daemon.proc, daemon.log_path = again.proc, again.log_path
    log = again.log()
    [line] = [line for line in log.splitlines() if " ERROR " in line]
    assert f"state file {path}: checksum mismatch" in line and "the file is corrupt" in line, line
    assert "kept as bad0.state.refused" in line and "add it again" in line, line
    assert "re-created 1 device(s) from their state files: good0" in log
    assert sorted(again.json("dev", "show")["dev"]) == ["good0"]  # the others are served all the same
    assert (daemon.runtime.path / "bad0.state.refused").exists() and not path.exists()
    again.cli("dev", "add", "name", "bad0", "mgmtdev", "vdpasim_blk", "capacity", "1M")
    assert sorted(again.json("dev", "show")["dev"]) == ["bad0", "good0"]
    assert read_state(path, runtime_dir=daemon.runtime.path).name == "bad0"


def warm_up_kernels() -> None:
    """Compile (or load from Numba's cache) the data-path kernels once, so no daemon pays for a cold compile."""
    from vdpasim.devices.blk import BlkDevice
    from vdpasim.devices.net import NetDevice

    warm_up(BlkDevice)
    warm_up(NetDevice)


def test_net_over_vdpasim_run_survives_kill9_restarts(image: GuestImage, daemon: DaemonProcess, tmp_path: Path) -> None:
    """The vhost-vdpa bypass path with a real daemon: QEMU under ``vdpasim run`` holds /dev/vhost-vdpa-0 open
    while the daemon behind the node is killed with SIGKILL and restarted. The node keeps the char-device state,
    as the kernel would, and replays it to the re-created device (bridge/vhost_user/replay.py): QEMU's ioctls
    never fail and the guest's ping resumes after each restart."""
    warm_up_kernels()
    daemon.cli(
        "dev", "add", "name", "rv0", "mgmtdev", "vdpasim_net", "mac", MAC, "mode", "responder", "peer_ip", PEER_IP,
    )  # fmt: skip
    node = daemon.json("-x", "dev", "show", "rv0")["dev"]["rv0"]["vhost_vdpa_node"]
    env = {**os.environ, ENV_RUNTIME_DIR: str(daemon.runtime.path)}

    def under_vdpasim_run(argv: list[str], **popen: object) -> subprocess.Popen:
        return subprocess.Popen([*VDPASIM, "run", "-v", "--", *argv], env=env, **popen)  # type: ignore[call-overload]

    cycles, count = CYCLES, int(GUEST_SECONDS / 0.05)
    vm = _guest(
        image,
        tmp_path,
        "ping",
        {"peer": PEER_IP, "addr": "10.0.0.1/24", "count": count, "interval": 0.05, "wait": 1},
        vhost_vdpa_net_args(0, node, mac=MAC),
        launcher=under_vdpasim_run,
    )
    with vm:
        _wait_progress(daemon, "rv0", timeout=60, buffers=20)  # the guest is pinging
        pauses = _kill_restart_cycles(daemon, "rv0", vm, random.Random(9), cycles=cycles)
        result = vm.wait()
    result.check()
    ping = result.result("ping")
    lost = ping["transmitted"] - ping["received"]
    _report(
        "net over vhost-vdpa (vdpasim run)",
        pauses,
        f"; ping: {ping['transmitted']} sent, {ping['received']} answered, {lost} lost ({ping['loss_pct']} %)",
    )
    assert ping["transmitted"] == count and ping["rc"] == 0
    assert ping["received"] >= count - sum(pauses) / 0.05 - 2 * cycles
    # `vdpasim run -v` logs to QEMU's stderr: one replay per restart, and QEMU itself complained of nothing.
    assert result.qemu_output.count("state replayed to the new back-end") == cycles, result.qemu_output
    assert [line for line in result.qemu_output.splitlines() if line.startswith("qemu-system")] == []
    log = _all_logs(daemon)
    assert log.count("re-created 1 device(s) from their state files: rv0") == cycles
    assert "Traceback" not in log and " ERROR " not in log, log


def test_blk_through_the_bypass_survives_kill9_restarts(
    image: GuestImage, daemon: DaemonProcess, tmp_path: Path
) -> None:
    """blk on the vhost-vdpa bypass path with a real daemon (QEMU 7.2 has no vhost-vdpa block front-end): QEMU's
    vhost-user-blk talks to the reverse bridge, ``vdpasim run -- vdpasim bridge``, whose vhost-vdpa client holds
    the device's /dev/vhost-vdpa-N open while the daemon behind it is killed with SIGKILL and restarted. The
    node replays its state; requests the dead daemon had taken are run again (the ring restarts at used->idx),
    so the guest's O_DIRECT writes and read-backs see no failure and no mismatch."""
    warm_up_kernels()
    daemon.cli("dev", "add", "name", "rvb0", "mgmtdev", "vdpasim_blk", "capacity", "16M")
    node = daemon.json("-x", "dev", "show", "rvb0")["dev"]["rvb0"]["vhost_vdpa_node"]
    env = {**os.environ, ENV_RUNTIME_DIR: str(daemon.runtime.path)}
    bridge_socket = daemon.runtime.path.parent / "bridge.sock"
    bridge_log = tmp_path / "bridge.log"
    with open(bridge_log, "wb") as log_file:
        bridge = subprocess.Popen(
            [*VDPASIM, "run", "-v", "--", *VDPASIM, "bridge", "--vhost-vdpa", node, "--vhost-user", str(bridge_socket)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not bridge_socket.exists():
            assert bridge.poll() is None and time.monotonic() < deadline, bridge_log.read_text()
            time.sleep(0.05)
        args = [
            "-chardev", f"socket,id=vu0,path={bridge_socket}",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=vu0,num-queues=1",
        ]  # fmt: skip
        vm = _guest(image, tmp_path, "blk-verify", {"verify_seconds": GUEST_SECONDS, "size": 1 << 20, "seed": 5}, args)
        with vm:
            _wait_progress(daemon, "rvb0", timeout=60, buffers=1000)  # blk-verify is writing
            pauses = _kill_restart_cycles(daemon, "rvb0", vm, random.Random(10))
            result = vm.wait()
    finally:
        bridge.terminate()
        bridge.wait(30)
    result.check()
    verify = _assert_blk_verify_clean(result, CYCLES)
    bridge_output = bridge_log.read_text(errors="replace")
    _report(
        "blk over the vhost-vdpa bypass (reverse bridge)",
        pauses,
        f"; guest: {verify['passes']} passes, longest request {verify['longest_request_ms']:.0f} ms",
    )
    assert [line for line in result.qemu_output.splitlines() if line.strip()] == []
    assert bridge_output.count("state replayed to the new back-end") == CYCLES, bridge_output
    log = _all_logs(daemon)
    assert log.count("re-created 1 device(s) from their state files: rvb0") == CYCLES
    assert "Traceback" not in log and " ERROR " not in log, log
