"""Shifted sparse attention (S²-Attn) for torchtune attention layers.

S²-Attn (LongLoRA) splits the attention heads in two sets
(:func:`~longlora_tune.modules.s2_heads.shifted_heads`). Heads ``[0, H//2)``
attend causally inside groups of ``G`` consecutive tokens ``[0, G), [G, 2G), ...``; heads ``[H//2, H)`` do
the same inside groups shifted by ``G/2`` (for an odd ``H`` the shifted set is one head larger, as in
LongLoRA's non-flash code). No token attends across its group within a layer, so attention costs ``O(N * G)``
instead of ``O(N^2)``, while the shift lets information flow between neighbouring groups across layers.

Two forms are provided:

* **No wrap-around (default).** The shifted groups are ``[0, G/2), [G/2, 3G/2), ...`` clipped at ``N``:
  the first and last shifted groups are short. Query ``q`` may see key ``k`` iff
  ``k <= q and (q + s) // G == (k + s) // G`` with ``s = 0`` for the unshifted heads and ``s = G/2`` for
  the shifted ones. Nothing from the future is ever visible, so right padding needs no mask.
* **Wrap-around** (``wrap_around=True``): the paper's Algorithm 1. The shifted heads' tokens are rolled by
  ``-G/2`` along the sequence, attend causally in groups of the rolled order and are rolled back. The
  last rolled group then holds tokens ``N-G/2 .. N-1`` followed by ``0 .. G/2-1``, so on those heads the
  first ``G/2`` queries see the last ``G/2`` tokens of the sequence (the future). Kept only to reproduce
  published numbers. Because of the wrap, right padding is visible to those queries, so padded batches
  in this form need a mask that hides pad keys.

When ``N`` is not a multiple of ``G`` the last group is simply shorter (groups are clipped at ``N``),
in both forms; this matches LongLoRA's supervised fine-tuning code, which drops group boundaries past
the padded batch length. An optional mask (bool ``[b, s, s]``, True = may attend, or a flex ``BlockMask``)
is ANDed with the S² pattern in original token positions, which is how per-sample padding and packed
documents are honoured.

The pattern is only for training: :class:`S2Attention` falls back to the wrapped full attention in eval
mode, with ``use_full_attn`` or while a KV cache is in use.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.s2_heads import shifted_heads

__all__ = [
    "BACKENDS",
    "S2Attention",
    "S2AttentionConfig",
    "describe_backend",
    "flash_attn_available",
    "shifted_sparse_attention",
]

BACKENDS = ("auto", "sdpa", "flash", "flex")

_MaskType = Tensor | BlockMask | None


def flash_attn_available() -> bool:
    """Whether the flash-attn varlen kernel can actually run here.

    A real import is attempted (a CUDA-less forced build of flash-attn installs a package that fails on
    import), and a CUDA device must be present.

    Returns:
        True if ``flash_attn.flash_attn_varlen_func`` imports and CUDA is available.
    """
    if not torch.cuda.is_available():
        return False
    try:
        module = importlib.import_module("flash_attn")
    except Exception:  # a broken build raises ImportError, OSError or RuntimeError on import
        return False
    return hasattr(module, "flash_attn_varlen_func")


def describe_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which S² kernel training will use, for the log (a silent fall-back from flash-attn is a surprise).

    Args:
        backend: the configured backend (``auto``, ``sdpa``, ``flash``, ``flex``).
        device: the training device.
        dtype: the compute dtype.

    Returns:
        A short description such as ``"backend auto: SDPA"``.
    """
    if backend != "auto":
        return f"backend {backend}"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if flash_attn_available():
            return "backend auto: flash-attn varlen"
        return "backend auto: SDPA, flash-attn not importable (pip install longlora-tune[flash])"
    return "backend auto: SDPA"


