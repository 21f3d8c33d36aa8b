"""``python -m longlora_tune.plan``: the planner's command line (arguments, report or JSON, exit status)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from longlora_tune._io import atomic_write_json
from longlora_tune.models.shapes import MODEL_SHAPES
from longlora_tune.plan.choose import AUTO_KEYS, choose_settings
from longlora_tune.plan.config_settings import config_auto_keys, load_config_settings
from longlora_tune.plan.facts import DTYPE_BYTES
from longlora_tune.plan.planner import plan

__all__ = ["main"]


def _tile_tokens_arg(value: str) -> int | str | None:
    """``--sequence-tile-tokens``: ``off`` is None, a whole number an int; anything else is left for
    :func:`plan` to refuse with the recipe's message."""
    if value == "off":
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _checkpoint_layers_arg(value: str | None) -> int | None:
    """``--checkpoint-layers``: ``all`` (None) or a count, through the recipe's parser."""
    from longlora_tune.training.auto_settings import parse_checkpoint_layers

    return None if value is None else parse_checkpoint_layers(value, allow_auto=False)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m longlora_tune.plan",
        description="Estimate per-GPU memory and FLOPs of a LongLoRA training step and whether it fits.",
        epilog="Exit status: 0 fits, 1 does not fit, 2 usage or config error.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="shipped config name (e.g. llama2_7b_100k) or a YAML path")
    source.add_argument("--model", choices=sorted(MODEL_SHAPES), help="model size (with --seq-len)")
    parser.add_argument(
        "--seq-len",
        type=int,
        help="training length (required with --model); with --config it replaces both the training length "
        "and model.max_seq_len",
    )
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: config or 1)")
    parser.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per optimizer step over all GPUs (default: config; none with --model)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default: config or bf16")
    parser.add_argument(
        "--fp32-trainable-params",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fp32 master copies of the trainable tensors, their gradients and AdamW state "
        "(default: config or on, as the recipe)",
    )
    parser.add_argument("--group-size", type=int, help="S2 group size (default: config or 1/4 of the length)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--checkpoint-layers",
        metavar="N|all",
        help="checkpoint only the first N decoder layers (the recipe's activation_checkpointing_layers; "
        "default: config or all); the plan also suggests the smallest N that fits",
    )
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--activation-offloading", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--cpu-offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="what-if: parameters, gradients and optimizer state on the host (torchtune's fsdp_cpu_offload; "
        "longlora_distributed has no such setting)",
    )
    parser.add_argument(
        "--quantize-base",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="QLoRA: NF4 frozen base projections (default: config's model.quantize_base or off)",
    )
    parser.add_argument("--full-attn", action="store_true", help="plan full attention instead of S2")
    parser.add_argument(
        "--context-parallel",
        type=int,
        help="GPUs sharing each sequence (the recipe's context_parallel_degree; default: config or 1)",
    )
    parser.add_argument("--loss-chunks", type=int, help="chunks of the loss (default: config or 8)")
    parser.add_argument(
        "--sequence-tile-tokens",
        metavar="N|off",
        help="run each layer's MLP block over tiles of N tokens (the recipe's sequence_tile_tokens; default: "
        "config or off)",
    )
    parser.add_argument(
        "--linear-ce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss, which keeps no fp32 "
        "log-probs "
        "for backward (default: the config's loss, else torchtune's CEWithChunkedOutputLoss)",
    )
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON to PATH (or stdout)")
    args = parser.parse_args(argv)
    if args.model and args.seq_len is None:
        parser.error("--model needs --seq-len")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 when the plan fits, 1 when it does not, 2 on a usage error.
    """
    args = _parse_args(argv)
    try:
        settings = load_config_settings(args.config) if args.config else {"model": args.model}
        if args.seq_len is not None:
            # A what-if at another length: the model is built for it too (its group size follows).
            settings.pop("max_seq_len", None)
        for key, value in (
            ("seq_len", args.seq_len),
            ("batch_size", args.batch_size),
            ("global_batch_size", args.global_batch_size),
            ("group_size", args.group_size),
            ("dtype", args.dtype),
            ("fp32_trainable_params", args.fp32_trainable_params),
            ("activation_checkpointing", args.activation_checkpointing),
            ("checkpoint_layers", _checkpoint_layers_arg(args.checkpoint_layers)),
            ("loss_chunks", args.loss_chunks),
            ("linear_ce", args.linear_ce),
            ("activation_offloading", args.activation_offloading),
            ("cpu_offload", args.cpu_offload),
            ("quantize_base", args.quantize_base),
            ("context_parallel_degree", args.context_parallel),
        ):
            if value is not None:
                settings[key] = value
        if args.sequence_tile_tokens is not None:
            settings["sequence_tile_tokens"] = _tile_tokens_arg(args.sequence_tile_tokens)
        if args.full_attn:
            settings["s2"] = False
        common = dict(gpus=args.gpus, fsdp=args.fsdp)
        # The config's `auto` levers that the command line does not set: chosen as the recipe chooses them.
        given = set(settings) | ({"checkpoint_layers"} if args.checkpoint_layers is not None else set())
        auto = [
            k for k in (config_auto_keys(args.config) if args.config else []) if AUTO_KEYS[k] not in given
        ]
        if auto:
            rest = {k: v for k, v in settings.items() if k not in ("model", "seq_len")}
            chosen = choose_settings(
                settings["model"],
                settings["seq_len"],
                budget_gib=args.gpu_memory,
                free=auto,
                **common,
                **rest,
            )
            result, reasons = chosen.plan, chosen.reasons
        else:
            result, reasons = plan(gpu_memory_gib=args.gpu_memory, **common, **settings), []
    except ValueError as err:
        print(f"longlora_tune.plan: error: {err}", file=sys.stderr)
        return 2
    if args.config:
        result.model = Path(args.config).stem
    report = {**result.to_dict(), "auto": reasons}
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    else:
        print(result.table())
        if reasons:
            print("The config's auto levers, chosen as the recipe chooses them at start-up:")
            print("\n".join(f"- {line}" for line in reasons))
        if args.json:
            atomic_write_json(args.json, report, default=str)
    return 0 if result.fits else 1
