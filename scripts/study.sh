#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The routing study: trains the same small DiT preset with each MLP variant at equal
# activated parameters and equal steps, samples with guidance 1.0 and 1.5, scores the
# samples with promoe-evaluate and writes a report (results.md, results.json, fd_steps.png).
#
#   scripts/study.sh [--out study] [--seeds "0 1"] [--variants "dense top-k ..."]
#                    [--steps 1600] [--objective flow|ddpm] [--samples 1000] [--preset mini-28]
#                    [--experts 4] [--batch 64] [--sample-steps 25]
#
# Every run lives in <out>/runs/<variant>-s<seed>/ and is evaluated at a quarter, half and
# all of the steps (guidance 1.5; guidance 1.0 at the end too). The script can be stopped
# and started again: finished evaluations are kept and runs resume from their checkpoints,
# so more seeds or variants can be added to a study later with the same --out.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=study
seeds="0 1"
variants="dense top-k expert-choice expert-race promoe promoe-no-rcl promoe-no-cond"
steps=1600
objective=flow
samples=1000
preset=mini-28
experts=4
batch=64
sample_steps=25
while (($#)); do
  case "$1" in
    --out) out="$2" ;;
    --seeds) seeds="$2" ;;
    --variants) variants="$2" ;;
    --steps) steps="$2" ;;
    --objective) objective="$2" ;;
    --samples) samples="$2" ;;
    --preset) preset="$2" ;;
    --experts) experts="$2" ;;
    --batch) batch="$2" ;;
    --sample-steps) sample_steps="$2" ;;
    -h | --help) sed -n '3,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "study.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  (($# >= 2)) || { echo "study.sh: $1 needs a value" >&2; exit 2; }
  shift 2
done
((steps >= 4 && steps % 4 == 0)) || { echo "study.sh: --steps must be a positive multiple of 4, got $steps" >&2; exit 2; }

# shellcheck source=lib/deps.sh
PROMOE_WITH_STUDY_PACKAGES=1 source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"
promoe_ensure_deps
promoe_configure "$repo" >/dev/null
cmake --build "$PROMOE_BUILD_DIR" --target train_dit sample_dit promoe-evaluate -j"$PROMOE_JOBS"
train="$PROMOE_BUILD_DIR/examples/train_dit"
sample="$PROMOE_BUILD_DIR/examples/sample_dit"
evaluate="$PROMOE_BUILD_DIR/tools/promoe-evaluate"

mkdir -p "$out/runs"
classifier="$out/fmnist_classifier.safetensors"
# the classifier (trained once) and the floor: the real test set against the training set
[[ -f "$out/floor.json" ]] || "$evaluate" --classifier "$classifier" --floor --json "$out/floor.json"

evaluate_at() {  # run folder, step, guidance
  local dir="$1" step="$2" cfg="$3"
  local stem="$dir/eval-$step-cfg$cfg"
  [[ -f "$stem.json" ]] && return 0
  "$sample" --checkpoint "$dir/checkpoint.safetensors" --num-samples "$samples" --cfg-scale "$cfg" \
    --steps "$sample_steps" --seed 1000 --columns 50 --out "$stem.npz"
  "$evaluate" --classifier "$classifier" --samples "$stem.npz" --json "$stem.json.part"
  mv "$stem.json.part" "$stem.json"
}

for seed in $seeds; do
  for variant in $variants; do
    dir="$out/runs/$variant-s$seed"
    mkdir -p "$dir"
    echo "== $variant, seed $seed: $dir"
    for step in $((steps / 4)) $((steps / 2)) "$steps"; do
      if [[ ! -f "$dir/eval-$step-cfg1.5.json" ]]; then
        start=(--overwrite)
        [[ -f "$dir/checkpoint.safetensors" ]] && start=(--resume)
        # one checkpoint per segment, so an interrupted segment resumes from the last evaluated one
        "$train" --preset "$preset" --mlp "$variant" --objective "$objective" --experts "$experts" \
          --batch "$batch" --seed "$seed" --steps "$step" --checkpoint-every "$step" --sample-every "$step" \
          --log-every 100 --out "$dir" "${start[@]}"
      fi
      evaluate_at "$dir" "$step" 1.5
    done
    evaluate_at "$dir" "$steps" 1.0
  done
done

# Debian's python3 (where python3-matplotlib goes), else the first on the PATH
python=/usr/bin/python3
[[ -x "$python" ]] || python=python3
"$python" "$repo/scripts/study_report.py" "$out"
