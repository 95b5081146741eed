"""Simulated devices served over vhost-user from this process, and a QEMU guest attached to them.

The end-to-end tests need the whole chain at once: a device model, a ``VhostUserServer`` in front of
it, QEMU 7.2 with the right ``-chardev``/``-netdev``/``-device`` arguments, and the test guest running
a workload. ``VhostUserRig`` sets that up for one boot and takes it down again:

* each device gets its own server on a socket in a private 0700 directory (made with ``mkdtemp``
  under ``/tmp``: a UNIX socket path must fit in 108 bytes, which pytest's long ``tmp_path`` names
  do not), so parallel tests never share a path;
* ``run()`` boots the guest with shared guest RAM (a vhost-user back-end maps it from QEMU's memfd),
  waits for it to power off (QEMU is killed by PID on a timeout), stops the servers, which waits for
  each connection's session to end, and only then reads every device's counters, so they are final;
* the result keeps what a test asserts on besides the guest's own lines: QEMU's log and the lines in
  it that mention vhost (QEMU's vhost errors and warnings all do), and every warning or error the
  back-ends and devices logged during the run;
* before the first boot of a process, ``warm_up`` runs one request through a throwaway device of
  each kind the rig serves: the data-path kernels are compiled on first use, which takes tens of
  seconds on a cold Numba cache, long enough for the guest's driver to give up on its first frames;
* ``close()`` (or leaving the ``with`` block) stops what is still running, closes the devices and
  removes the sockets and their directory, whatever happened before.

The QEMU arguments are built by ``vhost_user_net_args`` and ``vhost_user_blk_args``, which
docs/vhost-user.md explains: ``vectors=0`` on vhost-user-net (QEMU 7.2 under TCG segfaults when a
Linux guest starts a vhost-user-net device with MSI-X), ``romfile=`` (the NIC's iPXE ROM would drive
the device before the kernel does), an explicit ``num-queues`` on vhost-user-blk (QEMU defaults it to
the vCPU count and refuses a back-end with fewer queues).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from bridge.supervisor.supervisor import Supervisor
from bridge.vhost_user.server import VhostUserServer  # a test kit joins both halves; the core never does

from ..config import BlkConfig, NetConfig, format_mac
from ..devices.blk import BlkDevice
from ..devices.core import SimDevice
from ..devices.net import NetDevice
from ..errors import UsageError, VdpasimError
from ..guest.build import GuestImage
from ..guest.qemu import BootResult, GuestRunError, GuestVM
from ..guest.workloads import fnv1a64, loopback_frame, loopback_kind
from ..ops import supports
from ..virtio import constants as c
from .driver import DriverQueue, GuestMemory
from .net import NetHarness, ethernet

if TYPE_CHECKING:
    from bridge.bypass import VhostVdpaNode

__all__ = [
    "DEFAULT_MEMORY_MB",
    "RigResult",
    "VhostUserRig",
    "vhost_lines",
    "vhost_user_blk_args",
    "vhost_user_net_args",
    "warm_up",
    "assert_counters_agree",
    "assert_loopback",
]

DEFAULT_MEMORY_MB = 512  # enough for the guest's workloads; less RAM for the back-end to map


def vhost_user_net_args(
    index: int,
    socket_path: str | os.PathLike[str],
    *,
    mac: str,
    queue_pairs: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    queue_size: int | None = None,
) -> list[str]:
    """QEMU arguments for a virtio-net-pci NIC whose data path is the vhost-user back-end at ``socket_path``.

    ``index`` makes the chardev, netdev and device ids unique when a guest has several. ``mac`` must
    be the device's own MAC too: the guest uses QEMU's, the device filters on its own.
    """
    device = [f"virtio-net-pci,id=nic{index},netdev=net{index},mac={mac}", "romfile=", "vectors=0"]
    if queue_pairs > 1:
        device.append("mq=on")  # the guest then gets a control queue (run by QEMU) to choose pairs with
    device += _ring_options(packed, event_idx)
    if queue_size is not None:
        device += [f"rx_queue_size={queue_size}", f"tx_queue_size={queue_size}"]
    return [
        "-chardev",
        f"socket,id=vhost-user{index},path={socket_path}",
        "-netdev",
        f"vhost-user,id=net{index},chardev=vhost-user{index},queues={queue_pairs}",
        "-device",
        ",".join(device),
    ]


def vhost_vdpa_net_args(
    index: int,
    node: str,
    *,
    mac: str | None = None,
    queue_pairs: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    queue_size: int | None = None,
    vectors: int | None = None,
) -> list[str]:
    """QEMU arguments for a virtio-net-pci NIC on the vhost-vdpa device ``node`` (/dev/vhost-vdpa-N): what one
    writes on a kernel with real vDPA. With MSI-X, unlike vhost-user-net (QEMU 7.2 under TCG polls the call
    eventfds itself here). ``mac=`` is written into the device's config space by QEMU at start-up."""
    device = [f"virtio-net-pci,id=nic{index},netdev=net{index}", "romfile="]
    if mac is not None:
        device.append(f"mac={mac}")
    if queue_pairs > 1:
        device.append("mq=on")  # QEMU reads the pair count from the device's config space
    if vectors is not None:
        device.append(f"vectors={vectors}")
    device += _ring_options(packed, event_idx)
    if queue_size is not None:
        device += [f"rx_queue_size={queue_size}", f"tx_queue_size={queue_size}"]
    return ["-netdev", f"vhost-vdpa,id=net{index},vhostdev={node}", "-device", ",".join(device)]


