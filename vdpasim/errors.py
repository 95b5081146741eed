"""The error tree: who is at fault decides the class, and each class knows its errno.

* ``PeerError``: input from outside (guest driver, VMM, netlink user, trapped program) is invalid.
  Each wire converts it in exactly one place: -errno (ioctl), NACK (vhost-user), NLMSG_ERROR (netlink).
* ``DeviceFault``: the guest broke the virtqueue contract (malformed chain, address outside memory).
  The device sets NEEDS_RESET, logs the reason and keeps serving every other device.
* ``TransportError``: a socket or fd went away; ``reconnect`` says whether to wait for the peer.
* ``UsageError``: our own caller broke a precondition; a bug if it ever comes from a wire.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "VdpasimError",
    "PeerError",
    "CodecError",
    "SessionError",
    "DeviceRequestError",
    "DeviceFault",
    "TransportError",
    "UsageError",
]


class VdpasimError(Exception):
    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class PeerError(VdpasimError):
    """The peer sent something invalid; carries the errno (and netlink extack text) to answer with."""

    errno = _errno.EINVAL


class CodecError(PeerError):
    """Malformed bytes."""


class SessionError(PeerError):
    """A well-formed request out of order or not negotiated."""


class DeviceRequestError(PeerError):
    """A request the device refuses (bad feature set, bad queue index, config out of range...)."""


class DeviceFault(VdpasimError):
    """The driver broke the virtqueue contract; the device needs a reset."""

    def __init__(self, message: str, *, queue: int = -1, code: int = 0) -> None:
        super().__init__(message)
        self.queue = queue
        self.code = code


class TransportError(VdpasimError):
    def __init__(self, message: str, *, reconnect: bool = False) -> None:
        super().__init__(message, errno=_errno.EPIPE)
        self.reconnect = reconnect


class UsageError(VdpasimError):
    errno = _errno.EINVAL
