"""Feature negotiation rules: which driver feature sets a device accepts at FEATURES_OK (VIRTIO 1.2 §2.2).

Each rule is a feature and the features it requires, with the spec clause that says so; a driver
feature set that is not a subset of the device's, or breaks a rule, is refused with the reason.
"""

from __future__ import annotations

from . import constants as c

__all__ = ["DEPENDENCIES", "feature_names", "check_driver_features"]

# feature -> (features it needs (all of them), where the spec says so)
DEPENDENCIES: dict[int, tuple[tuple[int, ...], str]] = {
    c.VIRTIO_NET_F_GUEST_TSO4: ((c.VIRTIO_NET_F_GUEST_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_GUEST_TSO6: ((c.VIRTIO_NET_F_GUEST_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_GUEST_ECN: ((c.VIRTIO_NET_F_GUEST_TSO4,), "5.1.3.1"),
    c.VIRTIO_NET_F_GUEST_UFO: ((c.VIRTIO_NET_F_GUEST_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_HOST_TSO4: ((c.VIRTIO_NET_F_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_HOST_TSO6: ((c.VIRTIO_NET_F_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_HOST_ECN: ((c.VIRTIO_NET_F_HOST_TSO4,), "5.1.3.1"),
    c.VIRTIO_NET_F_HOST_UFO: ((c.VIRTIO_NET_F_CSUM,), "5.1.3.1"),
    c.VIRTIO_NET_F_CTRL_RX: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
    c.VIRTIO_NET_F_CTRL_VLAN: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
    c.VIRTIO_NET_F_GUEST_ANNOUNCE: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
    c.VIRTIO_NET_F_MQ: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
    c.VIRTIO_NET_F_CTRL_MAC_ADDR: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
    c.VIRTIO_NET_F_RSS: ((c.VIRTIO_NET_F_CTRL_VQ,), "5.1.3.1"),
}

_DEVICE_NAMES = {
    c.VIRTIO_ID_NET: {v: n for n, v in vars(c).items() if n.startswith("VIRTIO_NET_F_")},
    c.VIRTIO_ID_BLOCK: {v: n for n, v in vars(c).items() if n.startswith("VIRTIO_BLK_F_")},
}
_TRANSPORT_NAMES = {v: n for n, v in vars(c).items() if n.startswith(("VIRTIO_F_", "VIRTIO_RING_F_", "VHOST_USER_F_"))}


def feature_names(features: int, device_id: int = c.VIRTIO_ID_NET) -> list[str]:
    """Names of the set bits; bits 0-23 are device-specific, 24 and up transport features."""
    return [
        (_TRANSPORT_NAMES if bit >= 24 else _DEVICE_NAMES.get(device_id, {})).get(bit, f"bit {bit}")
        for bit in range(64)
        if features >> bit & 1
    ]


def check_driver_features(driver: int, device: int, device_id: int) -> str | None:
    """Why the device refuses ``driver`` at FEATURES_OK, or None if it accepts it."""
    extra = driver & ~device
    if extra:
        return f"driver features {', '.join(feature_names(extra, device_id))} were not offered"
    if device_id == c.VIRTIO_ID_NET:
        for feature, (needs, clause) in DEPENDENCIES.items():
            if driver >> feature & 1:
                missing = [n for n in needs if not driver >> n & 1]
                if missing:
                    name = feature_names(1 << feature, device_id)[0]
                    need_names = ", ".join(feature_names(sum(1 << n for n in missing), device_id))
                    return f"{name} requires {need_names} (VIRTIO 1.2 §{clause})"
    # vdpasim devices are modern only (little-endian, v1 net header), as every vDPA driver expects.
    if not driver >> c.VIRTIO_F_VERSION_1 & 1:
        return "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
    return None
