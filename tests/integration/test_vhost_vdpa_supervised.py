"""VhostVdpaClient in a real process, against VhostVdpaServer through the seccomp supervisor.

A small program opens /dev/vhost-vdpa-0 with the client, as it would open the kernel's char device, and
drives a virtio-net device through it: feature negotiation, IOTLB batches mapping its memfd guest RAM,
rings with its own kick and call eventfds, frames there and back, suspend/resume, refusals. Every ioctl
and IOTLB write is trapped and answered by the server here, over a real NetDevice whose data path reads
the program's memory through the memfd the supervisor fetched from /proc/PID/map_files, and signals the
program's eventfds fetched with pidfd_getfd.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from bridge.supervisor.supervisor import FIRST_NODE_FD, Supervisor, TargetMemory
from bridge.vhost_user.client import VhostUserClient
from bridge.vhost_user.server import VhostUserServer
from bridge.vhost_vdpa.client import VhostVdpaClient
from bridge.vhost_vdpa.server import VhostVdpaServer
from vdpasim.config import NetConfig
from vdpasim.devices.net import NetDevice
from vdpasim.testing.driver import GuestMemory
from vdpasim.testing.net import BROADCAST, NetDriver, ethernet
from vdpasim.testing.vhost_vdpa import FakeCaller, ServerTransport

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent(
    """
    import json
    from bridge.vhost_vdpa.client import VhostVdpaClient
    from vdpasim.errors import PeerError
    from vdpasim.testing.driver import GuestMemory
    from vdpasim.testing.net import BROADCAST, NetDriver, ethernet

    def errno_of(call, *args):
        try:
            call(*args)
        except PeerError as exc:
            return exc.errno
        return 0

    out = {}
    client = VhostVdpaClient("/dev/vhost-vdpa-0")
    out["fd"] = client._io.fd
    out["backend"] = client.backend_features
    out["suspend"] = hasattr(client, "suspend")
    out["vqs"] = client.get_vq_count()
    out["device_id"] = client.get_device_id()
    out["mac"] = client.get_config(0, 6).hex()
    out["iova"] = [client.get_iova_range().first, client.get_iova_range().last]
    memory = GuestMemory(8 << 20)
    driver = NetDriver(client, memory, queue_size=64)
    driver.initialize()
    out["status"] = client.get_status()
    frames = [ethernet(BROADCAST, bytes.fromhex("020000000099"), 0x88B5, bytes([i]) * 60) for i in range(5)]
    driver.post_rx(0, 8)
    driver.send(0, frames)
    out["frames_ok"] = [r.frame for r in driver.receive(0, 5, timeout=120)] == frames
    client.suspend()
    out["tx_base"] = client.get_vq_state(1).last_avail
    client.resume()
    driver.send(0, frames[:1])
    out["after_resume"] = driver.receive(0, 1, timeout=120)[0].frame == frames[0]
    out["bad_ring"] = errno_of(client.set_vq_num, 7, 64)
    out["late_features"] = errno_of(client.set_driver_features, 0)
    out["bad_size"] = errno_of(client.set_vq_num, 0, 3)
    client.reset()
    out["reset_status"] = client.get_status()
    client.close()
    driver.close()
    memory.close()
    print(json.dumps(out), flush=True)
    """
)


class Node:
    def __init__(self, device: NetDevice) -> None:
        self.device = device
        self.servers: list[VhostVdpaServer] = []

    def open(self, flags: int) -> VhostVdpaServer:
        server = VhostVdpaServer(self.device, name=f"vhost-vdpa-0#{len(self.servers)}")
        self.servers.append(server)
        return server


def test_client_drives_a_net_device_through_the_supervised_server() -> None:
    device = NetDevice(NetConfig(name="sup0", mac=bytes.fromhex("02000000aa01")))
    node = Node(device)
    supervisor = Supervisor(
        [sys.executable, "-c", PROGRAM], {"/dev/vhost-vdpa-0": node}, stdout=-1, stderr=-1, cwd=str(ROOT)
    )
    try:
        out, err = supervisor.process.communicate(timeout=240)
        assert supervisor.process.returncode == 0, err.decode()[-3000:]
        supervisor.wait(10)
    finally:
        supervisor.close()
        device.close()
    result = json.loads(out.decode().splitlines()[-1])
    assert result == {
        "fd": FIRST_NODE_FD,
        "backend": 0x76,  # IOTLB_MSG_V2, IOTLB_BATCH, SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK
        "suspend": True,
        "vqs": 3,
        "device_id": 1,
        "mac": "02000000aa01",
        "iova": [0, (1 << 63) - 1],
        "status": 0xF,
        "frames_ok": True,
        "tx_base": 5,
        "after_resume": True,
        "bad_ring": errno.ENOBUFS,
        "late_features": errno.EBUSY,
        "bad_size": errno.EINVAL,
        "reset_status": 0,
    }
    (server,) = node.servers
    assert server.closed  # the program's close released the node
    assert server.stats.writes >= 3 and server.stats.commits >= 1
    assert server.stats.failures == 2  # EBUSY, EINVAL; the client answers ENOBUFS itself, knowing the queue count
    assert device.get_status() == 0 and len(device.memory) == 0  # release reset the device and its map


class SelfCaller(FakeCaller):
    """This process as the caller: ioctl arguments in a FakeCaller's memory, file mappings from /proc/self."""

    def __init__(self) -> None:
        super().__init__()
        self._proc = TargetMemory(os.getpid())

    def map_file(self, uaddr: int, size: int) -> tuple[int, int]:
        return self._proc.map_file(uaddr, size)


def test_reverse_bridge_vhost_user_in_front_of_a_vhost_vdpa_fd() -> None:
    """A vhost-user socket served over VhostVdpaClient: DPDK's vDPA framework shape, with the fd in-process.

    NetDriver -> VhostUserClient -> socket -> VhostUserServer -> VhostVdpaClient -> VhostVdpaServer ->
    NetDevice. The back-end hands the client user addresses (RingAddressSpace.USER) and the regions it
    mapped from the front-end's memfds; the client translates ring addresses to IOVAs and maps the
    regions by their address in this process, which the server resolves to the same memfds.
    """
    device = NetDevice(NetConfig(name="rev0"))
    server = VhostVdpaServer(device, name="vhost-vdpa-rev")
    vdpa = VhostVdpaClient(transport=ServerTransport(server, SelfCaller()))
    workdir = tempfile.mkdtemp(prefix="vdpasim-rev-")
    os.chmod(workdir, 0o700)
    front = VhostUserServer(vdpa, os.path.join(workdir, "rev.sock"))
    front.start()
    try:
        with GuestMemory(8 << 20) as memory, VhostUserClient(front.path) as client:
            driver = NetDriver(client, memory, queue_size=64)
            try:
                driver.initialize()
                frames = [ethernet(BROADCAST, bytes.fromhex("020000000099"), 0x88B5, bytes([i]) * 80) for i in range(4)]
                driver.post_rx(0, 8)
                driver.send(0, frames)
                assert [r.frame for r in driver.receive(0, 4, timeout=120)] == frames
                assert device.vstats(1)["tx packets"] == 4
                assert server.stats.commits >= 1 and server.mappings()
            finally:
                client.reset()
                driver.close()
    finally:
        front.stop()
        os.rmdir(workdir)
        vdpa.close()
        device.close()
    assert server.closed and len(device.memory) == 0
