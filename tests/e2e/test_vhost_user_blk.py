"""A real QEMU 7.2 (TCG) guest uses a simulated virtio-blk disk through vhost-user-blk-pci, on both doors.

"vhost-user": QEMU connects to the device's socket. "vhost-vdpa": QEMU 7.2 has no vhost-vdpa block front-end,
so QEMU's vhost-user-blk connects to the reverse bridge (``vdpasim bridge``, under the bypass supervisor), whose
vhost-vdpa client drives the device through its /dev/vhost-vdpa-N node: every request crosses both bridges.
The disk is an image file served by a BlkDevice in this process (vdpasim.testing.vhost_user). The
guest's ``blk`` workload writes a random pattern, flushes, reads it back past its page cache, then
issues write-zeroes and discard (``BLKZEROOUT``, ``BLKDISCARD``) and reports checksums of each step;
the host then finds exactly those bytes in the image file, and the rest of the file untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdpasim.config import BlkConfig
from vdpasim.guest import GuestImage, build_guest
from vdpasim.guest.workloads import file_range_sha256
from vdpasim.testing.vhost_user import VhostUserRig
from vdpasim.virtio import constants as c

DISK_BYTES = 16 << 20
OFFSET, LENGTH = 4 << 20, 1 << 20  # the workload's region: pattern, then zeroes and discard in its last half


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


@pytest.mark.parametrize(
    ("transport", "packed", "event_idx", "num_queues"),
    [
        pytest.param("vhost-user", False, True, 1, id="vhost-user-split-event_idx"),
        pytest.param("vhost-user", True, False, 2, id="vhost-user-packed-no_event_idx-2queues"),
        pytest.param("vhost-vdpa", False, True, 1, id="vhost-vdpa-split-event_idx"),
        pytest.param("vhost-vdpa", True, False, 2, id="vhost-vdpa-packed-no_event_idx-2queues"),
    ],
)
def test_guest_writes_flushes_zeroes_and_discards_the_image_file(
    image: GuestImage, tmp_path: Path, transport: str, packed: bool, event_idx: bool, num_queues: int
) -> None:
    disk = tmp_path / "disk.img"
    original = os.urandom(DISK_BYTES)  # random, so every range the guest zeroes is visibly zeroed
    disk.write_bytes(original)
    config = BlkConfig(name="vu-blk", path=str(disk), num_queues=num_queues)
    with VhostUserRig(image, tmp_path / "logs", transport=transport) as rig:
        rig.add_blk(config, packed=packed, event_idx=event_idx)
        run = rig.run("blk", {"offset": OFFSET, "size": LENGTH})
    run.check()

    blk = run.result("blk")
    features = blk["features"]
    assert (features[c.VIRTIO_F_RING_PACKED] == "1") is packed
    assert (features[c.VIRTIO_RING_F_EVENT_IDX] == "1") is event_idx
    assert (features[c.VIRTIO_BLK_F_MQ] == "1") is (num_queues > 1)
    assert blk["size"] == DISK_BYTES and (blk["offset"], blk["length"]) == (OFFSET, LENGTH)
    # The guest saw its own bytes again after a flush and a dropped page cache.
    assert blk["write_rc"] == 0 and blk["flush"]["ok"] is True
    assert blk["readback_sha256"] == blk["pattern_sha256"] and blk["ok"] is True
    # Write-zeroes and discard reached the device (the guest's queue limits come from its config space).
    assert blk["queue"]["write_zeroes_max_bytes"] > 0 and blk["queue"]["discard_max_bytes"] > 0
    quarter = LENGTH // 4
    zero_at, discard_at = OFFSET + 2 * quarter, OFFSET + 3 * quarter
    assert blk["zeroout"]["result"] == {
        "op": "zeroout",
        "dev": "/dev/vda",
        "offset": zero_at,
        "length": quarter,
        "ok": True,
    }
    assert blk["discard"]["result"] == {
        "op": "discard",
        "dev": "/dev/vda",
        "offset": discard_at,
        "length": quarter,
        "ok": True,
    }
    assert blk["zeroout"]["is_zero"] is True
    assert blk["discard"]["is_zero"] is True  # this device zeroes discarded ranges of an image file
    stat = blk["stat"]
    assert stat["discard_ios"] >= 1 and stat["flush_ios"] >= 1 and stat["write_ios"] >= 1

    # The host reads the image file itself: the guest's bytes are there, and nothing else changed.
    assert file_range_sha256(disk, OFFSET, LENGTH // 2) == blk["head_sha256"]
    assert file_range_sha256(disk, OFFSET, LENGTH) == blk["final_sha256"]
    data = disk.read_bytes()
    assert len(data) == DISK_BYTES
    assert data[zero_at : zero_at + 2 * quarter] == bytes(2 * quarter)
    assert data[:OFFSET] == original[:OFFSET] and data[OFFSET + LENGTH :] == original[OFFSET + LENGTH :]

    counters = run.counters["vu-blk"]
    assert sum(q["errors"] for q in counters) == 0
    assert sum(q["successes"] for q in counters) == sum(q["packets"] for q in counters) > 0
    assert run.vhost_lines == [] and run.backend_log == []