@dataclass(frozen=True)
class S2AttentionConfig:
    """Settings of shifted sparse attention, as set from a model builder or YAML config.

    Attributes:
        group_size_ratio: Group size as a fraction of the model's ``max_seq_len`` (LongLoRA uses 1/4).
            Ignored when ``group_size`` is set.
        group_size: Fixed group size in tokens (even, >= 2); overrides ``group_size_ratio``.
        wrap_around: Use the paper's roll-based Algorithm 1 (leaks the last ``G/2`` tokens to the first
            ``G/2`` queries of the shifted heads) instead of the causal no-wrap form.
        backend: ``"auto"``, ``"sdpa"``, ``"flash"`` or ``"flex"``; see :func:`shifted_sparse_attention`.
        use_full_attn: Train with ordinary full causal attention (S² disabled), e.g. for ablations.
    """

    group_size_ratio: float | None = 0.25
    group_size: int | None = None
    wrap_around: bool = False
    backend: str = "auto"
    use_full_attn: bool = False

    def __post_init__(self) -> None:
        if self.group_size is None and self.group_size_ratio is None:
            raise LongLoRAConfigError("S2AttentionConfig needs group_size or group_size_ratio; both are None")
        if self.group_size_ratio is not None and not (0.0 < float(self.group_size_ratio) <= 1.0):
            raise LongLoRAConfigError(f"group_size_ratio must be in (0, 1], got {self.group_size_ratio}")
        if self.group_size is not None:
            _check_group_size(self.group_size)
        if self.backend not in BACKENDS:
            raise LongLoRAConfigError(
                f"Unknown S2 attention backend {self.backend!r}; choose one of {BACKENDS}"
            )
        if not isinstance(self.wrap_around, bool) or not isinstance(self.use_full_attn, bool):
            raise LongLoRAConfigError(
                "wrap_around and use_full_attn must be bool, got "
                f"{self.wrap_around!r}, {self.use_full_attn!r}"
            )

    def resolve_group_size(self, max_seq_len: int) -> int:
        """Group size in tokens for a model trained on sequences of up to ``max_seq_len`` tokens.

        Args:
            max_seq_len: Longest training sequence (the model's ``max_seq_len``).

        Returns:
            ``group_size`` if set, else ``group_size_ratio * max_seq_len``.

        Raises:
            ValueError: If the result is not an even integer >= 2 or exceeds ``max_seq_len``.
        """
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise LongLoRAConfigError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if self.group_size is not None:
            size = self.group_size
        else:
            exact = float(self.group_size_ratio) * max_seq_len
            size = round(exact)
            if abs(exact - size) > 1e-6:
                raise LongLoRAConfigError(
                    f"group_size_ratio {self.group_size_ratio} * max_seq_len {max_seq_len} = {exact} is not "
                    "an integer; pick a ratio that divides max_seq_len or set group_size"
                )
            _check_group_size(size, what=f"group_size_ratio {self.group_size_ratio} * {max_seq_len}")
        if size > max_seq_len:
            raise LongLoRAConfigError(
                f"group_size {size} exceeds max_seq_len {max_seq_len}; use a smaller group size"
            )
        return size


def _check_group_size(group_size: int, what: str = "group_size") -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise LongLoRAConfigError(f"{what} must be an int, got {group_size!r}")
    if group_size < 2:
        raise LongLoRAConfigError(f"{what} must be >= 2, got {group_size}")
    if group_size % 2:
        raise LongLoRAConfigError(
            f"{what} must be even (groups are shifted by half a group), got {group_size}"
        )


