#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# On a machine with an NVIDIA GPU: builds promoe with Thrust's CUDA device system (every test,
# train_dit, sample_dit and promoe_bench through nvcc, GEMMs on cuBLAS), runs the whole test
# suite on the device, checks CPU-GPU parity of a DiT training run, runs the GPU benchmarks
# (promoe_bench --device cuda and bench/torch_bench.py --device cuda, PyTorch eager) and
# prints a table. Logs and results go to OUT.
#
#   scripts/gpu-check.sh OUT [--stage all|build|test|parity|bench] [--quick]
#     --stage   run one stage (each fits a 10-minute slot; the build tree is kept between them)
#     --quick   benchmarks at 4096 tokens and on mini-28 only, 3 timed runs
# Environment: PROMOE_BUILD_DIR (default build-cuda/), CMAKE_CUDA_ARCHITECTURES (default:
# the GPU's own, "native").
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '9,14p' "${BASH_SOURCE[0]}" >&2; }
(($# >= 1)) || { usage; exit 2; }
out="$1"
shift
stage=all
quick=0
while (($#)); do
  case "$1" in
    --stage) stage="${2:-}"; shift ;;
    --quick) quick=1 ;;
    *) echo "gpu-check.sh: unknown argument '$1'" >&2; usage; exit 2 ;;
  esac
  shift
done
[[ "$stage" =~ ^(all|build|test|parity|bench)$ ]] || { echo "gpu-check.sh: unknown stage '$stage'" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# shellcheck source=lib/deps.sh
PROMOE_WITH_TEST_PACKAGES=1 source "$repo/scripts/lib/deps.sh"
export PROMOE_BUILD_DIR="${PROMOE_BUILD_DIR:-$repo/build-cuda}"
export PROMOE_THRUST_DEVICE_SYSTEM=CUDA
build="$PROMOE_BUILD_DIR"
status=0

stage_build() {
  promoe_ensure_deps
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
    head -n 15 "$out/nvidia-smi.txt"
  else
    echo "gpu-check.sh: no nvidia-smi here; building anyway (the tests will need a GPU)" >&2
  fi
  CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-native}" "$repo/scripts/cuda-build.sh" \
    2>&1 | tee "$out/build.log"
}

stage_test() {
  # Several test processes share the GPU; the CPU side of each stays on 2 threads.
  (cd "$build" && OMP_NUM_THREADS=2 ctest --output-on-failure -j4 --output-junit "$out/ctest.xml") \
    2>&1 | tee "$out/ctest.log" || status=1
}

# The same 20 training steps of a ProMoE DiT on the CPU and on the GPU: the loss curves must
# agree to 1e-4 relative in float32 (sums in another order; the tests hold the 1e-5 layer
# parity), and to 1e-2 with bf16 GEMMs (tensor cores on the GPU, rounded operands on the CPU)
# and with bf16 training (--dtype bf16: bf16 weights and activations, float32 master weights).
stage_parity() {
  local dev mode tolerance flags
  for mode in highest bf16 bf16-dtype; do
    case "$mode" in
      highest) tolerance=1e-4 flags=(--matmul-precision highest) ;;
      bf16) tolerance=1e-2 flags=(--matmul-precision bf16) ;;
      bf16-dtype) tolerance=1e-2 flags=(--dtype bf16) ;;
    esac
    for dev in cpu cuda; do
      "$build/examples/train_dit" --device "$dev" --mlp promoe --steps 20 --log-every 1 --sample-every 20 \
        "${flags[@]}" --out "$out/parity-$mode-$dev" --overwrite \
        >"$out/parity-$mode-$dev.log" 2>&1 || { status=1; return; }
    done
    /usr/bin/env python3 - "$out/parity-$mode-cpu/log.csv" "$out/parity-$mode-cuda/log.csv" \
      "$mode" "$tolerance" <<'PY' | tee -a "$out/parity.txt" || status=1
import csv, sys
a, b = ([float(r["loss"]) for r in csv.DictReader(open(p))] for p in sys.argv[1:3])
tolerance = float(sys.argv[4])
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
print("train_dit cpu vs cuda, %s, %d logged steps: largest relative loss difference %.3g (limit %g)"
      % (sys.argv[3], len(a), worst, tolerance))
sys.exit(0 if len(a) == len(b) == 20 and worst <= tolerance else 1)
PY
  done
}

stage_bench() {
  local tokens=4096,16384 presets=mini-28,S reps=5
  if ((quick)); then tokens=4096 presets=mini-28 reps=3; fi
  "$build/bench/promoe_bench" --device cuda --tokens "$tokens" --reps "$reps" --cases moe,experts,dit,dit-bf16,sample \
    --dit-presets "$presets" --json "$out/promoe-gpu.json" 2>&1 | tee "$out/promoe-gpu.log" || { status=1; return; }
  local python=/usr/bin/python3 merge=(--promoe "$out/promoe-gpu.json")
  [[ -x "$python" ]] || python=python3
  if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    if "$python" "$repo/bench/torch_bench.py" --device cuda --threads 2 --tokens "$tokens" --reps "$reps" \
      --dit-presets "$presets" --out "$out/torch-gpu.json" 2>&1 | tee "$out/torch-gpu.log"; then
      merge+=(--torch "$out/torch-gpu.json")
    else
      status=1
    fi
  else
    echo "gpu-check.sh: $python has no torch with CUDA: promoe only" >&2
  fi
  echo
  "$python" "$repo/bench/merge_results.py" "${merge[@]}" --out "$out/gpu-results.json" | tee "$out/gpu-table.md"
}

case "$stage" in
  all) stage_build; stage_test; stage_parity; stage_bench ;;
  *) "stage_$stage" ;;
esac
echo "gpu-check.sh: stage $stage done, exit $status; logs and results in $out"
exit "$status"
