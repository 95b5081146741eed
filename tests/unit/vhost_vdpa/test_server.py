"""VhostVdpaServer against the kernel's rules (drivers/vhost/vdpa.c, drivers/vhost/vhost.c), one rule a test.

Every refusal is checked for its errno, then ``check_usable`` restarts the device the way QEMU 7.2 does and
passes a frame through its rings: a refused request must leave nothing broken behind.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from bridge.vhost_vdpa import abi as a
from bridge.vhost_vdpa.server import (
    VHOST_GET_VRING_BUSYLOOP_TIMEOUT,
    VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
    IotlbRejected,
    VhostVdpaServer,
)
from vdpasim.errors import PeerError
from vdpasim.testing.vhost_vdpa import (
    ACK_DRIVER,
    DATA_VQS,
    GUEST_RAM,
    HOLE,
    MAC,
    RAM_SIZE,
    V2_BATCH,
    VdpaEnv,
    errno_of,
    fd_is_open,
)
from vdpasim.virtio import constants as c

FEATURES_OK = ACK_DRIVER | c.VIRTIO_CONFIG_S_FEATURES_OK


class NoExtras:
    """The device's operations without the optional ones (suspend, resume, config callback)."""

    def __init__(self, device) -> None:
        self._device = device

    def __getattr__(self, name: str):
        if name in ("suspend", "resume", "set_config_cb"):
            raise AttributeError(name)
        return getattr(self._device, name)


def owned(env: VdpaEnv) -> VdpaEnv:
    env.vmm.call(a.VHOST_SET_OWNER)
    return env


def rejected(env: VdpaEnv, *args, **kwargs) -> tuple[int, int]:
    """(write errno, handler errno) of an IOTLB message the server refuses in its handler."""
    with pytest.raises(IotlbRejected) as info:
        env.vmm.iotlb(*args, **kwargs)
    return info.value.errno, info.value.cause


# ===== the QEMU 7.2 path =====
def test_qemu_72_sequence_reaches_driver_ok_and_passes_frames(env: VdpaEnv) -> None:
    driver = env.qemu_start()
    assert env.server.mappings() == [
        (GUEST_RAM, HOLE, env.host, a.VHOST_ACCESS_RW),
        (GUEST_RAM + HOLE, RAM_SIZE - HOLE, env.host + HOLE, a.VHOST_ACCESS_RW),
    ]
    assert env.server.stats.commits == 1  # one set_map for the whole batch
    for tag in range(3):
        env.ping(driver, tag)
    assert env.device.vstats(1)["tx packets"] == 3
    assert [env.vmm.vring(a.VHOST_GET_VRING_BASE, idx) for idx in DATA_VQS] == [3, 3]  # one buffer each per ping
    # QEMU 7.2 reads the bases after SET_STATUS(0): the reset device answers 0 (why newer QEMUs SUSPEND first).
    assert env.qemu_stop() == [0, 0]
    assert env.server.mappings() == []
    assert env.server.stats.failures == 0
    env.check_usable()


def test_stats_count_ioctls_writes_and_time(env: VdpaEnv) -> None:
    env.qemu_start()
    stats = env.server.stats
    assert stats.writes == 4 and stats.updates == 2
    assert stats.ioctls == sum(n for name, n in stats.requests.items() if name != "IOTLB")
    assert stats.requests["SET_VRING_KICK"] == 2 and stats.seconds > 0


# ===== features and status =====
def test_set_features_after_features_ok_is_ebusy(env: VdpaEnv) -> None:
    owned(env)
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", ACK_DRIVER)
    env.vmm.put(a.VHOST_SET_FEATURES, "<Q", 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_F_ACCESS_PLATFORM)
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", FEATURES_OK)
    assert errno_of(env.vmm.put, a.VHOST_SET_FEATURES, "<Q", 0) == errno.EBUSY
    env.check_usable()


def test_features_refused_at_features_ok_are_read_back_not_failed(env: VdpaEnv) -> None:
    owned(env)
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", ACK_DRIVER)
    env.vmm.put(a.VHOST_SET_FEATURES, "<Q", 1 << c.VIRTIO_NET_F_MTU)  # no VERSION_1
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", FEATURES_OK)  # vdpa_set_status cannot fail
    assert env.vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") == ACK_DRIVER
    env.check_usable()


