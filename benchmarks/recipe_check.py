"""The recipe itself on a real-shaped model: ``tune run longlora_distributed`` with the shipped defaults.

Run ``python -m benchmarks.recipe_check --workdir /tmp/rc --seq-len 32768 --out recipe_32768.json`` (or
``--seq-len longest``: the longest length the planner says fits this device with every memory lever on; when
that is longer than ``--max-seq-len`` (a step there would not fit the check's time: S² work grows as N²/4),
``--max-seq-len`` with the memory budget whose longest length it is, so that the run is still at the limit).
It writes a random Hugging Face checkpoint of Llama 3.2 1B's sizes (16 layers, hidden 2048, 32 query and
8 key/value heads, MLP 8192) with Llama 2's 32,000-token vocabulary, a corpus long enough for the steps,
then trains ``--steps`` steps with ``configs/hf_checkpoint.yaml``: bf16, every ``auto`` setting chosen by
the recipe at start-up, batch 1, no export. Reported from the recipe's own logs: the planner's peak (its
``auto`` line), the measured peak per step (``torch.cuda.max_memory_allocated``, torchtune's
``peak_memory_alloc``), tokens/s, MFU (model FLOPs of :func:`longlora_tune.plan.flops.step_flops` over the
chip's dense bf16 peak) and whether every loss is finite. ``--small`` is the dry run: a tiny model on the
CPU, so that every import and the log parsing are proven before a GPU is lent (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.tune_run import tune_run
from longlora_tune._io import atomic_write_json
from longlora_tune.models.shapes import ModelShape
from longlora_tune.modules.s2_attention import S2AttentionConfig
from longlora_tune.plan.facts import GIB
from longlora_tune.plan.flops import step_flops
from longlora_tune.plan.longest import ALL_LEVERS
from longlora_tune.plan.planner import planned_scenario
from longlora_tune.plan.suggestions import longest_fitting, loss_chunks_for

__all__ = ["REAL_SHAPE", "SMALL_SHAPE", "LongestSetting", "longest_setting", "main", "parse_run"]

#: Llama 3.2 1B's decoder sizes with Llama 2's vocabulary (the tiny SentencePiece tokenizer uses 512 ids).
REAL_SHAPE = ModelShape(
    vocab_size=32_000, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192
)
#: The dry run's model (CPU, seconds).
SMALL_SHAPE = ModelShape(
    vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128
)
#: The base checkpoint's context: the RoPE factor is ceil(seq_len / 4096), as for Llama 2.
BASE_CONTEXT = 4096
_STEP = re.compile(r"^Step (\d+) \| (.*)$", re.M)
_PLANNER = re.compile(r"auto: .* at (\d+) tokens: peak ([\d.]+) GiB")
#: One of the recipe's choice lines: ``auto: <key>: <value> (<why>)`` or the planner's summary.
_AUTO_LINE = re.compile(r"\bauto: ((?:[a-z_.]+: |.* at \d+ tokens: peak ).*)$")


def _make_base(workdir: Path, shape: ModelShape) -> Path:
    from longlora_tune.quickstart import tiny

    base = workdir / "base"
    if (base / "config.json").is_file():
        return base
    # A ModelShape's fields are the checkpoint maker's size arguments.
    tiny.make_hf_checkpoint(base, **asdict(shape), max_position_embeddings=BASE_CONTEXT, with_tokenizer=False)
    tiny.make_tokenizer(base)  # 512 pieces: ids below any vocabulary the shapes have
    return base


def _make_corpus(workdir: Path, tokens: int) -> Path:
    """A JSON-lines corpus of at least ``tokens`` tokens (counted as 4 characters a token, which the tiny
    tokenizer's ~2.5 never exceeds)."""
    from longlora_tune.quickstart import tiny

    path = workdir / f"corpus_{tokens}.jsonl"
    if not path.is_file():
        sample = tiny.make_documents(64, seed=0)
        chars_per_doc = sum(len(d) for d in sample) / len(sample)
        tiny.make_text_corpus(path, n_docs=math.ceil(4 * tokens / chars_per_doc) + 1)
    return path


class LongestSetting(NamedTuple):
    """What ``--seq-len longest`` runs.

    Attributes:
        planned_longest: The longest length the planner fits in the device's memory, every lever on.
        seq_len: The length run: that one, or ``cap`` when it is longer.
        budget_gib: The memory budget the run's ``auto`` settings are chosen for: the device's, or, when the
            length was capped, the planner's peak at ``cap`` with every lever on (so that ``cap`` is the
            longest length that budget fits, and the run exercises the same levers at the limit).
    """

    planned_longest: int
    seq_len: int
    budget_gib: float


def longest_setting(
    shape: ModelShape, budget_gib: float, *, dtype: str, cap: int, offloading: bool
) -> LongestSetting:
    """The longest length the planner fits on one device, capped, and the budget that makes it the limit.

    Args:
        shape: The model's sizes.
        budget_gib: Memory of the device.
        dtype: ``bf16`` or ``fp32``.
        cap: The longest length the check has time to run (a multiple of 1024).
        offloading: Whether activation offloading can run (CUDA).

    Returns:
        The :class:`LongestSetting`.
    """
    levers = {**ALL_LEVERS, "activation_offloading": offloading}
    # The search runs up to 64 times the planned length (as longlora_tune.plan.longest).
    scenario, _ = planned_scenario(shape, 262_144, gpus=1, gpu_memory_gib=budget_gib, dtype=dtype, **levers)
    longest = longest_fitting(scenario, size_loss_chunks=True)
    if longest <= cap:
        return LongestSetting(longest, longest, budget_gib)
    step = scenario.peak(cap, loss_chunks=loss_chunks_for(scenario, cap))
    # Rounded up to 0.1 GiB, so that the budget is never below the planned peak.
    return LongestSetting(longest, cap, math.ceil(step.peak / GIB * 10) / 10)


def parse_run(log_text: str, stderr: str) -> dict[str, Any]:
    """The numbers of one recipe run: per-step metrics from its DiskLogger file, the planner's peak.

    Args:
        log_text: The run's ``logs/log_*.txt``.
        stderr: What the run printed (the ``auto:`` lines).

    Returns:
        ``steps`` (one dict per logged step), ``planner_peak_gib`` (None without an auto line) and
        ``auto_lines``.
    """
    steps = []
    for match in _STEP.finditer(log_text):
        values = dict(item.split(":", 1) for item in match.group(2).split() if ":" in item)
        steps.append({"step": int(match.group(1)), **{k: float(v) for k, v in values.items()}})
    planner = _PLANNER.search(stderr)
    return {
        "steps": steps,
        "planner_peak_gib": float(planner.group(2)) if planner else None,
        "auto_lines": [m.group(1) for m in map(_AUTO_LINE.search, stderr.splitlines()) if m],
    }


def _summary(
    run: dict[str, Any], shape: ModelShape, seq_len: int, peak_tflops: float | None
) -> dict[str, Any]:
    steps = run["steps"]
    timed = steps[1:] or steps  # the first step compiles and warms the allocator
    tokens_per_s = statistics.median(s["tokens_per_second_per_gpu"] for s in timed) if timed else None
    measured = max((s["peak_memory_alloc"] for s in steps if "peak_memory_alloc" in s), default=None)
    group_size = S2AttentionConfig().resolve_group_size(seq_len)  # the default ratio hf_checkpoint.yaml keeps
    model = step_flops(shape, seq_len, 1, group_size=group_size, activation_checkpointing=True).model
    planner = run["planner_peak_gib"]
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": model * tokens_per_s / seq_len / (peak_tflops * 1e12)
        if tokens_per_s and peak_tflops
        else None,
        "measured_peak_gib": measured,
        "planner_peak_gib": planner,
        "planner_over_measured": planner / measured if planner and measured else None,
        "losses_finite": bool(steps) and all(math.isfinite(s["loss"]) for s in steps),
    }


