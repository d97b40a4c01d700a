#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs what is missing, builds the quickstart example and runs it.
# Arguments are passed on to the example.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/deps.sh
source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"

promoe_ensure_deps
promoe_configure "$repo"
cmake --build "$PROMOE_BUILD_DIR" --target quickstart -j"$PROMOE_JOBS"
exec "$PROMOE_BUILD_DIR/examples/quickstart" "$@"