def test_status_may_not_clear_bits(env: VdpaEnv) -> None:
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", ACK_DRIVER)
    assert errno_of(env.vmm.put, a.VHOST_VDPA_SET_STATUS, "<B", c.VIRTIO_CONFIG_S_ACKNOWLEDGE) == errno.EINVAL
    assert env.vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") == ACK_DRIVER
    env.check_usable()


def test_status_zero_resets_and_closes_ring_eventfds(env: VdpaEnv) -> None:
    driver = env.qemu_start()
    kicks = env.server.fds()["kick"]
    assert all(fd_is_open(fd) for fd in kicks[:2])
    env.vmm.put(a.VHOST_VDPA_SET_STATUS, "<B", 0)
    assert env.vmm.get(a.VHOST_VDPA_GET_STATUS, "<B") == 0
    assert env.device.get_driver_features() == 0
    assert not any(fd_is_open(fd) for fd in kicks[:2])
    assert len(env.server.mappings()) == 2  # the vhost IOTLB outlives a reset; the device's map does not
    assert env.device.memory is not None and len(env.device.memory) == 0
    del driver
    env.check_usable()


def test_status_byte_comes_from_the_callers_memory(env: VdpaEnv) -> None:
    assert errno_of(env.server.ioctl, a.VHOST_VDPA_SET_STATUS, 0x10, env.caller) == errno.EFAULT
    env.check_usable()


# ===== backend features =====
def test_get_backend_features_offers_the_kernel_set(env: VdpaEnv) -> None:
    bits = env.vmm.get(a.VHOST_GET_BACKEND_FEATURES, "<Q")
    expected = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6)  # V2 BATCH ASID SUSPEND RESUME EAD
    assert bits == expected


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        pytest.param(1 << 9, errno.EOPNOTSUPP, id="unknown-bit"),
        pytest.param(1 << 63, errno.EOPNOTSUPP, id="bit-63"),
        pytest.param(1 << a.VHOST_BACKEND_F_DESC_ASID, errno.EINVAL, id="desc_asid-without-asid"),
        pytest.param(
            1 << a.VHOST_BACKEND_F_DESC_ASID | 1 << a.VHOST_BACKEND_F_IOTLB_ASID, errno.EOPNOTSUPP, id="desc_asid"
        ),
        pytest.param(1 << a.VHOST_BACKEND_F_IOTLB_PERSIST, errno.EOPNOTSUPP, id="persist"),
    ],
)
def test_set_backend_features_refusals(env: VdpaEnv, features: int, expected: int) -> None:
    assert errno_of(env.vmm.put, a.VHOST_SET_BACKEND_FEATURES, "<Q", features) == expected
    env.check_usable()


def test_suspend_bits_need_the_operation() -> None:
    env = VdpaEnv()
    env.server.close()
    env.server = VhostVdpaServer(NoExtras(env.device), name="plain")
    env.vmm.server = env.server
    try:
        assert not env.vmm.get(a.VHOST_GET_BACKEND_FEATURES, "<Q") & (3 << a.VHOST_BACKEND_F_SUSPEND)
        for bit in (a.VHOST_BACKEND_F_SUSPEND, a.VHOST_BACKEND_F_RESUME):
            assert errno_of(env.vmm.put, a.VHOST_SET_BACKEND_FEATURES, "<Q", 1 << bit) == errno.EOPNOTSUPP
        env.vmm.call(a.VHOST_VDPA_SUSPEND)  # no DRIVER_OK yet: 0, as the kernel answers
        env.qemu_start()
        assert errno_of(env.vmm.call, a.VHOST_VDPA_SUSPEND) == errno.EOPNOTSUPP
        assert errno_of(env.vmm.call, a.VHOST_VDPA_RESUME) == errno.EOPNOTSUPP
        env.check_usable()
    finally:
        env.close()


# ===== ownership and requests vhost-vdpa does not serve =====
def test_second_set_owner_is_ebusy(env: VdpaEnv) -> None:
    owned(env)
    assert errno_of(env.vmm.call, a.VHOST_SET_OWNER) == errno.EBUSY
    env.check_usable()


def test_vring_requests_need_an_owner(env: VdpaEnv) -> None:
    assert errno_of(env.vmm.put, a.VHOST_SET_VRING_NUM, "<II", 0, 64) == errno.EPERM
    assert env.vmm.get(a.VHOST_GET_FEATURES, "<Q")  # device requests do not
    env.check_usable()


