"""Training-step benchmark: LongLoRA vs the same model with full attention vs plain LoRA.

Run ``python -m benchmarks --shape 7b-proxy --seq-lens 8192 --repeats 5 --out bench.json``.

Variants (same model, same LoRA on q/k/v/o, same activation checkpointing and chunked loss):

* ``longlora``: S²-Attn, LoRA + trainable embeddings and norms (LoRA+);
* ``full_attn``: the same with ``use_full_attn=True``;
* ``lora``: full attention, LoRA-only trainable set;
* ``peer`` (with ``--peer``): the transformers + PEFT step a user would otherwise assemble, with the same
  no-wrap S² registered through transformers' ``AttentionInterface`` (see :mod:`benchmarks.peer`).

On CUDA the ``longlora`` variant runs once per S² backend: ``sdpa``, ``flex`` and ``flash`` (when
flash-attn imports). Every case runs in its own Python process (clean memory peaks), one warm-up step and
then ``--repeats`` timed steps; ``--rounds`` repeats the whole sweep with the cases interleaved, so that
load from other processes hits every variant alike. Reported: median step time and the min-max spread,
tokens/s, peak memory (see ``memory_kind``), model TFLOP/s and, on CUDA, MFU against the chip's dense bf16
peak (``--peak-tflops``, detected from the device name otherwise), and the ratios full/S² and
plain-LoRA/LongLoRA and, with ``--peer``, ours/peer in best-step and median tokens/s and in peak memory
(CPU: the increase over the built model; CUDA: absolute). Results are printed as a markdown table and
written as JSON with ``--out``.

``--context-parallel P`` runs instead the context-parallel comparison of
:mod:`benchmarks.context_parallel`: the same step with the sequence split over ``P`` processes
against one process, with the halo bytes per layer measured.

``--profile N`` profiles one more step of every case (after the timed ones, with ``torch.profiler``) and
prints its N most expensive operators by self time, for ours and the peer alike.

Ours is compiled as the shipped configs' ``compile: auto`` decides (``torch.compile`` of the decoder layers
and the loss wherever this machine can compile; :func:`longlora_tune.training.compile.compile_choice`);
``--compile true`` / ``false`` fixes it, and a bare ``--compile`` (``both``) runs every case of ours twice,
eagerly and compiled, and adds the eager/compiled step-time ratios. ``warmup_s`` (the first step) shows
the compile time. The peer always runs eagerly: it is the stack a user assembles.

``--checkpoint-layers N [N ...]`` recomputes only the first N decoder layers of ours (the recipe's
``activation_checkpointing_layers``); each value is its own case, labelled ``+acN``. The peer's gradient
checkpointing always covers every layer.

**Ours runs the fast settings** unless a lever is named: the fused loss
(``ChunkedLinearCrossEntropyLoss``), ``compile: auto``, and ``auto`` for ``--checkpoint-layers`` and
``--sequence-tile-tokens``, chosen before the cases start by the recipe's own choice
(:func:`longlora_tune.auto_choice.choose_auto_settings`) for ``--memory-budget-gib`` (default: the GPU's
free memory, on CPU the host's available memory). The chosen values label the case (``+acN``, ``+tileT``,
``+compile``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.cli import add_step_arguments, resolve_step_arguments
from benchmarks.train_step import (
    LORA_IMPLS,
    LOSSES,
    PEER_VARIANT,
    VARIANTS,
    Case,
    merge_rounds,
    resolve_shape,
    run_case,
    worker_env,
)
from longlora_tune._io import atomic_write_json
from longlora_tune.auto_choice import choose_auto_settings
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.s2_attention import S2AttentionConfig, flash_attn_available
from longlora_tune.plan.flops import step_flops
from longlora_tune.training.auto_settings import AUTO, host_available_gib, parse_checkpoint_layers
from longlora_tune.training.compile import compile_choice
from longlora_tune.training.sequence_tiling import check_tile_tokens

_WORKER_FLAG = "--worker-case"
_CP_FLAG = "--context-parallel"


def _cases(args: argparse.Namespace) -> list[Case]:
    backends = ["sdpa"]
    if args.device == "cuda":
        backends = [b for b in args.backends if b != "flash" or flash_attn_available()]
    cases = []
    variants = list(args.variants) + ([PEER_VARIANT] if args.peer else [])
    for seq_len in args.seq_lens:
        for variant in variants:
            ours = variant != PEER_VARIANT
            for backend, loss, lora, ac_layers, tile in (
                (b, loss, lora, ac_layers, tile)
                for b in (backends if variant == "longlora" else ["sdpa"])
                for loss in (args.losses if ours else ["chunked"])
                for lora in (args.lora_impls if ours else ["torchtune"])
                for ac_layers in (args.checkpoint_layers if ours else [None])
                for tile in (args.sequence_tile_tokens if ours else [None])
            ):
                if AUTO in (ac_layers, tile):
                    ac_layers, tile = _auto_levers(args, seq_len, variant, loss, ac_layers, tile)
                cases.append(
                    Case(
                        shape=args.shape,
                        layers=args.layers,
                        seq_len=seq_len,
                        batch_size=args.batch_size,
                        variant=variant,
                        backend=backend,
                        device=args.device,
                        dtype=args.dtype,
                        repeats=args.repeats,
                        threads=args.threads,
                        activation_checkpointing=args.activation_checkpointing,
                        checkpoint_layers=ac_layers,
                        sequence_tile_tokens=tile,
                        loss_chunks=args.loss_chunks,
                        peak_tflops=args.peak_tflops,
                        profile=args.profile,
                        loss_impl=loss,
                        lora_impl=lora,
                    )
                )
    # The peer is what a user assembles without compiling; only our cases follow --compile.
    return [
        replace(case, compile=compiled)
        for case in cases
        for compiled in (args.compile if case.variant != PEER_VARIANT else (False,))
    ]


def _compile_modes(mode: str, device: str) -> tuple[bool, ...]:
    """Our cases' ``compile`` values for ``--compile MODE`` (``auto``: the shipped configs' choice)."""
    if mode == "both":
        return (False, True)
    if mode == AUTO:
        # The benchmark neither splits sequences nor offloads, and every case has one length.
        on, _ = compile_choice(torch.device(device), context_parallel_degree=1, activation_offloading=False)
        return (on,)
    return (mode == "true",)


def _available_gib(device: str) -> float:
    """The default ``--memory-budget-gib``: the GPU's free memory, or the host's available memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 1024**3
    return host_available_gib()


