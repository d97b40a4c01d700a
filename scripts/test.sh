#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs what is missing, configures, builds everything and runs every test.
# Arguments are passed on to ctest (for example: scripts/test.sh -R routing).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/deps.sh
PROMOE_WITH_TEST_PACKAGES=1 source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"

promoe_ensure_deps
promoe_configure "$repo"
cmake --build "$PROMOE_BUILD_DIR" -j"$PROMOE_JOBS"
cd "$PROMOE_BUILD_DIR"
ctest --output-on-failure -j"$PROMOE_JOBS" "$@"
