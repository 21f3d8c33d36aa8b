"""The command-line options every training-step benchmark takes, and their defaults.

``python -m benchmarks`` and its ``--context-parallel`` mode time the same step on the same
shapes; this is where the options they share (model shape, lengths, device, dtype, timing, checkpointing,
loss chunks) are declared, resolved and checked once.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.train_step import BENCH_SHAPES

__all__ = ["add_step_arguments", "resolve_step_arguments"]


def add_step_arguments(
    parser: argparse.ArgumentParser, *, unit: str, rounds_help: str, seq_help: str
) -> None:
    """Add the shared options to ``parser``.

    Args:
        parser: The benchmark's parser.
        unit: What one measurement is called in the help (``case``, ``run``).
        rounds_help: Help text of ``--rounds`` (how this benchmark interleaves its rounds).
        seq_help: Help text of ``--seq-lens``.
    """
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="7b-proxy")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help=seq_help)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on CUDA"
    )
    parser.add_argument("--repeats", type=int, default=3, help=f"timed steps per {unit} and round (median)")
    parser.add_argument("--rounds", type=int, default=1, help=rounds_help)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--loss-chunks", type=int, default=8)


def resolve_step_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other options, and check the counts.

    ``--device auto`` becomes ``cuda`` when available, else ``cpu``; ``--dtype`` defaults to bf16 on CUDA
    and fp32 on a CPU; ``--seq-lens`` to 256 for the tiny shape and 8192 otherwise.

    Args:
        parser: The parser whose error (exit 2, one line) reports a count below 1.
        args: Parsed arguments with the options of :func:`add_step_arguments`; changed in place.
    """
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.seq_lens is None:
        args.seq_lens = [256] if args.shape == "tiny" else [8192]
    for name in ("repeats", "rounds", "threads", "batch_size", "loss_chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
