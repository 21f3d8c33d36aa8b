"""LongLoRA Llama 3 builders (Llama 3, 3.1, 3.2, 3.3): torchtune's LoRA Llama 3 plus RoPE extension and S².

One component builder covers the whole family: the architecture is the same (GQA, RoPE theta 500000), and
what differs is published data -- the RoPE scaling of the checkpoint (none for Llama 3's 8k context, Meta's
``llama3`` scaling for 3.1+'s 128k) and tied embeddings (3.2 1B/3B). Both are builder arguments, so a
Hugging Face folder's ``config.json`` states everything the builder needs.

Extending Llama 3.1+ keeps its ``llama3`` method with a larger factor (8 -> 16 for 256k), the only
extension transformers and vLLM can read back from ``config.json``; YaRN or linear scaling over it would
be a second method and are refused. Llama 3 (unscaled) is extended with linear interpolation by default,
as LongLoRA did for Llama 2.

Other Llama-architecture checkpoints (the ``hf_llama`` family of :mod:`longlora_tune.models.families`, e.g.
SmolLM2: RoPE base 1e5, tied embeddings) are built with :func:`longlora_llama3` too: every fact that differs
is a builder argument their ``config.json`` states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torchtune.models.llama3_2 import lora_llama3_2
from torchtune.modules import TransformerDecoder

from longlora_tune.models._common import LORA_ATTN_MODULES_DEFAULT, build_family, sized

__all__ = [
    "longlora_llama3",
    "longlora_llama3_1_70b",
    "longlora_llama3_1_8b",
    "longlora_llama3_2_1b",
    "longlora_llama3_2_3b",
    "longlora_llama3_3_70b",
    "longlora_llama3_8b",
]


def longlora_llama3(
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
    rope_base: float = 500_000,
    tie_word_embeddings: bool = False,
    original_max_seq_len: int = 8192,
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
    """Build a LongLoRA Llama 3.x: torchtune's ``lora_llama3_2`` with the RoPE extension and S² attention.

    Built on torchtune's ``lora_llama3_2`` (the one Llama 3 builder with ``tie_word_embeddings``; its RoPE is
    replaced), so parameter names are torchtune's and ``FullModelHFCheckpointer`` (``LLAMA3``, or
    ``LLAMA3_2`` when tied) loads Hugging Face weights into it. With tied embeddings the LM head *is* the
    token embedding, which LongLoRA trains: the head changes with it, as in the exported checkpoint.

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
        intermediate_dim: MLP hidden size. torchtune's Llama 3 rule when None (14336 for 4096).
        attn_dropout: Attention dropout.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (the checkpoint's ``rope_theta``).
        tie_word_embeddings: The LM head is the token embedding (Hugging Face ``tie_word_embeddings``).
        original_max_seq_len: The checkpoint's ``max_position_embeddings``.
        checkpoint_rope_scaling: The checkpoint's ``config.json`` ``rope_scaling`` entry (None: unscaled).
            Llama 3.1+: ``{"rope_type": "llama3", "factor": 8.0, ...}``.
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
        lora_llama3_2,
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
        tie_word_embeddings=tie_word_embeddings,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )


def longlora_llama3_8b(max_seq_len: int = 32768, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3 8B (32 layers, 32 heads, 8 KV heads, dim 4096, 8k context).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_8b", max_seq_len, knobs, takes_tie=True)


def longlora_llama3_1_8b(max_seq_len: int = 262144, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3.1 8B (32 layers, 32 heads, 8 KV heads, dim 4096, llama3 RoPE x8, 128k).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_1_8b", max_seq_len, knobs, takes_tie=True)


def longlora_llama3_1_70b(max_seq_len: int = 262144, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3.1 70B (80 layers, 64 heads, 8 KV heads, dim 8192, llama3 RoPE x8, 128k).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_1_70b", max_seq_len, knobs, takes_tie=True)


def longlora_llama3_2_1b(max_seq_len: int = 262144, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3.2 1B (16 layers, 32 heads, 8 KV heads, dim 2048, tied, llama3 RoPE x32).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_2_1b", max_seq_len, knobs, takes_tie=True)


def longlora_llama3_2_3b(max_seq_len: int = 262144, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3.2 3B (28 layers, 24 heads, 8 KV heads, dim 3072, tied, llama3 RoPE x32).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_2_3b", max_seq_len, knobs, takes_tie=True)


def longlora_llama3_3_70b(max_seq_len: int = 262144, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Llama 3.3 70B (80 layers, 64 heads, 8 KV heads, dim 8192, llama3 RoPE x8, 128k).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_llama3` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(longlora_llama3, "llama3_3_70b", max_seq_len, knobs, takes_tie=True)
