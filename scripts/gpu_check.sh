#!/usr/bin/env bash
# One-GPU check of longlora_tune (H100/H200 class, a few minutes, installs nothing).
#
# Usage: scripts/gpu_check.sh [OUT_DIR] [--dry-run]
#   OUT_DIR   where logs and results go (default: $OUT, else ./gpu_check_out)
#   --dry-run run every step on CPU with tiny shapes (seconds; used by the smoke test)
#
# Steps, each logged to OUT_DIR and bounded so the whole script ends in under 8 minutes:
#   1. info.txt            nvidia-smi, torch/CUDA/triton/flash-attn versions
#   2. pytest_s2.log       the S² unit tests (tests/modules/test_s2_attention.py)
#   3. backend_check.*     sdpa/flex/flash S² against a float64 dense reference on CUDA, fp32 and bf16
#   4. bench_<N>.{log,json} training-step benchmark (markdown table in the log), 7B width with two
#                          layers, at 8192 then 32768 tokens
#   summary.txt            exit status of every step
# Run from anywhere; uses the python on PATH (activate the project's environment first) unless
# $PYTHON is set. Exits non-zero if any step failed.
set -euo pipefail

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,17p' "$0"
      exit 0
      ;;
    -*)
      echo "gpu_check.sh: unknown option $arg (use --dry-run or -h)" >&2
      exit 2
      ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

TOTAL_BUDGET_S=465 # 7 min 45 s: the whole script must end in under 8 minutes
START_S=$SECONDS
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0

log() {
  echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_check.log"
}

remaining() {
  echo $((TOTAL_BUDGET_S - (SECONDS - START_S)))
}

# run_step NAME MAX_SECONDS COMMAND...: runs COMMAND with a time limit (capped by what is left of the
# budget), tees its output to NAME.log and records the exit status without stopping the script.
run_step() {
  local name="$1" max_s="$2"
  shift 2
  local left limit status
  left="$(remaining)"
  limit=$((max_s < left ? max_s : left))
  if ((limit < 10)); then
    log "$name: skipped (time budget spent)"
    echo "$name skipped-no-time" >>"$SUMMARY"
    FAILED=1
    return 0
  fi
  log "$name: start (limit ${limit}s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  status=${PIPESTATUS[0]}
  set -e
  if ((status == 124 || status == 137)); then
    log "$name: TIMED OUT after ${limit}s"
  else
    log "$name: exit $status"
  fi
  echo "$name $status" >>"$SUMMARY"
  if ((status != 0)); then
    FAILED=1
  fi
  return 0
}

collect_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$PYTHON" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
    free, total = torch.cuda.mem_get_info()
    print(f"memory free/total GiB {free / 2**30:.1f}/{total / 2**30:.1f}")
for name in ("triton", "flash_attn", "torchtune", "torchao"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__, err)
from longlora_tune.modules.s2_attention import flash_attn_available
print("flash_attn_available()", flash_attn_available())
PY
}

log "output folder: $OUT_DIR (dry run: $DRY_RUN)"
log "info: start"
set +e
collect_info 2>&1 | tee "$OUT_DIR/info.txt"
INFO_STATUS=${PIPESTATUS[0]}
set -e
echo "info $INFO_STATUS" >>"$SUMMARY"
if ((INFO_STATUS != 0)); then
  FAILED=1
fi

if ((DRY_RUN)); then
  log "pytest_s2: dry run, not run: $PYTHON -m pytest tests/modules/test_s2_attention.py -q"
  echo "pytest_s2 dry-run" >>"$SUMMARY"
  run_step backend_check 60 "$PYTHON" -m longlora_tune.bench.backend_check --device cpu --small \
    --out "$OUT_DIR/backend_check.json"
  run_step bench_64 120 "$PYTHON" -m longlora_tune.bench --shape tiny --seq-lens 64 --repeats 1 \
    --device cpu --in-process --out "$OUT_DIR/bench_64.json"
else
  # The unit tests build their tensors on the CPU; on a CUDA machine they also run flex backward.
  run_step pytest_s2 90 "$PYTHON" -m pytest tests/modules/test_s2_attention.py -q -x -p no:cacheprovider
  run_step backend_check 120 "$PYTHON" -m longlora_tune.bench.backend_check --device cuda \
    --out "$OUT_DIR/backend_check.json"
  # 8k first so that its numbers survive even if 32k runs out of time; each case is its own process.
  for seq_len in 8192 32768; do
    run_step "bench_$seq_len" 200 "$PYTHON" -m longlora_tune.bench --shape 7b --layers 2 \
      --seq-lens "$seq_len" --repeats 3 --device cuda --case-timeout 120 --out "$OUT_DIR/bench_$seq_len.json"
  done
fi

log "done in $((SECONDS - START_S))s; summary:"
tee -a "$OUT_DIR/gpu_check.log" <"$SUMMARY"
exit "$FAILED"
