"""S² backends against a dense-mask reference on one device (the GPU check's correctness step).

Run ``python -m benchmarks.backend_check --device cuda [--out check.json]``. For every available
backend (``sdpa`` everywhere; ``flex`` and ``flash`` on CUDA when they can run) and dtype (float32 and
bfloat16; flash only in bfloat16), the output and the q/k/v gradients of
:func:`~longlora_tune.modules.s2_attention.shifted_sparse_attention` are compared with softmax attention in
float64 under an explicit ``[H, N, N]`` S² mask built here from the definition (no-wrap form). Exits 1 if
any comparison fails.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from longlora_tune._io import atomic_write_json
from longlora_tune.modules.s2_attention import flash_attn_available, shifted_sparse_attention
from longlora_tune.modules.s2_heads import shifted_heads

__all__ = ["check_backend", "main", "reference_s2_attention"]

# Max abs error allowed relative to the reference's max abs value.
_TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def reference_s2_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int
) -> torch.Tensor:
    """No-wrap S² attention in float64 with a dense mask: heads ``[0, H//2)`` group from 0, the rest from G/2.

    Args:
        q: ``[b, h, n, d]``.
        k: ``[b, h, n, d]``.
        v: ``[b, h, n, d]``.
        group_size: ``G``.

    Returns:
        ``[b, h, n, d]`` float64.
    """
    heads, n = q.shape[1], q.shape[2]
    pos = torch.arange(n, device=q.device)
    qi, kj = pos[:, None], pos[None, :]
    halves = [
        (kj <= qi) & ((qi + shift) // group_size == (kj + shift) // group_size)
        for shift in (0, group_size // 2)
    ]
    unshifted = shifted_heads(heads).start
    allowed = torch.stack([halves[0]] * unshifted + [halves[1]] * (heads - unshifted))
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = (q64 @ k64.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64


def check_backend(
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    batch: int,
    heads: int,
    n: int,
    head_dim: int,
    group: int,
) -> dict[str, Any]:
    """Compare one backend/dtype with the float64 reference, forward and backward.

    Args:
        backend: ``sdpa``, ``flex`` or ``flash``.
        dtype: Input dtype.
        device: Device.
        batch: Batch size.
        heads: Heads (any count >= 1).
        n: Sequence length.
        head_dim: Head dimension.
        group: ``G``.

    Returns:
        A dict with the errors (relative to the reference's max abs) and ``ok``.
    """
    gen = torch.Generator().manual_seed(n + group)
    base = [torch.randn(batch, heads, n, head_dim, generator=gen) for _ in range(3)]
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in base)
    weight = torch.randn(batch, heads, n, head_dim, generator=gen).to(device)
    out = shifted_sparse_attention(q, k, v, group, backend=backend)
    grads = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_s2_attention(q64, k64, v64, group)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), (q64, k64, v64))
    errors = {}
    for name, got, want in [("out", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        err = (got.detach().double() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-12)
        errors[name] = float(err)
    tolerance = _TOLERANCE[dtype]
    return {
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [batch, heads, n, head_dim],
        "group": group,
        "errors": errors,
        "tolerance": tolerance,
        "ok": all(err <= tolerance for err in errors.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every available backend/dtype/shape check and print one line per check.

    Args:
        argv: Command-line arguments.

    Returns:
        0 if every check passed, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backend_check", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = ["sdpa"]
    if device.type == "cuda":
        backends.append("flex")
        if flash_attn_available():
            backends.append("flash")
    # (batch, heads, n, head_dim, G): aligned and not aligned to G, an odd head count (4 unshifted + 5
    # shifted, one varlen row per head for flash); flex gets 128-aligned half groups.
    shapes = (
        [(1, 4, 64, 16, 16), (2, 4, 60, 16, 16), (2, 9, 60, 16, 16)]
        if args.small
        else [(2, 8, 1024, 64, 256), (1, 8, 1000, 128, 256), (2, 9, 1024, 64, 256)]
    )
    results = []
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            if backend == "flash" and dtype == torch.float32:
                continue  # flash-attn kernels are half precision only
            for batch, heads, n, head_dim, group in shapes:
                if backend == "flex" and n % 128:
                    continue
                try:
                    res = check_backend(
                        backend, dtype, device, batch=batch, heads=heads, n=n, head_dim=head_dim, group=group
                    )
                except Exception as err:  # report every backend, even one that crashes
                    res = {
                        "backend": backend,
                        "dtype": str(dtype),
                        "shape": [batch, heads, n, head_dim],
                        "group": group,
                        "ok": False,
                        "error": f"{type(err).__name__}: {err}",
                    }
                results.append(res)
                detail = res.get("error") or " ".join(f"{k}={v:.1e}" for k, v in res["errors"].items())
                print(
                    f"{'PASS' if res['ok'] else 'FAIL'} {backend:5s} {res['dtype']:8s} {res['shape']} "
                    f"G={group} {detail}",
                    flush=True,
                )
                if args.out:  # after every comparison, so a run stopped by a time limit keeps what it found
                    atomic_write_json(args.out, {"device": str(device), "results": results}, default=str)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
