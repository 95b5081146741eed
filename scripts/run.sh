#!/usr/bin/env bash
# The main job: set up, then `vdpasim compare`: a net and a blk device, an unmodified QEMU 7.2 guest attached
# to each through vhost-user and through vhost-vdpa (kernel bypass), the same workload, the comparison printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/vdpasim compare "$@"
