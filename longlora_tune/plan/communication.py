"""Bytes each context-parallel design moves per layer and step: the planner's communication terms.

S² with context parallelism needs only a halo of half a group from the previous rank
(:func:`longlora_tune.modules.context_parallel.context_parallel_s2_attention`); ring attention and
Ulysses are computed for comparison. Pure arithmetic, no torch, so the planner imports it cheaply.
"""

from __future__ import annotations

from longlora_tune.modules.s2_heads import straddling_heads

__all__ = ["halo_bytes_per_layer", "ring_bytes_per_layer", "ulysses_bytes_per_layer"]


def halo_bytes_per_layer(
    *,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    group_size: int,
    degree: int,
    dtype_bytes: int,
    recompute: bool = False,
    masks: bool = False,
) -> int:
    """Bytes that cross one rank boundary per layer and training step with the halo design, both directions.

    The forward tail travels from rank ``r`` to ``r + 1`` and its gradient back, so this is what a middle
    rank receives when ``P > 2``; at ``P = 2`` the last rank receives the forward part and rank 0 the
    gradient part (measured by :func:`~longlora_tune.modules.context_parallel.count_halo_traffic` in
    ``python -m benchmarks --context-parallel 2``).

    Forward: ``2 * b * H/2 * G/2 * d`` elements (keys and values, expanded heads); backward: their
    gradient, the same size; activation checkpointing repeats the forward. Masks add ``2 * b * G/2`` int64
    per forward. Independent of the slice length; zero when ``degree`` is 1. For an odd ``H`` a boundary
    at a multiple of ``G`` carries the ``ceil(H/2)`` shifted heads and one at ``G/2`` past it the
    ``floor(H/2)`` unshifted ones; this counts the busier kind.

    Args:
        batch_size: sequences per micro-batch ``b``.
        num_heads: query heads ``H``.
        head_dim: ``d``.
        group_size: ``G``.
        degree: context-parallel degree ``P``.
        dtype_bytes: bytes per element of k/v (2 for bf16).
        recompute: activation checkpointing (the forward, and its message, runs twice).
        masks: a padding or document mask is passed.

    Returns:
        Bytes across one rank boundary (forward messages plus gradient messages), per layer per step.
    """
    if degree <= 1:
        return 0
    heads = straddling_heads(0, group_size, num_heads)
    forward = 2 * batch_size * (heads.stop - heads.start) * (group_size // 2) * head_dim * dtype_bytes
    mask = 2 * batch_size * (group_size // 2) * 8 if masks else 0
    forwards = 2 if recompute else 1
    return forwards * (forward + mask) + forward


def ring_bytes_per_layer(
    *,
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    slice_len: int,
    degree: int,
    dtype_bytes: int,
    recompute: bool = False,
) -> int:
    """Bytes one rank receives per layer and step with ring attention (for comparison).

    Forward: ``P-1`` hops of one slice's K and V (``2 * b * H_kv * L * d``); backward: ``P-1`` hops of K,
    V and their gradient accumulators (``4 * b * H_kv * L * d``), as ring-attention implementations do.

    Args:
        batch_size: ``b``.
        num_kv_heads: key/value heads ``H_kv`` (ring attention rotates unexpanded K/V).
        head_dim: ``d``.
        slice_len: ``L`` tokens per rank.
        degree: ``P``.
        dtype_bytes: bytes per element.
        recompute: activation checkpointing repeats the forward.

    Returns:
        Bytes received per rank per layer per step.
    """
    if degree <= 1:
        return 0
    hop = batch_size * num_kv_heads * slice_len * head_dim * dtype_bytes
    forwards = 2 if recompute else 1
    return (degree - 1) * hop * (2 * forwards + 4)


def ulysses_bytes_per_layer(
    *,
    batch_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    slice_len: int,
    degree: int,
    dtype_bytes: int,
    recompute: bool = False,
) -> int:
    """Bytes one rank receives per layer and step with head-parallel all-to-all (Ulysses), for comparison.

    Forward: q, k, v re-sharded from sequence to heads and the output back, each moving ``(P-1)/P`` of the
    rank's share; backward moves the four gradients the same way.

    Args:
        batch_size: ``b``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``H_kv``.
        head_dim: ``d``.
        slice_len: ``L``.
        degree: ``P``.
        dtype_bytes: bytes per element.
        recompute: activation checkpointing repeats the forward.

    Returns:
        Bytes received per rank per layer per step.
    """
    if degree <= 1:
        return 0
    once = batch_size * slice_len * head_dim * dtype_bytes * (2 * num_heads + 2 * num_kv_heads)
    once = once * (degree - 1) // degree
    forwards = 2 if recompute else 1
    return once * (forwards + 1)
