"""The longest training length that fits, per model and GPU count, with every memory lever on.

``python -m longlora_tune.plan.longest`` prints the README's table (``--json PATH`` writes it too): for each
model, one GPU and eight GPUs (context parallelism over all eight, so one sequence spans them) of
``--gpu-memory`` GiB, the longest length the planner fits with LoRA+ on a bf16 base and with QLoRA, and
the pinned host memory that length's activation offloading needs. "Every lever" is every layer
checkpointed, the fused loss with chunks sized for the length, the MLP in tiles of
:data:`~longlora_tune.plan.suggestions.SUGGESTED_TILE_TOKENS` tokens and activation offloading; the
recipe's ``auto`` settings pick the cheaper subset that still fits a given length.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from longlora_tune._io import atomic_write_json
from longlora_tune.models.shapes import MODEL_SHAPES
from longlora_tune.plan.facts import GIB
from longlora_tune.plan.planner import planned_scenario
from longlora_tune.plan.suggestions import SUGGESTED_TILE_TOKENS, longest_fitting, loss_chunks_for

__all__ = ["LongestFit", "longest_length", "main"]

#: The README table's rows: model key and the name it prints.
TABLE_MODELS = {"7b": "Llama 2 7B", "llama3_1_8b": "Llama 3.1 8B", "13b": "Llama 2 13B", "70b": "Llama 2 70B"}
#: Every memory lever the recipe has, as planner keywords (loss chunks are sized per length).
ALL_LEVERS = {
    "activation_checkpointing": True,
    "checkpoint_layers": None,
    "linear_ce": True,
    "sequence_tile_tokens": SUGGESTED_TILE_TOKENS,
    "activation_offloading": True,
}


@dataclass(frozen=True)
class LongestFit:
    """The longest length one setting fits.

    Attributes:
        model: Model key of :data:`~longlora_tune.models.shapes.MODEL_SHAPES`.
        gpus: GPUs (one sequence over all of them when more than one).
        gpu_memory_gib: GiB per GPU.
        quantize_base: QLoRA (NF4 base weights).
        seq_len: Longest length that fits (0: none).
        loss_chunks: The fused loss's chunk count at that length.
        peak_gib: Planned peak per GPU at that length.
        host_gib: Pinned host memory per GPU activation offloading needs at that length.
    """

    model: str
    gpus: int
    gpu_memory_gib: float
    quantize_base: bool
    seq_len: int
    loss_chunks: int
    peak_gib: float
    host_gib: float


def longest_length(model: str, *, gpus: int, gpu_memory_gib: float, quantize_base: bool) -> LongestFit:
    """The longest length ``model`` trains at on ``gpus`` GPUs with every lever on.

    Args:
        model: Model key of :data:`~longlora_tune.models.shapes.MODEL_SHAPES`.
        gpus: GPUs; more than one means context parallelism of that degree.
        gpu_memory_gib: GiB per GPU.
        quantize_base: QLoRA (NF4 base weights) instead of a bf16 base.

    Returns:
        The :class:`LongestFit`.

    Raises:
        ValueError: As :func:`~longlora_tune.plan.plan` for an unknown model or bad numbers.
    """
    # A start length the settings accept; the search runs up to 64 times it.
    start = 262_144 * gpus
    scenario, _ = planned_scenario(
        model,
        start,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        context_parallel_degree=gpus,
        quantize_base=quantize_base,
        **ALL_LEVERS,
    )
    length = longest_fitting(scenario, size_loss_chunks=True)
    chunks = loss_chunks_for(scenario, max(length, 1024 * gpus))
    step = scenario.peak(max(length, 1024 * gpus), loss_chunks=chunks)
    return LongestFit(
        model=model,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        quantize_base=quantize_base,
        seq_len=length,
        loss_chunks=chunks,
        peak_gib=round(step.peak / GIB, 1),
        host_gib=round(step.host / GIB, 1),
    )


def _cell(fit: LongestFit) -> str:
    if not fit.seq_len:
        return "does not fit"
    return f"{fit.seq_len:,} ({fit.host_gib:g} GiB host)"


def table(fits: Sequence[LongestFit]) -> str:
    """The markdown table of :func:`main`: one row per model and GPU count.

    Args:
        fits: Results of :func:`longest_length`, LoRA+ and QLoRA for each model and GPU count.

    Returns:
        The table's text.
    """
    cells = {(f.model, f.gpus, f.quantize_base): f for f in fits}
    memory = fits[0].gpu_memory_gib if fits else 0
    lines = [
        f"| model | GPUs of {memory:g} GiB | LoRA+, bf16 base: tokens (pinned host per GPU) "
        "| QLoRA: tokens (host) |",
        "|---|---:|---:|---:|",
    ]
    for model, gpus in dict.fromkeys((f.model, f.gpus) for f in fits):
        name = TABLE_MODELS.get(model, model)
        lora, qlora = cells[(model, gpus, False)], cells[(model, gpus, True)]
        lines.append(f"| {name} | {gpus} | {_cell(lora)} | {_cell(qlora)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m longlora_tune.plan.longest``: print (and optionally write) the longest-length table.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m longlora_tune.plan.longest",
        description="The longest training length that fits, per model and GPU count, with every lever on.",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=list(TABLE_MODELS))
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="GPU counts (default 1 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    fits = [
        longest_length(model, gpus=gpus, gpu_memory_gib=args.gpu_memory, quantize_base=quantize)
        for model in args.models
        for gpus in args.gpus
        for quantize in (False, True)
    ]
    print(table(fits))
    if args.json:
        atomic_write_json(args.json, [asdict(f) for f in fits])
    return 0


if __name__ == "__main__":
    sys.exit(main())