def test_reset_owner_is_not_a_vhost_vdpa_request(env: VdpaEnv) -> None:
    owned(env)
    assert errno_of(env.vmm.call, a.VHOST_RESET_OWNER, struct.pack("<I", 0)) == errno.ENOTTY
    assert errno_of(env.vmm.call, a.VHOST_RESET_OWNER) == errno.EFAULT  # arg 0: the ring index is unreadable
    env.check_usable()


@pytest.mark.parametrize("request_", [a.VHOST_SET_LOG_BASE, a.VHOST_SET_LOG_FD], ids=["log_base", "log_fd"])
def test_dirty_log_requests_are_enotty(env: VdpaEnv, request_: int) -> None:
    assert errno_of(env.vmm.call, request_, bytes(8)) == errno.ENOTTY
    env.check_usable()


def test_unknown_ioctl(env: VdpaEnv) -> None:
    owned(env)
    unknown = 0xC008AF5A
    assert errno_of(env.vmm.call, unknown, struct.pack("<II", 0, 0)) == errno.ENOTTY
    assert errno_of(env.vmm.call, unknown, struct.pack("<II", 7, 0)) == errno.ENOBUFS  # index checked first
    assert errno_of(env.vmm.call, 0x1234, bytes(8)) == errno.ENOTTY
    env.check_usable()


def test_set_mem_table_is_checked_then_ignored(env: VdpaEnv) -> None:
    owned(env)
    region = struct.pack("<QQQQ", 0, 4096, 0x7000, 0)
    env.vmm.call(a.VHOST_SET_MEM_TABLE, struct.pack("<II", 1, 0) + region)
    assert env.server.mappings() == []
    assert errno_of(env.vmm.call, a.VHOST_SET_MEM_TABLE, struct.pack("<II", 0, 1)) == errno.EOPNOTSUPP
    assert errno_of(env.vmm.call, a.VHOST_SET_MEM_TABLE, struct.pack("<II", 65, 0)) == errno.E2BIG
    assert errno_of(env.vmm.call, a.VHOST_SET_MEM_TABLE, struct.pack("<II", 2, 0) + region) == errno.EFAULT
    env.check_usable()


def test_busyloop_timeout_is_stored(env: VdpaEnv) -> None:
    owned(env)
    env.vmm.put(VHOST_SET_VRING_BUSYLOOP_TIMEOUT, "<II", 1, 50)
    assert env.vmm.vring(VHOST_GET_VRING_BUSYLOOP_TIMEOUT, 1) == 50
    env.check_usable()


# ===== config space =====
def test_config_reads_and_writes(env: VdpaEnv) -> None:
    assert env.vmm.get(a.VHOST_VDPA_GET_CONFIG_SIZE, "<I") == 12
    assert env.vmm.get_config(0, 6) == MAC
    env.vmm.set_config(0, bytes.fromhex("020000000042"))
    assert env.vmm.get_config(0, 6) == bytes.fromhex("020000000042")
    env.vmm.set_config(8, b"\x07\x00")  # a read-only field: set_config cannot fail, the value stays
    assert env.vmm.get_config(8, 2) == b"\x01\x00"
    env.vmm.set_config(0, MAC)
    env.check_usable()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0), (13, 1), (10, 4), (0, 13), (0, 0xFFFFFFFF)],
    ids=["len-0", "off-past-end", "len-past-end", "too-long", "huge"],
)
def test_config_range_refusals_are_einval(env: VdpaEnv, offset: int, length: int) -> None:
    header = a.VHOST_VDPA_CONFIG.pack(offset, length)
    assert errno_of(env.vmm.call, a.VHOST_VDPA_GET_CONFIG, header) == errno.EINVAL
    assert errno_of(env.vmm.call, a.VHOST_VDPA_SET_CONFIG, header) == errno.EINVAL
    env.check_usable()


def test_config_buffer_outside_memory_is_efault(env: VdpaEnv) -> None:
    end = env.caller.base + len(env.caller.memory)
    env.caller.write(end - 8, a.VHOST_VDPA_CONFIG.pack(0, 6))  # header readable, buffer past the end
    assert errno_of(env.server.ioctl, a.VHOST_VDPA_GET_CONFIG, end - 8, env.caller) == errno.EFAULT
    assert errno_of(env.server.ioctl, a.VHOST_VDPA_SET_CONFIG, end - 8, env.caller) == errno.EFAULT
    env.check_usable()


