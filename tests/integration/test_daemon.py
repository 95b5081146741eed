"""The daemon as users run it: a real ``vdpasim daemon`` process, driven by the real ``vdpasim`` command.

Each test has its own runtime directory (``VDPASIM_RUNTIME_DIR``) and ends every daemon it started
by its PID. What is checked is what a user or a front-end can observe: files and their modes, the
command's output and exit status, the daemon's exit status and log, what its process maps.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from bridge.vhost_user.messages import U64, MemoryRegion, MemoryTable, Message
from bridge.vhost_user.messages import FrontendRequest as F
from bridge.vhost_user.transport import MessageStream
from vdpasim.bus import Bus, VdpaNetlinkServer, VdpaSocket
from vdpasim.bus import netlink as nl
from vdpasim.control import MAX_MESSAGE, ControlClient, decode_response
from vdpasim.errors import CodecError
from vdpasim.runtime import RuntimeDir
from vdpasim.testing.daemon import VDPASIM, DaemonProcess, end_daemon_of, fresh_runtime, process_gone, run_cli


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess() as d:
        yield d


@pytest.fixture(scope="module")
def daemon_with_keep() -> Iterator[DaemonProcess]:
    """One daemon with one device, "keep", shared by the error cases (none of which may change anything)."""
    with DaemonProcess() as d:
        d.cli("dev", "add", "name", "keep", "mgmtdev", "vdpasim_net")
        yield d


@pytest.fixture
def runtime() -> Iterator[RuntimeDir]:
    """A runtime directory with no daemon yet; whatever daemon ends up on it is ended by pid."""
    rt = fresh_runtime()
    try:
        yield rt
    finally:
        end_daemon_of(rt)
        shutil.rmtree(rt.path.parent, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _error_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


# ----- permissions, lock, life cycle -----
def test_runtime_dir_and_sockets_are_private(daemon: DaemonProcess) -> None:
    rt = daemon.runtime
    assert _mode(rt.path) == 0o700
    assert stat.S_ISSOCK(rt.control_socket.lstat().st_mode) and _mode(rt.control_socket) == 0o600
    assert rt.pid_file.read_text().strip() == str(daemon.pid)
    assert _mode(rt.pid_file) == 0o600
    daemon.cli("dev", "add", "name", "net0", "mgmtdev", "vdpasim_net")
    sock = Path(daemon.json("-x", "dev", "show", "net0")["dev"]["net0"]["vhost_user_socket"])
    assert sock == rt.path / "net0.vhost-user.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode) and _mode(sock) == 0o600
    status = daemon.json("daemon", "status")["daemon"]
    assert status["pid"] == daemon.pid and status["runtime_dir"] == str(rt.path) and status["devices"] == ["net0"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(daemon: DaemonProcess, sig: int) -> None:
    daemon.cli("dev", "add", "name", "n1", "mgmtdev", "vdpasim_net")
    daemon.cli("dev", "add", "name", "b1", "mgmtdev", "vdpasim_blk", "capacity", "1M")
    # A front-end is connected when the signal comes: it must see its socket close.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front_end:
        front_end.connect(str(daemon.runtime.path / "n1.vhost-user.sock"))
        front_end.settimeout(30)
        assert daemon.stop(sig) == 0
        assert front_end.recv(1) == b""  # EOF: the back-end closed the connection
    # Sockets and pidfile: all gone. The devices' state files (and the RAM disk's file) stay for the next
    # daemon on the directory, which serves the devices again (docs/reliability.md).
    assert sorted(p.name for p in daemon.runtime.path.iterdir()) == ["b1.ramdisk", "b1.state", "n1.state"]
    log = daemon.log()
    assert f"stopping on {signal.Signals(sig).name}: 2 device(s)" in log
    assert "deleted n1" in log and "deleted b1" in log and "Traceback" not in log


def test_second_daemon_on_the_same_dir_is_refused(daemon: DaemonProcess) -> None:
    second = run_cli(daemon.runtime, "daemon", check=False)
    assert second.returncode == 1
    assert f"a vdpasim daemon (pid {daemon.pid}) already serves {daemon.runtime.path}" in second.stderr
    # The first one is untouched: same lock, same socket, still answering.
    assert daemon.runtime.pid_file.read_text().strip() == str(daemon.pid)
    assert daemon.json("daemon", "status")["daemon"]["pid"] == daemon.pid
    # `daemon start` finds it answering and starts none.
    start = run_cli(daemon.runtime, "daemon", "start")
    assert f"vdpasim: a daemon (pid {daemon.pid}) already serves {daemon.runtime.path}" in start.stderr


def test_two_daemons_side_by_side() -> None:
    with DaemonProcess() as one, DaemonProcess() as two:
        assert one.runtime.path != two.runtime.path
        one.cli("dev", "add", "name", "same", "mgmtdev", "vdpasim_net", "mac", "02:00:00:00:00:0a")
        two.cli("dev", "add", "name", "same", "mgmtdev", "vdpasim_net", "mac", "02:00:00:00:00:0b")
        a = one.json("-x", "dev", "show", "same")["dev"]["same"]
        b = two.json("-x", "dev", "show", "same")["dev"]["same"]
        assert a["vhost_user_socket"] != b["vhost_user_socket"]
        assert one.json("dev", "config", "show", "same")["config"]["same"]["mac"] == "02:00:00:00:00:0a"
        assert two.json("dev", "config", "show", "same")["config"]["same"]["mac"] == "02:00:00:00:00:0b"
        one.cli("dev", "del", "same")
        assert one.json("dev", "show") == {"dev": {}}
        assert list(two.json("dev", "show")["dev"]) == ["same"]


@pytest.mark.parametrize("problem", ["group-readable", "symlink", "other-owner", "not-a-dir"])
def test_unsafe_runtime_dir_is_refused(runtime: RuntimeDir, problem: str) -> None:
    runtime.path.parent.mkdir(mode=0o700, exist_ok=True)
    if problem == "group-readable":
        runtime.path.mkdir(mode=0o700)
        os.chmod(runtime.path, 0o750)
        expected = "has mode 0750"
    elif problem == "symlink":
        target = runtime.path.parent / "elsewhere"
        target.mkdir(mode=0o700)
        runtime.path.symlink_to(target)
        expected = "is a symbolic link"
    elif problem == "other-owner":
        runtime.path.mkdir(mode=0o700)
        if os.geteuid() != 0:
            pytest.fail("needs root to give a directory away (CI runs as root)")
        os.chown(runtime.path, 65534, 65534)
        expected = "belongs to uid 65534"
    else:
        runtime.path.write_text("")
        expected = "is not a directory"
    result = run_cli(runtime, "daemon", check=False)
    assert result.returncode == 1
    assert expected in result.stderr
    assert not runtime.control_socket.exists() and not runtime.pid_file.exists()
    # Commands that would start a daemon refuse too, with the same reason.
    add = run_cli(runtime, "dev", "add", "name", "x", "mgmtdev", "vdpasim_net", check=False)
    assert add.returncode == 1 and expected in add.stderr


def test_auto_start_then_stop(runtime: RuntimeDir) -> None:
    assert not runtime.path.exists()
    none = run_cli(runtime, "daemon", "status", check=False)
    assert none.returncode == 1 and "no daemon serves" in none.stderr
    assert run_cli(runtime, "-j", "dev", "show").stdout == '{"dev":{}}\n'  # reads start nothing
    assert not runtime.path.exists()

    added = run_cli(runtime, "-j", "dev", "add", "name", "auto0", "mgmtdev", "vdpasim_net")
    assert "started a daemon" in added.stderr
    assert _mode(runtime.path) == 0o700 and _mode(runtime.log_file) == 0o600
    pid = json.loads(run_cli(runtime, "-j", "daemon", "status").stdout)["daemon"]["pid"]
    assert runtime.daemon_pid() == pid and not process_gone(pid)
    assert added.stdout == "\n"  # what `vdpa -j dev add` prints
    assert json.loads(run_cli(runtime, "-j", "dev", "show").stdout)["dev"]["auto0"]["mgmtdev"] == "vdpasim_net"

    # A second add finds the running daemon and starts no other.
    again = run_cli(runtime, "dev", "add", "name", "auto1", "mgmtdev", "vdpasim_blk")
    assert "started a daemon" not in again.stderr
    assert json.loads(run_cli(runtime, "-j", "daemon", "status").stdout)["daemon"]["devices"] == ["auto0", "auto1"]

    stopped = run_cli(runtime, "daemon", "stop")
    assert f"stopped the daemon (pid {pid})" in stopped.stderr
    deadline = time.monotonic() + 20
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process_gone(pid)
    assert sorted(p.name for p in runtime.path.iterdir()) == [
        "auto0.state",
        "auto1.ramdisk",
        "auto1.state",
        "daemon.log",
    ]
    log = runtime.log_file.read_text()
    assert "auto0: added (vdpasim_net)" in log and "deleted auto1" in log and log.rstrip().endswith("stopped")
    assert "no daemon serves" in run_cli(runtime, "daemon", "stop").stderr  # idempotent


def test_racing_commands_start_one_daemon(runtime: RuntimeDir) -> None:
    env = {**os.environ, "VDPASIM_RUNTIME_DIR": str(runtime.path)}
    commands = [
        subprocess.Popen(
            [*VDPASIM, "dev", "add", "name", f"race{i}", "mgmtdev", "vdpasim_net"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [(p.wait(120), *p.communicate()) for p in commands]
    assert [rc for rc, _, _ in outputs] == [0, 0, 0], outputs
    status = json.loads(run_cli(runtime, "-j", "daemon", "status").stdout)["daemon"]
    assert status["devices"] == ["race0", "race1", "race2"]
    assert runtime.daemon_pid() == status["pid"]
    # Losers of the start race said why they stopped; no other daemon lives on.
    daemons = [p for p in _pids_with_env(str(runtime.path)) if p != status["pid"]]
    assert daemons == []


def _pids_with_env(runtime_path: str) -> list[int]:
    """Live processes whose environment names this runtime directory and which run ``vdpasim daemon``."""
    found = []
    marker = f"VDPASIM_RUNTIME_DIR={runtime_path}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or process_gone(int(entry.name)):
            continue
        try:
            if (
                marker in (entry / "environ").read_bytes().split(b"\0")
                and b"daemon" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_restart_after_a_killed_daemon_serves_its_devices_again(runtime: RuntimeDir) -> None:
    first = DaemonProcess(runtime).start()
    first.cli("dev", "add", "name", "k0", "mgmtdev", "vdpasim_net", "mac", "02:00:00:00:00:42")
    first.cli("dev", "add", "name", "k1", "mgmtdev", "vdpasim_blk", "capacity", "1M")
    first.cli("dev", "del", "k0")
    first.cli("dev", "add", "name", "k2", "mgmtdev", "vdpasim_net", "mode", "responder", "peer_ip", "10.9.0.2")
    first.cli("dev", "set", "name", "k2", "mac", "02:00:00:00:00:43")
    before = first.json("-x", "dev", "show")
    config = first.json("-x", "dev", "config", "show", "k2")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    left = sorted(p.name for p in runtime.path.iterdir())
    assert {"control.sock", "k1.vhost-user.sock", "daemon.pid", "k1.state", "k2.state"} <= set(left)
    assert "k0.state" not in left  # dev del removed it
    assert _mode(runtime.path / "k1.state") == 0o600
    assert runtime.daemon_pid() is None  # the kernel dropped the lock with the process
    assert run_cli(runtime, "daemon", "status", check=False).returncode == 1  # a dead socket is no daemon
    second = DaemonProcess(runtime).start()
    try:
        log = second.log()
        assert "removed a stale socket" in log, log
        assert "re-created 2 device(s) from their state files: k1, k2" in log, log
        # Same sockets, same /dev/vhost-vdpa-N numbers (k1 kept 1 although 0 is free now), same config.
        assert second.json("-x", "dev", "show") == before
        assert before["dev"]["k1"]["vhost_vdpa_node"] == "/dev/vhost-vdpa-1"
        assert second.json("-x", "dev", "config", "show", "k2") == config
        assert config["config"]["k2"]["mac"] == "02:00:00:00:00:43"
        second.cli("dev", "del", "k1")
        assert not (runtime.path / "k1.state").exists() and not (runtime.path / "k1.ramdisk").exists()
        second.cli("dev", "add", "name", "k1", "mgmtdev", "vdpasim_blk")  # the name is free again
    finally:
        assert second.stop() == 0


# ----- CLI round trips through the daemon (the formats themselves: tests/unit/cli) -----
def test_net_round_trip(daemon: DaemonProcess) -> None:
    added = daemon.cli(
        "dev", "add", "name", "net0", "mgmtdev", "vdpasim_net", "mac", "02:11:22:33:44:55", "mtu", "9000",
        "max_vqp", "2", "mode", "responder", "peer_ip", "10.1.0.2",
    )  # fmt: skip
    assert (added.stdout, added.stderr) == ("", "")
    dev = {"type": "network", "mgmtdev": "vdpasim_net", "vendor_id": 0, "max_vqs": 5, "max_vq_size": 256}
    assert daemon.json("dev", "show") == {"dev": {"net0": dev}}
    assert daemon.cli("dev", "show", "net0").stdout == (
        "net0: type network mgmtdev vdpasim_net vendor_id 0 max_vqs 5 max_vq_size 256\n"
    )
    ext = daemon.json("-x", "dev", "show", "net0")["dev"]["net0"]
    assert ext == {**dev, "vhost_user_socket": str(daemon.runtime.path / "net0.vhost-user.sock"),
                   "vhost_vdpa_node": "/dev/vhost-vdpa-0"}  # fmt: skip
    assert daemon.cli("dev", "config", "show", "net0").stdout == (
        "net0: mac 02:11:22:33:44:55 link up link_announce false max_vq_pairs 2 mtu 9000 \n"
    )
    daemon.cli("dev", "set", "name", "net0", "mac", "02:11:22:33:44:66")
    assert daemon.json("dev", "config", "show")["config"]["net0"]["mac"] == "02:11:22:33:44:66"
    vstats = daemon.cli("dev", "vstats", "show", "net0", "qidx", "1", check=False)
    assert vstats.returncode == 1  # no driver has negotiated features yet
    assert (
        vstats.stderr
        == "Error: vdpa: feature negotiation not complete.\nkernel answers: Resource temporarily unavailable\n"
    )

    assert daemon.cli("dev", "del", "net0").stdout == ""
    assert not Path(ext["vhost_user_socket"]).exists()
    assert daemon.json("dev", "show") == {"dev": {}}


def test_blk_round_trip(daemon: DaemonProcess, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    daemon.cli("dev", "add", "name", "blk0", "mgmtdev", "vdpasim_blk", "capacity", "2M", "file", str(image), "create")
    assert image.stat().st_size == 2 << 20
    daemon.cli("dev", "add", "name", "blk1", "mgmtdev", "vdpasim_blk", "file", str(image), "read_only")
    daemon.cli("dev", "add", "name", "blk2", "mgmtdev", "vdpasim_blk", "size", "64M", "num_queues", "2")
    shown = daemon.json("-x", "dev", "show")["dev"]
    assert [shown[n]["max_vqs"] for n in ("blk0", "blk1", "blk2")] == [1, 1, 2]
    assert [shown[n]["vhost_vdpa_node"] for n in ("blk0", "blk1", "blk2")] == [f"/dev/vhost-vdpa-{i}" for i in range(3)]
    assert daemon.cli("dev", "config", "show", "blk0").stdout == "blk0: \n"
    stats = daemon.cli("dev", "vstats", "show", "blk2", "qidx", "1", check=False)
    assert (stats.returncode, stats.stderr) == (1, "kernel answers: Operation not supported\n")
    for name in ("blk0", "blk1", "blk2"):
        daemon.cli("dev", "del", name)
    assert image.stat().st_size == 2 << 20  # the image stays
    assert sorted(p.name for p in daemon.runtime.path.iterdir()) == ["control.sock", "daemon.pid"]


def test_mgmtdev_show(daemon: DaemonProcess) -> None:
    shown = daemon.json("mgmtdev", "show")["mgmtdev"]
    assert set(shown) == {"vdpasim_net", "vdpasim_blk"}
    assert shown["vdpasim_net"]["supported_classes"] == ["net"]
    assert shown["vdpasim_blk"]["supported_classes"] == ["block"]
    assert daemon.json("mgmtdev", "show", "vdpasim_blk") == {"mgmtdev": {"vdpasim_blk": shown["vdpasim_blk"]}}
    assert daemon.cli("mgmtdev", "show").stdout.startswith("vdpasim_net: \n  supported_classes net\n")


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["add", "name", "bad", "mgmtdev", "vdpasim_nope"],
         "Error: vdpa: Fail to find the specified management device.\nkernel answers: No such device\n"),
        (["add", "name", "keep", "mgmtdev", "vdpasim_net"], "kernel answers: File exists\n"),
        (["add", "name", "bad", "mgmtdev", "vdpasim_net", "mac", "01:00:00:00:00:01"],
         "Error: vdpasim_net: mac: 01:00:00:00:00:01 is a multicast address.\nkernel answers: Invalid argument\n"),
        (["add", "name", "bad", "mgmtdev", "vdpasim_net", "mtu", "60"],
         "Error: integer out of range.\nkernel answers: Numerical result out of range\n"),
        (["add", "name", "bad", "mgmtdev", "vdpasim_net", "max_vqp", "0"],
         "Error: vdpa: At least one pair of VQs is required.\nkernel answers: Invalid argument\n"),
        (["add", "name", "bad", "mgmtdev", "vdpasim_blk", "mac", "02:00:00:00:00:01"],
         "Error: vdpa: Some provided attributes are not supported: 0x400.\nkernel answers: Operation not supported\n"),
        (["del", "ghost"], "Error: vdpa: device not found.\nkernel answers: No such device\n"),
        (["add", "name", "bad", "mgmtdev", "vdpasim_net", "mac", "02:00:zz:00:00:01"],
         '"02:00:zz:00:00:01" is invalid lladdr.\n'),
        (["add", "name", "bad", "mgmtdev", "vdpasim_net", "colour", "red"], 'Unknown option "colour"\n'),
    ],
)  # fmt: skip
def test_errors_are_the_kernels_and_harmless(daemon_with_keep: DaemonProcess, words: list[str], message: str) -> None:
    daemon = daemon_with_keep
    result = daemon.cli("dev", *words, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", message)
    # Nothing else changed, and the daemon serves on.
    assert list(daemon.json("dev", "show")["dev"]) == ["keep"]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_socket_path_too_long_is_refused(runtime: RuntimeDir) -> None:
    deep = RuntimeDir(runtime.path.parent / ("d" * 60) / "run")
    with DaemonProcess(deep) as d:
        result = d.cli("dev", "add", "name", "n" * 40, "mgmtdev", "vdpasim_net", check=False)
        assert result.returncode == 1 and "107 bytes" in result.stderr
        assert "kernel answers: File name too long" in result.stderr
        assert d.json("dev", "show") == {"dev": {}}


# ----- the control socket under bad input -----
def test_malformed_control_messages_get_answers(daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(str(daemon.runtime.control_socket))
        raw.settimeout(30)
        cases = [
            (b"not json", errno.EINVAL),
            (b"[1, 2]", errno.EINVAL),
            (b'{"vdpasim": 9, "op": "dev_get"}', errno.EPROTO),
            (b'{"vdpasim": 1, "op": "dev_explode"}', errno.EOPNOTSUPP),
            (b'{"vdpasim": 1, "op": "dev_new", "args": {"name": "q"}}', errno.EOPNOTSUPP),  # netlink's job now
            (b"{" + b" " * MAX_MESSAGE + b"}", errno.EMSGSIZE),
        ]
        for data, expected in cases:
            raw.send(data)
            response = decode_response(raw.recv(MAX_MESSAGE + 1))
            assert response.errno == expected, (data[:80], response)
            assert response.error
    with ControlClient(daemon.runtime.control_socket) as client:
        with pytest.raises(CodecError):
            client.request("dev_del", name="nothing")
        assert client.request("daemon_get")["daemon"]["devices"] == []
    assert "Traceback" not in daemon.log()


# ----- a front-end that leaves -----
def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _eventfds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:[eventfd]"
        except FileNotFoundError:  # closed while we looked
            continue
    return count


def test_front_end_leaving_releases_memory_and_fds(daemon: DaemonProcess) -> None:
    daemon.cli("dev", "add", "name", "fe0", "mgmtdev", "vdpasim_net")
    sock_path = daemon.runtime.path / "fe0.vhost-user.sock"
    tag = f"vds-guest-ram-{uuid.uuid4().hex[:8]}"
    eventfds_before = _eventfds(daemon.pid)
    memfd = os.memfd_create(tag)
    calls = [os.eventfd(0) for _ in range(2)]
    try:
        os.ftruncate(memfd, 4 << 20)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        sock.settimeout(30)
        stream = MessageStream(sock)
        stream.send(Message(F.GET_FEATURES))
        assert stream.receive() is not None
        stream.send(Message(F.SET_OWNER))
        region = MemoryRegion(guest_addr=0, size=4 << 20, user_addr=0x7F0000000000, mmap_offset=0)
        stream.send(Message(F.SET_MEM_TABLE, MemoryTable((region,)), fds=(memfd,)))
        for index, call in enumerate(calls):
            stream.send(Message(F.SET_VRING_CALL, U64(index), fds=(call,)))
        stream.send(Message(F.GET_FEATURES))  # its reply proves every request before it was handled
        assert stream.receive() is not None
        assert tag in _maps(daemon.pid), daemon.log()  # guest RAM is mapped...
        assert _eventfds(daemon.pid) == eventfds_before + len(calls), daemon.log()  # ...and the call fds held
        assert daemon.json("daemon", "status")["daemon"]["connections"] == {"fe0": 1}
        stream.close()  # the front-end leaves

        deadline = time.monotonic() + 20
        while (tag in _maps(daemon.pid) or _eventfds(daemon.pid) != eventfds_before) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tag not in _maps(daemon.pid), daemon.log()
        assert _eventfds(daemon.pid) == eventfds_before, daemon.log()
        assert "negotiated_features" not in daemon.json("dev", "config", "show", "fe0")["config"]["fe0"]
        assert "front-end left" in daemon.log()
        # The device serves the next front-end.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as again:
            again.connect(str(sock_path))
            again.settimeout(30)
            second = MessageStream(again)
            second.send(Message(F.GET_FEATURES))
            assert second.receive() is not None
    finally:
        os.close(memfd)
        for fd in calls:
            os.close(fd)


# ----- the netlink door: every client sees the one bus -----
def test_netlink_clients_and_the_cli_share_the_bus(daemon: DaemonProcess) -> None:
    daemon.cli("dev", "add", "name", "cli0", "mgmtdev", "vdpasim_net", "mac", "02:00:00:00:00:c1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(daemon.runtime.control_socket))
        with VdpaSocket(use_socket=conn) as vdpa:
            assert list(nl.dev_view(vdpa.dev("show"))["dev"]) == ["cli0"]
            vdpa.dev("add", "nl0", mgmtdev="vdpasim_blk", capacity=2048, read_only=True)
            ext = vdpa.dev("show", "nl0", extensions=True)[0]
            assert ext.get_attr("VDPASIM_ATTR_VHOST_USER_PATH") == str(daemon.runtime.path / "nl0.vhost-user.sock")
            assert ext.get_attr("VDPASIM_ATTR_VHOST_VDPA_NODE") == "/dev/vhost-vdpa-1"
            with pytest.raises(NetlinkError) as refused:
                vdpa.dev("del", "ghost")
            assert (refused.value.code, refused.value.args[1]) == (errno.ENODEV, "vdpa: device not found")
        # The daemon's own JSON operations share the connection.
        conn.send(b'{"vdpasim": 1, "seq": 9, "op": "daemon_get", "args": {}}')
        status = decode_response(conn.recv(MAX_MESSAGE)).result["daemon"]
        assert status["devices"] == ["cli0", "nl0"] and status["pid"] == daemon.pid
    assert daemon.cli("dev", "show").stdout.splitlines()[1] == (
        "nl0: type block mgmtdev vdpasim_blk vendor_id 0 max_vqs 1 max_vq_size 256"
    )
    daemon.cli("dev", "del", "nl0")
    assert not (daemon.runtime.path / "nl0.vhost-user.sock").exists()


def test_the_family_lookup_is_answered_as_the_kernel_answers_it(daemon: DaemonProcess) -> None:
    # CTRL_CMD_GETFAMILY "vdpa", as iproute2's mnlu_gen_socket_open sends it (REQUEST|ACK, version 1).
    name = b"vdpa\0"
    attr = struct.pack("=HH", 4 + len(name), 2) + name + b"\0" * (-len(name) % 4)  # CTRL_ATTR_FAMILY_NAME
    body = struct.pack("=BBH", 3, 1, 0) + attr
    request = struct.pack("=IHHII", 16 + len(body), 0x10, 0x1 | 0x4, 77, 0) + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(daemon.runtime.control_socket))
        conn.settimeout(30)
        conn.send(request)
        reply = conn.recv(1 << 16)
        ack = conn.recv(1 << 16)
    expected = VdpaNetlinkServer(Bus()).handle(request, sender_pid=os.getpid(), ext_ack=True, cap_ack=True)
    assert [reply, ack] == expected
    _, kind, _, seq, _ = struct.unpack_from("=IHHII", reply)
    assert (kind, seq, struct.unpack_from("=i", ack, 16)[0]) == (0x10, 77, 0)


def test_mode_is_user_without_vduse_and_shown_with_x(daemon: DaemonProcess) -> None:
    assert not os.path.exists("/dev/vduse/control")  # the host has no VDUSE: auto chooses the userspace bus
    text = daemon.cli("-x", "mgmtdev", "show").stdout
    assert text.startswith("vdpasim_net: \n") and text.endswith("\nmode user\n")
    shown = daemon.json("-x", "mgmtdev", "show")
    assert shown["mode"] == "user" and set(shown["mgmtdev"]) == {"vdpasim_net", "vdpasim_blk"}
    assert "mode" not in daemon.json("mgmtdev", "show")  # without -x: exactly what iproute2 prints
    assert daemon.json("daemon", "status")["daemon"]["mode"] == "user"


def test_kernel_mode_without_vduse_is_refused_with_the_reason(runtime: RuntimeDir) -> None:
    assert not os.path.exists("/dev/vduse/control")
    env = {**os.environ, "VDPASIM_RUNTIME_DIR": str(runtime.path)}
    proc = subprocess.run([*VDPASIM, "daemon", "--mode", "kernel"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "kernel mode needs VDUSE (/dev/vduse/control" in proc.stderr
    assert not runtime.control_socket.exists()
