"""LongLoRA Llama 2 builders: torchtune's LoRA Llama 2 plus position interpolation and S² attention.

The component builder :func:`longlora_llama2` takes every shape as an argument (YAML configs use it for
tiny models); the model builders fix the Llama 2 7B/13B/70B shapes and keep LongLoRA's defaults
(LoRA rank 8, alpha 16, no dropout, on q/k/v/o only; group size 1/4 of ``max_seq_len``; RoPE factor
``ceil(max_seq_len / 4096)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torchtune.models.llama2 import lora_llama2
from torchtune.modules import TransformerDecoder

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models._common import (
    LORA_ATTN_MODULES_DEFAULT,
    check_lora_attn_modules,
    resolve_rope,
    s2_config,
)
from longlora_tune.models.longlora import apply_longlora
from longlora_tune.models.shapes import _SIZE_FIELDS, MODEL_SHAPES
from longlora_tune.modules.position_interpolation import position_interpolation_factor

__all__ = ["longlora_llama2", "longlora_llama2_13b", "longlora_llama2_70b", "longlora_llama2_7b"]


def longlora_llama2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    *,
    lora_attn_modules: Sequence[str] = LORA_ATTN_MODULES_DEFAULT,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    intermediate_dim: int | None = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000,
    rope_scaling_factor: float | None = None,
    original_max_seq_len: int = 4096,
    checkpoint_rope_scaling: Optional[Mapping[str, Any]] = None,
    rope_scaling: Optional[Mapping[str, Any]] = None,
    s2_group_size_ratio: float | None = 0.25,
    s2_group_size: int | None = None,
    s2_wrap_around: bool = False,
    s2_backend: str = "auto",
    use_full_attn: bool = False,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Build a LongLoRA Llama 2: torchtune's ``lora_llama2`` with scaled RoPE and S² attention.

    Parameter names are torchtune's, so ``FullModelHFCheckpointer`` (model_type ``LLAMA2``) loads Hugging
    Face Llama 2 weights into it (load with ``strict=False`` or validate the missing LoRA keys, as
    torchtune's LoRA recipes do).

    Args:
        vocab_size: Vocabulary size.
        num_layers: Decoder layers.
        num_heads: Query heads, any count: S² shifts heads ``[num_heads // 2, num_heads)``.
        num_kv_heads: Key/value heads (GQA when fewer than ``num_heads``).
        embed_dim: Hidden size.
        max_seq_len: Longest sequence the model is trained/run on (the extended context); sizes the
            RoPE cache and the S² group.
        lora_attn_modules: Attention projections that get LoRA (LongLoRA: all four).
        apply_lora_to_mlp: LoRA on the MLP projections (LongLoRA: no).
        apply_lora_to_output: LoRA on the LM head (LongLoRA: no).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        intermediate_dim: MLP hidden size; torchtune's Llama 2 rule when None (11008 for 4096).
        attn_dropout: Attention dropout.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (theta).
        rope_scaling_factor: Linear position-interpolation factor; None computes
            ``ceil(max_seq_len / original_max_seq_len)`` (at least 1). Pass an explicit factor when the
            checkpoint already has one (see ``position_interpolation_factor(..., existing_factor)``).
        original_max_seq_len: The base model's unscaled context (``max_position_embeddings``).
        checkpoint_rope_scaling: The checkpoint's ``config.json`` ``rope_scaling`` entry (None: unscaled).
            A linear one keeps LongLoRA's rule ``max(existing, ceil(max_seq_len / original))``.
        rope_scaling: A RoPE extension other than LongLoRA's linear one, ``{"type": "yarn"|"llama3"|
            "linear", "factor": f}`` (see :func:`longlora_tune.models.longlora_llama3`); None (the
            default) is exactly the linear position interpolation above.
        s2_group_size_ratio: S² group size as a fraction of ``max_seq_len``.
        s2_group_size: Fixed S² group size in tokens (overrides the ratio).
        s2_wrap_around: Paper Algorithm 1 (roll; leaks G/2 future tokens) instead of the causal form.
        s2_backend: ``"auto"``, ``"sdpa"``, ``"flash"`` or ``"flex"``.
        use_full_attn: Train with full attention (S² off).
        use_dora: DoRA instead of LoRA.
        quantize_base: QLoRA (NF4 base weights of the LoRA linears).

    Returns:
        The LongLoRA ``TransformerDecoder``.

    Raises:
        ValueError: On invalid S², RoPE or LoRA settings.
    """
    modules = check_lora_attn_modules(lora_attn_modules)
    s2 = s2_config(
        s2_group_size_ratio=s2_group_size_ratio,
        s2_group_size=s2_group_size,
        s2_wrap_around=s2_wrap_around,
        s2_backend=s2_backend,
        use_full_attn=use_full_attn,
    )
    checkpoint_type = (checkpoint_rope_scaling or {}).get(
        "rope_type", (checkpoint_rope_scaling or {}).get("type", "linear")
    )
    rope = None
    if rope_scaling is not None or checkpoint_type != "linear":
        rope = resolve_rope(
            max_seq_len=max_seq_len,
            rope_base=rope_base,
            original_max_seq_len=original_max_seq_len,
            checkpoint_rope_scaling=checkpoint_rope_scaling,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
            default_type="linear",
        )
    elif rope_scaling_factor is None:
        existing = float((checkpoint_rope_scaling or {}).get("factor", 1.0))
        rope_scaling_factor = position_interpolation_factor(max_seq_len, original_max_seq_len, existing)
    model = lora_llama2(
        lora_attn_modules=modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    if rope is not None:
        return apply_longlora(model, s2=s2, rope=rope)
    return apply_longlora(model, s2=s2, rope_scaling_factor=rope_scaling_factor, rope_base=rope_base)


def _sized(size: str, max_seq_len: int, knobs: dict[str, Any]) -> TransformerDecoder:
    published = MODEL_SHAPES[size]
    shape = {f: getattr(published, f) for f in _SIZE_FIELDS}
    fixed = set(shape) & set(knobs)
    if fixed:
        raise LongLoRAConfigError(
            f"longlora_llama2_{size} fixes {sorted(fixed)}; use longlora_tune.models.longlora_llama2 "
            "to choose model shapes"
        )
    return longlora_llama2(**shape, max_seq_len=max_seq_len, **knobs)


def longlora_llama2_7b(max_seq_len: int = 8192, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 2 7B (32 layers, 32 heads, dim 4096, vocab 32000).

    Args:
        max_seq_len: Extended context length (8192, 16384, 32768, 65536, 100000, ...).
        **knobs: Any keyword of :func:`longlora_llama2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return _sized("7b", max_seq_len, knobs)


def longlora_llama2_13b(max_seq_len: int = 8192, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 2 13B (40 layers, 40 heads, dim 5120, MLP 13824, vocab 32000).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama2` except the shapes.

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return _sized("13b", max_seq_len, knobs)


def longlora_llama2_70b(max_seq_len: int = 8192, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 2 70B (80 layers, 64 heads, 8 KV heads, dim 8192, MLP 28672, vocab 32000).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama2` except the shapes.

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return _sized("70b", max_seq_len, knobs)
