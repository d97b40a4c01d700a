# shellcheck shell=bash
# Sourced by the scripts: configures the build tree. promoe_configure REPO [CMAKE-ARGS...]
#   PROMOE_BUILD_DIR             build tree (default: build/ in the repository)
#   PROMOE_THRUST_DEVICE_SYSTEM  OFF, CPP, OMP or CUDA (default: OMP when the CUDA
#                                toolkit's Thrust is installed, else OFF)
#   CCACHE_DIR                   ccache's cache (default: .ccache/ in the repository)

promoe_configure() {
  local repo="$1"
  shift
  PROMOE_BUILD_DIR="${PROMOE_BUILD_DIR:-$repo/build}"
  export CCACHE_DIR="${CCACHE_DIR:-$repo/.ccache}"
  # shellcheck disable=SC2034  # read by the scripts that source this file
  PROMOE_JOBS="$(nproc 2>/dev/null || echo 2)"

  local cuda_root="${CUDAToolkit_ROOT:-${CUDA_PATH:-/usr/local/cuda}}"
  local thrust="${PROMOE_THRUST_DEVICE_SYSTEM:-}"
  if [[ -z "$thrust" ]]; then
    thrust=OFF
    local dir
    for dir in "$cuda_root/lib/cmake/thrust" "$cuda_root/lib64/cmake/thrust"; do
      if [[ -f "$dir/thrust-config.cmake" ]]; then
        thrust=OMP
        break
      fi
    done
  fi

  cmake -S "$repo" -B "$PROMOE_BUILD_DIR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DPROMOE_THRUST_DEVICE_SYSTEM="$thrust" "$@"
}
