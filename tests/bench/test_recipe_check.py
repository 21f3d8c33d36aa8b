"""benchmarks.recipe_check: reading a recipe run's numbers back from its logs (the run itself is the GPU
check's dry run in tests/bench/test_bench_smoke.py)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.recipe_check import REAL_SHAPE, _summary, longest_setting, parse_run
from longlora_tune.plan.flops import step_flops

# torchtune's DiskLogger: "Step N | name:value name:value ..." per logged step.
LOG = (
    "Step 1 | loss:10.4 lr:1e-06 tokens_per_second_per_gpu:20000.0 peak_memory_alloc:30.5 \n"
    "Step 2 | loss:10.1 lr:2e-06 tokens_per_second_per_gpu:40000.0 peak_memory_alloc:31.0 \n"
    "Step 3 | loss:9.8 lr:3e-06 tokens_per_second_per_gpu:44000.0 peak_memory_alloc:30.9 \n"
)
STDERR = (
    "INFO:longlora_tune:S2 backend auto: SDPA, RoPE factor 8.0\n"
    "INFO:longlora_tune:auto: custom at 32768 tokens: peak 33.2 GiB of 78 GiB, 1.0 TFLOPs per step "
    "(budget: free GPU memory)\n"
    "INFO:longlora_tune:auto: activation_checkpointing_layers: 4 (4 of 16 layers recomputed)\n"
    "INFO:longlora_tune:auto: compile: true (inductor compiles on cuda; ...)\n"
)


def test_parse_run_reads_every_step_and_the_planners_peak():
    run = parse_run(LOG, STDERR)
    assert [s["step"] for s in run["steps"]] == [1, 2, 3]
    assert run["steps"][1] == {
        "step": 2,
        "loss": 10.1,
        "lr": 2e-06,
        "tokens_per_second_per_gpu": 40000.0,
        "peak_memory_alloc": 31.0,
    }
    assert run["planner_peak_gib"] == 33.2
    # Only the recipe's choice lines, not every line that says "auto".
    assert [line.split(":")[0] for line in run["auto_lines"]] == [
        "custom at 32768 tokens",
        "activation_checkpointing_layers",
        "compile",
    ]


def test_summary_times_steps_after_the_first_and_compares_peaks():
    summary = _summary(parse_run(LOG, STDERR), REAL_SHAPE, 32768, peak_tflops=989.0)
    assert summary["tokens_per_s"] == 42000.0  # median of steps 2-3: step 1 compiles
    assert summary["measured_peak_gib"] == 31.0
    assert summary["planner_over_measured"] == pytest.approx(33.2 / 31.0)
    model = step_flops(REAL_SHAPE, 32768, 1, group_size=8192, activation_checkpointing=True).model
    assert summary["mfu"] == pytest.approx(model * 42000.0 / 32768 / 989e12)
    assert summary["losses_finite"] is True
    bad = parse_run(LOG.replace("loss:9.8", "loss:nan"), STDERR)
    assert _summary(bad, REAL_SHAPE, 32768, None)["losses_finite"] is False
    assert math.isnan(bad["steps"][2]["loss"])


def test_longest_is_the_planners_or_the_cap_with_the_budget_that_makes_it_the_limit():
    small = longest_setting(REAL_SHAPE, 24.0, dtype="bf16", cap=10**7, offloading=True)
    large = longest_setting(REAL_SHAPE, 80.0, dtype="bf16", cap=10**7, offloading=True)
    assert 0 < small.planned_longest < large.planned_longest
    assert (large.seq_len, large.budget_gib) == (large.planned_longest, 80.0)
    capped = longest_setting(REAL_SHAPE, 80.0, dtype="bf16", cap=131_072, offloading=True)
    assert capped.planned_longest == large.planned_longest and capped.seq_len == 131_072
    # The cap is the longest length of the budget it gets (to the planner's 1024-token step).
    again = longest_setting(REAL_SHAPE, capped.budget_gib, dtype="bf16", cap=10**7, offloading=True)
    assert 131_072 <= again.planned_longest < 131_072 + 8 * 1024
    assert capped.budget_gib < 80.0


def test_a_run_past_its_timeout_is_killed_and_still_reported(tmp_path):
    # One second cannot cover the recipe's start-up: the child is killed and the report says so.
    from benchmarks.recipe_check import main

    out = tmp_path / "report.json"
    report = main(["--small", "--workdir", str(tmp_path / "w"), "--seq-len", "256", "--timeout", "1",
                   "--out", str(out)])  # fmt: skip
    assert report["returncode"] == "timeout" and report["losses_finite"] is False
    assert json.loads(out.read_text())["returncode"] == "timeout"
