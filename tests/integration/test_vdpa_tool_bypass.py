"""The unmodified iproute2 ``vdpa`` tool (Debian's 6.1) under ``vdpasim run``: its NETLINK_GENERIC socket is
emulated by the supervisor and answered by a real daemon (one per test, on its own runtime directory).

What it prints, its exit status and its errors are compared with vdpasim's own CLI on the same daemon; the
other sockets of a supervised program (AF_UNIX, AF_INET, NETLINK_ROUTE) run untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from vdpasim.runtime import ENV_RUNTIME_DIR
from vdpasim.testing.daemon import VDPASIM, DaemonProcess, fresh_runtime, run_cli

VDPA = shutil.which("vdpa") or "/usr/sbin/vdpa"  # Debian's iproute2, which scripts/setup.sh installs


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess() as d:
        yield d


def vdpa(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess:
    """``vdpasim run -- vdpa ARGS`` on ``d``'s runtime directory."""
    return run_cli(d.runtime, "run", "--", VDPA, *args, check=False)


def vdpa_json(d: DaemonProcess, *args: str) -> dict:
    result = vdpa(d, "-j", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_mgmtdev_show_lists_vdpasims_management_devices(daemon: DaemonProcess) -> None:
    text = vdpa(daemon, "mgmtdev", "show")
    assert text.returncode == 0, text.stderr
    assert text.stdout == daemon.cli("mgmtdev", "show").stdout
    assert text.stdout.startswith("vdpasim_net: \n  supported_classes net\n")
    assert "vdpasim_blk: \n  supported_classes block\n" in text.stdout
    assert vdpa_json(daemon, "mgmtdev", "show") == daemon.json("mgmtdev", "show")
    one = vdpa_json(daemon, "mgmtdev", "show", "vdpasim_blk")
    assert list(one["mgmtdev"]) == ["vdpasim_blk"]


def test_device_life_cycle_matches_vdpasims_cli(daemon: DaemonProcess) -> None:
    add = vdpa(daemon, "dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net", "mac", "52:54:00:00:00:01")
    assert (add.returncode, add.stdout, add.stderr) == (0, "", "")
    words = ["dev", "add", "name", "vdpa1", "mgmtdev", "vdpasim_net", "mac", "52:54:00:00:00:02"]
    add = vdpa(daemon, *words, "max_vqp", "2", "mtu", "9000")
    assert add.returncode == 0, add.stderr
    add = vdpa(daemon, "dev", "add", "name", "blk0", "mgmtdev", "vdpasim_blk")
    assert add.returncode == 0, add.stderr

    ours, theirs = vdpa_json(daemon, "dev", "show"), daemon.json("dev", "show")
    assert sorted(ours["dev"]) == sorted(theirs["dev"]) == ["blk0", "vdpa0", "vdpa1"]
    for name, fields in theirs["dev"].items():
        assert set(ours["dev"][name]) == set(fields), name
        for key, value in fields.items():
            assert ours["dev"][name][key] == value, (name, key)
    assert ours["dev"]["vdpa1"]["max_vqs"] == 5  # 2 pairs + the control queue
    assert ours["dev"]["blk0"]["type"] == "block"
    assert vdpa(daemon, "dev", "show").stdout == daemon.cli("dev", "show").stdout

    config = vdpa_json(daemon, "dev", "config", "show")["config"]
    assert config == daemon.json("dev", "config", "show")["config"]
    assert config["vdpa0"]["mac"] == "52:54:00:00:00:01"
    assert (config["vdpa1"]["mtu"], config["vdpa1"]["max_vq_pairs"]) == (9000, 2)
    assert vdpa_json(daemon, "dev", "config", "show", "vdpa1") == {"config": {"vdpa1": config["vdpa1"]}}

    # vstats before a driver negotiated features: the kernel's EAGAIN and extack, as vdpasim's CLI shows them
    ours_v = vdpa(daemon, "dev", "vstats", "show", "vdpa0", "qidx", "0")
    theirs_v = daemon.cli("dev", "vstats", "show", "vdpa0", "qidx", "0", check=False)
    assert ours_v.stderr == theirs_v.stderr
    assert "Error: vdpa: feature negotiation not complete." in ours_v.stderr

    for name in ("vdpa0", "vdpa1", "blk0"):
        deleted = vdpa(daemon, "dev", "del", name)
        assert (deleted.returncode, deleted.stderr) == (0, "")
    assert vdpa_json(daemon, "dev", "show") == {"dev": {}} == daemon.json("dev", "show")
    assert vdpa(daemon, "dev", "show").stdout == ""


def test_refusals_match_vdpasims_cli_and_the_kernel(daemon: DaemonProcess) -> None:
    assert vdpa(daemon, "dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net").returncode == 0
    cases = [
        ["dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net"],  # EEXIST, no extack
        ["dev", "add", "name", "x", "mgmtdev", "nope"],  # ENODEV
        ["dev", "add", "name", "b1", "mgmtdev", "vdpasim_blk", "mac", "52:54:00:00:00:01"],  # EOPNOTSUPP
        ["dev", "del", "nope"],
        ["dev", "config", "show", "nope"],
        ["mgmtdev", "show", "nope"],
    ]
    for words in cases:
        ours, theirs = vdpa(daemon, *words), daemon.cli(*words, check=False)
        assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), words
        assert ours.returncode == 1, words
    again = vdpa(daemon, "dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net")
    assert again.stderr == "kernel answers: File exists\n"


