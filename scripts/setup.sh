#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian (bookworm) machine: system packages, then the virtualenv at .venv
# with vdpasim installed (editable) and its test tools. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the project needs; each later capability adds its own here.
# DPDK 22.11 (dpdk-testpmd is in dpdk-dev; its vhost and virtio_user drivers are separate packages) is the
# peer of `vdpasim bench e2e`. qemu-storage-daemon, the peer of `vdpasim bench blk`, is in qemu-system-common,
# which qemu-system-x86 depends on.
APT_PACKAGES=(gcc libc6-dev python3-venv qemu-system-x86 kmod iproute2
              dpdk dpdk-dev librte-net-vhost23 librte-net-virtio23)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# python3-venv is not needed where the interpreter already has a working venv module (e.g. pyenv builds).
if python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp=.venv/.vdpasim-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing vdpasim and its dependencies into .venv" >&2
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi
