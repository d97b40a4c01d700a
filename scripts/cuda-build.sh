#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds every target with Thrust's CUDA device system -- the tests, train_dit, sample_dit and
# promoe_bench through nvcc, GEMMs on cuBLAS -- and runs nothing: on machines without a GPU
# (CI) this catches a broken CUDA build; scripts/gpu-check.sh builds the same way, then runs.
# Without nvcc it says so and exits 0. Arguments are passed on to cmake.
# Environment: PROMOE_BUILD_DIR (default build-cuda/), CMAKE_CUDA_ARCHITECTURES (default 90:
# one architecture is enough to catch what does not compile).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/deps.sh
source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"

cuda_root="${CUDAToolkit_ROOT:-${CUDA_PATH:-/usr/local/cuda}}"
if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x "$cuda_root/bin/nvcc" ]]; then
  echo "cuda-build.sh: no nvcc (CUDA toolkit) here: nothing to build"
  exit 0
fi
export PATH="$PATH:$cuda_root/bin"
export PROMOE_BUILD_DIR="${PROMOE_BUILD_DIR:-$repo/build-cuda}"
export PROMOE_THRUST_DEVICE_SYSTEM=CUDA
promoe_ensure_deps
promoe_configure "$repo" -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" "$@"
start=$SECONDS
cmake --build "$PROMOE_BUILD_DIR" -j"$PROMOE_JOBS"
echo "cuda-build.sh: every CUDA target built in $((SECONDS - start)) s ($PROMOE_BUILD_DIR)"
