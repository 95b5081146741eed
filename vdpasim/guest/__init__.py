"""The test guest: a Debian 6.12 kernel + busybox initramfs built from packages, and QEMU boots of it.

``build_guest()`` makes (or finds in the cache) the image; ``boot()``/``GuestVM`` run it under QEMU
TCG with a named workload and return the ``VDPASIM-RESULT`` lines it printed. See docs/guest.md.
"""

from .build import DEFAULT_MODULES, GuestBuildError, GuestImage, build_guest, cache_dir
from .qemu import BootResult, GuestRunError, GuestVM, boot, kernel_cmdline

__all__ = [
    "DEFAULT_MODULES",
    "BootResult",
    "GuestBuildError",
    "GuestImage",
    "GuestRunError",
    "GuestVM",
    "boot",
    "build_guest",
    "cache_dir",
    "kernel_cmdline",
]
