#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds promoe_bench, runs it and bench/torch_bench.py (the PyTorch references) on 2 threads,
# and joins the two by case name into DIR/<hostname>-<YYYY-MM-DD>.json; prints a markdown table.
#
#   scripts/bench.sh [--quick] [--out DIR]
#     --quick    MoE layers at 1024 tokens only, 3 timed runs per case, one round (default:
#                1024, 4096, 16384 tokens, 5 runs, two rounds)
#     --out DIR  where the results file goes (default: bench/results)
#
# A round runs promoe_bench, then torch_bench.py; with two rounds each case keeps each side's
# faster round (merge_results.py): on a shared machine the speed drifts by up to 25 % from one
# minute to the next, and alternating the sides gives both the same chance of a good minute.
#
# PyTorch runs only when /usr/bin/python3 can import torch. Its GEMMs go to Debian's OpenBLAS,
# which does not know newer CPUs and falls back to its slow Prescott kernel there; on an
# AVX-512 CPU whose kernel OpenBLAS does not pick by itself this script sets
# OPENBLAS_CORETYPE=SkylakeX (unless it is already set), and then times PyTorch a second time as
# installed (OpenBLAS's own kernel choice) for a second column.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/deps.sh
source "$repo/scripts/lib/deps.sh"
# shellcheck source=lib/configure.sh
source "$repo/scripts/lib/configure.sh"

usage() {
  echo "usage: scripts/bench.sh [--quick] [--out DIR]" >&2
}

quick=0
out_dir="$repo/bench/results"
while (($# > 0)); do
  case "$1" in
    --quick) quick=1 ;;
    --out)
      (($# >= 2)) || { echo "bench.sh: --out needs a folder" >&2; usage; exit 2; }
      out_dir="$2"
      shift
      ;;
    -h | --help) usage 2>&1; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1'" >&2; usage; exit 2 ;;
  esac
  shift
done

bench_args=()
rounds=2
if ((quick)); then
  bench_args=(--tokens 1024 --reps 3)
  rounds=1
fi

promoe_ensure_deps
promoe_configure "$repo" >/dev/null
cmake --build "$PROMOE_BUILD_DIR" --target promoe_bench -j"$PROMOE_JOBS"

# Each side runs with its best OpenMP wait policy: promoe with libgomp's default (spin
# briefly, then sleep); PyTorch with passive waiting, since its OpenMP threads would
# otherwise spin against OpenBLAS's own threads on the same cores.
export OMP_NUM_THREADS=2
unset OMP_WAIT_POLICY
python=/usr/bin/python3  # Debian's, where python3-torch installs
[[ -x "$python" ]] || python="$(command -v python3)"
mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

merge_args=()
# promoe runs in the same environment every round, whatever the PyTorch runs export.
run_promoe() {
  echo "== promoe_bench ${bench_args[*]} (round $1 of $rounds)"
  env -u OMP_WAIT_POLICY -u OPENBLAS_NUM_THREADS -u OPENBLAS_CORETYPE \
    "$PROMOE_BUILD_DIR/bench/promoe_bench" "${bench_args[@]}" --json "$work/promoe-$1.json"
  merge_args+=(--promoe "$work/promoe-$1.json")
}
run_promoe 1

# The kernel OpenBLAS picks under the current environment, from the library torch loads.
openblas_core() {
  local core
  core="$("$python" - <<'EOF' 2>/dev/null || true
import ctypes, re, torch  # noqa: F401  (loads torch's BLAS)
with open("/proc/self/maps") as f:
    libs = sorted({l.split()[-1] for l in f if re.search(r"libopenblas[^/]*\.so", l.split()[-1])})
if libs:
    lib = ctypes.CDLL(libs[0])
    lib.openblas_get_corename.restype = ctypes.c_char_p
    print(lib.openblas_get_corename().decode())
EOF
)"
  echo "${core:-unknown}"
}
torch_status=0
if [[ "$python" == /usr/bin/python3 ]] && "$python" -c 'import torch' >/dev/null 2>&1; then
  export OPENBLAS_NUM_THREADS=2 OMP_WAIT_POLICY=passive
  installed_core="$(openblas_core)"
  if [[ -z "${OPENBLAS_CORETYPE:-}" ]] && grep -qw avx512f /proc/cpuinfo &&
     [[ ! "$installed_core" =~ ^(SkylakeX|Cooperlake|SapphireRapids)$ ]]; then
    export OPENBLAS_CORETYPE=SkylakeX
    core_source="set by bench.sh: the CPU has AVX-512, OpenBLAS chose $installed_core"
  elif [[ -n "${OPENBLAS_CORETYPE:-}" ]]; then
    core_source="OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE from the environment"
  else
    core_source="OpenBLAS's own detection"
  fi
  core="$installed_core"
  [[ "$core_source" == "set by bench.sh"* ]] && core="$(openblas_core)"
  merge_args+=(--openblas-core "$core")
  for ((round = 1; round <= rounds; ++round)); do
    ((round == 1)) || run_promoe "$round"
    echo "== torch_bench: OpenBLAS kernel $core (${core_source}) (round $round of $rounds)"
    if "$python" "$repo/bench/torch_bench.py" --threads 2 "${bench_args[@]}" --out "$work/torch-$round.json"; then
      merge_args+=(--torch "$work/torch-$round.json")
    else
      torch_status=$?
      echo "bench.sh: torch_bench.py failed (exit $torch_status); the results hold promoe only" >&2
      break
    fi
  done
  # When this script chose the kernel, PyTorch also runs as installed (OpenBLAS's own choice),
  # on the MoE layers, DiT steps and GEMMs.
  if [[ "$core_source" == "set by bench.sh"* && "$torch_status" == 0 ]]; then
    unset OPENBLAS_CORETYPE
    echo "== torch_bench as installed: OpenBLAS kernel $installed_core (OpenBLAS's own detection)"
    merge_args+=(--openblas-core-as-installed "$installed_core")
    if "$python" "$repo/bench/torch_bench.py" --threads 2 "${bench_args[@]}" --cases moe,dit,gemm \
        --out "$work/torch-installed.json"; then
      merge_args+=(--torch-as-installed "$work/torch-installed.json")
    else
      echo "bench.sh: torch_bench.py as installed failed; the results leave it out" >&2
    fi
  fi
else
  echo "== $python cannot import torch: running promoe_bench only (install python3-torch for the comparison)"
  for ((round = 2; round <= rounds; ++round)); do run_promoe "$round"; done
fi

host="$(uname -n)"
result="$out_dir/${host}-$(date +%F).json"
echo
"$python" "$repo/bench/merge_results.py" "${merge_args[@]}" --out "$result"
echo
echo "results: $result"
exit "$torch_status"
