"""Context parallelism for S²-Attn: each rank holds a contiguous slice of every sequence.

Design (halo exchange). A sequence of ``N = P * L`` tokens is split over the ``P`` ranks of a context-
parallel group; rank ``r`` holds global positions ``[r*L, (r+1)*L)`` of q, k, v (RoPE already applied at
global positions). In S² (no-wrap form) a query sees only keys of its own group: the unshifted heads
``[0, H//2)`` use groups ``[jG, (j+1)G)``, the shifted heads ``[H//2, H)``
(:func:`~longlora_tune.modules.s2_heads.shifted_heads`) groups shifted by ``G/2``. When ``L`` is a
multiple of ``G/2``, every slice start ``p0 = r*L`` is a group boundary of one head set and the middle of a
group of the other: the shifted heads straddle ``p0`` when ``p0 % G == 0``, the unshifted ones when
``p0 % G == G/2``. So rank ``r > 0`` needs exactly one thing from the outside: the previous rank's last
``G/2`` keys and values of the heads whose group straddles ``p0``. One point-to-point message per layer
forward (and its gradient back in backward), of ``b * H/2 * G/2 * d`` keys plus as many values
(``ceil(H/2)`` or ``floor(H/2)`` heads for an odd ``H``), independent of ``L`` and of ``P``; ring attention
instead rotates all of K and V around the ring.

Each rank then computes:

* the bulk: :func:`~longlora_tune.modules.s2_attention.shifted_sparse_attention` on its own slice with
  ``start=p0``, which lays out both head sets' groups as in the whole sequence, cut at the slice;
* the seam: the first ``G/2`` queries of the straddling heads attend to the ``G/2`` halo keys and their own
  first ``G/2`` keys (one small causal-with-offset SDPA), replacing those rows of the bulk result. With a
  single head (shifted, none unshifted) a rank starting mid-group has no seam and an empty halo.

Rank 0 runs the seam too, with every halo key masked out: its result equals the bulk's, but every rank then
takes part in the halo exchange's backward (a rank that skipped it would leave its neighbour waiting).

Refused (one-line ``ValueError``/``LongLoRAConfigError``): ``L`` not a multiple of ``G/2`` (which includes
``G > 2L``: a group would span more than two ranks), the wrap-around form (it would need a message from the
last rank to the first), no heads, and mismatched shapes.

Masks use the single-process semantics in global positions: ``key_padding_mask`` (bool ``[b, L]``, True =
real token) and ``document_ids`` (int ``[b, L]``, packed documents) give the dense mask
``valid[k] & (doc[q] == doc[k])`` ANDed with S²; query rows with no allowed key return zeros. Every rank of
the group must pass the same kinds of mask (the halo of the mask is exchanged only when one is given).
A padding mask costs no ``L x L`` memory; document ids build a bool ``[b, L, L]`` on each rank for the
bulk call (``L`` = 32k: 1 GiB per sequence), the one place where a flex ``BlockMask`` would do better.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.loss import shift_labels
from longlora_tune.modules.s2_attention import S2Attention, shifted_sparse_attention
from longlora_tune.modules.s2_heads import straddling_heads

__all__ = [
    "ContextParallelAttention",
    "ContextParallelBatch",
    "ContextParallelSlice",
    "HaloTraffic",
    "check_context_parallel",
    "context_parallel_attention",
    "context_parallel_s2_attention",
    "count_halo_traffic",
    "document_ids_from_positions",
    "split_batch_for_context_parallel",
    "split_for_context_parallel",
]


def _working_degrees(seq_len: int, group_size: int) -> str:
    half = group_size // 2
    degrees = [p for p in range(1, min(seq_len, 64) + 1) if seq_len % p == 0 and (seq_len // p) % half == 0]
    return ", ".join(str(p) for p in degrees) or "none"


def check_context_parallel(seq_len: int, degree: int, group_size: int) -> int:
    """Check that a sequence length, context-parallel degree and S² group size work together.

    Args:
        seq_len: global (unsplit) sequence length ``N`` of every batch.
        degree: context-parallel degree ``P`` (ranks sharing one sequence).
        group_size: S² group size ``G`` (even).

    Returns:
        The slice length ``L = N / P``.

    Raises:
        LongLoRAConfigError: if ``N`` is not a multiple of ``P``, or ``L`` is not a multiple of ``G/2``
            (which also refuses ``G > 2L``: a group would span more than two ranks). The message lists the
            degrees that work for this ``N`` and ``G``.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise LongLoRAConfigError(f"context_parallel_degree={degree!r}; use an integer >= 1")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise LongLoRAConfigError(f"S2 group size {group_size!r} is not an even integer >= 2")
    if seq_len % degree or (seq_len // degree) % (group_size // 2):
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree} with sequence length {seq_len} and S2 group size "
            f"{group_size}: "
            f"each rank's slice must be a multiple of G/2={group_size // 2} tokens (so G <= 2 * slice); "
            f"degrees that work: {_working_degrees(seq_len, group_size)}; or pad sequences to a "
            f"multiple of {degree * group_size // 2}"
        )
    return seq_len // degree