def vhost_user_blk_args(
    index: int,
    socket_path: str | os.PathLike[str],
    *,
    num_queues: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    queue_size: int | None = None,
) -> list[str]:
    """QEMU arguments for a vhost-user-blk-pci disk served by the back-end at ``socket_path``."""
    device = [f"vhost-user-blk-pci,id=disk{index},chardev=vhost-user{index}", f"num-queues={num_queues}"]
    device += _ring_options(packed, event_idx)
    if queue_size is not None:
        device.append(f"queue-size={queue_size}")
    return ["-chardev", f"socket,id=vhost-user{index},path={socket_path}", "-device", ",".join(device)]


def _ring_options(packed: bool, event_idx: bool) -> list[str]:
    # Both are virtio-pci device properties: QEMU offers the feature to the guest only when it is on
    # and the back-end offers it too; event_idx is on by default, packed off.
    return (["packed=on"] if packed else []) + ([] if event_idx else ["event_idx=off"])


_WARM: set[type[SimDevice]] = set()  # device kinds whose kernels this process has run
_WARM_UP_TIMEOUT = 600.0  # a cold compile on a loaded two-core machine


def warm_up(kind: type[SimDevice]) -> None:
    """Run one request through a throwaway device of ``kind`` (NetDevice or BlkDevice), once per process.

    The kernels come from Numba's on-disk cache when it is warm (well under a second) and are compiled
    otherwise; either way, after this a guest's first kick is served at once.
    """
    if kind in _WARM:
        return
    if issubclass(kind, NetDevice):
        with NetHarness(memory_size=4 << 20) as harness:
            device, driver = harness.add("vu-warm-net", event_idx=True)
            frame = ethernet(device.mac, b"\x02\0\0\0\0\x01", 0x88B5, bytes(46))
            driver.post_rx(0, 1)
            driver.send(0, [frame])
            [received] = driver.receive(0, 1, timeout=_WARM_UP_TIMEOUT)
            if received.frame != frame:
                raise VdpasimError("warm-up: the net device returned a different frame")
            driver.wait_used(driver.tx(0), 1, timeout=_WARM_UP_TIMEOUT)
            if supports(device, "set_vq_enabled"):
                # A disabled ring has a path of its own (vhost-user: QEMU disables the pairs not in use).
                device.set_vq_enabled(driver.tx(0), False)  # type: ignore[attr-defined]
                driver.send(0, [frame])
                driver.wait_used(driver.tx(0), 1, timeout=_WARM_UP_TIMEOUT)
    elif issubclass(kind, BlkDevice):
        _warm_up_blk()
    else:
        raise UsageError(f"no warm-up for {kind.__name__}")
    _WARM.add(kind)


