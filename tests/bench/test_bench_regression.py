"""The bench regression comparison (scripts/bench_regression.sh) on hand-made bench JSON; nothing is run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.regression import (
    DEFAULT_BASELINE,
    baseline_from_result,
    compare_to_baseline,
    main,
)

REPO = Path(__file__).resolve().parents[2]
CASE = {
    "shape": "7b-proxy",
    "layers": None,
    "batch_size": 1,
    "device": "cpu",
    "dtype": "fp32",
    "threads": 1,
    "activation_checkpointing": True,
    "checkpoint_layers": None,
    "loss_chunks": 8,
    "compile": False,
}


def _result(median: float = 1.30, best: float = 1.25, cpu: float = 1.28, **case: object) -> dict:
    """A ``python -m benchmarks --peer --out`` JSON with one ours-vs-peer row at 8192."""
    ours = {**CASE, "variant": "longlora", "seq_len": 8192, **case}
    peer = {**CASE, "variant": "peer", "seq_len": 8192}
    return {
        "command": "python -m benchmarks --shape 7b-proxy --seq-lens 8192 --peer",
        "host": "h",
        "cpu_count": 2,
        "torch": "2.13.0",
        "complete": True,
        "results": [ours, peer],
        "peer": [
            {
                "seq_len": 8192,
                "ours": "longlora[sdpa]",
                "best_ratio": best,
                "median_ratio": median,
                "cpu_median_ratio": cpu,
                "mem_ratio": 0.9,
            }
        ],
    }


BASELINE = baseline_from_result(_result(), note="hand-made")


def test_recorded_baseline_keeps_every_ratio_and_the_settings():
    assert BASELINE["ratios"] == {
        "8192": {"longlora[sdpa]": {"median_ratio": 1.30, "best_ratio": 1.25, "cpu_median_ratio": 1.28}}
    }
    assert BASELINE["settings"] == CASE and BASELINE["note"] == "hand-made"
    assert BASELINE["command"].endswith("--peer") and BASELINE["recorded"]


@pytest.mark.parametrize(
    ("median", "status"),
    [(1.30, "ok"), (1.20, "ok"), (1.171, "ok"), (1.169, "regression"), (1.0, "regression"), (2.0, "ok")],
)
def test_a_drop_of_more_than_ten_percent_fails(median, status):
    comparison = compare_to_baseline(_result(median=median), BASELINE, metric="median_ratio")
    assert comparison.status == status
    assert comparison.exit_code == {"ok": 0, "regression": 1}[status]
    row = comparison.rows[0]
    assert (row["seq_len"], row["ours"], row["baseline"], row["current"]) == (
        8192,
        "longlora[sdpa]",
        1.30,
        median,
    )
    assert row["change"] == pytest.approx(median / 1.30 - 1)
    line = comparison.line()
    assert "\n" not in line and line.startswith(
        f"bench regression: {'OK' if status == 'ok' else 'REGRESSION'}"
    )
    assert f"{median:.3f}x vs recorded 1.300x" in line


def test_metric_and_tolerance_are_chosen():
    result = _result(median=1.0, cpu=1.28)  # wall median dropped (a loaded machine), CPU time did not
    # auto: CPU time for a CPU baseline, wall time for a CUDA one.
    assert compare_to_baseline(result, BASELINE).metric == "cpu_median_ratio"
    assert compare_to_baseline(result, BASELINE).status == "ok"
    cuda = {**BASELINE, "settings": {**BASELINE["settings"], "device": "cuda"}}
    on_cuda = compare_to_baseline(_result(median=1.0, cpu=1.28, device="cuda"), cuda)
    assert on_cuda.metric == "median_ratio" and on_cuda.status == "regression"
    assert compare_to_baseline(_result(cpu=1.1), BASELINE).status == "regression"
    assert compare_to_baseline(result, BASELINE, metric="median_ratio", tolerance=0.25).status == "ok"
    assert compare_to_baseline(result, BASELINE, metric="median_ratio", tolerance=0.2).status == "regression"
    with pytest.raises(ValueError, match="metric must be one of"):
        compare_to_baseline(result, BASELINE, metric="tokens")
    with pytest.raises(ValueError, match="tolerance must be in"):
        compare_to_baseline(result, BASELINE, tolerance=1.5)


def test_results_that_cannot_be_compared_fail_with_the_reason():
    other = compare_to_baseline(_result(threads=2, dtype="bf16"), BASELINE)
    assert other.status == "incomparable" and other.exit_code == 2
    assert (
        "measured with other settings than recorded: dtype='bf16' (recorded 'fp32'), threads=2"
        in other.line()
    )
    no_peer = _result()
    no_peer["peer"] = []
    assert "no ours-vs-peer row for seq 8192 longlora[sdpa]" in compare_to_baseline(no_peer, BASELINE).line()
    failed = _result()
    failed["peer"] = []
    failed["results"][1]["error"] = "worker exited 1: out of memory"
    line = compare_to_baseline(failed, BASELINE).line()
    assert (
        line == "bench regression: CANNOT COMPARE: case peer seq 8192 failed: worker exited 1: out of memory"
    )
    with pytest.raises(ValueError, match="run the bench with --peer"):
        baseline_from_result(no_peer)
    with pytest.raises(ValueError, match="incomplete"):
        baseline_from_result({**_result(), "complete": False})


def test_cli_records_then_checks(tmp_path, capsys):
    result, baseline = tmp_path / "bench.json", tmp_path / "baseline.json"
    result.write_text(json.dumps(_result()))
    assert main(["record", str(result), "--baseline", str(baseline), "--note", "quiet"]) == 0
    assert "recorded" in capsys.readouterr().out
    assert json.loads(baseline.read_text())["ratios"] == BASELINE["ratios"]
    assert main(["check", str(result), "--baseline", str(baseline)]) == 0
    result.write_text(json.dumps(_result(cpu=1.0)))
    assert main(["check", str(result), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and out.splitlines()[-1].startswith("bench regression: REGRESSION")
    assert main(["check", str(tmp_path / "missing.json"), "--baseline", str(baseline)]) == 2
    assert "result" in capsys.readouterr().err


def test_the_shipped_baseline_is_a_valid_record():
    baseline = json.loads(DEFAULT_BASELINE.read_text())
    assert baseline["ratios"]["8192"]["longlora[sdpa]"]["median_ratio"] > 0
    assert baseline["settings"]["shape"] == "7b-proxy" and baseline["command"] and baseline["recorded"]
    # The same numbers compare as "ok" with themselves.
    row = {"seq_len": 8192, "ours": "longlora[sdpa]", **baseline["ratios"]["8192"]["longlora[sdpa]"]}
    result = {"complete": True, "results": [{**baseline["settings"], "variant": "longlora"}], "peer": [row]}
    assert compare_to_baseline(result, baseline).status == "ok"


def test_script_compares_a_given_result_without_running_the_bench(tmp_path):
    result, baseline = tmp_path / "bench.json", tmp_path / "baseline.json"
    result.write_text(json.dumps(_result(cpu=1.0)))
    baseline.write_text(json.dumps(BASELINE))
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "bench_regression.sh"),
            "--result",
            str(result),
            "--baseline",
            str(baseline),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip().startswith("bench regression: REGRESSION: ours/peer cpu_median_ratio")
