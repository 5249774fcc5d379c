#!/usr/bin/env bash
# Rebuild the multi-scale deformable attention kernels (deformable_detr_ops._C, from ops/csrc)
# against the torch installed in the current Python environment, in place, then check that they
# load. `pip install -e .` already builds them; run this after changing torch or the C++/CUDA code.
#
#   scripts/build_ops.sh
#
# The CPU kernel is always built; the CUDA kernel too when torch has CUDA and nvcc is found
# (no GPU needed). Environment:
#   PYTHON                  interpreter to build for (default: python)
#   MS_DEFORM_ATTN_CUDA     0: CPU kernel only; 1: fail unless the CUDA kernel is built; unset: auto
#   TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0" (default: 7.0 to 9.0 plus PTX,
#                           limited to what nvcc supports)
#   CUDA_HOME               CUDA toolkit (default: found from nvcc)
#   MAX_JOBS                parallel compile jobs
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}

# No build isolation: compile against the torch of this environment, not a freshly pinned one.
"$PYTHON" -m pip install --no-build-isolation --no-deps -e "$ROOT"

cd /
"$PYTHON" - <<'CHECK'
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("error")  # a build that does not load must fail here, not warn later
    import deformable_detr_ops as ops

print(f"ms_deform_attn kernels: cpu={ops.kernel_available('cpu')} cuda={ops.kernel_available('cuda')}")
CHECK