# ----------------------------------------------------------------------------------------------------
# Point-to-point halo exchange with autograd
# ----------------------------------------------------------------------------------------------------


class HaloTraffic:
    """What the halo exchange posted in this process while counted (see :func:`count_halo_traffic`).

    Keys of every dict are the passes: ``forward`` (key/value tails; activation checkpointing's recomputation
    counts again), ``backward`` (their gradients) and ``mask`` (the padding/document halo).

    Attributes:
        sent: pass -> bytes of the tensors this process sent.
        received: pass -> bytes of the tensors it received.
        messages: pass -> point-to-point operations posted (sends plus receives).
    """

    PASSES = ("forward", "backward", "mask")

    def __init__(self) -> None:
        self.sent = dict.fromkeys(self.PASSES, 0)
        self.received = dict.fromkeys(self.PASSES, 0)
        self.messages = dict.fromkeys(self.PASSES, 0)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """The counts as plain dicts (JSON-ready).

        Returns:
            ``{"sent": ..., "received": ..., "messages": ...}``, each pass -> int.
        """
        return {"sent": dict(self.sent), "received": dict(self.received), "messages": dict(self.messages)}


# Active counters. A module-level list rather than a thread-local: CUDA runs backward (and activation
# checkpointing's recomputation) on autograd's own threads.
_COUNTERS: list[HaloTraffic] = []


@contextlib.contextmanager
def count_halo_traffic() -> Iterator[HaloTraffic]:
    """Count the bytes and messages every halo exchange of this process posts inside the block.

    The counts are of what the op hands to ``torch.distributed`` (the benchmark checks them against
    :func:`longlora_tune.plan.communication.halo_bytes_per_layer`); the cost is one dict update per message.

    Yields:
        The counter, filled as the block runs (forward and backward both, if both run inside it).
    """
    counter = HaloTraffic()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _exchange(
    send: Optional[Tensor],
    recv: Optional[Tensor],
    dst: Optional[int],
    src: Optional[int],
    group,
    kind: str,
):
    # An empty tensor (no head straddles that boundary: one head in all) is not posted; the peer computes
    # the same head set from the same positions and posts nothing either.
    ops = []
    sent = received = 0
    if send is not None and dst is not None and send.numel():
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=dst))
        sent = send.numel() * send.element_size()
    if recv is not None and src is not None and recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=src))
        received = recv.numel() * recv.element_size()
    for counter in _COUNTERS:
        counter.sent[kind] += sent
        counter.received[kind] += received
        counter.messages[kind] += len(ops)
    if ops:
        # batch_isend_irecv: NCCL needs the pair posted together; gloo runs them one by one.
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _HaloFromPrevious(torch.autograd.Function):
    """Send ``tail`` to the next rank and return what the previous rank sent (zeros on rank 0).

    ``tail`` is ``[b, heads, ...]`` and the halo ``[b, halo_heads, ...]``: for an odd head count the heads
    straddling the slice's end and its start can differ by one. Backward sends the halo's gradient to the
    previous rank and receives the tail's from the next one (zeros on the last rank): send/recv is not
    autograd-aware, so the reverse message is written here.
    """

    @staticmethod
    def forward(ctx: Any, tail: Tensor, halo_heads: int, group: Any, rank: int, world: int) -> Tensor:
        ctx.group, ctx.rank, ctx.world, ctx.tail_shape = group, rank, world, tail.shape
        tail = tail.contiguous()
        halo = tail.new_zeros((tail.shape[0], halo_heads, *tail.shape[2:]))
        nxt = rank + 1 if rank + 1 < world else None
        prev = rank - 1 if rank > 0 else None
        _exchange(tail, halo, nxt, prev, group, "forward")
        return halo

    @staticmethod
    def backward(ctx: Any, grad_halo: Tensor) -> tuple[Optional[Tensor], None, None, None, None]:
        rank, world = ctx.rank, ctx.world
        grad_tail = grad_halo.new_zeros(ctx.tail_shape)
        nxt = rank + 1 if rank + 1 < world else None
        prev = rank - 1 if rank > 0 else None
        _exchange(grad_halo.contiguous(), grad_tail, prev, nxt, ctx.group, "backward")
        return grad_tail, None, None, None, None


