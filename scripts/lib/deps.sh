# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh: makes sure the Debian packages promoe
# builds with are installed. As root, installs the missing ones with apt-get; otherwise
# names them and exits 1. `PROMOE_WITH_TEST_PACKAGES=1` (set by test.sh) adds what only the
# tests need (PyTorch for the parity tests), which the demo does not install;
# `PROMOE_WITH_STUDY_PACKAGES=1` (set by study.sh) adds what its report needs (plots).

PROMOE_DEB_PACKAGES=(
  cmake g++ make
  libeigen3-dev catch2
  libopenblas-dev libopenblas0-pthread
  ccache zlib1g-dev libstb-dev dataset-fashion-mnist
  nlohmann-json3-dev libcli11-dev
)
if [[ "${PROMOE_WITH_TEST_PACKAGES:-0}" == 1 ]]; then
  PROMOE_DEB_PACKAGES+=(python3 python3-torch python3-numpy)
fi
if [[ "${PROMOE_WITH_STUDY_PACKAGES:-0}" == 1 ]]; then
  PROMOE_DEB_PACKAGES+=(python3 python3-matplotlib)
fi

promoe_missing_packages() {
  local pkg status
  for pkg in "${PROMOE_DEB_PACKAGES[@]}"; do
    status="$(dpkg -s "$pkg" 2>/dev/null || true)"
    if [[ "$status" != *"Status: install ok installed"* ]]; then
      printf '%s\n' "$pkg"
    fi
  done
}

promoe_ensure_deps() {
  if ! command -v dpkg >/dev/null 2>&1; then
    echo "promoe: not a Debian-based system; make sure the equivalents of these are installed:" \
         "${PROMOE_DEB_PACKAGES[*]}" >&2
    return 0
  fi
  local missing=()
  mapfile -t missing < <(promoe_missing_packages)
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "promoe: missing packages: ${missing[*]}" >&2
    echo "promoe: install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "promoe: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
}
