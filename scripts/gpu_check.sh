#!/usr/bin/env bash
# One-GPU check of longlora_tune on a lent machine (one H100/H200, no internet; at most 9 minutes).
#
# Usage: scripts/gpu_check.sh [OUT_DIR] [--dry-run]
#   OUT_DIR   where logs and results go (default: $OUT, else ./gpu_check_out)
#   --dry-run run every step on CPU with tiny shapes (seconds; used by the smoke test); installs nothing
#
# Packages: the lent machine has torch, transformers, peft, safetensors, sentencepiece, tiktoken and pyarrow
# but not torchtune, torchao, torchdata, omegaconf or datasets. Run scripts/prepare_gpu_wheels.sh here first:
# it fills .whl/ (git-ignored, ~22 MB, travels with the working tree), and this script installs it with
# `pip install --no-index --no-deps --target /tmp/site` and puts /tmp/site first on PYTHONPATH before
# anything imports torchtune. flash-attn is NOT available there (no binary wheel on the registry, and it
# cannot be built within the time limit): S² is measured with sdpa and flex (compiled) only.
#
# Steps, in this order of priority, each written as it runs (a run cut short keeps what it measured), each
# bounded and the whole script under 9 minutes (a step the budget no longer covers is skipped-no-time):
#   1. info.txt             nvidia-smi, torch/CUDA/triton/flash-attn versions
#   2. imports.log          every module the check imports, and one PEFT LoRA layer built next to torchao
#   3. backend_check.*      correctness first: sdpa/flex S² against a float64 dense reference on CUDA, fp32
#                           and bf16, forward and q/k/v gradients (JSON rewritten after every comparison)
#   4. recipe_32768.*       `tune run longlora_distributed` with configs/hf_checkpoint.yaml (every setting
#                           auto, bf16) on a random checkpoint of Llama 3.2 1B's sizes at 32768 tokens:
#                           planner vs measured peak, tokens/s, MFU, losses finite (benchmarks.recipe_check)
#   5. bench_32768_peer.*   ours on defaults (compile: auto, auto levers) vs the transformers + PEFT peer,
#                           bf16, 7B width, 2 layers, 32768 tokens (JSON rewritten after every case)
#   6. recipe_longest.*     step 4 at the longest length the planner says fits this GPU, or, when that is
#                           over 131072 tokens, at 131072 with the budget whose longest length it is
# The dry run replaces 3-6 by CPU stand-ins (backend check, a tiny bench, the recipe check at 256 tokens and
# at the longest length of a small budget).
# OUT_DIR gets summary.txt (exit status of every step), gpu_check.log, the *.json results and logs.tar.gz
# (every *.log and info.txt, repacked after each step): at most 8 files, what the lent machine sends back.
# Run from anywhere; uses the python on PATH (activate the project's environment first) unless
# $PYTHON is set. Exits non-zero if any step failed.
set -euo pipefail

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,29p' "$0"
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
LOG_DIR="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
WHEEL_DIR="$REPO_ROOT/.whl"
SITE_DIR="${GPU_CHECK_SITE:-/tmp/site}"
SITE_NOTE="no $WHEEL_DIR (run scripts/prepare_gpu_wheels.sh first if torchtune is not installed)"
if ((!DRY_RUN)) && compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  # Before anything imports torchtune. --no-deps: the folder holds every missing requirement, pinned.
  mkdir -p "$SITE_DIR"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE_DIR" "$WHEEL_DIR"/*.whl \
    >"$LOG_DIR/install.log" 2>&1; then
    SITE_NOTE="installed $(find "$WHEEL_DIR" -type f -name '*.whl' | wc -l) wheels into $SITE_DIR with pip"
  else
    # No pip (or pip refusing): a wheel is a zip archive laid out for site-packages; unpacking it is enough
    # for importing, and every wheel here is pure Python or built for this machine's Python.
    "$PYTHON" - "$SITE_DIR" "$WHEEL_DIR"/*.whl >>"$LOG_DIR/install.log" 2>&1 <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
    SITE_NOTE="pip install failed (see install.log); unpacked the wheels into $SITE_DIR"
  fi
  export PYTHONPATH="$SITE_DIR:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The recipe check's random checkpoint (5 GB at Llama 3.2 1B's sizes) and runs: never in OUT_DIR.
RECIPE_DIR="$(mktemp -d)"
trap 'rm -rf "$RECIPE_DIR"' EXIT

TOTAL_BUDGET_S=530 # 8 min 50 s: the whole script must end in under 9 minutes
START_S=$SECONDS
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0

log() {
  echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_check.log"
}

# Every log in one archive, rewritten after each step (a tar of a few small files takes milliseconds).
pack_logs() {
  tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$LOG_DIR" . && mv "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
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
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  status=${PIPESTATUS[0]}
  set -e
  if ((status == 124 || status == 137)); then
    log "$name: TIMED OUT after ${limit}s"
  else
    log "$name: exit $status"
  fi
  echo "$name $status" >>"$SUMMARY"
  pack_logs
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
log "packages: $SITE_NOTE"
log "flash-attn: not measured unless it imports (the lent machine has no flash-attn: no binary wheel" \
  "on the registry and no time to build it); S² backends measured: sdpa and flex (compiled)"
log "info: start"
set +e
collect_info 2>&1 | tee "$LOG_DIR/info.txt"
INFO_STATUS=${PIPESTATUS[0]}
set -e
echo "info $INFO_STATUS" >>"$SUMMARY"
pack_logs
if ((INFO_STATUS != 0)); then
  FAILED=1
fi

run_step imports 90 "$PYTHON" -m benchmarks.gpu_imports

if ((DRY_RUN)); then
  run_step backend_check 60 "$PYTHON" -m benchmarks.backend_check --device cpu --small \
    --out "$OUT_DIR/backend_check.json"
  run_step bench_64 120 "$PYTHON" -m benchmarks --shape tiny --seq-lens 64 --repeats 1 \
    --device cpu --in-process --peer --checkpoint-layers all 0 --compile false --out "$OUT_DIR/bench_64.json"
  run_step recipe_256 120 "$PYTHON" -m benchmarks.recipe_check --small --workdir "$RECIPE_DIR" \
    --seq-len 256 --out "$OUT_DIR/recipe_256.json"
  run_step recipe_longest 120 "$PYTHON" -m benchmarks.recipe_check --small --workdir "$RECIPE_DIR" \
    --seq-len longest --max-seq-len 1024 --out "$OUT_DIR/recipe_longest.json"
else
  # Correctness first: if S² is wrong on this GPU, its speed does not matter.
  run_step backend_check 100 "$PYTHON" -m benchmarks.backend_check --device cuda \
    --out "$OUT_DIR/backend_check.json"
  # The recipe itself (tune run, shipped defaults, every setting auto) on Llama 3.2 1B's sizes at 32k.
  # --timeout inside the step's limit: the check kills its tune run itself (freeing the GPU for the next
  # step) and still writes the steps it logged.
  run_step recipe_32768 180 "$PYTHON" -m benchmarks.recipe_check --workdir "$RECIPE_DIR" --seq-len 32768 \
    --timeout 165 --out "$OUT_DIR/recipe_32768.json"
  # Ours on defaults (compile: auto, auto levers) vs the transformers + PEFT peer, 7B width, 2 layers.
  run_step bench_32768_peer 150 "$PYTHON" -m benchmarks --shape 7b --layers 2 --device cuda --repeats 3 \
    --case-timeout 120 --seq-lens 32768 --variants longlora --backends sdpa --peer \
    --out "$OUT_DIR/bench_32768_peer.json"
  # The longest length the planner says fits; capped at 131072 tokens (3 steps in the time left) with the
  # memory budget whose longest length that is.
  run_step recipe_longest 180 "$PYTHON" -m benchmarks.recipe_check --workdir "$RECIPE_DIR" --seq-len longest \
    --timeout 165 --out "$OUT_DIR/recipe_longest.json"
fi

log "done in $((SECONDS - START_S))s; summary:"
tee -a "$OUT_DIR/gpu_check.log" <"$SUMMARY"
exit "$FAILED"
