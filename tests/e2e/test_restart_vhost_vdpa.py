"""The daemon behind a vhost-vdpa bypass node dies (kill -9 shape) and restarts 10 times under a running guest.

QEMU 7.2 runs under the bypass supervisor; its /dev/vhost-vdpa-0 is a VhostVdpaNode, whose ReplayingClient
(bridge/vhost_user/replay.py) keeps the char-device state and replays it to each new back-end. A restart
here: the in-process VhostUserServer is stopped without a word to the node (its sockets shut down, the
device thrown away), and after ``DOWN_SECONDS`` a fresh device with the same config listens on the same
socket path, as a restarted daemon would.

* net: ``ping`` at 0.05 s to the device's responder; after every restart the new device answers pings (it
  counts the packets it served); the guest's loss is reported.
* blk: QEMU's vhost-user-blk -> reverse bridge (``vdpasim bridge`` under its own supervisor) -> node ->
  daemon, with ``blk-verify`` (O_DIRECT pattern writes and read-backs) running through all 10 restarts:
  zero errors, zero mismatches, no I/O error in the guest's kernel log. Requests the dead device had
  taken but not completed are re-run by the next one (base = used->idx).

Each test prints the pause per restart (crash to replay done; and, of that, new daemon up to replay done).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path

import pytest

from bridge.bypass import VhostVdpaNode
from bridge.vhost_user.replay import ReplayingClient
from vdpasim.config import BlkConfig, NetConfig
from vdpasim.devices.blk import BlkDevice
from vdpasim.devices.net import NetDevice
from vdpasim.guest import GuestImage, build_guest
from vdpasim.testing.restart import RestartingBackend, replace_rig_backend
from vdpasim.testing.vhost_user import VhostUserRig

MAC = "52:54:00:5e:00:07"
PEER_IP = "10.0.0.2"
GUEST_ADDR = "10.0.0.1/24"
NODE = "/dev/vhost-vdpa-0"
RESTARTS = 10
DOWN_SECONDS = 0.2  # how long the daemon is away before the new one listens


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


class Restarter(threading.Thread):
    """Restarts the rig's back-end ``RESTARTS`` times once the workload runs; records what each cost."""

    def __init__(self, rig: VhostUserRig, backend: RestartingBackend, node: VhostVdpaNode, busy: int) -> None:
        super().__init__(name="restarter", daemon=True)
        self.rig, self.backend, self.node, self.busy = rig, backend, node, busy
        self.pauses: list[float] = []  # crash -> replay done
        self.replays: list[float] = []  # new back-end listening -> replay done
        self.served_after: list[int] = []  # packets/requests the new device served before the next restart
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _packets(self) -> int:
        device = self.backend.device
        return 0 if device is None else sum(q["packets"] for q in device.stats())

    def _ops(self) -> ReplayingClient | None:
        return self.node.servers[-1].ops if self.node.servers else None  # type: ignore[return-value]

    def _wait(self, what: str, predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.stop.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}")
            time.sleep(0.005)

    def run(self) -> None:
        try:
            rng = random.Random(7)
            self._wait("the workload", lambda: self._ops() is not None and self._packets() >= self.busy, 120)
            ops = self._ops()
            assert ops is not None
            for i in range(RESTARTS):
                crashed = self.backend.restart(DOWN_SECONDS)
                started = time.monotonic()
                assert self.backend.server is not None and self.backend.device is not None
                replace_rig_backend(self.rig, 0, self.backend.device, self.backend.server)
                self._wait(f"replay {i + 1}", lambda i=i: ops.stats.replays > i, 30)
                done = ops.stats.replayed_at[i]
                self.pauses.append(done - crashed)
                self.replays.append(done - started)
                # The new device serves the guest: ping answered, blk requests completed.
                self._wait(f"traffic after restart {i + 1}", lambda: self._packets() >= self.busy, 30)
                time.sleep(rng.uniform(0.3, 1.2))  # a random moment of the workload
                self.served_after.append(self._packets())
        except BaseException as exc:
            self.error = exc


def _report(kind: str, restarter: Restarter, extra: str) -> None:
    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1e3:.0f} ms, max {max(values) * 1e3:.0f} ms"

    print(
        f"\n[{kind}] {len(restarter.pauses)} restarts: pause (crash -> replay done, {DOWN_SECONDS * 1e3:.0f} ms "
        f"down) {ms(restarter.pauses)}; new daemon up -> replay done {ms(restarter.replays)}; {extra}"
    )


