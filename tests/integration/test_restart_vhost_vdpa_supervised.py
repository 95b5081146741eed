"""A program on a bypass node keeps its device while the daemon behind the node is killed and restarted.

The program (under the seccomp supervisor) opens /dev/vhost-vdpa-0 with VhostVdpaClient, as it would open
the kernel's node, and drives a loopback NetDevice through it: the node is a VhostVdpaNode, so a
VhostVdpaServer over a ReplayingClient of the device's vhost-user socket. Between bursts of frames the test
crashes the VhostUserServer (the hang-up a kill -9 gives) and serves a fresh device on the same path; the
program asks for status, config and ring state while the back-end is away and gets the kernel's answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bridge.bypass import VhostVdpaNode
from bridge.supervisor.supervisor import Supervisor
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.testing.restart import RestartingBackend
from vdpasim.testing.vhost_user import warm_up

ROOT = Path(__file__).resolve().parents[2]
MAC = bytes.fromhex("02000000cc01")
CYCLES = 3

PROGRAM = textwrap.dedent(
    """
    import json, sys
    from bridge.vhost_vdpa.client import VhostVdpaClient
    from vdpasim.testing.driver import GuestMemory
    from vdpasim.testing.net import BROADCAST, NetDriver, ethernet

    def frames(tag):
        return [ethernet(BROADCAST, bytes.fromhex("020000000088"), 0x88B5, bytes([tag, i]) * 40) for i in range(4)]

    def say(**what):
        print(json.dumps(what), flush=True)

    client = VhostVdpaClient("/dev/vhost-vdpa-0")
    memory = GuestMemory(8 << 20)
    driver = NetDriver(client, memory, queue_size=64)
    driver.initialize()
    driver.post_rx(0, 64)
    for tag in range(CYCLES + 1):
        if tag:
            assert sys.stdin.readline().strip() == "down"
            # The daemon is gone: the node answers from what it kept.
            mac = client.get_config(0, 6).hex()
            say(status=client.get_status(), mac=mac, tx_base=client.get_vq_state(1).last_avail)
            driver.send(0, frames(tag))  # into a ring nobody serves yet
            say(sent=tag)
            assert sys.stdin.readline().strip() == "up"
        else:
            driver.send(0, frames(tag))
        got = [r.frame for r in driver.receive(0, 4, timeout=60)]
        say(cycle=tag, ok=got == frames(tag))
    client.reset()
    say(reset_status=client.get_status())
    client.close()
    """
).replace("CYCLES", str(CYCLES))


def test_program_keeps_its_device_across_daemon_restarts() -> None:
    warm_up(NetDevice)
    directory = Path(tempfile.mkdtemp(prefix="vdpasim-rs-"))
    backend = RestartingBackend(lambda: NetDevice(NetConfig(name="rs0", mac=MAC)), str(directory / "net.sock"))
    backend.start()
    node = VhostVdpaNode("rs0", backend.path, reconnect_seconds=20)
    supervisor = Supervisor(
        [sys.executable, "-c", PROGRAM],
        {"/dev/vhost-vdpa-0": node},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
    )
    process = supervisor.process
    assert process.stdin is not None and process.stdout is not None
    lines: list[dict] = []

    def read() -> dict:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        lines.append(json.loads(line))
        return lines[-1]

    try:
        assert read() == {"cycle": 0, "ok": True}
        for cycle in range(1, CYCLES + 1):
            backend.crash()
            (server,) = node.servers
            replaying = server.ops
            deadline = time.monotonic() + 10
            while replaying.connected:  # the node's watcher sees the hang-up
                assert time.monotonic() < deadline
                time.sleep(0.005)
            process.stdin.write(b"down\n")
            process.stdin.flush()
            assert read() == {"status": 0xF, "mac": MAC.hex(), "tx_base": 4 * cycle}
            assert read() == {"sent": cycle}
            backend.start()
            process.stdin.write(b"up\n")
            process.stdin.flush()
            assert read() == {"cycle": cycle, "ok": True}
            while replaying.stats.replays < cycle:  # frames flow from DRIVER_OK on, a moment before it counts
                assert time.monotonic() < deadline + 10
                time.sleep(0.005)
        assert read() == {"reset_status": 0}
        assert process.wait(60) == 0
        supervisor.wait(10)
    finally:
        supervisor.close()
        backend.close()
        shutil.rmtree(directory, ignore_errors=True)
    (server,) = node.servers
    stats = server.ops.stats
    assert node.opens == 1 and server.closed
    assert (stats.outages, stats.replays, stats.failed_replays) == (CYCLES, CYCLES, 0)
    assert stats.requeued >= 4 * CYCLES  # each cycle's frames were sent into the dead device's ring
    assert server.stats.failures == 0  # no ioctl of the program failed, before, during or after