def test_config_call_eventfd_and_unbind(env: VdpaEnv) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        env.vmm.put(a.VHOST_VDPA_SET_CONFIG_CALL, "<i", fd)
        ours = env.server.fds()["config"][0]
        assert ours is not None and fd_is_open(ours)
        env.device.config_changed()
        assert os.eventfd_read(fd) == 1
        assert errno_of(env.vmm.put, a.VHOST_VDPA_SET_CONFIG_CALL, "<i", 0x7FFFFFF0) == errno.EBADF
        assert env.server.fds()["config"] == [None] and not fd_is_open(ours)  # the failed call unbound it
        env.vmm.put(a.VHOST_VDPA_SET_CONFIG_CALL, "<i", fd)
        env.vmm.put(a.VHOST_VDPA_SET_CONFIG_CALL, "<i", -1)
        assert env.server.fds()["config"] == [None]
    finally:
        os.close(fd)
    env.check_usable()


# ===== device facts =====
def test_device_facts(env: VdpaEnv) -> None:
    vmm = env.vmm
    assert vmm.get(a.VHOST_VDPA_GET_DEVICE_ID, "<I") == 1
    assert vmm.get(a.VHOST_VDPA_GET_VRING_NUM, "<H") == 256
    assert vmm.get(a.VHOST_VDPA_GET_VQS_COUNT, "<I") == 3
    assert vmm.get(a.VHOST_VDPA_GET_AS_NUM, "<I") == 1
    assert vmm.get(a.VHOST_VDPA_GET_GROUP_NUM, "<I") == 1
    first, last = struct.unpack("<QQ", vmm.call(a.VHOST_VDPA_GET_IOVA_RANGE, bytes(16)))
    assert (first, last) == (0, (1 << 63) - 1)
    assert vmm.get(a.VHOST_GET_FEATURES, "<Q") == env.device.get_device_features()


def test_group_requests_without_the_operations(env: VdpaEnv) -> None:
    owned(env)
    assert errno_of(env.vmm.vring, a.VHOST_VDPA_GET_VRING_GROUP, 0) == errno.EOPNOTSUPP
    assert errno_of(env.vmm.vring, a.VHOST_VDPA_GET_VRING_DESC_GROUP, 0) == errno.EOPNOTSUPP
    assert errno_of(env.vmm.vring, a.VHOST_VDPA_GET_VRING_SIZE, 0) == errno.EOPNOTSUPP
    assert errno_of(env.vmm.vring, a.VHOST_VDPA_SET_GROUP_ASID, 0, 1) == errno.EINVAL  # asid >= 1 address space
    assert errno_of(env.vmm.vring, a.VHOST_VDPA_SET_GROUP_ASID, 0, 0) == errno.EOPNOTSUPP
    env.check_usable()


# ===== rings =====
VRING_REQUESTS = [
    a.VHOST_SET_VRING_NUM,
    a.VHOST_SET_VRING_ADDR,
    a.VHOST_SET_VRING_BASE,
    a.VHOST_GET_VRING_BASE,
    a.VHOST_SET_VRING_KICK,
    a.VHOST_SET_VRING_CALL,
    a.VHOST_SET_VRING_ERR,
    a.VHOST_VDPA_SET_VRING_ENABLE,
    a.VHOST_VDPA_GET_VRING_GROUP,
    a.VHOST_VDPA_SET_GROUP_ASID,
    a.VHOST_VDPA_GET_VRING_SIZE,
]


@pytest.mark.parametrize("request_", VRING_REQUESTS, ids=lambda r: f"{r:#x}")
@pytest.mark.parametrize("index", [3, 0xFFFFFFFF])
def test_ring_index_past_the_queues_is_enobufs(env: VdpaEnv, request_: int, index: int) -> None:
    owned(env)
    assert errno_of(env.vmm.call, request_, struct.pack("<I", index) + bytes(36)) == errno.ENOBUFS
    env.check_usable()


@pytest.mark.parametrize("num", [0, 3, 100, 0x10000, 0xFFFFFFFF])
def test_ring_size_must_be_a_power_of_two(env: VdpaEnv, num: int) -> None:
    owned(env)
    assert errno_of(env.vmm.put, a.VHOST_SET_VRING_NUM, "<II", 0, num) == errno.EINVAL
    env.check_usable()


