"""Smoke tests of the benchmark harness, the S² backend check and the GPU check script (no timing asserts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.backend_check import main as backend_check_main
from benchmarks.train_step import Case, detect_peak_tflops, resolve_shape, run_case

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
#: Every lever of ours given (torchtune's chunked loss, every layer recomputed, untiled, eager): the cases
#: whose labels and numbers these tests compare do not depend on the auto choice (and ``--compile auto``
#: would build inductor kernels on CPU).
FIXED = ["--losses", "chunked", "--checkpoint-layers", "all", "--sequence-tile-tokens", "off"]
FIXED += ["--compile", "false"]


def test_run_case_one_step_each_variant():
    results = {}
    for variant in ("longlora", "full_attn", "lora"):
        case = Case(shape="tiny", seq_len=32, variant=variant, repeats=1, loss_chunks=2)
        results[variant] = run_case(case)
    for variant, result in results.items():
        assert len(result["step_s"]) == 1 and result["median_s"] > 0, variant
        assert len(result["cpu_step_s"]) == 1 and result["median_cpu_s"] > 0, variant
        assert result["tokens_per_s"] == pytest.approx(32 / result["median_s"])
        assert result["model_flops"] > 0 and result["mfu"] is None  # CPU: no MFU without a peak
        assert result["memory_kind"].startswith("cpu peak RSS") or result["memory_kind"] == "unavailable"
    # The variants differ in the trainable set and attention FLOPs exactly as documented.
    assert results["longlora"]["trainable"] == results["full_attn"]["trainable"]
    assert results["lora"]["trainable"]["embed"] == 0 and results["lora"]["trainable"]["norm"] == 0
    assert results["lora"]["trainable"]["lora"] == results["longlora"]["trainable"]["lora"] > 0
    assert results["longlora"]["model_flops"] < results["full_attn"]["model_flops"]


def test_cli_in_process_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench_main(
        [
            "--shape",
            "tiny",
            "--seq-lens",
            "32",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--in-process",
            "--loss-chunks",
            "2",
            "--out",
            str(out),
            *FIXED,
        ]
    )
    table = capsys.readouterr().out
    assert [r["variant"] for r in results] == ["longlora", "full_attn", "lora"]
    assert "| longlora[sdpa] | 32 |" in table and "full/S²" in table
    payload = json.loads(out.read_text())
    assert len(payload["results"]) == 3 and len(payload["ratios"]) == 1
    ratio = payload["ratios"][0]
    full = next(r for r in payload["results"] if r["variant"] == "full_attn")
    s2 = next(r for r in payload["results"] if r["variant"] == "longlora")
    assert ratio["full_over_s2"] == pytest.approx(full["median_s"] / s2["median_s"])
    assert ratio["full_over_s2_cpu"] == pytest.approx(full["median_cpu_s"] / s2["median_cpu_s"])
    assert payload["complete"] is True


def test_cli_rejects_unavailable_backend_on_cpu():
    with pytest.raises(ValueError, match="flex"):
        run_case(Case(shape="tiny", seq_len=32, variant="longlora", backend="flex", repeats=1))
    with pytest.raises(ValueError, match="seq_len"):
        Case(shape="tiny", seq_len=30, variant="longlora")


def test_shapes_and_peaks():
    proxy = resolve_shape("7b-proxy")
    assert (proxy.num_layers, proxy.embed_dim, proxy.num_heads, proxy.head_dim) == (2, 512, 4, 128)
    assert proxy.intermediate_dim / proxy.embed_dim == pytest.approx(11008 / 4096, rel=0.01)
    assert resolve_shape("7b", layers=2).num_layers == 2 and resolve_shape("7b", 2).embed_dim == 4096
    assert detect_peak_tflops("NVIDIA H200") == 989.0 and detect_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert detect_peak_tflops("NVIDIA H100 PCIe") == 756.0 and detect_peak_tflops("Quadro") is None


def test_backend_check_cpu(tmp_path):
    out = tmp_path / "check.json"
    assert backend_check_main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["dtype"] for r in results} == {"float32", "bfloat16"} and all(r["ok"] for r in results)


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The lent machine sends back at most 8 files: the logs travel in one archive.
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {
        "summary.txt",
        "gpu_check.log",
        "logs.tar.gz",
        "backend_check.json",
        "bench_64.json",
        "recipe_256.json",
        "recipe_longest.json",
    }
    with tarfile.open(tmp_path / "logs.tar.gz") as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        logs = {Path(m.name).name: archive.extractfile(m).read().decode() for m in members}
    summary = (tmp_path / "summary.txt").read_text().split("\n")
    assert "info 0" in summary and "backend_check 0" in summary and "bench_64 0" in summary
    assert "imports 0" in summary and "ok   import benchmarks.peer" in logs["imports.log"]
    assert "ok   peft builds a LoRA layer" in logs["imports.log"] and "torch" in logs["info.txt"]
    bench = json.loads((tmp_path / "bench_64.json").read_text())
    assert {r["variant"] for r in bench["results"]} == {"longlora", "full_attn", "lora", "peer"}
    # Ours with every layer recomputed and with none, each against the peer.
    # (The fused loss is ours by default.)
    assert [q["ours"] for q in bench["peer"]] == [
        "longlora[sdpa]+fused-loss",
        "longlora[sdpa]+fused-loss+ac0",
    ]
    assert "flash-attn" in (tmp_path / "gpu_check.log").read_text()
    assert "PASS sdpa" in logs["backend_check.log"]
    # The recipe itself under `tune run`, its numbers read back from its own logs.
    assert "recipe_256 0" in summary
    recipe = json.loads((tmp_path / "recipe_256.json").read_text())
    assert recipe["returncode"] == 0 and recipe["losses_finite"], recipe["stderr_tail"]
    assert [s["step"] for s in recipe["steps"]] == [1, 2, 3] and recipe["tokens_per_s"] > 0
    assert recipe["planner_peak_gib"] > 0 and recipe["planner_longest"] >= 256
    assert recipe["auto_lines"][1].startswith("activation_checkpointing_layers: ")
    # Capped at 1024 tokens: run with the budget whose longest length that is.
    longest = json.loads((tmp_path / "recipe_longest.json").read_text())
    assert "recipe_longest 0" in summary and longest["losses_finite"], longest["stderr_tail"]
    assert longest["seq_len"] == 1024 < longest["planner_longest"] and longest["budget_gib"] < 8


def test_cli_compile_measures_eager_and_compiled(monkeypatch, capsys):
    # aot_eager: dynamo + AOTAutograd without inductor's C++ codegen, so the smoke test stays fast.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    argv = ["--shape", "tiny", "--seq-lens", "32", "--repeats", "1", "--device", "cpu", "--in-process"]
    results = bench_main([*argv, "--loss-chunks", "2", "--variants", "longlora", *FIXED, "--compile"])
    table = capsys.readouterr().out
    assert [r["compile"] for r in results] == [False, True]
    eager, compiled = results
    assert "error" not in compiled and compiled["warmup_s"] > 0
    # Same seed, data and step: the compiled step computes the same loss.
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert "| 32 | longlora[sdpa] |" in table and "eager/compiled" in table


def test_cli_profile_prints_top_operators_of_ours_and_the_peer(capsys):
    results = bench_main(
        ["--shape", "tiny", "--seq-lens", "32", "--repeats", "1", "--device", "cpu", "--in-process"]
        + ["--variants", "longlora", "--peer", "--loss-chunks", "2", "--profile", "5", *FIXED]
    )
    table = capsys.readouterr().out
    assert [r["variant"] for r in results] == ["longlora", "peer"]
    for r in results:
        prof = r["op_profile"]
        ops = prof["ops"]
        assert len(ops) == 5 and prof["total_self_ms"] > 0
        assert [op["self_ms"] for op in ops] == sorted((op["self_ms"] for op in ops), reverse=True)
        assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
        assert all(op["calls"] >= 1 for op in ops)
        assert f"{'longlora[sdpa]' if r['variant'] == 'longlora' else 'peer'} seq 32: one step" in table
        assert f"| {ops[0]['name']} | {ops[0]['calls']} |" in table
    # Profiling is off by default: no profile, no table.
    plain = bench_main(
        ["--shape", "tiny", "--seq-lens", "32", "--repeats", "1", "--device", "cpu", "--in-process"]
        + ["--variants", "longlora", "--loss-chunks", "2", "--compile", "false"]
    )
    assert "op_profile" not in plain[0] and "one step" not in capsys.readouterr().out


def test_fused_loss_case_trains_like_the_chunked_loss():
    # Warm-up plus two timed steps of AdamW: equal losses mean equal gradients through the whole step.
    chunked, fused = (
        run_case(Case(shape="tiny", seq_len=32, variant="longlora", repeats=2, loss_chunks=2, loss_impl=impl))
        for impl in ("chunked", "fused")
    )
    assert fused["loss_impl"] == "fused" and chunked["loss_impl"] == "chunked"
    assert fused["loss"] == pytest.approx(chunked["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="loss_impl"):
        Case(shape="tiny", seq_len=32, variant="longlora", loss_impl="liger")


def test_fused_lora_case_trains_like_torchtune_lora(capsys):
    results = bench_main(
        ["--shape", "tiny", "--seq-lens", "32", "--repeats", "2", "--device", "cpu", "--in-process"]
        + ["--variants", "longlora", "--loss-chunks", "2", "--lora-impls", "torchtune", "fused", *FIXED]
    )
    assert [r["lora_impl"] for r in results] == ["torchtune", "fused"]
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    assert "| longlora[sdpa]+fused-lora | 32 |" in capsys.readouterr().out


def test_checkpoint_layers_cases_train_alike_and_the_peer_recomputes_every_layer(capsys):
    # tiny has 2 layers: all, the first 1, none. Recomputation changes the schedule, never the numbers.
    results = bench_main(
        ["--shape", "tiny", "--seq-lens", "32", "--repeats", "2", "--device", "cpu", "--in-process"]
        + ["--variants", "longlora", "--peer", "--loss-chunks", "2", "--losses", "chunked"]
        + ["--sequence-tile-tokens", "off", "--checkpoint-layers", "all", "1", "0", "--compile", "false"]
    )
    table = capsys.readouterr().out
    assert [(r["variant"], r["checkpoint_layers"]) for r in results] == [
        ("longlora", None),
        ("longlora", 1),
        ("longlora", 0),
        ("peer", None),
    ]
    assert all("error" not in r for r in results)
    for r in results[1:3]:
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    # Every one of ours is compared with the peer under its own label.
    for label in ("longlora[sdpa]", "longlora[sdpa]+ac1", "longlora[sdpa]+ac0"):
        assert f"| 32 | {label} | " in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint-layers", "3"], "--checkpoint-layers 3 is more than the tiny shape's 2 layers"),
        (
            ["--checkpoint-layers", "-1"],
            "activation_checkpointing_layers='-1' must be all, auto or an integer >= 0",
        ),
        (
            ["--checkpoint-layers", "some"],
            "activation_checkpointing_layers='some' must be all, auto or an integer",
        ),
        (["--checkpoint-layers", "1", "--no-activation-checkpointing"], "needs activation checkpointing"),
    ],
)
def test_checkpoint_layers_bad_values_are_one_line_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--shape", "tiny", "--device", "cpu", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compile_runs_only_our_cases_both_ways(monkeypatch):
    from benchmarks.__main__ import _cases, _parse

    cases = _cases(
        _parse(["--shape", "tiny", "--device", "cpu", "--variants", "longlora", "--peer", "--compile"])
    )
    assert [(c.variant, c.compile) for c in cases] == [
        ("longlora", False),
        ("longlora", True),
        ("peer", False),
    ]


def test_checkpoint_layers_equal_to_the_layer_count_is_all_and_each_setting_runs_once():
    from benchmarks.__main__ import _parse

    # tiny has 2 layers: 2 is 'all'.
    args = _parse(["--shape", "tiny", "--device", "cpu", "--checkpoint-layers", "2", "0", "all", "0"])
    assert args.checkpoint_layers == [None, 0]


def test_sequence_tile_cases_train_alike_and_count_the_tiles_rerun(capsys):
    # tiny at 32 tokens: untiled, and tiles of 24 (a shorter last tile). Tiling reruns the MLPs in backward.
    results = bench_main(
        ["--shape", "tiny", "--seq-lens", "32", "--repeats", "2", "--device", "cpu", "--in-process"]
        + [
            "--variants",
            "longlora",
            "--loss-chunks",
            "2",
            "--losses",
            "chunked",
            "--checkpoint-layers",
            "all",
        ]
        + ["--sequence-tile-tokens", "off", "24", "--compile", "false"]
    )
    assert [r["sequence_tile_tokens"] for r in results] == [None, 24]
    assert all("error" not in r for r in results)
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    assert results[1]["executed_flops"] > results[0]["executed_flops"]
    assert results[1]["model_flops"] == results[0]["model_flops"]
    assert "| 32 | longlora[sdpa]+tile24 | " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "sequence_tile_tokens=0 must be a positive integer, auto or null"),
        ("x", "sequence_tile_tokens='x' must be a positive integer, auto or null"),
    ],
)
def test_sequence_tile_bad_values_are_one_line_errors(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--shape", "tiny", "--device", "cpu", "--sequence-tile-tokens", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ours_defaults_to_the_fused_loss_and_auto_levers(capsys, monkeypatch):
    from benchmarks.__main__ import _cases, _parse
    from longlora_tune.plan import plan
    from longlora_tune.plan.facts import GIB

    def ours(*extra: str):
        argv = ["--shape", "tiny", "--seq-lens", "32", "--device", "cpu", "--variants", "longlora", *extra]
        (case,) = _cases(_parse(argv))
        return case.loss_impl, case.checkpoint_layers, case.sequence_tile_tokens

    def compiled(*extra: str) -> list[bool]:
        argv = ["--shape", "tiny", "--device", "cpu", "--variants", "longlora", "--peer", *extra]
        return [case.compile for case in _cases(_parse(argv))]

    # compile: auto, as the shipped configs: compiled where this machine can compile; the peer never.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    assert compiled() == [True, False] and compiled("--compile", "false") == [False, False]
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "inductor")
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert compiled() == [False, False] and compiled("--compile", "true") == [True, False]

    # Plenty of memory: nothing recomputed, untiled, the fused loss.
    assert ours("--memory-budget-gib", "64") == ("fused", 0, None)
    # Between the planner's peaks without and with the first layer checkpointed: that layer is recomputed.
    peaks = plan(
        resolve_shape("tiny"), 32, gpus=1, dtype="fp32", linear_ce=True, suggest=False
    ).checkpoint_layers_peak_bytes
    budget = (peaks[0] + peaks[1]) / 2 / GIB
    assert ours("--memory-budget-gib", str(budget)) == ("fused", 1, None)
    # A lever named on the command line is kept.
    assert ours("--memory-budget-gib", "64", "--checkpoint-layers", "all", "--losses", "chunked") == (
        "chunked",
        None,
        None,
    )
    # Nothing fits: one line, exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--shape", "tiny", "--seq-lens", "32", "--device", "cpu", "--memory-budget-gib", "0.5"])
    assert exit_info.value.code == 2
    assert "auto levers: nothing fits --memory-budget-gib 0.5 at 32 tokens" in capsys.readouterr().err
