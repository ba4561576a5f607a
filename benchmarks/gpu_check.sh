#!/usr/bin/env bash
# The whole GPU check in one command, for a fresh GPU machine with python3 (torch, ninja, pytest)
# and nvcc but no internet: build fusedlr in place with its CUDA kernels, run the CUDA and op tests,
# run the GPU benchmark, and print a summary table last. Logs and bench.json go to $OUT.
#
#   bash benchmarks/gpu_check.sh            # OUT=./gpu-check-out, within 6 minutes on an H200
#
# Each phase prints its time when it ends, and the summary comes last even when a phase fails or
# runs out of time. Environment: OUT, PYTHON (python3), MAX_JOBS (all cores), BUDGET_S (330: every
# phase is cut off so that the whole check, start-up included, ends within 6 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-check-out}
BUDGET_S=${BUDGET_S:-330}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
SUMMARY=()
FAILED=0

# phase NAME CAP_SECONDS COMMAND...: runs COMMAND under a timeout of CAP_SECONDS or what is left of
# the budget, whichever is less; its output goes to $OUT/NAME.log and, when SHOW=1, to the terminal.
phase() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 10 ]; then
    SUMMARY+=("$(printf '%-8s %-22s %6s' "$name" "skipped (no time left)" "-")")
    FAILED=1
    return 1
  fi
  echo "== $name (limit ${limit}s): $*"
  local begin=$SECONDS rc=0
  if [ "${SHOW:-1}" = 1 ]; then
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  fi
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status="failed (rc $rc)"; fi
  [ "$status" = ok ] || FAILED=1
  SUMMARY+=("$(printf '%-8s %-22s %6d' "$name" "$status" $((SECONDS - begin)))")
  echo "== $name: $status in $((SECONDS - begin))s ($((SECONDS - START))s of ${BUDGET_S}s used)"
  [ "$status" = ok ]
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')" | tee "$OUT/machine.txt"
{ nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version; } 2>/dev/null | tail -n 1 \
  | tee -a "$OUT/machine.txt" || true

built=0
if SHOW=0 phase build 150 env FUSEDLR_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" setup.py build_ext --inplace; then
  built=1
else
  echo "build failed; first errors:"
  grep -n -m 20 -E "error|Error" "$OUT/build.log" || tail -n 30 "$OUT/build.log"
fi

if [ "$built" = 1 ]; then
  # The CUDA tests only (tests/test_cuda.py, [note: lean CUDA tests], and the one-rank NCCL FSDP2
  # case of tests/test_distributed.py): the CPU and emulation tests
  # need no GPU and run in CI.
  phase tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py \
    "tests/test_distributed.py::test_nccl_one_rank_fsdp2" || true
  # torch.compile of a 2,000-tensor step takes minutes: the compiled contender runs on llama-1b only.
  phase bench 100 "$PYTHON" -m fusedlr bench --device cuda --preset llama-1b --steps 30 --quiet \
    --json "$OUT/bench.json" || true
  phase small 40 "$PYTHON" -m fusedlr bench --device cuda --preset 2000x1k --steps 100 --quiet --no-compiled \
    --json "$OUT/bench_small.json" || true
  phase clip 40 "$PYTHON" -m fusedlr bench --device cuda --preset llama-1b --max-grad-norm 1.0 --steps 15 --quiet \
    --no-compiled --json "$OUT/bench_clip.json" || true
fi

{
  echo
  echo "== gpu check summary ($((SECONDS - START))s in all; logs in $OUT)"
  printf '%-8s %-22s %6s\n' phase status seconds
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ -f "$OUT/tests.log" ]; then
    echo "tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
  fi
  for json in "$OUT/bench.json" "$OUT/bench_small.json" "$OUT/bench_clip.json"; do
    [ -f "$json" ] || continue
    "$PYTHON" - "$json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"bench: {report['optimizer']}, schedule {report['schedule']}, {report['dtype']}, "
      f"max_grad_norm {report.get('max_grad_norm')}, floor at {report['floor_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
print(f"{'preset':<10} {'contender':<34} {'median ms':>10} {'% floor':>8} {'vs fused':>9}")
for preset in report["presets"]:
    for r in preset["results"]:
        print(f"{preset['preset']:<10} {r['contender']:<34} {r['median_s'] * 1e3:>10.3f} "
              f"{r['pct_of_floor']:>7.1f}% {r['speedup_vs_torch_fused']:>8.2f}x")
        if "compile_s" in r:
            print(f"{preset['preset']:<10} ({r['contender']}: compiled in {r['compile_s']:.0f} s, apart)")
    if "clipping_cost" in preset:
        print(f"{preset['preset']:<10} clipping costs {preset['clipping_cost']:.2f}x "
              f"(one more gradient read: {preset['clipping_floor']:.2f}x)")
EOF
  done
} | tee "$OUT/summary.txt"
exit "$FAILED"
