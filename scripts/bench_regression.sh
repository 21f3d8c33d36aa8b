#!/usr/bin/env bash
# Benchmark regression check: our tokens/s ratio to the transformers + PEFT peer against a recorded value.
#
# Usage: scripts/bench_regression.sh [--record] [--result FILE] [--baseline FILE] [--rounds N] [--repeats N]
#                                    [--metric auto|median_ratio|best_ratio|cpu_median_ratio] [--tolerance 0.10]
#                                    [--note TEXT]
#   (no option)     rerun the 7B-proxy comparison (python -m benchmarks --shape 7b-proxy
#                   --seq-lens 8192 --variants longlora --peer with the recorded case's settings: torchtune's
#                   chunked loss, every layer recomputed, untiled; interleaved rounds, one thread) and compare
#                   ours/peer with scripts/bench_baseline.json: exits 1 with one REGRESSION line when the
#                   ratio dropped by more than the tolerance (10%), 2 when the run failed or cannot be
#                   compared (other settings than recorded), 0 otherwise
#   --record        rerun and write the new ratios as the baseline instead of checking (commit the file;
#                   record on a quiet machine, --note says under which conditions)
#   --result FILE   compare (or record) an existing bench JSON instead of rerunning
#   --rounds/--repeats  bench rounds (default 3) and timed steps per round (default 3): about 6 minutes
#                   on one core
#   --metric        auto (default): cpu_median_ratio (tokens per CPU-second; a one-thread run's wall time
#                   follows the machine's load) for a CPU baseline, median_ratio (wall clock) on CUDA;
#                   or median_ratio, best_ratio (fastest steps), cpu_median_ratio
# Not part of the test suite (speed lives in benchmarks); tests/bench/test_bench_regression.py tests only
# the comparison. Uses $PYTHON or the python on PATH, with this checkout first on PYTHONPATH.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

action=check
result=""
rounds=3
repeats=3
# Explicit, so that an installed (non-editable) copy of the package still reads this checkout's file.
compare_args=(--baseline "$REPO/scripts/bench_baseline.json")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --record) action=record; shift ;;
    --result) result="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --baseline|--metric|--tolerance|--note) compare_args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench regression: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$result" ]]; then
  workdir="$(mktemp -d)"
  trap 'rm -rf "$workdir"' EXIT
  result="$workdir/bench.json"
  # The bench's tables go to stderr with its progress, so that stdout's last line is the verdict.
  if ! OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" -m benchmarks --shape 7b-proxy --seq-lens 8192 \
      --variants longlora --peer --threads 1 --rounds "$rounds" --repeats "$repeats" --out "$result" \
      --losses chunked --checkpoint-layers all --sequence-tile-tokens off --compile false >&2; then
    if [[ ! -s "$result" ]]; then
      echo "bench regression: CANNOT COMPARE: the benchmark run failed before writing a result (see above)"
      exit 2
    fi
    # A failed case is in the JSON: the comparison names it.
  fi
fi

# "check" exits 0 ok, 1 regression, 2 cannot compare; "record" 0 or 2.
exec "$PY" -m benchmarks.regression "$action" "$result" ${compare_args[@]+"${compare_args[@]}"}