def _head_sets(num_heads: int, group_size: int, start: int) -> list[tuple[int, int]]:
    """``(head count, group shift)`` of the unshifted, then the shifted heads; an empty set is left out.

    The shift is in the positions of a tensor whose first token is at global position ``start``: a head
    set whose groups are ``(p + s) // G`` globally has local groups ``(i + (start + s) % G) // G``.
    """
    shifted = shifted_heads(num_heads)
    sets = [(shifted.start, 0), (shifted.stop - shifted.start, group_size // 2)]
    return [(count, (start + shift) % group_size) for count, shift in sets if count]


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def shifted_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    *,
    wrap_around: bool = False,
    mask: _MaskType = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
    start: int = 0,
) -> Tensor:
    """Shifted sparse attention over ``[batch, heads, seq, head_dim]`` tensors.

    Allowed pairs are the S² pattern (see the module docstring) AND ``mask`` if given, in original token
    positions. Query rows with no allowed key (e.g. pad rows of a padding mask) return zeros.

    Backends:
        * ``"sdpa"``: groups folded into the batch dimension and run through
          ``scaled_dot_product_attention`` (CPU and GPU); never builds an ``N x N`` mask. A dense mask is
          used through its ``G x G`` diagonal blocks only.
        * ``"flash"``: ``flash_attn_varlen_func`` with one varlen segment per group (CUDA, fp16/bf16, no
          mask).
        * ``"flex"``: ``flex_attention`` with a block-sparse ``BlockMask`` (ANDed with a caller's
          ``BlockMask``, e.g. packed documents). No dropout; backward needs a GPU.
        * ``"auto"``: flash when available, on CUDA, half precision and no mask; flex when ``mask`` is a
          ``BlockMask``; otherwise sdpa.

    Args:
        q: Queries ``[b, h, n, d]`` with RoPE applied at global positions.
        k: Keys ``[b, h, n, d]`` (already expanded to all query heads).
        v: Values ``[b, h, n, d]``.
        group_size: ``G``, even, >= 2. May exceed ``n`` (then the unshifted heads are full causal).
        wrap_around: Use the paper's roll-based form (leaks ``G/2`` future tokens; see module docstring).
        mask: Optional bool ``[b or 1, n, n]`` (True = may attend) or a flex ``BlockMask``.
        backend: ``"auto"``, ``"sdpa"``, ``"flash"`` or ``"flex"``.
        dropout_p: Attention dropout probability (not supported by flex).
        scale: Softmax scale; ``1/sqrt(d)`` when None.
        start: Global position of the first token when q, k, v hold the slice ``[start, start + n)`` of a
            longer sequence (context parallelism): the groups are those of the whole sequence, clipped to
            the slice, so no key before the slice is seen. No-wrap form only.

    Returns:
        Attention output ``[b, h, n, d]``.

    Raises:
        ValueError: On no heads, a bad group size or ``start``, mismatched shapes, a bad mask, an unknown
            backend, or a backend that cannot serve the request.
    """
    _check_group_size(group_size)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown S2 attention backend {backend!r}; choose one of {BACKENDS}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [batch, heads, seq, head_dim] with equal batch/heads/seq (k/v expanded, no KV "
            f"cache); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if wrap_around and start:
        raise ValueError("wrap_around=True needs the whole sequence (start=0): the roll wraps at its end")
    head_sets = _head_sets(q.shape[1], group_size, start)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if mask is not None and not isinstance(mask, BlockMask):
        _check_dense_mask(mask, q)

    if backend == "auto":
        if (
            mask is None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and flash_attn_available()
        ):
            backend = "flash"
        elif isinstance(mask, BlockMask):
            backend = "flex"
        else:
            backend = "sdpa"

    if backend == "sdpa":
        if isinstance(mask, BlockMask):
            raise ValueError("backend='sdpa' cannot take a flex BlockMask; use backend='flex' or 'auto'")
        return _s2_sdpa(q, k, v, group_size, head_sets, wrap_around, mask, dropout_p, scale)
    if backend == "flash":
        if mask is not None:
            raise ValueError(
                "backend='flash' does not support an attention mask; use backend='sdpa' or 'flex' (or 'auto')"
            )
        if not flash_attn_available():
            raise ValueError(
                "backend='flash' needs flash-attn and a CUDA device; use backend='auto' or 'sdpa'"
            )
        return _s2_flash(q, k, v, group_size, head_sets, wrap_around, dropout_p, scale)
    if dropout_p > 0.0:
        raise ValueError(f"backend='flex' does not support dropout (got dropout_p={dropout_p}); use 'sdpa'")
    return _s2_flex(q, k, v, group_size, head_sets, wrap_around, mask, scale)


def _check_dense_mask(mask: Tensor, q: Tensor) -> None:
    b, _, n, _ = q.shape
    if (
        not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or mask.dim() != 3
        or mask.shape[0] not in (1, b)
        or mask.shape[1:] != (n, n)
    ):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        dtype = mask.dtype if isinstance(mask, Tensor) else None
        raise ValueError(
            f"mask must be a bool tensor [batch or 1, {n}, {n}] (True = may attend) or a BlockMask; "
            f"got {shape} of dtype {dtype}"
        )


def _group_starts(n: int, group_size: int, shift: int) -> list[int]:
    """Segment boundaries of one head set in its tensor's positions: 0, first group end, ..., n.

    Position ``i`` is in group ``(i + shift) // G``: with ``shift`` = G/2 the groups are [0, G/2),
    [G/2, 3G/2), ...; boundaries at or past ``n`` are dropped, so the last segment is short when ``n`` is
    not aligned.
    """
    first = group_size - shift
    return [0, *range(first, n, group_size), n] if n > 0 else [0]


# ----------------------------------------------------------------------------------------------------
# SDPA backend
# ----------------------------------------------------------------------------------------------------


def _s2_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    head_sets: list[tuple[int, int]],
    wrap_around: bool,
    mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> Tensor:
    b, _, n, _ = q.shape
    counts = [count for count, _ in head_sets]
    # Each head set: (q, k, v) in its attention order, the offset of its slots from original positions
    # and the shift of its groups. Wrap-around attends in the rolled order (slot r holds token
    # (r + G/2) mod n, i.e. torch.roll by -G/2) with unshifted groups. Positions stay Python ints so that
    # torch.compile traces this without reading tensor values (no graph break).
    sets = []
    for qkv, (_, shift) in zip(zip(*(x.split(counts, dim=1) for x in (q, k, v))), head_sets):
        if wrap_around and shift:
            sets.append((tuple(torch.roll(x, shifts=-shift, dims=2) for x in qkv), shift, 0))
        else:
            sets.append((qkv, 0, shift))

    # Cut every set into its groups (split: one cheap backward, no per-slice zero-filled gradients) and
    # batch all groups of equal length and head count into one SDPA call, groups becoming batch rows (for
    # an odd H the two sets differ by one head and so never share a call).
    calls: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (length, heads) -> [(set, group, start)]
    pieces: list[list[tuple[Tensor, Tensor, Tensor]]] = []
    for si, (qkv, _, s) in enumerate(sets):
        bounds = _group_starts(n, group_size, s)
        lengths = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
        pieces.append(list(zip(*(x.split(lengths, dim=2) for x in qkv))))
        for gi, (a, length) in enumerate(zip(bounds[:-1], lengths)):
            calls.setdefault((length, counts[si]), []).append((si, gi, a))

    outputs: list[list[Tensor | None]] = [[None] * len(p) for p in pieces]
    for (length, _), groups in calls.items():
        qg, kg, vg = (torch.cat([pieces[si][gi][j] for si, gi, _ in groups]) for j in range(3))
        attn_mask = None
        if mask is not None:
            blocks = [_mask_block(mask, a + sets[si][1], length, n, b) for si, _, a in groups]
            attn_mask = torch.cat(blocks)[:, None]
        out = _causal_sdpa(qg, kg, vg, attn_mask, dropout_p, scale)
        for (si, gi, _), o in zip(groups, out.split(b)):
            outputs[si][gi] = o
    outs = []
    for parts, (_, offset, _) in zip(outputs, sets):
        out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        outs.append(torch.roll(out, shifts=offset, dims=2) if offset else out)
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _mask_block(mask: Tensor, start: int, length: int, n: int, batch: int) -> Tensor:
    """The caller's mask restricted to one group, as [batch, L, L].

    The group holds the tokens at original positions ``(start + i) mod n`` for ``i < length`` (only the
    wrapped group of the rolled heads actually wraps).
    """
    start %= n
    if start + length <= n:  # contiguous (everything but the wrapped group)
        block = mask[:, start : start + length, start : start + length]
    else:
        index = torch.arange(start, start + length, device=mask.device) % n
        block = mask[:, index[:, None], index[None, :]]
    return block.expand(batch, -1, -1)


def _causal_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None
) -> Tensor:
    """Causal SDPA, optionally ANDed with a bool mask [rows, 1, L, L]; rows with no allowed key give 0."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    length = q.shape[-2]
    mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    # A fully masked row (e.g. a pad query) gives NaN on some kernels: let it see itself, then zero its
    # output. Done unconditionally, as checking for such rows would synchronise with the GPU.
    empty = ~mask.any(dim=-1, keepdim=True)
    mask = mask | (empty & torch.eye(length, dtype=torch.bool, device=q.device))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------------
# flash-attn varlen backend
# ----------------------------------------------------------------------------------------------------


@torch.compiler.disable
def _flash_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, dropout_p: float, scale: float | None
) -> Tensor:
    # Outside any torch.compile graph: flash-attn's autograd.Function (custom ops only in some versions)
    # is not reliably traceable, so the kernel runs eagerly while the packing around it stays compiled.
    from flash_attn import flash_attn_varlen_func  # imported lazily: optional, CUDA-only dependency

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
    )


def _s2_flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    head_sets: list[tuple[int, int]],
    wrap_around: bool,
    dropout_p: float,
    scale: float | None,
) -> Tensor:
    b, heads, n, _ = q.shape
    # The kernel gives every varlen row one head count, so a row is a chunk of `width` heads of one sample
    # and one head set: H/2 heads for an even H (LongLoRA's layout, a row per head half and sample), a
    # single head for an odd H (the sets differ by one head).
    width = math.gcd(*(count for count, _ in head_sets))
    chunks = heads // width
    shifts = [shift for count, shift in head_sets for _ in range(count // width)]  # group shift per chunk
    # Wrap-around rolls the shifted heads' chunks (the trailing ones) and then groups them from 0.
    kept = chunks - sum(1 for shift in shifts if shift) if wrap_around else chunks

    def roll(x: Tensor, shift: int) -> Tensor:
        # x: [chunks, b, n, width, d]; only the chunks from `kept` on move.
        return torch.cat([x[:kept], torch.roll(x[kept:], shifts=shift, dims=2)]) if kept < chunks else x

    def pack(x: Tensor) -> Tensor:
        # [b, H, n, d] -> [chunks, b, n, width, d]: each chunk of each sample is one varlen "row" of n tokens.
        x = x.reshape(b, chunks, width, n, x.shape[-1]).permute(1, 0, 3, 2, 4)
        return roll(x, -(group_size // 2)).reshape(chunks * b * n, width, x.shape[-1])

    # Boundaries depend only on positions, head set and G (never on a batch maximum), and every row has
    # exactly n tokens, so row r's boundaries are offset by r * n and stay monotonic.
    bounds = {
        shift: torch.tensor(_group_starts(n, group_size, 0 if wrap_around else shift), dtype=torch.int32)
        for shift in dict.fromkeys(shifts)
    }
    rows = [bounds[shift][:-1] + (c * b + r) * n for c, shift in enumerate(shifts) for r in range(b)]
    cu_seqlens = torch.cat([*rows, torch.tensor([chunks * b * n], dtype=torch.int32)]).to(q.device)
    max_len = min(group_size, n)
    out = _flash_varlen(pack(q), pack(k), pack(v), cu_seqlens, max_len, dropout_p, scale)
    out = roll(out.reshape(chunks, b, n, width, out.shape[-1]), group_size // 2)
    return out.permute(1, 0, 3, 2, 4).reshape(b, heads, n, out.shape[-1])


# ----------------------------------------------------------------------------------------------------
# flex_attention backend
# ----------------------------------------------------------------------------------------------------


def _s2_mask_mod(n: int, group_size: int, shift: int, wrap_around: bool) -> Callable:
    """flex ``mask_mod`` of one head set in original positions (``shift``: its groups' shift, < G)."""
    if wrap_around and shift:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            rq = (q_idx - shift) % n
            rk = (kv_idx - shift) % n
            return (rk <= rq) & (rq // group_size == rk // group_size)

    else:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx <= q_idx) & ((q_idx + shift) // group_size == (kv_idx + shift) // group_size)

    return mask_mod


def _dense_mask_mod(dense: Tensor) -> Callable:
    """flex ``mask_mod`` reading a bool ``[b or 1, n, n]`` tensor (batch 1 is broadcast)."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[b if dense.shape[0] > 1 else 0, q_idx, kv_idx]

    return mask_mod


@functools.lru_cache(maxsize=32)
def _cached_s2_block_mask(n: int, group_size: int, shift: int, wrap_around: bool, device: str) -> BlockMask:
    # Shape and pattern depend only on these arguments, so the mask is built once per training run.
    return create_block_mask(_s2_mask_mod(n, group_size, shift, wrap_around), None, None, n, n, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    # Eager flex materialises the full score matrix; on CUDA the compiled kernel is the whole point.
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable(recursive=False)
def _flex_cuda(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None) -> Tensor:
    # Kept out of an enclosing torch.compile graph (nested compilation fails); flex itself stays compiled.
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


def _s2_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    head_sets: list[tuple[int, int]],
    wrap_around: bool,
    mask: _MaskType,
    scale: float | None,
) -> Tensor:
    n = q.shape[2]
    attend = _flex_cuda if q.is_cuda else flex_attention
    other_mod, mask_batch = None, None
    if isinstance(mask, BlockMask):
        if tuple(mask.seq_lengths) != (n, n):
            raise ValueError(f"BlockMask seq_lengths {mask.seq_lengths} do not match sequence length {n}")
        other_mod, mask_batch = mask.mask_mod, mask.kv_num_blocks.shape[0]
    elif mask is not None:
        other_mod, mask_batch = _dense_mask_mod(mask), mask.shape[0]
    counts = [count for count, _ in head_sets]
    outs = []
    for qh, kh, vh, (_, shift) in zip(*(x.split(counts, dim=1) for x in (q, k, v)), head_sets):
        if other_mod is None and not torch.compiler.is_compiling():
            block_mask = _cached_s2_block_mask(n, group_size, shift, wrap_around, str(q.device))
        elif other_mod is None:
            # Traced into the compiled graph (dynamo would bypass the lru_cache anyway, with a warning).
            mod = _s2_mask_mod(n, group_size, shift, wrap_around)
            block_mask = create_block_mask(mod, None, None, n, n, device=q.device)
        else:
            mod = and_masks(_s2_mask_mod(n, group_size, shift, wrap_around), other_mod)
            block_mask = create_block_mask(
                mod, mask_batch if mask_batch > 1 else None, None, n, n, device=q.device
            )
        outs.append(attend(qh, kh, vh, block_mask=block_mask, scale=scale))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------------------------------
# torchtune attention callable
# ----------------------------------------------------------------------------------------------------


class S2Attention(nn.Module):
    """Drop-in replacement for a torchtune ``MultiHeadAttention._attention_call`` that trains with S².

    Install it as a child module (``mha._attention_call = S2Attention(G, cfg, mha._attention_call)``) so
    that ``model.train()`` / ``model.eval()`` toggle it. It has no parameters or buffers, so state-dict
    keys do not change. S² is used only while training, without ``use_full_attn`` and without a KV cache
    (query and key lengths equal); otherwise every call is passed unchanged to ``full_attention``.

    Args:
        group_size: ``G`` in tokens (even, >= 2), usually ``config.resolve_group_size(max_seq_len)``.
        config: The S² settings (wrap-around, backend, ``use_full_attn``).
        full_attention: The attention callable being replaced (torchtune's original ``_attention_call``).

    Raises:
        ValueError: On a bad group size, config or callable.
    """

    def __init__(self, group_size: int, config: S2AttentionConfig, full_attention: Callable) -> None:
        super().__init__()
        _check_group_size(group_size)
        if not isinstance(config, S2AttentionConfig):
            raise ValueError(f"config must be an S2AttentionConfig, got {type(config).__name__}")
        if isinstance(full_attention, S2Attention):
            raise ValueError("full_attention is already an S2Attention; pass its full_attention instead")
        if not callable(full_attention):
            raise ValueError(f"full_attention must be callable, got {type(full_attention).__name__}")
        self.group_size = group_size
        self.config = config
        self.full_attention = full_attention
        # Set by longlora_tune.modules.context_parallel.context_parallel_attention for a context-parallel
        # training step (a plain attribute: no state-dict key); None = single-process S².
        self.context_parallel: Callable[..., Tensor] | None = None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: _MaskType = None,
        dropout_p: float = 0.0,
        is_causal: bool = True,
    ) -> Tensor:
        """Attention with torchtune's ``_attention_call`` signature.

        Args:
            q: Queries ``[b, h, s_q, d]``.
            k: Keys ``[b, h, s_k, d]`` (expanded to all heads).
            v: Values ``[b, h, s_k, d]``.
            mask: Optional bool ``[b, s, s]`` mask or ``BlockMask`` (ANDed with the S² pattern).
            dropout_p: Attention dropout probability.
            is_causal: Passed to ``full_attention``; the S² pattern is causal regardless.

        Returns:
            Attention output ``[b, h, s_q, d]``.
        """
        if self.context_parallel is not None:
            # q, k, v hold one slice of each sequence: full attention here would silently ignore the
            # other ranks' tokens, so anything but an S² training step is an error.
            if not self.training or q.shape[-2] != k.shape[-2] or mask is not None:
                raise RuntimeError(
                    "context-parallel S2 attention runs only in training, without a KV cache and without a "
                    "dense mask (pass document ids to context_parallel_attention instead)"
                )
            return self.context_parallel(q, k, v, self.group_size, dropout_p=dropout_p)
        if not self.training or self.config.use_full_attn or q.shape[-2] != k.shape[-2]:
            return self.full_attention(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return shifted_sparse_attention(
            q,
            k,
            v,
            self.group_size,
            wrap_around=self.config.wrap_around,
            mask=mask,
            backend=self.config.backend,
            dropout_p=dropout_p,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"group_size={self.group_size}, wrap_around={cfg.wrap_around}, backend={cfg.backend!r}, "
            f"use_full_attn={cfg.use_full_attn}"
        )