def _auto_levers(
    args: argparse.Namespace, seq_len: int, variant: str, loss: str, ac_layers: Any, tile: Any
) -> tuple[int | None, int | None]:
    """Our ``auto`` checkpointed-layer count and tile size for one case, as the recipe would choose them."""
    levers = (("activation_checkpointing_layers", ac_layers), ("sequence_tile_tokens", tile))
    auto = [key for key, value in levers if value == AUTO]
    kwargs = dict(
        model=resolve_shape(args.shape, args.layers),
        seq_len=seq_len,
        gpus=1,
        batch_size=args.batch_size,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        s2=variant == "longlora",
        trainable_extras=() if variant == "lora" else ("embed", "norm"),
        loss_chunks=args.loss_chunks,
        linear_ce=loss == "fused",
        sequence_tile_tokens=None if tile == AUTO else tile,
        activation_offloading=False,
        suggest=False,
    )
    if ac_layers != AUTO:
        kwargs["checkpoint_layers"] = ac_layers
    choice = choose_auto_settings(
        kwargs, budget_gib=args.memory_budget_gib, auto=auto, offloading_available=False
    )
    if not choice.plan.fits:
        raise ValueError(
            f"auto levers: nothing fits --memory-budget-gib {args.memory_budget_gib:.1f} at {seq_len} tokens"
        )
    layers = choice.settings.get("activation_checkpointing_layers", ac_layers)
    # N = every layer is the default case ('all'), labelled without +acN.
    layers = None if layers in ("all", choice.plan.shape.num_layers) else layers
    return layers, choice.settings.get("sequence_tile_tokens", tile)


