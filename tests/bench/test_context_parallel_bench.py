"""The context-parallel benchmark: two gloo processes against one, halo bytes counted and checked."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.context_parallel import (
    combine_ranks,
    comparisons,
    launch,
    markdown,
    run_rank,
)
from benchmarks.train_step import Case, resolve_shape


def _rank(rank: int, step_s: list[float], cpu_step_s: list[float], sent: int, received: int) -> dict:
    passes = {"forward": 0, "backward": 0, "mask": 0}
    return {
        "rank": rank,
        "context_parallel_degree": 2,
        "shape": "tiny",
        "layers": None,
        "seq_len": 64,
        "batch_size": 1,
        "activation_checkpointing": False,
        "group_size": 16,
        "num_layers": 2,
        "dtype_bytes": 4,
        "model_flops": 1e9,
        "step_s": step_s,
        "cpu_step_s": cpu_step_s,
        "warmup_s": 1.0 + rank,
        "loss": 1.5,
        "peak_mem_bytes": 100 + rank,
        "peak_mem_over_model_bytes": 10 + rank,
        "halo": {
            "sent": {**passes, "forward": sent},
            "received": {**passes, "forward": received},
            "messages": {**passes, "forward": 2},
        },
        "halo_steps_differ": False,
    }


def test_combine_ranks_takes_the_slowest_rank_per_step_and_sums_cpu_time():
    # Rank 0 sends the forward tail, rank 1 receives it (no recompute, and no backward in this fake).
    ranks = [_rank(1, [0.3, 0.1], [0.2, 0.1], 0, 4096), _rank(0, [0.2, 0.2], [0.1, 0.1], 4096, 0)]
    out = combine_ranks(ranks)
    assert out["step_s"] == [0.3, 0.2] and out["cpu_step_s"] == pytest.approx([0.3, 0.2])
    assert out["median_s"] == pytest.approx(0.25) and out["tokens_per_s"] == pytest.approx(64 / 0.25)
    assert out["loss"] == 3.0 and out["warmup_s"] == 2.0
    assert out["per_rank_peak_mem_over_model_bytes"] == [10, 11] and out["peak_mem_over_model_bytes"] == 11
    # 4096 bytes over 2 layers across the one boundary; without recompute the formula adds the backward
    # gradient, which this fake did not send: the check must say no.
    assert out["halo_bytes_per_layer"]["forward"] == 2048 and out["halo_bytes_per_layer"]["total"] == 2048
    assert out["halo_formula_bytes"] == 2 * 2048 and out["halo_matches_formula"] is False
    with pytest.raises(ValueError, match="expected 2 rank results"):
        combine_ranks(ranks[:1])


def test_two_processes_against_one_measured_bytes_equal_the_formula():
    case = Case(shape="tiny", seq_len=64, variant="longlora", repeats=2, loss_chunks=2)
    single = combine_ranks([run_rank(case, 1)])
    split = launch(case, 2, timeout=240)
    assert "error" not in split, split.get("error")

    shape = resolve_shape("tiny")
    layers, group = shape.num_layers, 64 // 4
    # By hand: keys and values of H/2 heads, G/2 positions, head_dim d, fp32, batch 1.
    tail = 2 * (shape.num_heads // 2) * (group // 2) * shape.head_dim * 4
    per_layer = split["halo_bytes_per_layer"]
    # Activation checkpointing sends the tail twice (forward and recomputation) and its gradient once.
    assert per_layer == {"forward": 2 * tail, "backward": tail, "mask": 0, "total": 3 * tail}
    assert split["halo_formula_bytes"] == 3 * tail and split["halo_matches_formula"] is True
    assert split["halo_steps_differ"] is False and split["halo_sent_equals_received"] is True
    rank0, rank1 = (r["halo"] for r in split["rank_results"])
    assert rank0["sent"]["forward"] == rank1["received"]["forward"] == 2 * tail * layers
    assert rank1["sent"]["backward"] == rank0["received"]["backward"] == tail * layers
    assert rank0["received"]["forward"] == 0 and rank1["sent"]["forward"] == 0  # no wrap-around
    assert split["ring_formula_bytes"] > per_layer["total"]
    assert single["halo_bytes_per_layer"]["total"] == 0 and single["grad_allreduce_bytes"] == 0
    assert split["grad_allreduce_bytes"] > 0

    for r in (single, split):
        assert len(r["step_s"]) == 2 and r["median_s"] > 0 and r["median_cpu_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(64 / r["median_s"])
    assert len(split["per_rank_peak_mem_over_model_bytes"]) == 2
    # The split step computes the same loss (and, after two AdamW steps, the same weights) as one process.
    assert split["loss"] == pytest.approx(single["loss"], rel=1e-5)

    table = markdown([single, split])
    assert "| 64 | 2 |" in table and "| 64 | 1 |" in table and "| yes |" in table
    row = comparisons([single, split])[0]
    assert row["degree"] == 2 and row["speedup"] == pytest.approx(single["median_s"] / split["median_s"])
    assert row["loss_rel_diff"] < 1e-5


def test_cli_refuses_lengths_that_do_not_split(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--context-parallel", "3", "--shape", "tiny", "--seq-lens", "64", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--seq-lens 64: context_parallel_degree=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--context-parallel", "1", "--shape", "tiny", "--device", "cpu"])
    assert exit_info.value.code == 2 and "must be >= 2" in capsys.readouterr().err


def test_worker_reports_errors_as_one_line(capsys):
    from benchmarks.context_parallel import main as cp_main

    for degree, seq_len, message in ((3, 64, "context_parallel_degree=3"), (2, 64, "needs a process group")):
        spec = {"case": {"shape": "tiny", "seq_len": seq_len, "variant": "longlora"}, "degree": degree}
        assert cp_main(["--cp-worker", json.dumps(spec)]) == []
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert message in result["error"] and "\n" not in result["error"]