def test_ring_address_flags_and_alignment(env: VdpaEnv) -> None:
    owned(env)
    assert errno_of(env.vmm.vring_addr, 0, 0x1000, 0x2000, 0x3000, flags=2) == errno.EOPNOTSUPP
    assert errno_of(env.vmm.vring_addr, 0, 0x1000, 0x2001, 0x3000) == errno.EINVAL  # avail: 2-byte aligned
    assert errno_of(env.vmm.vring_addr, 0, 0x1000, 0x2000, 0x3002) == errno.EINVAL  # used: 4-byte aligned
    assert errno_of(env.vmm.vring_addr, 0, 0x1000, 0x2000, 0x3000, log=1) == errno.EINVAL
    env.vmm.vring_addr(0, 0x1001, 0x2002, 0x3004, flags=1)  # desc alignment is not checked; LOG is accepted
    env.check_usable()


def test_split_base_over_16_bits_is_einval(env: VdpaEnv) -> None:
    owned(env)
    assert errno_of(env.vmm.put, a.VHOST_SET_VRING_BASE, "<II", 0, 0x10000) == errno.EINVAL
    env.check_usable()


def test_addr_and_base_after_driver_ok_need_suspend(env: VdpaEnv) -> None:
    driver = env.qemu_start()
    dq = driver.queues[0]
    assert errno_of(env.vmm.vring_addr, 0, dq.desc_addr, dq.driver_addr, dq.device_addr) == errno.EINVAL
    assert errno_of(env.vmm.put, a.VHOST_SET_VRING_BASE, "<II", 0, 0) == errno.EINVAL
    env.vmm.put(a.VHOST_SET_VRING_NUM, "<II", 0, 64)  # vhost-vdpa does not refuse this one
    env.vmm.call(a.VHOST_VDPA_SUSPEND)
    assert env.device.suspended
    env.vmm.vring_addr(0, dq.desc_addr, dq.driver_addr, dq.device_addr)
    env.vmm.put(a.VHOST_SET_VRING_BASE, "<II", 0, 0)
    env.vmm.call(a.VHOST_VDPA_RESUME)
    assert not env.device.suspended
    assert errno_of(env.vmm.put, a.VHOST_SET_VRING_BASE, "<II", 0, 0) == errno.EINVAL
    env.ping(driver)
    env.check_usable()


def test_suspend_before_driver_ok_is_a_no_op(env: VdpaEnv) -> None:
    env.vmm.call(a.VHOST_VDPA_SUSPEND)
    assert not env.device.suspended and not env.server.suspended
    env.check_usable()


def test_get_vring_base_reads_the_device(env: VdpaEnv) -> None:
    driver = env.qemu_start()
    env.ping(driver)
    assert env.vmm.vring(a.VHOST_GET_VRING_BASE, 1) == 1
    env.check_usable()


@pytest.mark.parametrize("request_", [a.VHOST_SET_VRING_KICK, a.VHOST_SET_VRING_CALL, a.VHOST_SET_VRING_ERR])
def test_ring_eventfds(env: VdpaEnv, request_: int) -> None:
    owned(env)
    kind = {a.VHOST_SET_VRING_KICK: "kick", a.VHOST_SET_VRING_CALL: "call"}.get(request_, "err")
    first, second = (os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2))
    other = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        env.vmm.vring_file(request_, 1, first)
        taken = env.server.fds()[kind][1]
        assert taken is not None and taken != first and fd_is_open(taken)
        env.vmm.vring_file(request_, 1, second)  # re-set: the previous copy is closed
        assert not fd_is_open(taken)
        taken = env.server.fds()[kind][1]
        assert errno_of(env.vmm.vring_file, request_, 1, other) == errno.EINVAL  # not an eventfd
        assert errno_of(env.vmm.vring_file, request_, 1, 0x7FFFFFF0) == errno.EBADF
        assert errno_of(env.vmm.vring_file, request_, 1, -7) == errno.EBADF
        assert env.server.fds()[kind][1] == taken  # refusals leave the bound eventfd alone
        env.vmm.vring_file(request_, 1, -1)  # unbind
        assert env.server.fds()[kind][1] is None and not fd_is_open(taken)
    finally:
        for fd in (first, second, other):
            os.close(fd)
    env.check_usable()


