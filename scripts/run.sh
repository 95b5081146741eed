#!/usr/bin/env bash
# The main job: set up, then run vdpasim's demonstration (devices created, traffic through real rings).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/vdpasim demo "$@"