def _run_in_subprocess(case: Case, timeout: float | None) -> dict[str, Any]:
    env = worker_env(case)
    cmd = [sys.executable, "-m", "benchmarks", _WORKER_FLAG, json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**asdict(case), "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**asdict(case), "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def _run_here(case: Case) -> dict[str, Any]:
    try:
        if case.variant == PEER_VARIANT:
            from benchmarks.peer import run_peer_case  # transformers and peft only when asked

            return run_peer_case(case)
        return run_case(case)
    except ValueError as err:
        return {**asdict(case), "error": str(err)}


def _label(result: dict[str, Any]) -> str:
    label = result["variant"] + (f"[{result['backend']}]" if result["variant"] == "longlora" else "")
    if result.get("loss_impl", "chunked") != "chunked" and result["variant"] != PEER_VARIANT:
        label += f"+{result['loss_impl']}-loss"
    if result.get("lora_impl", "torchtune") != "torchtune" and result["variant"] != PEER_VARIANT:
        label += f"+{result['lora_impl']}-lora"
    if result.get("checkpoint_layers") is not None and result["activation_checkpointing"]:
        label += f"+ac{result['checkpoint_layers']}"
    if result.get("sequence_tile_tokens") is not None:
        label += f"+tile{result['sequence_tile_tokens']}"
    return label + ("+compile" if result.get("compile") else "")


def compile_speedups(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Eager over compiled step time for every case measured both ways (``--compile``).

    Args:
        results: Per-case results (merged over rounds).

    Returns:
        One row per (sequence length, variant): ``eager_over_compiled`` (wall median), its CPU-time
        counterpart, and both warm-up (first step, compile included) times.
    """
    compiled = {(r["seq_len"], _label(r)): r for r in results if r.get("compile") and "error" not in r}
    rows = []
    for e in results:
        c = compiled.get((e["seq_len"], _label(e) + "+compile"))
        if e.get("compile") or "error" in e or c is None:
            continue
        rows.append(
            {
                "seq_len": e["seq_len"],
                "case": _label(e),
                "eager_s": e["median_s"],
                "compiled_s": c["median_s"],
                "eager_over_compiled": e["median_s"] / c["median_s"],
                "eager_over_compiled_cpu": e["median_cpu_s"] / c["median_cpu_s"],
                "eager_warmup_s": e.get("warmup_s"),
                "compiled_warmup_s": c.get("warmup_s"),
            }
        )
    return rows


def _memory(result: dict[str, Any]) -> int | None:
    # CPU: the peak RSS increase over the built model (the processes' import footprints differ: torchtune
    # vs transformers + peft); CUDA: absolute max_memory_allocated, weights and PEFT's copies included.
    if result.get("device") == "cpu":
        return result.get("peak_mem_over_model_bytes")
    return result.get("peak_mem_bytes")


def _peer_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        by = {_label(r): r for r in results if r["seq_len"] == seq_len and "error" not in r}
        peer = by.get(PEER_VARIANT)
        if peer is None:
            continue
        for label, ours in by.items():
            if not label.startswith("longlora"):
                continue
            ours_mem, peer_mem = _memory(ours), _memory(peer)
            out.append(
                {
                    "seq_len": seq_len,
                    "ours": label,
                    "tokens_per_s_best": [ours["batch_size"] * seq_len / r["min_s"] for r in (ours, peer)],
                    "tokens_per_s_median": [ours["tokens_per_s"], peer["tokens_per_s"]],
                    "best_ratio": peer["min_s"] / ours["min_s"],
                    "median_ratio": peer["median_s"] / ours["median_s"],
                    "cpu_median_ratio": peer["median_cpu_s"] / ours["median_cpu_s"],
                    "peak_mem_bytes": [ours_mem, peer_mem],
                    "mem_ratio": ours_mem / peer_mem if ours_mem and peer_mem else None,
                }
            )
    return out


def peer_markdown(rows: list[dict[str, Any]]) -> str:
    """Render the ours-vs-peer comparison as a markdown table.

    Args:
        rows: Output of the peer ratio computation.

    Returns:
        The table (empty string without rows).
    """
    if not rows:
        return ""
    mib = 1024**2
    lines = [
        "| seq | ours | tokens/s best: ours / peer | tokens/s median: ours / peer | ours/peer best "
        "| median | CPU-time median | peak mem MiB: ours / peer | mem ours/peer |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q in rows:
        best, median = q["tokens_per_s_best"], q["tokens_per_s_median"]
        mem = " / ".join(f"{m / mib:.0f}" if m else "n/a" for m in q["peak_mem_bytes"])
        mem_ratio = f"{q['mem_ratio']:.2f}x" if q["mem_ratio"] else "n/a"
        lines.append(
            f"| {q['seq_len']} | {q['ours']} | {best[0]:.0f} / {best[1]:.0f} "
            f"| {median[0]:.0f} / {median[1]:.0f} "
            f"| {q['best_ratio']:.2f}x | {q['median_ratio']:.2f}x | {q['cpu_median_ratio']:.2f}x | {mem} "
            f"| {mem_ratio} |"
        )
    return "\n".join(lines)


def profile_markdown(results: list[dict[str, Any]]) -> str:
    """Render each profiled case's top operators (``--profile``) as a markdown table.

    Args:
        results: Per-case results; those without an ``op_profile`` are skipped.

    Returns:
        One table per profiled case (empty string when none was profiled).
    """
    blocks = []
    for r in results:
        prof = r.get("op_profile")
        if not prof:
            continue
        lines = [
            f"{_label(r)} seq {r['seq_len']}: one step, {prof['total_self_ms']:.0f} ms self time in all",
            "",
            "| operator | calls | self ms | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {op['name']} | {op['calls']} | {op['self_ms']:.1f} | {100 * op['share']:.1f}% |"
            for op in prof["ops"]
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        by = {
            _label(r): r
            for r in results
            if r["seq_len"] == seq_len and "error" not in r and not r.get("compile")  # eager vs eager
        }
        shape = resolve_shape(results[0]["shape"], results[0]["layers"])
        ideal = step_flops(
            shape,
            seq_len,
            results[0]["batch_size"],
            group_size=S2AttentionConfig().resolve_group_size(seq_len),
            activation_checkpointing=results[0]["activation_checkpointing"],
        ).total
        full = step_flops(
            shape,
            seq_len,
            results[0]["batch_size"],
            group_size=None,
            activation_checkpointing=results[0]["activation_checkpointing"],
        ).total
        for label, s2 in by.items():
            if not label.startswith("longlora"):
                continue
            row: dict[str, Any] = {
                "seq_len": seq_len,
                "longlora": label,
                "flop_ideal_full_over_s2": full / ideal,
            }
            if "full_attn" in by:
                f = by["full_attn"]
                row["full_over_s2"] = f["median_s"] / s2["median_s"]
                # Most pessimistic and optimistic pairing of the observed extremes.
                row["full_over_s2_range"] = [f["min_s"] / s2["max_s"], f["max_s"] / s2["min_s"]]
                row["full_over_s2_cpu"] = f["median_cpu_s"] / s2["median_cpu_s"]
                row["full_over_s2_cpu_range"] = [
                    min(f["cpu_step_s"]) / max(s2["cpu_step_s"]),
                    max(f["cpu_step_s"]) / min(s2["cpu_step_s"]),
                ]
            if "lora" in by:
                row["lora_over_longlora"] = by["lora"]["median_s"] / s2["median_s"]
                row["lora_over_longlora_cpu"] = by["lora"]["median_cpu_s"] / s2["median_cpu_s"]
            out.append(row)
    return out


def markdown(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """Render results and ratios as markdown tables.

    Args:
        results: Per-case results (``run_case`` outputs, merged over rounds).
        ratios: Output of the ratio computation.

    Returns:
        The tables.
    """
    mib = 1024**2
    lines = [
        "| variant | seq | median step s (min-max) | median CPU s (min-max) | steps | tokens/s "
        "| peak mem MiB (over model) | model TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {_label(r)} | {r['seq_len']} | error: {r['error']} | | | | | | |")
            continue
        over = r.get("peak_mem_over_model_bytes")
        mem = f"{r['peak_mem_bytes'] / mib:.0f}" if r.get("peak_mem_bytes") else "n/a"
        mem += f" ({over / mib:.0f})" if over else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        cpu = r["cpu_step_s"]
        lines.append(
            f"| {_label(r)} | {r['seq_len']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) "
            f"| {r['median_cpu_s']:.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | {len(r['step_s'])} "
            f"| {r['tokens_per_s']:.0f} | {mem} | {r['model_tflops_per_s']:.3f} | {mfu} |"
        )
    if ratios:
        lines += [
            "",
            "| seq | LongLoRA | full/S² wall median (range) | full/S² CPU-time median (range) | FLOP ideal "
            "| plain-LoRA/LongLoRA wall, CPU |",
            "|---:|---|---:|---:|---:|---:|",
        ]

        def fmt(q: dict[str, Any], key: str) -> str:
            if key not in q:
                return "n/a"
            low, high = q[f"{key}_range"]
            return f"{q[key]:.2f}x ({low:.2f}-{high:.2f})"

        for q in ratios:
            lora = (
                f"{q['lora_over_longlora']:.2f}x, {q['lora_over_longlora_cpu']:.2f}x"
                if "lora_over_longlora" in q
                else "n/a"
            )
            lines.append(
                f"| {q['seq_len']} | {q['longlora']} | {fmt(q, 'full_over_s2')} "
                f"| {fmt(q, 'full_over_s2_cpu')} | {q['flop_ideal_full_over_s2']:.2f}x | {lora} |"
            )
    speedups = compile_speedups(results)
    if speedups:
        lines += [
            "",
            "| seq | case | eager s | compiled s | eager/compiled wall, CPU | first step eager, compiled s |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for q in speedups:
            lines.append(
                f"| {q['seq_len']} | {q['case']} | {q['eager_s']:.3f} | {q['compiled_s']:.3f} "
                f"| {q['eager_over_compiled']:.2f}x, {q['eager_over_compiled_cpu']:.2f}x "
                f"| {q['eager_warmup_s']:.1f}, {q['compiled_warmup_s']:.1f} |"
            )
    return "\n".join(lines)


def _checkpoint_layers(value: str) -> int | str | None:
    try:
        return parse_checkpoint_layers(value)
    except LongLoRAConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _tile_tokens(value: str) -> int | str | None:
    if value == "off":
        return None
    try:
        return check_tile_tokens(int(value) if value.strip().isdigit() else value, allow_auto=True)
    except LongLoRAConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_step_arguments(
        parser,
        unit="case",
        rounds_help="interleaved sweeps, each case in a fresh process",
        seq_help="sequence lengths (default: 256 for tiny, 8192 otherwise)",
    )
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["sdpa", "flash", "flex"],
        default=["sdpa", "flash", "flex"],
        help="S² backends on CUDA (flash skipped if absent)",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also run the transformers + PEFT step with the same S² (interleaved with ours)",
    )
    parser.add_argument(
        "--checkpoint-layers",
        nargs="+",
        type=_checkpoint_layers,
        default=[AUTO],
        metavar="N",
        help="our activation checkpointing: recompute only the first N decoder layers (the recipe's "
        "activation_checkpointing_layers), 'all', or 'auto' (default: the fewest that fit "
        "--memory-budget-gib); each value runs as its own case, the peer recomputes every layer",
    )
    parser.add_argument(
        "--sequence-tile-tokens",
        nargs="+",
        type=_tile_tokens,
        default=[AUTO],
        metavar="T",
        help="our MLP blocks over tiles of T tokens (the recipe's sequence_tile_tokens), 'off', or 'auto' "
        "(default: chosen for --memory-budget-gib); each value runs as its own case, the peer is untiled",
    )
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="memory the auto levers are chosen for (the recipe's memory_budget_gib; default: the GPU's "
        "free memory, on CPU the host's available memory)",
    )
    parser.add_argument(
        "--lora-impls",
        nargs="+",
        choices=list(LORA_IMPLS),
        default=["torchtune"],
        help="our LoRA forward: torchtune's LoRALinear and/or the fused dropout-free path "
        "(longlora_tune.modules.lora_fused); each runs as its own case",
    )
    parser.add_argument(
        "--losses",
        nargs="+",
        choices=list(LOSSES),
        default=["fused"],
        help="our loss: torchtune's chunked CE on chunked logits, and/or the fused chunked projection + CE "
        "(longlora_tune.modules.linear_ce; the default); each runs as its own case",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 dense peak for MFU (default: from the GPU name, H100/H200 989, A100 312)",
    )
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds per case process")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every case in this process (faster; memory peaks of earlier cases may hide later ones)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="both",
        default=AUTO,
        choices=(AUTO, "true", "false", "both"),
        help="our torch.compile of layers + loss: auto (default; the shipped configs' compile: auto, true "
        "where compiling works), true, false, or both (bare --compile: every case eagerly and compiled, "
        "with the step-time ratios)",
    )
    parser.add_argument(
        _CP_FLAG,
        type=int,
        metavar="P",
        help="instead: one training step with the sequence split over P processes against 1 "
        "(halo bytes per layer, step time; see benchmarks.context_parallel)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one more step per case and print its N top operators by self time",
    )
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f"--profile must be >= 0, got {args.profile}")
    resolve_step_arguments(parser, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.memory_budget_gib is None:
        args.memory_budget_gib = _available_gib(args.device)
    args.compile = _compile_modes(args.compile, args.device)
    counts = [n for n in args.checkpoint_layers if isinstance(n, int)]
    if counts:
        if not args.activation_checkpointing and any(counts):
            parser.error(
                "--checkpoint-layers needs activation checkpointing; drop --no-activation-checkpointing"
            )
        num_layers = resolve_shape(args.shape, args.layers).num_layers
        too_many = [n for n in counts if n > num_layers]
        if too_many:
            parser.error(
                f"--checkpoint-layers {too_many[0]} is more than the {args.shape} shape's "
                f"{num_layers} layers; use at most {num_layers} or 'all'"
            )
        # N = the layer count is 'all': one case each, in the order given.
        args.checkpoint_layers = list(
            dict.fromkeys(None if n == num_layers else n for n in args.checkpoint_layers)
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark sweep.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The per-case results.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_WORKER_FLAG]:
        print(json.dumps(_run_here(Case(**json.loads(argv[1])))), flush=True)
        return []
    if any(a == _CP_FLAG or a.startswith(_CP_FLAG + "=") for a in argv):
        from benchmarks.context_parallel import main as context_parallel_main

        return context_parallel_main(argv)
    args = _parse(argv)
    try:
        cases = _cases(args)
    except ValueError as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    measured: dict[Case, list[dict[str, Any]]] = {case: [] for case in cases}

    def summarise() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        results = [merge_rounds(rounds) for rounds in measured.values() if rounds]
        return results, _ratios(results)

    def save() -> None:
        results, ratios = summarise()
        peer = _peer_ratios(results)
        payload = {
            "command": "python -m benchmarks " + " ".join(argv),
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "complete": all(len(rounds) == args.rounds for rounds in measured.values()),
            "results": results,
            "ratios": ratios,
            "peer": peer,
            "compile_speedups": compile_speedups(results),
        }
        atomic_write_json(args.out, payload, default=str)

    for round_index in range(args.rounds):
        for case in cases:
            result = _run_here(case) if args.in_process else _run_in_subprocess(case, args.case_timeout)
            measured[case].append(result)
            status = result.get("error") or f"median {result['median_s']:.3f} s"
            print(
                f"[round {round_index + 1}/{args.rounds}] {_label(result)} seq {case.seq_len}: {status}",
                file=sys.stderr,
                flush=True,
            )
            if args.out:
                save()  # after every case, so a sweep stopped by a time limit keeps what it measured
    results, ratios = summarise()
    print(markdown(results, ratios))
    peer_table = peer_markdown(_peer_ratios(results))
    if peer_table:
        print("\n" + peer_table)
    profiles = profile_markdown(results)
    if profiles:
        print("\n" + profiles)
    return results


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()) else 0)
