"""The ioctl numbers and struct sizes of bridge/vhost_vdpa/abi.py against the kernel's own headers.

A C program compiled here against the installed uapi headers (linux-libc-dev) prints each macro and
sizeof; the ioctls newer than those headers are pinned to the encodings of the current uapi.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bridge.vhost_vdpa import abi

HEADER = Path("/usr/include/linux/vhost.h")
NEWER_THAN_HEADERS = {  # current mainline uapi, not in the installed 6.1 headers
    "VHOST_VDPA_RESUME": 0x0000AF7E,
    "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xC008AF7F,
    "VHOST_VDPA_GET_VRING_SIZE": 0xC008AF82,
}
STRUCTS = {
    "vhost_vring_state": abi.VHOST_VRING_STATE,
    "vhost_vring_file": abi.VHOST_VRING_FILE,
    "vhost_vring_addr": abi.VHOST_VRING_ADDR,
    "vhost_vdpa_config": abi.VHOST_VDPA_CONFIG,
    "vhost_vdpa_iova_range": abi.VHOST_VDPA_IOVA_RANGE,
    "vhost_iotlb_msg": abi.VHOST_IOTLB_MSG,
    "vhost_msg": abi.VHOST_MSG_V1,
    "vhost_msg_v2": abi.VHOST_MSG_V2,
}


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    names = sorted(set(re.findall(r"#define (VHOST_[A-Z0-9_]+)\s+_IO", HEADER.read_text())))
    lines = [f'printf("{n} %lu\\n", (unsigned long){n});' for n in names]
    lines += [f'printf("sizeof_{s} %zu\\n", sizeof(struct {s}));' for s in STRUCTS]
    source = "#include <stdio.h>\n#include <linux/vhost.h>\nint main(void){" + "".join(lines) + "return 0;}\n"
    workdir = tmp_path_factory.mktemp("abi")
    (workdir / "abi.c").write_text(source)
    subprocess.run(["gcc", "-o", str(workdir / "abi"), str(workdir / "abi.c")], check=True)
    out = subprocess.run([str(workdir / "abi")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_ioctl_of_the_installed_headers_matches(kernel_values: dict[str, int]) -> None:
    ioctls = {k: v for k, v in kernel_values.items() if not k.startswith("sizeof_")}
    ours = {name: getattr(abi, name) for name in ioctls if hasattr(abi, name)}
    assert len(ours) >= 30  # the generic vhost and the vhost-vdpa ioctls we use
    assert ours == {name: ioctls[name] for name in ours}


def test_struct_sizes_match_the_kernel(kernel_values: dict[str, int]) -> None:
    assert {s: layout.size for s, layout in STRUCTS.items()} == {s: kernel_values[f"sizeof_{s}"] for s in STRUCTS}


def test_ioctls_newer_than_the_headers() -> None:
    assert {name: getattr(abi, name) for name in NEWER_THAN_HEADERS} == NEWER_THAN_HEADERS