def _mask_halo(tail: Tensor, group: Any, rank: int, world: int) -> Tensor:
    halo = torch.zeros_like(tail)
    _exchange(
        tail.contiguous(),
        halo,
        rank + 1 if rank + 1 < world else None,
        rank - 1 if rank else None,
        group,
        "mask",
    )
    return halo


# ----------------------------------------------------------------------------------------------------
# The attention op
# ----------------------------------------------------------------------------------------------------


def context_parallel_s2_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    *,
    group: Any = None,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> Tensor:
    """S²-Attn (no-wrap form) over a sequence split in contiguous slices across a process group.

    Rank ``r`` of ``group`` holds global positions ``[r*L, (r+1)*L)``. The concatenation over ranks of
    the results equals ``shifted_sparse_attention(q_full, k_full, v_full, group_size, mask=M)`` with
    ``M[b, i, j] = valid[b, j] & (doc[b, i] == doc[b, j])`` (``M`` omitted when neither mask is given),
    forward and backward. Every rank of ``group`` must call it with the same shapes and kinds of mask.

    Args:
        q: Queries ``[b, h, L, d]`` of this rank's slice (RoPE applied at global positions).
        k: Keys ``[b, h, L, d]`` (expanded to all query heads).
        v: Values ``[b, h, L, d]``.
        group_size: ``G``, even; ``L`` must be a multiple of ``G/2``.
        group: The context-parallel process group (None: the default group).
        key_padding_mask: Optional bool ``[b, L]``, True for real tokens (pad keys are hidden).
        document_ids: Optional integer ``[b, L]`` document index of each token (packed batches).
        dropout_p: Attention dropout probability (not reproducible against a single process).
        scale: Softmax scale; ``1/sqrt(d)`` when None.

    Returns:
        Attention output ``[b, h, L, d]`` of this rank's slice.

    Raises:
        ValueError: On bad shapes, no heads, a bad group size, or ``L`` not a multiple of ``G/2``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [batch, heads, slice, head_dim] with equal batch/heads/slice; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, heads, length, _ = q.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    shift = group_size // 2
    if length % shift:
        raise ValueError(
            f"context-parallel S2 needs each rank's slice ({length} tokens) to be a multiple of G/2={shift}; "
            f"pad sequences or change the context-parallel degree (see check_context_parallel)"
        )
    for name, m in (("key_padding_mask", key_padding_mask), ("document_ids", document_ids)):
        if m is not None and tuple(m.shape) != (b, length):
            raise ValueError(f"{name} must be [batch, slice] = {(b, length)}, got {tuple(m.shape)}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")

    rank = dist.get_rank(group) if dist.is_initialized() else 0
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    start = rank * length
    seam_heads = straddling_heads(start, group_size, heads)
    tail_heads = straddling_heads(start + length, group_size, heads)  # the next rank's seam heads

    with_mask = key_padding_mask is not None or document_ids is not None
    valid = key_padding_mask if key_padding_mask is not None else torch.ones(b, length, dtype=torch.bool)
    valid = valid.to(q.device)
    docs = (
        document_ids.to(q.device).long()
        if document_ids is not None
        else torch.zeros_like(valid, dtype=torch.long)
    )

    dense = None
    if document_ids is not None:
        # Materialised [b, L, L] (the public function then reads only its G x G diagonal blocks).
        dense = valid[:, None, :] & (docs[:, :, None] == docs[:, None, :])
    elif key_padding_mask is not None:
        dense = valid[:, None, :].expand(b, length, length)  # a view: no L x L memory
    bulk = shifted_sparse_attention(
        q, k, v, group_size, mask=dense, backend="sdpa", dropout_p=dropout_p, scale=scale, start=start
    )

    # The halo: the next rank's straddling heads, last G/2 keys and values, stacked on the feature axis.
    tail = torch.cat([k[:, tail_heads, -shift:], v[:, tail_heads, -shift:]], dim=-1)
    halo = _HaloFromPrevious.apply(tail, seam_heads.stop - seam_heads.start, group, rank, world)
    halo_k, halo_v = halo.split([k.shape[-1], v.shape[-1]], dim=-1)

    halo_valid = torch.full((b, shift), rank > 0, dtype=torch.bool, device=q.device)
    halo_docs = torch.zeros(b, shift, dtype=torch.long, device=q.device)
    if with_mask:
        info = _mask_halo(torch.stack([valid[:, -shift:].long(), docs[:, -shift:]]), group, rank, world)
        halo_valid = halo_valid & info[0].bool()
        halo_docs = info[1]
    if seam_heads.start == seam_heads.stop:
        # No head straddles this start (one head, unshifted here), but the empty halo stays in the graph
        # so that this rank's backward receives the next rank's gradient message for its tail.
        return bulk + 0.0 * halo.sum()

    # The seam: the straddling heads' first G/2 queries see the G/2 halo keys and their own first G/2 keys
    # (causally).
    qs = q[:, seam_heads, :shift]
    ks = torch.cat([halo_k, k[:, seam_heads, :shift]], dim=2)
    vs = torch.cat([halo_v, v[:, seam_heads, :shift]], dim=2)
    key_valid = torch.cat([halo_valid, valid[:, :shift]], dim=1)
    key_docs = torch.cat([halo_docs, docs[:, :shift]], dim=1)
    if not with_mask:
        # No dense [b, G/2, G] mask (2 GiB at G = 64k): the seam is causal aligned to the bottom right.
        if rank > 0:
            seam = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=causal_lower_right(shift, 2 * shift), dropout_p=dropout_p, scale=scale
            )
        else:
            # Rank 0 has no halo (its seam is a plain causal block), but the halo stays in the graph so
            # that this rank's backward receives the next rank's gradient message.
            seam = F.scaled_dot_product_attention(
                qs, ks[:, :, shift:], vs[:, :, shift:], is_causal=True, dropout_p=dropout_p, scale=scale
            )
            seam = seam + 0.0 * (halo_k.sum() + halo_v.sum())
    else:
        rows = torch.arange(shift, device=q.device)[:, None]
        cols = torch.arange(2 * shift, device=q.device)[None, :]
        allowed = (
            (cols <= rows + shift)[None]
            & key_valid[:, None, :]
            & (docs[:, :shift, None] == key_docs[:, None, :])
        )
        # A query with no allowed key (a pad row) gets zeros, as in the single-process function; letting
        # it see one key first avoids the NaN some kernels give for an empty row.
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (empty & (cols == rows + shift)[None])
        seam = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=allowed[:, None], dropout_p=dropout_p, scale=scale
        )
        seam = seam.masked_fill(empty[:, None], 0.0)

    seamed = torch.cat([seam, bulk[:, seam_heads, shift:]], dim=2)
    return torch.cat([bulk[:, : seam_heads.start], seamed, bulk[:, seam_heads.stop :]], dim=1)


# ----------------------------------------------------------------------------------------------------
# Splitting a batch
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextParallelSlice:
    """One rank's share of a batch.

    Attributes:
        tokens: ``[b, L]`` input tokens of this rank's slice.
        labels: ``[b, L]`` targets, already shifted by one BEFORE the split (do not shift again).
        input_pos: ``[b, L]`` RoPE positions (global, or per document for packed batches).
        start: global position of the slice's first token (``rank * L``).
    """

    tokens: Tensor
    labels: Tensor
    input_pos: Tensor
    start: int


def split_for_context_parallel(
    tokens: Tensor,
    labels: Tensor,
    *,
    rank: int,
    degree: int,
    ignore_index: int = -100,
    input_pos: Optional[Tensor] = None,
) -> ContextParallelSlice:
    """This context-parallel rank's contiguous slice of a batch, with labels shifted before the split.

    Shifting first keeps the target of each slice's last token (the first token of the next slice); the
    last token of the whole sequence gets ``ignore_index``.

    Args:
        tokens: ``[b, N]`` input tokens.
        labels: ``[b, N]`` labels aligned with ``tokens`` (torchtune's convention, unshifted).
        rank: this rank's index in the context-parallel group.
        degree: the context-parallel degree ``P``.
        ignore_index: the loss's ignore index.
        input_pos: ``[b, N]`` positions of packed batches; None for ``0 .. N-1``.

    Returns:
        The slice (tokens, shifted labels, positions, start).

    Raises:
        LongLoRAConfigError: if ``N`` is not a multiple of ``degree`` or ``rank`` is out of range.
    """
    if tokens.dim() != 2 or labels.shape != tokens.shape:
        raise ValueError(
            f"tokens and labels must be [batch, seq]; got {tuple(tokens.shape)}, {tuple(labels.shape)}"
        )
    n = tokens.shape[1]
    if degree < 1 or n % degree:
        raise LongLoRAConfigError(
            f"sequence length {n} is not a multiple of context_parallel_degree={degree}; pad batches to a "
            f"multiple of {degree} (times G/2 for S2)"
        )
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside the context-parallel group of {degree}")
    length = n // degree
    part = slice(rank * length, (rank + 1) * length)
    if input_pos is None:
        input_pos = torch.arange(n, device=tokens.device).expand(tokens.shape[0], n)
    shifted = shift_labels(labels, ignore_index)
    return ContextParallelSlice(tokens[:, part], shifted[:, part], input_pos[:, part], rank * length)


def document_ids_from_positions(input_pos: Tensor) -> Tensor:
    """Document index of every token of a packed batch, from its per-document positions.

    torchtune's packs restart ``input_pos`` at 0 for each sample; the pack's padding continues the last
    sample's positions and so joins its document. That is harmless: padding sits after every real token
    (causal attention never shows it to one) and its labels are ignored.

    Args:
        input_pos: ``[b, N]`` positions of the whole (unsplit) packed batch.

    Returns:
        ``[b, N]`` int64 document ids (0 for the first document of each row).
    """
    return torch.cumsum((input_pos == 0).long(), dim=1) - 1


@dataclass(frozen=True)
class ContextParallelBatch:
    """One context-parallel rank's share of a training batch, ready for the model and the loss.

    Attributes:
        batch: ``tokens``, ``labels`` (already shifted: score with ``labels_shifted=True``) and global
            ``input_pos`` of this rank's slice; no dense ``mask`` (the attention takes ``document_ids``).
        document_ids: ``[b, L]`` document ids of packed batches, None otherwise.
    """

    batch: dict[str, Tensor]
    document_ids: Optional[Tensor]


def split_batch_for_context_parallel(
    batch: dict[str, Any], *, rank: int, degree: int, ignore_index: int
) -> ContextParallelBatch:
    """This rank's contiguous slice of a collated batch (pretraining blocks, padded or packed SFT).

    Labels are shifted before the split (:func:`split_for_context_parallel`); positions are global, or per
    document for packed batches, whose dense document mask is replaced by document ids (the dense
    ``[b, N, N]`` mask is never sliced or sent). Right-padded batches need no mask: S² without wrap-around
    is causal, so no real token ever sees the padding after it.

    Args:
        batch: the collated batch: ``tokens``, ``labels`` and, for packed data, ``input_pos`` and ``mask``.
        rank: this rank's index in its context-parallel group.
        degree: the context-parallel degree ``P``.
        ignore_index: the loss's ignore index.

    Returns:
        The slice and its document ids.

    Raises:
        LongLoRAConfigError: if the batch length is not a multiple of ``degree``.
    """
    input_pos = batch.get("input_pos", None)
    part = split_for_context_parallel(
        batch["tokens"],
        batch["labels"],
        rank=rank,
        degree=degree,
        ignore_index=ignore_index,
        input_pos=input_pos,
    )
    docs = None
    if input_pos is not None:
        length = part.tokens.shape[1]
        docs = document_ids_from_positions(input_pos)[:, part.start : part.start + length]
    out = {"tokens": part.tokens, "labels": part.labels, "input_pos": part.input_pos}
    return ContextParallelBatch(out, docs)


class ContextParallelAttention:
    """What an :class:`~longlora_tune.modules.s2_attention.S2Attention` needs for one context-parallel step.

    Set on every S² module by :func:`context_parallel_attention`; the module then calls it instead of the
    single-process S² function. A plain attribute (not a submodule or buffer), so state-dict keys and
    parameter names do not change.

    Args:
        group: the context-parallel process group.
        key_padding_mask: optional bool ``[b, L]`` of this rank's slice (True = real token).
        document_ids: optional int ``[b, L]`` document ids of this rank's slice (packed batches).
    """

    def __init__(
        self, group: Any, key_padding_mask: Optional[Tensor] = None, document_ids: Optional[Tensor] = None
    ) -> None:
        self.group = group
        self.key_padding_mask = key_padding_mask
        self.document_ids = document_ids

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, group_size: int, dropout_p: float = 0.0) -> Tensor:
        """Run :func:`context_parallel_s2_attention` on this rank's slice.

        Args:
            q: queries ``[b, h, L, d]``.
            k: keys ``[b, h, L, d]``.
            v: values ``[b, h, L, d]``.
            group_size: the S² group size.
            dropout_p: attention dropout.

        Returns:
            ``[b, h, L, d]``.
        """
        return context_parallel_s2_attention(
            q,
            k,
            v,
            group_size,
            group=self.group,
            key_padding_mask=self.key_padding_mask,
            document_ids=self.document_ids,
            dropout_p=dropout_p,
        )


@contextlib.contextmanager
def context_parallel_attention(
    model: torch.nn.Module,
    *,
    group: Any,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
) -> Iterator[None]:
    """Make every S² layer of ``model`` attend across the context-parallel group for one step.

    Wrap the forward AND the backward: activation checkpointing recomputes the attention during
    ``backward()``, and the recomputation must take the same path. (A module attribute rather than a
    thread-local: CUDA runs backward, and so the recomputation, on autograd's own threads.)

    Args:
        model: the model (possibly FSDP-wrapped and activation-checkpointed).
        group: the context-parallel process group (``mesh["cp"].get_group()``).
        key_padding_mask: optional bool ``[b, L]`` of this rank's slice.
        document_ids: optional int ``[b, L]`` of this rank's slice (packed batches).

    Yields:
        Nothing; the S² layers are restored to single-process attention on exit.

    Raises:
        LongLoRAConfigError: if the model has no S² layer, or one trains with full attention or the
            wrap-around form (neither can be split at slice boundaries with a halo).
    """
    layers = [m for m in model.modules() if isinstance(m, S2Attention)]
    if not layers:
        raise LongLoRAConfigError(
            "context_parallel_degree > 1 needs a model with S2 attention; this one has none"
        )
    for m in layers:
        if m.config.use_full_attn:
            raise LongLoRAConfigError(
                "context_parallel_degree > 1 with model.use_full_attn=true is not supported (full attention "
                "would need ring attention); set context_parallel_degree=1 or use_full_attn=false"
            )
        if m.config.wrap_around:
            raise LongLoRAConfigError(
                "context_parallel_degree > 1 with model.s2_wrap_around=true is not supported (the wrap "
                "links the last rank to the first); set s2_wrap_around=false"
            )
    state = ContextParallelAttention(group, key_padding_mask, document_ids)
    for m in layers:
        m.context_parallel = state
    try:
        yield
    finally:
        for m in layers:
            m.context_parallel = None