def _run_with_restarts(rig: VhostUserRig, make, busy: int, workload: str, args: dict):  # type: ignore[no-untyped-def]
    """Run ``workload`` in the guest while the device's back-end is restarted; (run, restarter, node server)."""
    restarter = Restarter(rig, _adopt(rig, make), rig.nodes[NODE], busy=busy)
    restarter.start()
    try:
        run = rig.run(workload, args)
    finally:
        restarter.stop.set()
        restarter.join()
    (server,) = rig.nodes[NODE].servers
    return run, restarter, server


def _adopt(rig: VhostUserRig, make) -> RestartingBackend:  # type: ignore[no-untyped-def]
    first = rig.backends[0]
    backend = RestartingBackend(make, first.server.path)
    backend.device, backend.server = first.device, first.server
    return backend


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_ping_resumes_after_each_of_ten_daemon_restarts(image: GuestImage, tmp_path: Path, packed: bool) -> None:
    count = 500  # 25 s at 0.05 s: longer than 10 restarts take
    config = NetConfig(name="rs-ping", mode="responder", peer_ip=PEER_IP, mac=MAC)
    with VhostUserRig(image, tmp_path, transport="vhost-vdpa", timeout=240) as rig:
        rig.add_net(config, packed=packed)
        ping_args = {"peer": PEER_IP, "addr": GUEST_ADDR, "count": count, "interval": 0.05, "wait": 2}
        run, restarter, server = _run_with_restarts(rig, lambda: NetDevice(config), 6, "ping", ping_args)
        stats = server.ops.stats
    assert restarter.error is None, restarter.error
    ping = run.result("ping")
    lost = ping["transmitted"] - ping["received"]
    resent = sum(n for idx, n in stats.requeued_by_queue.items() if idx % 2)  # transmit queues are odd
    waiting = "not counted (packed)" if packed else str(resent)
    layout = "packed" if packed else "split"
    _report(f"net {layout}", restarter, f"ping {ping['received']}/{ping['transmitted']} answered, {lost} lost "
            f"({ping['loss_pct']} %), tx frames waiting in the rings at the replays: {waiting}")  # fmt: skip
    assert ping["transmitted"] == count and ping["received"] > 0
    assert lost <= RESTARTS * 20  # a pause of up to ~1 s per restart
    assert (stats.outages, stats.replays, stats.gave_up) == (RESTARTS, RESTARTS, False)
    assert len(restarter.served_after) == RESTARTS  # every new device answered pings before the next restart
    assert server.stats.failures == 0  # QEMU's ioctls never failed, before, during or after
    assert [line for line in run.boot.kmsg if "watchdog" in line.lower() or "virtio" in line.lower()] == []
    assert run.vhost_lines == []
    assert run.boot.guest_rc == 0 and run.boot.returncode == 0, run.boot.tail()


@pytest.mark.parametrize(("packed", "num_queues"), [(False, 1), (True, 2)], ids=["split", "packed-2queues"])
def test_blk_verify_loses_nothing_across_ten_daemon_restarts(
    image: GuestImage, tmp_path: Path, packed: bool, num_queues: int
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    config = BlkConfig(name="rs-blk", path=str(disk), num_queues=num_queues)
    with VhostUserRig(image, tmp_path / "logs", transport="vhost-vdpa", timeout=240) as rig:
        rig.add_blk(config, packed=packed)
        verify_args = {"seconds": 24, "offset": 1 << 20, "size": 2 << 20}
        run, restarter, server = _run_with_restarts(rig, lambda: BlkDevice(config), 50, "blk-verify", verify_args)
        stats = server.ops.stats
    assert restarter.error is None, restarter.error
    verify = run.result("blk-verify")
    rerun = "not counted (packed)" if packed else str(stats.requeued)
    kind = f"blk {'packed' if packed else 'split'} x{num_queues}"
    _report(kind, restarter, f"{verify['passes']} passes, {verify['blocks_written']} blocks written, "
            f"longest guest request {verify['longest_request_ms']} ms, requests re-run: {rerun}")  # fmt: skip
    assert verify["ok"] is True, verify
    assert verify["write_errors"] == verify["read_errors"] == verify["mismatches"] == 0
    assert verify["passes"] >= 2
    assert [line for line in run.boot.kmsg if "error" in line.lower() or "blk" in line.lower()] == []
    assert (stats.outages, stats.replays, stats.gave_up) == (RESTARTS, RESTARTS, False)
    assert len(restarter.served_after) == RESTARTS
    assert server.stats.failures == 0
    assert sum(q["errors"] for q in run.counters["rs-blk"]) == 0
    assert run.vhost_lines == [] and run.boot.guest_rc == 0, run.boot.tail()
