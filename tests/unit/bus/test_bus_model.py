"""The userspace vDPA bus without netlink: the kernel's rules as the daemon and the CLI meet them.

The wire tests (test_netlink_server.py) cover what vdpasim's own management devices refuse; these
cover the rules that need other management devices to show (a class check, the multi-class
ambiguity), the readable messages behind each errno, the listener hooks the daemon uses, that a
deleted device releases what it held, and that concurrent requests cannot register a name twice.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading

import pytest

from vdpasim.bus import VDPASIM_BLK, VDPASIM_NET, Bus, BusError, DevSetConfig
from vdpasim.bus.model import NET_ATTRS_MASK
from vdpasim.virtio import constants as c

MAC = bytes.fromhex("525400000001")


@pytest.fixture
def bus():
    bus = Bus()
    yield bus
    bus.close()


def refusal(call, *args, **kwargs) -> BusError:
    with pytest.raises(BusError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_add_get_delete(bus):
    vdev = bus.add("vdpa0", "vdpasim_net", DevSetConfig(mac=MAC, mtu=9000, max_vqp=2))
    assert bus.get("vdpa0") is vdev and bus.devices() == [vdev]
    assert (vdev.device_id, vdev.nvqs, vdev.max_vq_size, vdev.min_vq_size) == (c.VIRTIO_ID_NET, 5, 256, 1)
    assert (vdev.config.mtu, vdev.device.mac) == (9000, MAC)
    bus.delete("vdpa0")
    assert bus.devices() == []
    error = refusal(bus.get, "vdpa0")
    assert (error.errno, error.extack, str(error)) == (errno.ENODEV, "vdpa: device not found", "no device vdpa0")


def test_every_refusal_has_a_readable_message(bus):
    bus.add("vdpa0", "vdpasim_net")
    duplicate = refusal(bus.add, "vdpa0", "vdpasim_net")
    assert (duplicate.errno, duplicate.extack, str(duplicate)) == (errno.EEXIST, None, "device vdpa0 already exists")
    nameless = refusal(bus.add, None, "vdpasim_net")
    assert (nameless.errno, nameless.extack, str(nameless)) == (errno.EINVAL, None, "no device name")
    lost = refusal(bus.add, "x", "vdpasim_nope")
    assert (lost.errno, str(lost)) == (errno.ENODEV, "no management device vdpasim_nope")
    assert lost.extack == "vdpa: Fail to find the specified management device"


def test_mgmtdev_handles_need_the_right_bus_name(bus):
    assert bus.mgmtdev("vdpasim_net") is VDPASIM_NET
    for name, bus_name in (("vdpasim_net", "pci"), ("vdpasim_none", None), (None, None)):
        error = refusal(bus.mgmtdev, name, bus_name)
        assert error.extack == "vdpa: Fail to find the specified mgmt device"
        assert error.errno == (errno.EINVAL if name is None else errno.ENODEV)
    on_a_bus = dataclasses.replace(VDPASIM_NET, name="0000:01:00.2", bus="pci")
    assert Bus((on_a_bus,)).mgmtdev("0000:01:00.2", "pci") is on_a_bus
    assert refusal(Bus((on_a_bus,)).mgmtdev, "0000:01:00.2").errno == errno.ENODEV


def test_net_attributes_on_a_management_device_without_the_net_class():
    # A management device that accepts the net attributes but creates no net device: the class check.
    odd = dataclasses.replace(VDPASIM_BLK, name="odd_blk", config_attr_mask=NET_ATTRS_MASK)
    error = refusal(Bus((odd,)).add, "d0", "odd_blk", DevSetConfig(mtu=1500))
    assert error.errno == errno.EINVAL
    assert error.extack == "vdpa: Network class attributes provided on unsupported management device"


def test_device_features_on_a_multi_class_management_device_are_ambiguous():
    both = dataclasses.replace(
        VDPASIM_NET, name="both", id_table=(c.VIRTIO_ID_NET, c.VIRTIO_ID_BLOCK), config_attr_mask=1 << 20
    )
    device_bits = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_NET_F_MAC
    error = refusal(Bus((both,)).add, "d0", "both", DevSetConfig(device_features=device_bits))
    assert (error.errno, error.extack) == (
        errno.EINVAL,
        "vdpa: Management device supports multi-class while device features specified are ambiguous",
    )
    transport_only = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_F_ACCESS_PLATFORM  # no device bits: not ambiguous
    bus = Bus((both,))
    try:
        assert bus.add("d0", "both", DevSetConfig(device_features=transport_only)).device.device_features == (
            transport_only
        )
    finally:
        bus.close()


def test_network_attributes_need_cap_net_admin(bus):
    error = refusal(bus.add, "vdpa0", "vdpasim_net", DevSetConfig(mac=MAC), net_admin=False)
    assert (error.errno, error.extack) == (errno.EPERM, None)
    assert bus.add("vdpa1", "vdpasim_net", net_admin=False).name == "vdpa1"  # nothing to check without them


def test_the_kernels_order_of_checks(bus):
    # max_vqp 0 is refused before the management device is even looked up...
    early = refusal(bus.add, "x", "vdpasim_nope", DevSetConfig(max_vqp=0))
    assert early.extack == "vdpa: At least one pair of VQs is required"
    # ...and the model refuses bad features before the name is found taken, as a kernel simulator does.
    bus.add("vdpa0", "vdpasim_net")
    bad = refusal(bus.add, "vdpa0", "vdpasim_net", DevSetConfig(device_features=1 << 0 | 1 << c.VIRTIO_F_VERSION_1))
    assert bad.errno == errno.EINVAL and bad.extack.startswith("vdpasim_net: device_features:")


def test_listeners_see_devices_come_and_go(bus):
    events: list[tuple[str, str, bool]] = []
    bus.subscribe(lambda event, vdev: events.append((event, vdev.name, vdev.name in {v.name for v in bus.devices()})))
    bus.add("vdpa0", "vdpasim_net")
    bus.add("blk0", "vdpasim_blk")
    bus.delete("vdpa0")
    bus.close()
    # "del" comes while the device is still on the bus (the daemon stops serving it first).
    assert events == [("add", "vdpa0", True), ("add", "blk0", True), ("del", "vdpa0", True), ("del", "blk0", True)]


def test_deleting_a_device_releases_its_disk(bus, tmp_path):
    image = tmp_path / "disk.img"
    vdev = bus.add("blk0", "vdpasim_blk", DevSetConfig(extension={"path": str(image), "create": True}))
    fd = vdev.device.backing.fd
    assert os.path.samestat(os.fstat(fd), os.stat(image))
    bus.delete("blk0")
    assert not any(
        os.path.exists(f"/proc/self/fd/{n}") and os.path.realpath(f"/proc/self/fd/{n}") == str(image)
        for n in os.listdir("/proc/self/fd")
    )


def test_set_attr(bus):
    bus.add("vdpa0", "vdpasim_net", DevSetConfig(mac=MAC))
    bus.add("blk0", "vdpasim_blk")
    assert bus.set_attr("vdpa0", bytes.fromhex("525400000009")) is None
    assert bus.get("vdpa0").device.mac == bytes.fromhex("525400000009")
    bus.get("vdpa0").device.reset()
    assert bus.get("vdpa0").device.mac == bytes.fromhex("525400000009")  # the new MAC outlives a device reset
    assert bus.set_attr("blk0", MAC) == "vdpa: blk0 device not supported"
    assert refusal(bus.set_attr, "vdpa0", bytes.fromhex("330000000001")).extack == "vdpa: Invalid MAC address"
    no_set = dataclasses.replace(VDPASIM_NET, set_attr=False)
    other = Bus((no_set,))
    try:
        other.add("n0", "vdpasim_net")
        assert refusal(other.set_attr, "n0", MAC).extack == "vdpa: Operation not supported by the device."
    finally:
        other.close()


def test_one_name_one_device_under_concurrent_adds(bus):
    results: list[str] = []
    barrier = threading.Barrier(8)

    def add() -> None:
        barrier.wait()
        try:
            bus.add("race0", "vdpasim_net")
            results.append("added")
        except BusError as error:
            results.append(errno.errorcode[error.errno])

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["EEXIST"] * 7 + ["added"]
    assert [v.name for v in bus.devices()] == ["race0"]


def test_a_failing_listener_does_not_undo_the_change(bus, caplog):
    def broken(event, vdev):
        raise RuntimeError(f"cannot serve {vdev.name}")

    bus.subscribe(broken)
    assert bus.add("vdpa0", "vdpasim_net").name == "vdpa0"
    bus.delete("vdpa0")
    assert bus.devices() == []
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        "add listener failed for vdpa0",
        "del listener failed for vdpa0",
    ]
