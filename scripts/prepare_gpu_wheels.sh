#!/usr/bin/env bash
# Download, on this machine, the wheels that scripts/gpu_check.sh needs on the lent GPU machine.
#
# Usage: scripts/prepare_gpu_wheels.sh [DEST]     (DEST default: .whl/ at the repository root, git-ignored)
#
# The lent machine (one H200, CPython 3.12, torch with CUDA, transformers, peft, safetensors, sentencepiece,
# tiktoken, pyarrow, numpy; no internet) lacks torchtune, torchao, torchdata, omegaconf, datasets and what
# datasets imports at import time (pandas, dill, multiprocess, xxhash). It also pins peft==0.18.1 over the machine's own peft (0.21 seen there), which refuses to build
# LoRA layers next to torchao < 0.16 (the torchao that torchtune 0.6.1 needs): the peer benchmark died on it
# on the first lent H200. gpu_check.sh installs DEST/*.whl with `pip install --no-index --no-deps --target /tmp/site`.
# Every wheel is pinned and --no-deps: a new requirement is added here by hand, and the dry run
# (tests/test_gpu_check.py) imports everything the check imports from exactly these wheels plus the GPU
# machine's packages, so a forgotten one fails here, not on the GPU. About 22 MB in all.
# torchao's compiled kernels are built for one torch each; on another torch it skips loading them (its own
# version check) and its Python API, all that torchtune imports, works. flash-attn has no binary wheel on
# the registry and is not downloaded: the check measures sdpa and flex.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO_ROOT/.whl}"
PYTHON="${PYTHON:-python3}"

# Parsed by benchmarks.gpu_env.wheel_specs: one `name==version` per line between the markers.
# --- wheels ---
WHEELS=(
  torchtune==0.6.1
  torchao==0.15.0
  torchdata==0.11.0
  omegaconf==2.4.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  xxhash==4.1.0
  pandas==3.1.1
  python-dateutil==4.0.0
  tzdata==2026.6
  peft==0.18.1
)
# --- end wheels ---

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}"

# A wheel left over from an earlier pin would be installed too: keep only the listed versions.
for wheel in "$DEST"/*.whl; do
  base="$(basename "$wheel")"
  keep=0
  for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    version="${spec#*==}"
    # Wheel file names use underscores for dashes in the distribution name.
    if [[ "$base" == "${name//-/_}-${version}-"* ]]; then
      keep=1
    fi
  done
  if ((!keep)); then
    echo "prepare_gpu_wheels: removing stale $base"
    rm -f "$wheel"
  fi
done

ls -l "$DEST"
echo "prepare_gpu_wheels: $(find "$DEST" -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