def _warm_up_blk() -> None:
    """One read of sector 0 from a tiny RAM disk, driven as Linux's virtio_blk would."""
    device = BlkDevice(BlkConfig(name="vu-warm-blk", capacity=8))
    memory = GuestMemory(1 << 20)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        up = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
        device.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        device.set_status(up)
        device.set_driver_features(device.get_device_features() & ~(1 << c.VIRTIO_F_RING_PACKED))
        device.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK)
        device.set_map(memory.table)
        queue = DriverQueue(memory, 16, event_idx=True)
        device.set_vq_num(0, 16)
        device.set_vq_address(0, queue.desc_addr, queue.driver_addr, queue.device_addr)
        device.set_vq_kick(0, kick)
        device.set_vq_call(0, call)
        device.set_vq_ready(0, True)
        device.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)
        queue.add([struct.pack("<IIQ", c.VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        os.eventfd_write(kick, 1)
        if not select.select([call], [], [], _WARM_UP_TIMEOUT)[0]:
            raise VdpasimError(f"warm-up: the blk device did not answer within {_WARM_UP_TIMEOUT:.0f} s")
        [used] = queue.used()
        if used.data[-1] != c.VIRTIO_BLK_S_OK:
            raise VdpasimError(f"warm-up: the blk device answered status {used.data[-1]}")
    finally:
        device.close()  # stops its data-path thread before the eventfds and memory go
        memory.close()
        os.close(kick)
        os.close(call)


def vhost_lines(log: str) -> list[str]:
    """Lines of a QEMU log that mention vhost: its vhost errors and warnings all do."""
    return [line for line in log.splitlines() if "vhost" in line.lower()]


@dataclass
class RigResult:
    """What one run produced, for a test to assert on."""

    boot: BootResult
    backend_log: list[str]  # WARNING and worse from the back-ends and devices during the run
    counters: dict[str, list[dict[str, int]]]  # device name -> the queue counters after the run
    vstats: dict[str, dict[int, dict[str, int]]]  # net device name -> queue index -> vdpa vstats

    @property
    def qemu_log(self) -> str:
        return self.boot.qemu_output

    @property
    def vhost_lines(self) -> list[str]:
        return vhost_lines(self.boot.qemu_output)

    def result(self, kind: str) -> dict:
        return self.boot.result(kind)

    def net_totals(self, name: str) -> dict[str, int]:
        """A net device's vstats summed over its receive queues and over its transmit queues."""
        totals: dict[str, int] = {}
        for stats in self.vstats[name].values():
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def check(self) -> RigResult:
        """Raise GuestRunError unless the guest passed, QEMU said nothing about vhost and the back-ends
        logged no warning."""
        problems = []
        tail_shown = False
        try:
            self.boot.check()
        except GuestRunError as exc:  # reported with the back-end's view, which often explains it
            problems.append(str(exc))  # ends with the console's tail
            tail_shown = True
        if self.vhost_lines:
            problems.append("QEMU's log mentions vhost:\n" + "\n".join(self.vhost_lines))
        if self.backend_log:
            problems.append("the back-ends logged:\n" + "\n".join(self.backend_log))
        if problems:
            if not tail_shown:
                problems.append(self.boot.tail())
            raise GuestRunError("\n".join(problems))
        return self


class _Collector(logging.Handler):
    """Keeps the formatted WARNING-and-worse records of one run (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class _Backend:
    device: SimDevice
    server: VhostUserServer
    args: list[str]
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop()  # joins the server thread: the session has reset the device when it returns


@dataclass
class VhostUserRig:
    """Devices served over vhost-user in this process and one guest boot attached to them.

    ``log_dir`` receives the guest's console log (``console.log``) and QEMU's (``console.log.qemu``),
    kept for post-mortems; the sockets live elsewhere (see the module docstring).
    """

    image: GuestImage
    log_dir: Path
    memory_mb: int = DEFAULT_MEMORY_MB
    timeout: float = 120.0  # a boot takes 4-12 s; a back-end that stopped answering leaves QEMU waiting
    # One host thread for both vCPUs: with multi-threaded TCG a Linux guest has died (once in ~50 boots)
    # with "Oops: int3" at a static-key site it had just patched on its other vCPU: QEMU 7.2 ran stale
    # translated code. Single-threaded TCG invalidates it for every vCPU at once; it costs ~30 % per boot.
    accel: str = "tcg,thread=single"
    # "vhost-user": QEMU connects to the sockets; "vhost-vdpa": QEMU runs under the bypass supervisor and opens
    # /dev/vhost-vdpa-N, each a vhost-vdpa server bridged to the device's socket (bridge/bypass.py).
    transport: str = "vhost-user"
    # MSI-X vectors of a vhost-vdpa NIC (None: QEMU's default). 0 gives it the same interrupts as a
    # vhost-user NIC, which needs vectors=0 here (see vhost_user_net_args): for like-for-like comparisons.
    vhost_vdpa_vectors: int | None = None
    backends: list[_Backend] = field(default_factory=list, init=False)
    nodes: dict[str, VhostVdpaNode] = field(default_factory=dict, init=False)
    supervisor: Supervisor | None = field(default=None, init=False)
    bridges: list[Supervisor] = field(default_factory=list, init=False)  # reverse bridges (blk over vhost-vdpa)
    bridge_errors: list[str] = field(default_factory=list, init=False)
    socket_dir: Path | None = field(default=None, init=False)
    vm: GuestVM | None = field(default=None, init=False)

    # ----- devices -----
    def add_net(
        self,
        config: NetConfig,
        *,
        packed: bool = False,
        event_idx: bool = True,
        queue_size: int | None = None,
    ) -> NetDevice:
        """Serve a net device; the guest sees it as a virtio-net-pci NIC with all its queue pairs."""
        device = NetDevice(config)
        mac = format_mac(device.mac)

        def qemu_args(index: int, path: Path) -> list[str]:
            if self.transport == "vhost-vdpa":
                from bridge.bypass import VhostVdpaNode

                node = f"/dev/vhost-vdpa-{index}"
                self.nodes[node] = VhostVdpaNode(device.name, str(path))
                # mac=: QEMU writes its NIC's MAC into the device at start-up (its default, without one).
                return vhost_vdpa_net_args(
                    index, node, mac=mac, queue_pairs=config.max_vqp, packed=packed, event_idx=event_idx,
                    queue_size=queue_size, vectors=self.vhost_vdpa_vectors,
                )  # fmt: skip
            return vhost_user_net_args(
                index, path, mac=mac, queue_pairs=config.max_vqp, packed=packed, event_idx=event_idx,
                queue_size=queue_size,
            )  # fmt: skip

        self._serve(device, qemu_args)
        return device

    def add_blk(
        self,
        config: BlkConfig,
        *,
        packed: bool = False,
        event_idx: bool = True,
        queue_size: int | None = None,
    ) -> BlkDevice:
        """Serve a blk device; the guest sees it as a vhost-user-blk-pci disk with all its queues.

        Over "vhost-vdpa" (QEMU 7.2 has no vhost-vdpa block front-end), QEMU's vhost-user-blk connects to the
        reverse bridge (``vdpasim bridge``), a process under the bypass supervisor whose vhost-vdpa client opens
        the device's node: QEMU -> vhost-user -> bridge -> vhost-vdpa ioctls -> node -> vhost-user -> device.
        """
        device = BlkDevice(config)

        def qemu_args(index: int, path: Path) -> list[str]:
            if self.transport == "vhost-vdpa":
                path = self._reverse_bridge(index, device.name, path)
            return vhost_user_blk_args(
                index, path, num_queues=config.num_queues, packed=packed, event_idx=event_idx, queue_size=queue_size
            )

        self._serve(device, qemu_args)
        return device

    def _reverse_bridge(self, index: int, name: str, device_socket: Path) -> Path:
        """Start ``vdpasim bridge`` under a supervisor serving /dev/vhost-vdpa-<index>; its socket's path."""
        from bridge.bypass import VhostVdpaNode

        assert self.socket_dir is not None
        node = f"/dev/vhost-vdpa-{index}"
        self.nodes[node] = VhostVdpaNode(name, str(device_socket))
        path = self.socket_dir / f"{index}-bridge.sock"
        argv = [sys.executable, "-m", "vdpasim", "bridge", "--vhost-vdpa", node, "--vhost-user", str(path)]
        bridge = Supervisor(argv, {node: self.nodes[node]}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.bridges.append(bridge)
        deadline = time.monotonic() + 60  # the bridge imports numpy and opens the node first
        while not path.exists():
            if bridge.process.poll() is not None or time.monotonic() > deadline:
                stderr = bridge.process.communicate(timeout=5)[1] if bridge.process.poll() is not None else b""
                raise VdpasimError(f"the reverse bridge did not start: {stderr.decode(errors='replace')}")
            time.sleep(0.05)
        return path

    def _stop_bridges(self) -> None:
        for bridge in self.bridges:
            if bridge.closed:
                continue
            if bridge.process.poll() is None:
                bridge.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    bridge.process.wait(10)
            bridge.close()  # kills what is left, releases the node
            if bridge.process.stderr is not None:
                self.bridge_errors += bridge.process.stderr.read().decode(errors="replace").splitlines()
                bridge.process.stderr.close()

    def _serve(self, device: SimDevice, make_args: Callable[[int, Path], list[str]]) -> None:
        if self.vm is not None:
            device.close()
            raise UsageError("add devices before run(): QEMU's devices are fixed at start-up")
        try:
            if self.socket_dir is None:
                self.socket_dir = Path(tempfile.mkdtemp(prefix="vdpasim-vu-"))  # mode 0700
            index = len(self.backends)
            path = self.socket_dir / f"{index}.sock"
            server = VhostUserServer(device, str(path), name=device.name)
            server.start()
        except BaseException:
            device.close()
            raise
        backend = _Backend(device, server, [])
        self.backends.append(backend)  # close() tears it down, whatever happens next
        backend.args = make_args(index, path)

    # ----- the boot -----
    def qemu_args(self) -> list[str]:
        return [arg for backend in self.backends for arg in backend.args]

    def run(self, workload: str | Sequence[str], params: Mapping[str, object] | None = None) -> RigResult:
        """Boot the guest with ``workload``, wait for it to power off, and collect everything."""
        if self.vm is not None:
            raise UsageError("a rig boots once: make another for the next run")
        if not self.backends:
            raise UsageError("no device to attach: call add_net() or add_blk() first")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for kind in {type(backend.device) for backend in self.backends}:
            warm_up(kind)
        collector = _Collector()
        watched = logging.getLogger("vdpasim")  # devices, sessions and servers all log below it
        watched.addHandler(collector)
        try:
            self.vm = GuestVM(
                self.image,
                workload,
                params,
                self.qemu_args(),
                log_path=self.log_dir / "console.log",
                timeout=self.timeout,
                memory_mb=self.memory_mb,
                accel=self.accel,
                shared_memory=True,
                launcher=self._launch,
            )
            with self.vm:
                boot = self.vm.wait()
            if self.supervisor is not None:
                self.supervisor.close()  # releases the nodes QEMU held: their servers reset the devices
            self._stop_bridges()
            for backend in self.backends:
                backend.stop()
        finally:
            watched.removeHandler(collector)
        counters = {b.device.name: b.device.stats() for b in self.backends}
        vstats = {
            b.device.name: {i: b.device.vstats(i) for i in range(len(b.device.vqs)) if b.device.queue_role(i)}
            for b in self.backends
            if isinstance(b.device, NetDevice)
        }
        backend_log = collector.lines + self.bridge_errors  # the bridge processes log warnings on stderr
        return RigResult(boot=boot, backend_log=backend_log, counters=counters, vstats=vstats)

    def _launch(self, argv: list[str], **popen: object) -> subprocess.Popen:
        if self.transport == "vhost-user":
            return subprocess.Popen(argv, **popen)  # type: ignore[call-overload]
        self.supervisor = Supervisor(argv, self.nodes, **popen)
        return self.supervisor.process

    # ----- tear-down -----
    def close(self) -> None:
        """End QEMU (by PID), the servers and the devices; remove the sockets. Safe to call twice."""
        if self.vm is not None:
            self.vm.stop()
        if self.supervisor is not None:
            self.supervisor.close()
        self._stop_bridges()
        first_error: BaseException | None = None
        for backend in self.backends:  # every one is torn down; the first failure is raised at the end
            for step in (backend.stop, backend.device.close):
                try:
                    step()
                except Exception as exc:
                    first_error = first_error or exc
        self.backends.clear()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
        if first_error is not None:
            raise first_error

    def __enter__(self) -> VhostUserRig:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----- what the e2e tests assert of a net run, on either door -----
def assert_counters_agree(run: RigResult, name: str, guest: dict[str, int]) -> None:
    """The device's vstats, summed over its queues, are the guest interface's counters."""
    device = run.net_totals(name)
    assert (device["tx packets"], device["tx bytes"]) == (guest["tx_packets"], guest["tx_bytes"])
    assert (device["rx packets"], device["rx bytes"]) == (guest["rx_packets"], guest["rx_bytes"])
    assert device["tx errors"] == device["rx errors"] == device["rx overruns"] == 0
    assert guest["tx_errors"] == guest["rx_errors"] == guest["rx_dropped"] == guest["tx_dropped"] == 0


def assert_loopback(loop: dict, mac_text: str, count: int, seed: int) -> None:
    """Own-MAC and broadcast frames came back once each, byte for byte; foreign-MAC frames never did."""
    mac = bytes.fromhex(mac_text.replace(":", ""))
    frames = [loopback_frame(mac, seed, seq) for seq in range(count)]
    passed = [seq for seq in range(count) if loopback_kind(seq) != "foreign"]
    assert loop["mac"] == mac_text
    assert (loop["sent"], loop["send_errors"], loop["received"]) == (count, 0, len(passed))
    assert (loop["duplicates"], loop["corrupt"], loop["other_frames"], loop["corrupt_seqs"]) == (0, 0, 0, [])
    assert loop["missing"] == [seq for seq in range(count) if seq not in passed]
    third = count // 3
    assert loop["kinds"] == {
        "own": {"sent": third, "back": third},
        "broadcast": {"sent": third, "back": third},
        "foreign": {"sent": third, "back": 0},
    }
    assert loop["pkttype"] == {"host": third, "broadcast": third, "multicast": 0, "otherhost": 0}
    # The guest compared every frame it got with the one it sent (memcmp) and hashed both streams;
    # the host rebuilds the frames and checks the guest's per-frame and stream digests against them.
    assert loop["frames"] == [
        [seq, len(frame), f"{fnv1a64(frame):016x}", int(seq in passed)] for seq, frame in enumerate(frames)
    ]
    sent = back = 0xCBF29CE484222325
    for seq, frame in enumerate(frames):
        sent = fnv1a64(frame, sent)
        if seq in passed:
            back = fnv1a64(frame, back)
    assert (loop["digest_sent"], loop["digest_back"]) == (f"{sent:016x}", f"{back:016x}")
