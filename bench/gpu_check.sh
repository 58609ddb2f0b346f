#!/usr/bin/env bash
# The one script a session runs when a GPU is lent (see README "GPU check").
#
#   bash bench/gpu_check.sh             # full check, <= 10 min (+ <= 2.5 min timing SGLang where it is installed)
#   bash bench/gpu_check.sh --quick     # <= 8 min: GPU tests (bf16, V=151936), kernels at 3B/7B, compile twin, step
#   bash bench/gpu_check.sh --dry-run   # every part at toy size on the CPU (tests run this)
#
# On the GPU machine (Python 3.12, torch, triton, transformers; no network) it installs this project with
# `pip install --no-deps --no-build-isolation -e .`, plus any wheels carried in .whl/ (liger-kernel: see
# the device README), then runs each part under its own time budget. A part whose prerequisites are
# missing is reported and skipped. At most 8 files are written, to $OUT when set, else bench/results/
# (dry-run: a temporary folder unless $OUT is set). Exit status: 0 when no part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  OUT_DIR=${OUT:-$(mktemp -d)}
  SLUG=cpu-dry-run
else
  OUT_DIR=${OUT:-bench/results}
  SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
  SLUG=${SLUG:-unknown-gpu}
  export TRITON_INTERPRET=0  # compiled kernels, never the interpreter
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check_${SLUG}.log"
SUMMARY="$OUT_DIR/gpu_check_${SLUG}.md"
: > "$LOG"
export RARL_BENCH_OUT="$OUT_DIR" RARL_GPU_SLUG="$SLUG" RARL_DRY_RUN="$DRY" RARL_QUICK="$QUICK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The device machine gets a copy of the work tree without .git: pass the commit in RARL_COMMIT there.
export RARL_COMMIT=${RARL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

START=$(date +%s)
FAILED=0
ROWS=()

# run_part NAME BUDGET_SECONDS COMMAND...: runs under `timeout`, appends to the log, records the outcome.
# Exit code 3 from a part means "prerequisite missing: skipped".
run_part() {
  local name=$1 budget=$2
  shift 2
  local t0 rc status
  t0=$(date +%s)
  echo "=== part $name (budget ${budget}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$budget" bash -c "$*" >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    3) status=skipped ;;
    124|137) status="timeout (${budget}s)"; FAILED=1 ;;
    *) status="failed (rc=$rc)"; FAILED=1 ;;
  esac
  local dt=$(( $(date +%s) - t0 ))
  echo "=== part $name: $status in ${dt}s" | tee -a "$LOG"
  ROWS+=("| $name | $status | $dt |")
}

part_env() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $RARL_COMMIT"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "accelerate", "liger-kernel", "flash-attn", "sglang", "trl", "peft"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:  # report, never fail: this part only describes the machine
        print(name, "MISSING")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

part_install() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: not installing; checking that the packages import"
  else
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      echo "installed carried wheels: $(ls .whl)"
    else
      echo "no carried wheels in .whl/ (liger-kernel is then missing and its parts skip)"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  fi
  "$PY" -c "import rarl_fast, rarl_kernels; print('rarl_fast', rarl_fast.__version__, 'rarl_kernels', rarl_kernels.__version__)"
}

part_gpu_tests() {
  local args=(-m gpu -q -p no:cacheprovider --timeout 240 tests)
  "$PY" -m pytest "${args[@]}"
  local rc=$?
  if [ $rc = 5 ]; then echo "no GPU-marked tests collected"; return 0; fi
  return $rc
}

part_smoke() {
  local extra=()
  [ "$DRY" = 1 ] && extra+=(--device cpu)
  "$PY" bench/gpu_smoke.py "${extra[@]}"
}

part_rollout_bench() {
  if [ "$DRY" = 1 ]; then "$PY" bench/bench_rollout.py --scenario toy --device cpu --images 4
  else "$PY" bench/bench_rollout.py --scenario bench --device cuda --images 4
  fi
}

# SGLang beside the HF engine on the same scenario; skipped (exit 3) unless sglang is installed and a GPU is used.
part_rollout_sglang() {
  if [ "$DRY" = 1 ] || ! "$PY" -c "import sglang" >/dev/null 2>&1; then
    echo "sglang is not installed here (or dry run): SGLang's engine is not timed"; return 3
  fi
  "$PY" bench/bench_rollout.py --scenario bench --device cuda --images 4 --backend sglang
}