def test_kick_and_call_reach_the_device_as_fds(env: VdpaEnv) -> None:
    owned(env)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        env.vmm.vring_file(a.VHOST_SET_VRING_KICK, 0, kick)
        assert env.device._kicks[0] == env.server.fds()["kick"][0]
        env.vmm.vring_file(a.VHOST_SET_VRING_KICK, 0, -1)
        assert env.device._kicks[0] is None
    finally:
        os.close(kick)
    env.check_usable()


# ===== IOTLB =====
def test_iotlb_write_framing_refusals_are_einval(env: VdpaEnv) -> None:
    owned(env)
    update = struct.pack("<II", 2, 0) + a.VHOST_IOTLB_MSG.pack(GUEST_RAM, 4096, env.host, 3, a.VHOST_IOTLB_UPDATE)
    assert errno_of(env.vmm.write, update[:39]) == errno.EINVAL  # the kernel reads 40 bytes
    assert errno_of(env.vmm.write, b"\x02\x00") == errno.EINVAL
    assert errno_of(env.vmm.write, struct.pack("<i", 3) + update[4:]) == errno.EINVAL  # unknown framing
    zero = struct.pack("<II", 2, 0) + a.VHOST_IOTLB_MSG.pack(GUEST_RAM, 0, env.host, 3, a.VHOST_IOTLB_UPDATE)
    assert errno_of(env.vmm.write, zero) == errno.EINVAL  # UPDATE of size 0, refused before the handler
    assert errno_of(env.server.write, 0x10, 72, env.caller) == errno.EINVAL  # unreadable: a short copy
    assert env.vmm.write(update[:40]) == 72  # 40 bytes are enough; the kernel answers sizeof the message
    assert env.server.mappings() == [(GUEST_RAM, 4096, env.host, 3)]
    env.check_usable()


def test_iotlb_v1_messages_are_accepted(env: VdpaEnv) -> None:
    owned(env)
    assert env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 8192, env.host, a.VHOST_ACCESS_RO, v2=False) == 72
    assert env.server.mappings() == [(GUEST_RAM, 8192, env.host, a.VHOST_ACCESS_RO)]
    assert not env.device.memory.regions[0].writable
    env.check_usable()


def test_iotlb_without_owner_is_efault(env: VdpaEnv) -> None:
    assert rejected(env, a.VHOST_IOTLB_UPDATE, GUEST_RAM, 4096, env.host, 3) == (errno.EFAULT, errno.EPERM)
    env.check_usable()


@pytest.mark.parametrize(
    ("iova", "size"),
    [
        pytest.param(1 << 63, 4096, id="past-last"),
        pytest.param((1 << 63) - 4096, 8192, id="across-last"),
        pytest.param((1 << 64) - 4096, 8192, id="wrapping"),
    ],
)
def test_iotlb_update_outside_the_range(env: VdpaEnv, iova: int, size: int) -> None:
    owned(env)
    assert rejected(env, a.VHOST_IOTLB_UPDATE, iova, size, env.host, 3) == (errno.EFAULT, errno.EINVAL)
    env.check_usable()


def test_iotlb_overlap_is_eexist(env: VdpaEnv) -> None:
    owned(env)
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 0x4000, env.host, 3)
    for iova, size in ((GUEST_RAM, 0x1000), (GUEST_RAM + 0x3FFF, 1), (GUEST_RAM - 0x1000, 0x1001)):
        assert rejected(env, a.VHOST_IOTLB_UPDATE, iova, size, env.host, 3) == (errno.EFAULT, errno.EEXIST)
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM + 0x4000, 0x1000, env.host + 0x4000, 3)  # adjacent is fine
    env.check_usable()


@pytest.mark.parametrize("perm", [0, 4, 0xFF])
def test_iotlb_update_permission(env: VdpaEnv, perm: int) -> None:
    owned(env)
    assert rejected(env, a.VHOST_IOTLB_UPDATE, GUEST_RAM, 4096, env.host, perm) == (errno.EFAULT, errno.EINVAL)
    env.check_usable()


def test_iotlb_update_of_memory_that_is_no_shared_file_is_skipped(env: VdpaEnv) -> None:
    """vhost_vdpa_va_map maps VM_SHARED file VMAs only and skips the rest (QEMU's ROMs) without an error."""
    owned(env)
    assert env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, 0xFFFC0000, 0x40000, 0x5000, a.VHOST_ACCESS_RO) == 72
    past = env.host + RAM_SIZE - 4096
    assert env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 8192, past, 3) == 72
    assert env.server.mappings() == [] and env.server.stats.skipped == 2
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 8192, env.host, 3)  # no entry was made: no EEXIST
    assert env.server.mappings() == [(GUEST_RAM, 8192, env.host, 3)]
    env.check_usable()


