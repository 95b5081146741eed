"""Which bus the daemon serves: chosen once at start-up, kernel only where VDUSE and the family exist."""

from __future__ import annotations

import pytest

from vdpasim import daemon
from vdpasim.vduse import device as vduse_device


@pytest.mark.parametrize(
    ("vduse", "family", "expected"),
    [(True, True, "kernel"), (True, False, "user"), (False, True, "user"), (False, False, "user")],
)
def test_auto_mode(monkeypatch: pytest.MonkeyPatch, vduse: bool, family: bool, expected: str) -> None:
    monkeypatch.setattr(vduse_device, "vduse_available", lambda: vduse)
    monkeypatch.setattr(daemon, "kernel_family_present", lambda: family)
    assert daemon.choose_mode("auto") == expected
    assert daemon.choose_mode(None) == expected


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_requested_mode_is_kept(mode: str) -> None:
    assert daemon.choose_mode(mode) == mode


def test_kernel_bus_maps_vdpasim_net_onto_vduse_features() -> None:
    from vdpasim.bus.model import DevSetConfig

    net = daemon.KERNEL_MGMTDEVS[0]
    assert [m.name for m in daemon.KERNEL_MGMTDEVS] == ["vdpasim_net", "vdpasim_blk"]
    config = net.build_config("k0", DevSetConfig())
    assert config.device_features & vduse_device.VDUSE_NET_UNSUPPORTED == 0
    device = net.build_device(config)
    try:
        vduse_device.vduse_features(device)  # VDUSE's limits hold: no UsageError
    finally:
        device.close()