part_kernels_3b() {
  if [ "$DRY" = 1 ]; then "$PY" bench/bench_kernels.py --device cpu --shape toy --quick --providers torch,ours --modes full
  elif [ "$QUICK" = 1 ]; then "$PY" bench/bench_kernels.py --device cuda --shape qwen2.5-vl-3b --quick --modes full
  else "$PY" bench/bench_kernels.py --device cuda --shape qwen2.5-vl-3b
  fi
}

part_kernels_7b() {
  if [ "$DRY" = 1 ]; then "$PY" bench/bench_kernels.py --device cpu --shape toy --quick --providers ours --modes full
  else "$PY" bench/bench_kernels.py --device cuda --shape qwen2.5-vl-7b --quick --modes full
  fi
}

# The compile report's twin: the driver's registers / spills / shared memory of every kernel variant the ops load
# on this GPU, beside the ahead-of-time compile for its tile family (dry run: one kernel compiled, no file).
part_kernel_report() {
  if [ "$DRY" = 1 ]; then env -u TRITON_INTERPRET "$PY" -m rarl_kernels.aot --arch 90 --jobs 2 --kernel _grpo_token_kernel
  else "$PY" bench/kernel_report.py --device cuda
  fi
}

part_step_bench() {
  if [ "$DRY" = 1 ]; then "$PY" bench/bench_step.py --model tiny --device cpu --providers ours,torch --reps 1 --new-tokens 8
  else "$PY" bench/bench_step.py --model qwen2.5-vl-3b --device cuda --layers 4 --providers ours,torch --reps 1 --new-tokens 32
  fi
}

export DRY QUICK PY OUT_DIR SLUG
export -f part_env part_install part_gpu_tests part_smoke part_rollout_bench part_kernels_3b part_kernels_7b \
  part_kernel_report part_step_bench
export -f part_rollout_sglang

# Time budgets (seconds) per part; each is a cap enforced by `timeout`. Full <= 10 min, --quick <= 8 min. The GPU
# tests come first: they compile every kernel variant into triton's cache, which the later parts then reuse.
if [ "$DRY" = 1 ]; then
  B_ENV=30; B_INSTALL=30; B_TESTS=60; B_SMOKE=60; B_ROLLOUT=150; B_K3=60; B_K7=60; B_REPORT=60; B_STEP=150
elif [ "$QUICK" = 1 ]; then
  B_ENV=10; B_INSTALL=25; B_TESTS=120; B_SMOKE=15; B_ROLLOUT=20; B_K3=60; B_K7=40; B_REPORT=40; B_STEP=140
else
  B_ENV=10; B_INSTALL=25; B_TESTS=120; B_SMOKE=15; B_ROLLOUT=40; B_K3=110; B_K7=45; B_REPORT=40; B_STEP=150
fi
# SGLang's part runs only where sglang is installed (engine start-up is most of it); it adds to the totals above.
B_SGL=$([ "$QUICK" = 1 ] && echo 0 || echo 150)

run_part env "$B_ENV" part_env
run_part install "$B_INSTALL" part_install
if [ "$DRY" = 0 ] && [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
run_part gpu-tests "$B_TESTS" part_gpu_tests
run_part smoke "$B_SMOKE" part_smoke
run_part rollout-bench "$B_ROLLOUT" part_rollout_bench
if [ "$B_SGL" -gt 0 ]; then run_part rollout-sglang "$B_SGL" part_rollout_sglang; fi
run_part kernels-3b "$B_K3" part_kernels_3b
run_part kernels-7b "$B_K7" part_kernels_7b
run_part kernel-report "$B_REPORT" part_kernel_report
run_part step-bench "$B_STEP" part_step_bench

TOTAL=$(( $(date +%s) - START ))
{
  echo "# GPU check ($SLUG)"
  echo
  echo "date $(date -u +%Y-%m-%d), commit $RARL_COMMIT, dry-run=$DRY, quick=$QUICK, total ${TOTAL}s"
  echo
  echo "| part | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  for f in "$OUT_DIR/gpu_smoke_${SLUG}.csv" "$OUT_DIR/rollout.csv" "$OUT_DIR/kernels.csv" "$OUT_DIR/step.csv"; do
    if [ -f "$f" ]; then echo "$(basename "$f"):"; echo '```'; cat "$f"; echo '```'; fi
  done
} > "$SUMMARY"
cat "$SUMMARY"
echo "results in $OUT_DIR"
exit $FAILED