PROGRAM = textwrap.dedent(
    """
    import socket, struct, os, sys
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.send(b"unix"); print(b.recv(10).decode(), flush=True)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    c = socket.create_connection(srv.getsockname()); s, _ = srv.accept(); c.sendall(b"inet")
    print(s.recv(10).decode(), flush=True)
    route = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    print("route fd below 940:", route.fileno() < 940, flush=True)
    genl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 16)
    print("genl fd", genl.fileno(), flush=True)
    genl.bind((0, 0))
    print("port is pid", genl.getsockname()[0] == os.getpid(), flush=True)
    print("type", genl.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), genl.getsockopt(socket.SOL_SOCKET, 38),
          genl.getsockopt(socket.SOL_SOCKET, 39), flush=True)
    genl.setblocking(False)
    try:
        genl.recv(100)
    except BlockingIOError:
        print("EAGAIN", flush=True)
    genl.setblocking(True)
    req = struct.pack("=IHHIIBBH", 32, 16, 5, 7, 0, 3, 1, 0) + struct.pack("=HH", 9, 2) + b"vdpa\\0\\0\\0\\0"
    genl.send(req)
    data, _, flags, _ = genl.recvmsg(8, 0, socket.MSG_TRUNC)
    print("trunc", len(data), bool(flags & socket.MSG_TRUNC), flush=True)
    genl.send(req)
    n = len(genl.recv(65536, socket.MSG_PEEK | socket.MSG_TRUNC))
    data, addr = genl.recvfrom(65536)
    print("peek", n == len(data), "from", addr, "seq", struct.unpack_from("=I", data, 8)[0], flush=True)
    genl.close()
    """
)


def test_other_sockets_of_a_supervised_program_are_untouched(daemon: DaemonProcess) -> None:
    result = run_cli(daemon.runtime, "run", sys.executable, "-c", PROGRAM, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "unix",
        "inet",
        "route fd below 940: True",
        "genl fd 940",
        "port is pid True",
        "type 3 16 16",
        "EAGAIN",
        "trunc 8 True",
        "peek True from (0, 0) seq 7",
    ]
    link = run_cli(daemon.runtime, "run", "--", "ip", "link", "show", "lo", check=False)
    assert link.returncode == 0, link.stderr
    assert link.stdout.startswith("1: lo: <LOOPBACK")


def test_exit_status_and_signals_are_forwarded() -> None:
    runtime = fresh_runtime()
    env = {**os.environ, ENV_RUNTIME_DIR: str(runtime.path)}
    try:
        assert run_cli(runtime, "run", "--", "sh", "-c", "exit 7", check=False).returncode == 7
        assert run_cli(runtime, "run", "sh", "-c", "kill -TERM $$", check=False).returncode == 128 + 15
        missing = run_cli(runtime, "run", "--", "/nonexistent/cmd", check=False)
        assert missing.returncode == 127 and "cannot run" in missing.stderr
        proc = subprocess.Popen([*VDPASIM, "run", "--", "sleep", "60"], env=env)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT
        assert runtime.daemon_pid() is None  # no netlink request: no daemon started
    finally:
        shutil.rmtree(runtime.path.parent, ignore_errors=True)


THREADS_AND_EXEC = textwrap.dedent(
    """
    import os, socket, struct, sys, threading, time
    REQ = struct.pack("=IHHIIBBH", 32, 16, 5, 11, 0, 3, 1, 0) + struct.pack("=HH", 9, 2) + b"vdpa\\0\\0\\0\\0"
    if len(sys.argv) > 1:  # after exec: the inherited socket still works, the close-on-exec slot is free again
        kept = socket.socket(fileno=int(sys.argv[1]))
        kept.send(REQ)
        print("inherited", struct.unpack_from("=I", kept.recv(4096), 8)[0], flush=True)
        fresh = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
        print("fresh fd", fresh.fileno(), flush=True)
        sys.exit(0)
    nb = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 16)
    try:
        nb.recv(100)
    except BlockingIOError:
        print("SOCK_NONBLOCK EAGAIN", nb.fileno(), flush=True)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    got = []
    t = threading.Thread(target=lambda: got.append(s.recv(4096)))
    t.start()
    time.sleep(0.5)
    print("still waiting", t.is_alive(), flush=True)
    s.send(REQ)
    t.join(30)
    print("woken", struct.unpack_from("=I", got[0], 8)[0], flush=True)
    os.set_inheritable(s.fileno(), True)
    os.execv(sys.executable, [sys.executable, "-c", PROG, str(s.fileno())])
    """
)


def test_blocking_receive_waits_for_a_reply_and_sockets_survive_exec(daemon: DaemonProcess) -> None:
    program = THREADS_AND_EXEC.replace("PROG", repr(THREADS_AND_EXEC))
    result = run_cli(daemon.runtime, "run", "--", sys.executable, "-c", program, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "SOCK_NONBLOCK EAGAIN 940",
        "still waiting True",
        "woken 11",
        "inherited 11",
        "fresh fd 940",
    ]
    assert "the call waits" in result.stderr  # the pending receive is logged
