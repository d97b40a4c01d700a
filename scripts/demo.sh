#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs what is missing, builds train_dit and trains a small ProMoE-DiT on Fashion-MNIST
# for a few minutes on the CPU. Writes out/checkpoint.safetensors, out/samples.png (one row
# per class), out/routing.png and out/log.csv. Arguments are passed on to train_dit (e.g.
# --steps 3000, or --steps 1600 --resume to continue the last demo).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/deps.sh
source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"

promoe_ensure_deps
promoe_configure "$repo"
cmake --build "$PROMOE_BUILD_DIR" --target train_dit sample_dit -j"$PROMOE_JOBS"
cd "$repo"
# A new run replaces the last demo's output, unless the arguments ask to --resume it.
fresh=(--overwrite)
for arg in "$@"; do [[ "$arg" == --resume ]] && fresh=(); done
exec "$PROMOE_BUILD_DIR/examples/train_dit" --preset mini-28 --mlp promoe --steps 1600 --batch 64 \
  --sample-every 1600 --checkpoint-every 400 --out out "${fresh[@]}" "$@"
