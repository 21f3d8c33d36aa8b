"""LongLoRA Mistral builders: torchtune's LoRA Mistral plus RoPE extension and S² attention.

Mistral 7B is a Llama-style GQA decoder (32 query / 8 KV heads). The sized builder has the shapes of
Mistral-7B-v0.3 (vocabulary 32768, RoPE theta 1e6, 32k context, no sliding window); Mistral-7B-v0.1's
4096-token sliding window is not full attention and such checkpoints are refused when read. Unscaled
checkpoints are extended with linear interpolation by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torchtune.models.mistral import lora_mistral
from torchtune.modules import TransformerDecoder

from longlora_tune.models._common import LORA_ATTN_MODULES_DEFAULT, build_family, sized

__all__ = ["longlora_mistral", "longlora_mistral_7b"]


def longlora_mistral(
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
    intermediate_dim: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000,
    original_max_seq_len: int = 32768,
    checkpoint_rope_scaling: Optional[Mapping[str, Any]] = None,
    rope_scaling: Optional[Mapping[str, Any]] = None,
    rope_scaling_factor: Optional[float] = None,
    s2_group_size_ratio: Optional[float] = 0.25,
    s2_group_size: Optional[int] = None,
    s2_wrap_around: bool = False,
    s2_backend: str = "auto",
    use_full_attn: bool = False,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Build a LongLoRA Mistral: torchtune's ``lora_mistral`` with the RoPE extension and S² attention.

    Parameter names are torchtune's; ``FullModelHFCheckpointer`` (``MISTRAL``) loads Hugging Face weights.

    Args:
        vocab_size: Vocabulary size.
        num_layers: Decoder layers.
        num_heads: Query heads, any count: S² shifts heads ``[num_heads // 2, num_heads)`` (9 heads: 4
            unshifted, 5 shifted).
        num_kv_heads: Key/value heads (GQA). Any divisor of ``num_heads``, 1 and odd counts included:
            torchtune expands the KV heads to one per query head before the attention call, so each
            query head is shifted together with its own copy of the keys and values.
        embed_dim: Hidden size.
        max_seq_len: Longest sequence the model is trained/run on (the extended context); sizes the
            RoPE cache and the S² group.
        lora_attn_modules: Attention projections that get LoRA (LongLoRA: all four).
        apply_lora_to_mlp: LoRA on the MLP projections (LongLoRA: no).
        apply_lora_to_output: LoRA on the LM head (LongLoRA: no; not with tied embeddings).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        intermediate_dim: MLP hidden size. Required (14336 for Mistral 7B).
        attn_dropout: Attention dropout.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (the checkpoint's ``rope_theta``).
        original_max_seq_len: The checkpoint's ``max_position_embeddings``.
        checkpoint_rope_scaling: The checkpoint's ``config.json`` ``rope_scaling`` entry (None: unscaled).
        rope_scaling: The RoPE extension, ``{"type": "linear"|"yarn"|"llama3", "factor": f,
            "original_max_position_embeddings": n}`` (factor and original optional); None extends with the
            checkpoint's own method, or ``linear`` when it is unscaled, by the smallest factor covering
            ``max_seq_len``. Every result is one ``config.json`` ``rope_type`` (stacking is refused).
        rope_scaling_factor: Shorthand for ``rope_scaling.factor`` (with the default method).
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
        ValueError: On invalid S², RoPE or LoRA settings (RoPE ones are ``LongLoRAConfigError``).
    """
    return build_family(
        lora_mistral,
        default_rope_type="linear",
        rope=dict(
            rope_base=rope_base,
            original_max_seq_len=original_max_seq_len,
            checkpoint_rope_scaling=checkpoint_rope_scaling,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
        ),
        s2=dict(
            s2_group_size_ratio=s2_group_size_ratio,
            s2_group_size=s2_group_size,
            s2_wrap_around=s2_wrap_around,
            s2_backend=s2_backend,
            use_full_attn=use_full_attn,
        ),
        lora_attn_modules=lora_attn_modules,
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
        rope_base=rope_base,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )


def longlora_mistral_7b(max_seq_len: int = 65536, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Mistral 7B (v0.3) (32 layers, 32 heads, 8 KV heads, dim 4096, theta 1e6, 32k).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_mistral` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_mistral, "mistral_7b", max_seq_len, knobs, takes_tie=False)
