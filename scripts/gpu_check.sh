#!/usr/bin/env bash
# One call on a machine with a GPU (at most about 8 minutes, no network): builds the op for this GPU,
# runs the CUDA tests, times the op's implementations and the r50 training step, trains the default
# recipe for one epoch, and writes gpu_check.json and gpu_check.md (see tools/gpu_check.py).
#
#   bash scripts/gpu_check.sh [--output DIR] [--budget SECONDS] [--stages STAGE ...] [--skip-build]
#
# Needs the project's Python dependencies importable by $PYTHON (default python3); nothing is
# installed. Without a visible GPU it says so in one line and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# the stages' output reaches the caller as it happens
export PYTHONUNBUFFERED=1
exec "$PYTHON" tools/gpu_check.py "$@"
