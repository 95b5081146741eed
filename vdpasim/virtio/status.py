"""The device status machine (VIRTIO 1.2 §2.1, §3.1.1) as a table: what a driver may set, and when.

The driver only ever adds bits; writing 0 resets. NEEDS_RESET belongs to the device (a driver's
write cannot set or clear it). A bit listed in ``REQUIRES`` may only be set once the bits it names
are set (or are set in the same write). Whether FEATURES_OK sticks is the device's decision (it
drops the bit when it refuses the driver's features, and the driver reads the status back).
"""

from __future__ import annotations

from .constants import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)

__all__ = ["REQUIRES", "STATUS_NAMES", "status_names", "status_change_error"]

REQUIRES: dict[int, int] = {
    VIRTIO_CONFIG_S_DRIVER: VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_FEATURES_OK: VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK: VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
}

STATUS_NAMES = {
    VIRTIO_CONFIG_S_ACKNOWLEDGE: "ACKNOWLEDGE",
    VIRTIO_CONFIG_S_DRIVER: "DRIVER",
    VIRTIO_CONFIG_S_FEATURES_OK: "FEATURES_OK",
    VIRTIO_CONFIG_S_DRIVER_OK: "DRIVER_OK",
    VIRTIO_CONFIG_S_NEEDS_RESET: "NEEDS_RESET",
    VIRTIO_CONFIG_S_FAILED: "FAILED",
}


def status_names(status: int) -> str:
    return "|".join(name for bit, name in STATUS_NAMES.items() if status & bit) or "0"


def status_change_error(old: int, new: int) -> str | None:
    """Why a driver may not write ``new`` over ``old`` (0, the reset, is always allowed), or None."""
    if new == 0:
        return None
    old &= ~VIRTIO_CONFIG_S_NEEDS_RESET
    new &= ~VIRTIO_CONFIG_S_NEEDS_RESET
    cleared = old & ~new
    if cleared:
        return f"status {status_names(new)} clears {status_names(cleared)}; only a write of 0 clears bits"
    for bit, needed in REQUIRES.items():
        if new & bit and not old & bit and needed & ~new:
            return f"{STATUS_NAMES[bit]} set before {status_names(needed & ~new)}"
    return None
