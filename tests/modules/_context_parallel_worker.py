"""Run by tests/modules/test_context_parallel.py: context-parallel S² against one process, on gloo.

Usage: python _context_parallel_worker.py WORLD CP_DEGREES OUT_JSON [CASE_INDICES] (comma-separated lists).
Spawns WORLD processes, builds each (dp, cp) mesh in turn, and for every case compares each rank's forward
output and q/k/v gradients (float64) with the matching slices of the single-process
``shifted_sparse_attention``. With fewer KV heads than query heads, k and v are expanded as torchtune does
and the gradients compared are of the unexpanded ones. Rank 0 writes the largest absolute errors per case
(reduced over all ranks) to OUT_JSON; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.checkpoint

# (G, L, mask kind[, query heads, KV heads]; 4 and 4 when not given): G = L, G = L/2, G = 2L, L = 3G/2
# (odd ranks start mid-group of the unshifted heads).
CASES = [(8, 8, m) for m in ("none", "padding", "documents")] + [
    (4, 8, "none"),
    (4, 8, "padding"),
    (16, 8, "none"),
    (16, 8, "documents"),
    (8, 12, "none"),
    (8, 12, "padding"),
    (8, 8, "documents-checkpointed"),  # activation checkpointing re-runs the exchange during backward
    # Odd head counts: the halos at alternate boundaries differ by one head; KV head 1 of 3 serves query
    # heads on both sides of the 9-head split; one head has no seam (and an empty halo) at mid-group starts.
    (8, 12, "none", 9, 3),
    (16, 8, "documents", 9, 3),
    (8, 8, "padding", 3, 1),
    (8, 12, "none", 1, 1),
    (8, 12, "padding", 1, 1),
]


def case_key(case: tuple) -> str:
    """The result key of a case, e.g. ``G=8 L=12 none`` or ``G=8 L=12 none H=9/3``."""
    group_size, length, kind, *heads = case
    return f"G={group_size} L={length} {kind}" + (f" H={heads[0]}/{heads[1]}" if heads else "")


def _masks(kind: str, batch: int, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if kind == "none":
        return None, None
    lengths = torch.tensor([n, n // 2 + 3])[:batch]  # sample 1 is right-padded from inside a later slice
    valid = torch.arange(n)[None, :] < lengths[:, None]
    if kind == "padding":
        return valid, None
    # Packed documents with boundaries that fall inside groups and across slices, plus padding.
    starts = torch.zeros(batch, n, dtype=torch.long)
    starts[0, [5, n // 2 + 1]] = 1
    starts[1, [3, n // 2 - 2]] = 1
    return valid, starts.cumsum(dim=1)


def _case(
    group_size: int,
    length: int,
    kind: str,
    h: int,
    kv_heads: int,
    cp_group,
    cp_rank: int,
    cp_size: int,
) -> list[float]:
    from longlora_tune.modules.context_parallel import context_parallel_s2_attention
    from longlora_tune.modules.s2_attention import shifted_sparse_attention

    b, d = 2, 8
    n = length * cp_size
    gen = torch.Generator().manual_seed(1000 * group_size + length + len(kind))
    q, k, v, up = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(4))
    k, v = k[:, :kv_heads], v[:, :kv_heads]

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(h // kv_heads, dim=1)

    checkpointed = kind.endswith("-checkpointed")
    valid, docs = _masks(kind.removesuffix("-checkpointed"), b, n)
    dense = None
    if valid is not None:
        docs_full = docs if docs is not None else torch.zeros(b, n, dtype=torch.long)
        dense = valid[:, None, :] & (docs_full[:, :, None] == docs_full[:, None, :])
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_k, ref_v = expand(ref_in[1]), expand(ref_in[2])
    ref = shifted_sparse_attention(ref_in[0], ref_k, ref_v, group_size, mask=dense, backend="sdpa")
    if checkpointed:
        ref = shifted_sparse_attention(ref, ref_k, ref_v, group_size, mask=dense, backend="sdpa")
    ref.backward(up)

    part = slice(cp_rank * length, (cp_rank + 1) * length)
    mine = [x[:, :, part].clone().requires_grad_() for x in (q, k, v)]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return context_parallel_s2_attention(
            q,
            expand(k),
            expand(v),
            group_size,
            group=cp_group,
            key_padding_mask=None if valid is None else valid[:, part],
            document_ids=None if docs is None else docs[:, part],
        )

    if checkpointed:
        # Two layers, so one layer's recomputed exchange runs while the other's gradient is in flight.
        first = torch.utils.checkpoint.checkpoint(attend, *mine, use_reentrant=False)
        out = torch.utils.checkpoint.checkpoint(attend, first, mine[1], mine[2], use_reentrant=False)
    else:
        out = attend(*mine)
    out.backward(up[:, :, part])
    errors = [(out - ref[:, :, part]).abs().max()]
    errors += [(m.grad - r.grad[:, :, part]).abs().max() for m, r in zip(mine, ref_in)]
    # Grads must not be trivially zero where the reference has signal (the halo's gradient went back).
    errors.append(torch.tensor(0.0 if mine[1].grad.abs().sum() > 0 else 1.0, dtype=torch.float64))
    return [float(e.detach()) for e in errors]


def _run(rank: int, world: int, degrees: list, init_file: str, out_path: str, cases: list) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from longlora_tune.training.distributed import build_device_mesh

    results = {}
    for degree in degrees:  # one process start serves several meshes (starts dominate the test's time)
        mesh = build_device_mesh("cpu", context_parallel_degree=degree)
        cp_group = mesh["cp"].get_group()
        cp_rank, cp_size = mesh["cp"].get_local_rank(), mesh["cp"].size()
        found = {"mesh": [mesh["dp"].size(), cp_size], "cp_rank_matches": float(cp_rank == rank % degree)}
        for case in cases:
            group_size, length, kind, h, kv_heads = (*case, 4, 4)[:5]
            errs = _case(group_size, length, kind, h, kv_heads, cp_group, cp_rank, cp_size)
            errs = torch.tensor(errs, dtype=torch.float64)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            found[case_key(case)] = errs.tolist()
        results[f"cp={degree}"] = found
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    world_size, out = int(sys.argv[1]), sys.argv[3]
    cp_degrees = [int(d) for d in sys.argv[2].split(",")]
    chosen = CASES if len(sys.argv) < 5 else [CASES[int(i)] for i in sys.argv[4].split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _run, args=(world_size, cp_degrees, os.path.join(tmp, "init"), out, chosen), nprocs=world_size
        )
