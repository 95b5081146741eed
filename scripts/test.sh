#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, then every test (unit, property, devices).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -n "${VDPASIM_TEST_JOBS:-2}" "$@"