@pytest.mark.parametrize("kind", [1, 4, 7, 0xFF], ids=["miss", "access_fail", "7", "255"])
def test_iotlb_unknown_message_types(env: VdpaEnv, kind: int) -> None:
    owned(env)
    env.vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN)
    env.vmm.iotlb(a.VHOST_IOTLB_BATCH_END)
    assert rejected(env, kind, GUEST_RAM, 4096, env.host, 3) == (errno.EFAULT, errno.EINVAL)
    env.check_usable()


def test_iotlb_invalidate_before_any_mapping(env: VdpaEnv) -> None:
    owned(env)
    assert rejected(env, a.VHOST_IOTLB_INVALIDATE, 0, 4096) == (errno.EFAULT, errno.EINVAL)
    assert rejected(env, a.VHOST_IOTLB_BATCH_END) == (errno.EFAULT, errno.EINVAL)
    env.check_usable()


def test_iotlb_asid(env: VdpaEnv) -> None:
    owned(env)
    # Without IOTLB_ASID the field is not read: asid 5 means address space 0.
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 4096, env.host, 3, asid=5)
    assert env.server.mappings() == [(GUEST_RAM, 4096, env.host, 3)]
    env.vmm.put(a.VHOST_SET_BACKEND_FEATURES, "<Q", V2_BATCH | 1 << a.VHOST_BACKEND_F_IOTLB_ASID)
    assert rejected(env, a.VHOST_IOTLB_UPDATE, GUEST_RAM + 4096, 4096, env.host, 3, asid=1) == (
        errno.EFAULT,
        errno.EINVAL,
    )
    assert rejected(env, a.VHOST_IOTLB_BATCH_BEGIN, asid=1) == (errno.EFAULT, errno.EINVAL)
    env.check_usable()


def test_invalidate_drops_whole_mappings(env: VdpaEnv) -> None:
    owned(env)
    for i in range(4):
        env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM + i * 0x10000, 0x10000, env.host + i * 0x10000, 3)
    regions = list(env.device.memory.regions)
    # One byte in the second mapping and the first byte of the third: both go whole, nothing is split.
    env.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, GUEST_RAM + 0x1FFFF, 2)
    assert [m[0] for m in env.server.mappings()] == [GUEST_RAM, GUEST_RAM + 0x30000]
    assert len(env.device.memory) == 2  # committed at once outside a batch
    assert regions[1].fd is None and regions[2].fd is None  # closed: the device no longer sees them
    assert regions[0].fd is not None
    env.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, GUEST_RAM + 0x100000, 0x1000)  # nothing there: fine
    env.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, 0, 0)  # size 0 at 0 wraps to the whole space
    assert env.server.mappings() == []
    env.check_usable()


def test_batch_commits_once_and_closes_only_what_the_device_stopped_seeing(env: VdpaEnv) -> None:
    owned(env)
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 0x10000, env.host, 3)
    old = env.device.memory.regions[0]
    commits = env.server.stats.commits
    env.vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN)
    env.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, GUEST_RAM, 0x10000)
    assert old.fd is not None  # the device still has it until BATCH_END
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 0x20000, env.host, 3)
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM + 0x40000, 0x1000, env.host, 3)
    env.vmm.iotlb(a.VHOST_IOTLB_INVALIDATE, GUEST_RAM + 0x40000, 0x1000)  # mapped and dropped inside the batch
    assert env.server.stats.commits == commits and env.device.memory.regions == (old,)
    env.vmm.iotlb(a.VHOST_IOTLB_BATCH_END)
    assert env.server.stats.commits == commits + 1
    assert old.fd is None
    assert [(r.guest_addr, r.size) for r in env.device.memory.regions] == [(GUEST_RAM, 0x20000)]
    env.check_usable()