class _Terminated(Exception):
    """SIGTERM arrived while the recipe ran."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Make the checkpoint and corpus, run the recipe, write and return the report.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The report (also written to ``--out``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoint, corpus and run outputs")
    parser.add_argument("--seq-len", required=True, help="training length in tokens, or 'longest'")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=131_072,
        help="cap of 'longest' (step time); a capped run gets the budget whose longest length it is",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="dry run: tiny model on the CPU")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds for the recipe run; past them it is killed and what it logged is reported",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    import torch

    cuda = not args.small and torch.cuda.is_available()
    shape = SMALL_SHAPE if args.small else REAL_SHAPE
    dtype = "bf16" if cuda else "fp32"
    budget = torch.cuda.mem_get_info()[0] / GIB if cuda else 8.0
    longest = longest_setting(shape, budget, dtype=dtype, cap=args.max_seq_len, offloading=cuda)
    capped = args.seq_len == "longest" and longest.seq_len < longest.planned_longest
    if args.seq_len == "longest":
        seq_len, budget = longest.seq_len, longest.budget_gib
    else:
        seq_len = int(args.seq_len)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = _make_base(args.workdir, shape)
    corpus = _make_corpus(args.workdir, seq_len * (args.steps + 1))
    out = args.workdir / f"run_{seq_len}"
    overrides = {
        "checkpoint_dir": base,
        "output_dir": out,
        "dataset.data_files": corpus,
        "dataset.cache_dir": args.workdir / "cache",
        "dataset.num_proc": 1 if args.small else 8,
        "max_seq_len": seq_len,
        "max_steps": args.steps,
        "global_batch_size": 1,
        "save_every_n_steps": 0,
        "export_formats": "[]",
        "device": "cuda" if cuda else "cpu",
        "dtype": dtype,
        # The device's free memory unless the length was capped; the CPU needs a budget.
        **({"memory_budget_gib": budget} if capped or not cuda else {}),
        **({} if cuda else {"compile": "false"}),
    }
    start = time.perf_counter()
    # A SIGTERM (the GPU check's step limit) ends the run the same way: subprocess.run kills the child when
    # an exception interrupts it, and the report still says what was logged.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        proc = tune_run(
            "longlora_distributed",
            "hf_checkpoint",
            [f"{k}={v}" for k, v in overrides.items()],
            timeout=args.timeout,
        )
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        # The run is killed (its GPU memory freed for the next step); the steps it logged are still reported.
        partial = e.stderr or b""
        returncode, stderr = "timeout", partial.decode() if isinstance(partial, bytes) else partial
    except _Terminated:
        returncode, stderr = "terminated", ""
    finally:
        signal.signal(signal.SIGTERM, previous)
    logs = sorted((out / "logs").glob("log_*.txt"))
    run = parse_run(logs[-1].read_text() if logs else "", stderr)
    peak_tflops = None
    if cuda:
        from benchmarks.train_step import detect_peak_tflops

        peak_tflops = detect_peak_tflops(torch.cuda.get_device_name())
    report = {
        "shape": asdict(shape),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "seq_len": seq_len,
        "planner_longest": longest.planned_longest,
        "budget_gib": budget,
        "returncode": returncode,
        "wall_s": time.perf_counter() - start,
        **_summary(run, shape, seq_len, peak_tflops),
        **run,
        "stderr_tail": stderr[-4000:],
    }
    if args.out:
        atomic_write_json(args.out, report, default=str)
    print(json.dumps({k: v for k, v in report.items() if k not in ("steps", "stderr_tail")}, indent=1))
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["returncode"] == 0 and result["losses_finite"] else 1)
