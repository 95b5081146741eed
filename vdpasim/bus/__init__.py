"""The vDPA bus in userspace and its management plane: the vdpa generic-netlink family.

* ``netlink`` declares the family for pyroute2 (numbers, ``vdpa_msg``) and its client, ``VdpaSocket``,
  which talks to the kernel (kernel mode) or to vdpasim's own server over any connected socket;
* ``model`` is the bus: management devices ``vdpasim_net`` and ``vdpasim_blk``, the devices they
  create, and the kernel's rules for creating, inspecting and deleting them;
* ``server`` answers the family's requests over a ``Bus`` byte for byte as Linux 6.12 does, without
  doing any I/O itself (the daemon, the bypass supervisor and the tests move the bytes).
"""

from .model import VDPASIM_BLK, VDPASIM_NET, Bus, BusError, DevSetConfig, MgmtDev, VdpaDevice
from .netlink import VdpaSocket, vdpa_msg
from .server import VdpaNetlinkServer, datagrams

__all__ = [
    "Bus",
    "BusError",
    "DevSetConfig",
    "MgmtDev",
    "VdpaDevice",
    "VDPASIM_NET",
    "VDPASIM_BLK",
    "VdpaSocket",
    "vdpa_msg",
    "VdpaNetlinkServer",
    "datagrams",
]