def test_close_resets_and_releases_everything(env: VdpaEnv) -> None:
    env.qemu_start()
    regions = list(env.device.memory.regions)
    fds = env.server.fds()
    env.server.close()
    assert env.device.get_status() == 0 and len(env.device.memory) == 0
    assert all(r.fd is None for r in regions)
    assert not any(fd_is_open(fd) for fd in fds["kick"] + fds["call"] if fd is not None)
    assert errno_of(env.vmm.get, a.VHOST_VDPA_GET_STATUS, "<B") == errno.EBADF
    env.server = VhostVdpaServer(env.device, name="reopened")  # a second open of the same device
    env.vmm.server = env.server
    env.check_usable()


def test_regions_map_the_callers_file_at_its_offset(env: VdpaEnv) -> None:
    owned(env)
    env.memory.write(GUEST_RAM + 0x3000, b"hello")
    env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, 0x40000000, 0x1000, env.host + 0x3000, 3)
    assert env.device.memory.read(0x40000000, 5) == b"hello"
    assert env.device.memory.regions[0].offset == 0x3000
    env.check_usable()


def test_ring_ioctls_use_all_data_queues(env: VdpaEnv) -> None:
    driver = env.qemu_start()
    assert set(driver.queues) == set(DATA_VQS)
    env.check_usable()


class Grouped(NoExtras):
    """A parent with two groups (the control queue alone in group 1) and two address spaces, as vdpa_sim_net."""

    def __init__(self, device, *, broken: bool = False) -> None:
        super().__init__(device)
        self.broken = broken
        self.asids: list[tuple[int, int]] = []

    def get_group_num(self) -> int:
        if self.broken:
            raise PeerError("no extension", errno=errno.EOPNOTSUPP)
        return 2

    def get_as_num(self) -> int:
        return 2

    def get_vq_group(self, idx: int) -> int:
        return {2: 1, 1: 7}.get(idx, 0)  # ring 1 claims a group the device does not have

    def set_group_asid(self, group: int, asid: int) -> None:
        self.asids.append((group, asid))

    def get_vq_size(self, idx: int) -> int:
        return 64 + idx


def grouped_env(**kwargs) -> VdpaEnv:
    env = VdpaEnv()
    env.server.close()
    env.server = VhostVdpaServer(Grouped(env.device, **kwargs), name="grouped")
    env.vmm.server = env.server
    return env


def test_group_requests_reach_a_parent_that_has_them() -> None:
    env = grouped_env()
    try:
        owned(env)
        assert env.vmm.get(a.VHOST_VDPA_GET_GROUP_NUM, "<I") == 2 and env.vmm.get(a.VHOST_VDPA_GET_AS_NUM, "<I") == 2
        assert env.vmm.vring(a.VHOST_VDPA_GET_VRING_GROUP, 2) == 1
        assert errno_of(env.vmm.vring, a.VHOST_VDPA_GET_VRING_GROUP, 1) == errno.EIO  # group >= ngroups
        env.vmm.vring(a.VHOST_VDPA_SET_GROUP_ASID, 1, 1)
        assert env.server.ops.asids == [(1, 1)]
        assert errno_of(env.vmm.vring, a.VHOST_VDPA_SET_GROUP_ASID, 1, 2) == errno.EINVAL
        assert env.vmm.vring(a.VHOST_VDPA_GET_VRING_SIZE, 2) == 66
        # Address space 1 exists now: with IOTLB_ASID its mappings are kept apart from the device's memory.
        env.vmm.put(a.VHOST_SET_BACKEND_FEATURES, "<Q", V2_BATCH | 1 << a.VHOST_BACKEND_F_IOTLB_ASID)
        env.vmm.iotlb(a.VHOST_IOTLB_UPDATE, GUEST_RAM, 4096, env.host, 3, asid=1)
        assert env.server.mappings(1) == [(GUEST_RAM, 4096, env.host, 3)] and env.server.mappings(0) == []
        env.vmm.iotlb(a.VHOST_IOTLB_BATCH_BEGIN, asid=1)
        assert rejected(env, a.VHOST_IOTLB_UPDATE, GUEST_RAM, 4096, env.host, 3, asid=0) == (errno.EFAULT, errno.EINVAL)
        env.vmm.iotlb(a.VHOST_IOTLB_BATCH_END, asid=1)
        env.check_usable()
    finally:
        env.close()


def test_a_parent_that_cannot_say_its_groups_gets_the_defaults() -> None:
    env = grouped_env(broken=True)
    try:
        assert env.server.ngroups == 1 and env.server.nas == 2
        env.check_usable()
    finally:
        env.close()
