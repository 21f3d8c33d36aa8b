"""Benchmark: full causal SDPA attention vs S²-Attn (sdpa backend) forward and forward+backward.

Run ``python -m benchmarks.s2_attention [--lengths 4096 8192 16384] [--out results.json]``.
Prints a markdown table (median milliseconds over ``--repeats`` runs after one warm-up) and optionally
writes the measurements as JSON. On CPU it uses one thread by default so numbers are comparable across
machines with different core counts (and less disturbed by other processes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from longlora_tune._io import atomic_write_json
from longlora_tune.modules.s2_attention import shifted_sparse_attention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def bench_length(
    n: int,
    *,
    heads: int,
    head_dim: int,
    group_size: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Time full causal attention and S² attention at one sequence length.

    Args:
        n: Sequence length.
        heads: Number of attention heads.
        head_dim: Head dimension.
        group_size: S² group size.
        repeats: Timed runs per measurement (median reported).
        device: Device to run on.
        dtype: Tensor dtype.

    Returns:
        A dict with the per-run times, medians and minima (milliseconds) of forward and forward+backward,
        and the speed-ups of S² over full attention.
    """
    gen = torch.Generator(device="cpu").manual_seed(n)
    # torchtune hands the attention call [b, s, h, d] projections transposed to [b, h, s, d] (not contiguous).
    q, k, v = (
        torch.randn(1, n, heads, head_dim, generator=gen, dtype=dtype)
        .to(device)
        .transpose(1, 2)
        .requires_grad_()
        for _ in range(3)
    )
    grad_out = torch.randn(1, heads, n, head_dim, generator=gen, dtype=dtype).to(device)

    def full() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sparse() -> torch.Tensor:
        return shifted_sparse_attention(q, k, v, group_size, backend="sdpa")

    def run(attn: Callable[[], torch.Tensor], backward: bool) -> Callable[[], None]:
        def step() -> None:
            if backward:
                for x in (q, k, v):
                    x.grad = None
                attn().backward(grad_out)
            else:
                with torch.no_grad():
                    attn()

        return step

    steps = {
        f"{name}_{mode}": run(attn, backward)
        for name, attn in (("full", full), ("s2", sparse))
        for mode, backward in (("fwd", False), ("fwd_bwd", True))
    }
    for step in steps.values():
        step()  # warm-up: kernel selection, allocator, caches
    times: dict[str, list[float]] = {key: [] for key in steps}
    # Interleaved, so that load from other processes drifting over time hits both variants alike.
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(_time_ms(step, device))
    result: dict = {"n": n, "group_size": group_size}
    for key, values in times.items():
        result[f"{key}_ms"] = values
        result[f"{key}_median_ms"] = statistics.median(values)
        result[f"{key}_min_ms"] = min(values)
    result["speedup_fwd"] = result["full_fwd_median_ms"] / result["s2_fwd_median_ms"]
    result["speedup_fwd_bwd"] = result["full_fwd_bwd_median_ms"] / result["s2_fwd_bwd_median_ms"]
    # Best-of-n ratios: on a shared machine other processes only ever add time, so minima are steadier.
    result["speedup_fwd_min"] = result["full_fwd_min_ms"] / result["s2_fwd_min_ms"]
    result["speedup_fwd_bwd_min"] = result["full_fwd_bwd_min_ms"] / result["s2_fwd_bwd_min_ms"]
    return result


def markdown_table(results: list[dict]) -> str:
    """Render the measurements as a markdown table.

    Args:
        results: Outputs of :func:`bench_length`.

    Returns:
        The table as a string.
    """
    lines = [
        "| N | G | full fwd ms | S² fwd ms | fwd speed-up "
        "| full fwd+bwd ms | S² fwd+bwd ms | fwd+bwd speed-up | best-of speed-up fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [
            str(r["n"]),
            str(r["group_size"]),
            f"{r['full_fwd_median_ms']:.1f}",
            f"{r['s2_fwd_median_ms']:.1f}",
            f"{r['speedup_fwd']:.2f}x",
            f"{r['full_fwd_bwd_median_ms']:.1f}",
            f"{r['s2_fwd_bwd_median_ms']:.1f}",
            f"{r['speedup_fwd_bwd']:.2f}x",
            f"{r['speedup_fwd_min']:.2f}x / {r['speedup_fwd_bwd_min']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The measurements, one dict per sequence length.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="sequence lengths"
    )
    parser.add_argument("--heads", type=int, default=8, help="attention heads (>= 1)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension")
    parser.add_argument("--group-ratio", type=float, default=0.25, help="G = ratio * N (default 1/4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median, min)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write measurements as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.heads < 1:
        parser.error(f"--heads must be >= 1, got {args.heads}")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    results = []
    for n in args.lengths:
        group_size = int(n * args.group_ratio)
        if group_size < 2 or group_size % 2:
            parser.error(
                f"--group-ratio {args.group_ratio} gives group size {group_size} at N={n}; need even >= 2"
            )
        results.append(
            bench_length(
                n,
                heads=args.heads,
                head_dim=args.head_dim,
                group_size=group_size,
                repeats=args.repeats,
                device=device,
                dtype=dtype,
            )
        )
        print(f"N={n} done", flush=True)
    print(
        f"\nbatch 1, {args.heads} heads, head dim {args.head_dim}, {args.dtype}, device {device}, "
        f"{args.threads} thread(s), median of {args.repeats}\n"
    )
    print(markdown_table(results))
    if args.out is not None:
        meta = {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": str(device),
            "dtype": args.dtype,
            "threads": args.threads,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": 1,
            "repeats": args.repeats,
        }
        atomic_write_json(args.out, {"meta": meta, "results": results})
    return results


if __name__ == "__main__":
    main()
