"""LongLoRA Qwen2 / Qwen2.5 builders: torchtune's LoRA Qwen2 plus RoPE extension and S² attention.

Qwen2.5 differs from Llama in three ways the builders keep: q/k/v projections have biases (frozen base
weights, untouched by LoRA), RoPE theta is 1e6 and rotates head *halves* (torchtune's Qwen2 RoPE; the
replacement keeps that layout), and the 0.5B-3B models tie the LM head to the token embedding.

The default extension is YaRN, Qwen2.5's own long-context method. The sized builders follow Qwen's
recipe for contexts past 32768 -- YaRN from ``original_max_position_embeddings: 32768`` with factor
``ceil(max_seq_len / 32768)`` (4 for 128k) -- because the 7B+ base checkpoints state
``max_position_embeddings: 131072`` although they were pretrained at 32768.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torchtune.models.qwen2 import lora_qwen2
from torchtune.modules import TransformerDecoder

from longlora_tune.models._common import LORA_ATTN_MODULES_DEFAULT, build_family, sized

__all__ = [
    "longlora_qwen2",
    "longlora_qwen2_5_0_5b",
    "longlora_qwen2_5_14b",
    "longlora_qwen2_5_1_5b",
    "longlora_qwen2_5_32b",
    "longlora_qwen2_5_3b",
    "longlora_qwen2_5_72b",
    "longlora_qwen2_5_7b",
]


#: Qwen's recipe past 32k: YaRN over the 32768-token pretraining context (factor from max_seq_len).
_QWEN_YARN = {"type": "yarn", "original_max_position_embeddings": 32768}


def longlora_qwen2(
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
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
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
    """Build a LongLoRA Qwen2 / Qwen2.5: torchtune's ``lora_qwen2`` with the RoPE extension and S² attention.

    Parameter names are torchtune's; ``FullModelHFCheckpointer`` (``QWEN2``, which reads
    ``tie_word_embeddings`` from ``config.json``) loads Hugging Face weights into it. With tied embeddings
    the LM head *is* the token embedding, which LongLoRA trains: the head changes with it.

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
        intermediate_dim: MLP hidden size. Required (18944 for Qwen2.5 7B).
        attn_dropout: Attention dropout.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (the checkpoint's ``rope_theta``).
        tie_word_embeddings: The LM head is the token embedding (Hugging Face ``tie_word_embeddings``).
        original_max_seq_len: The checkpoint's ``max_position_embeddings``.
        checkpoint_rope_scaling: The checkpoint's ``config.json`` ``rope_scaling`` entry (None: unscaled).
        rope_scaling: The RoPE extension, ``{"type": "linear"|"yarn"|"llama3", "factor": f,
            "original_max_position_embeddings": n}`` (factor and original optional); None extends with the
            checkpoint's own method, or ``yarn`` when it is unscaled, by the smallest factor covering
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
        lora_qwen2,
        default_rope_type="yarn",
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


def longlora_qwen2_5_0_5b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 0.5B (24 layers, 14 heads, 2 KV heads, dim 896, tied).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_0_5b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_1_5b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 1.5B (28 layers, 12 heads, 2 KV heads, dim 1536, tied).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_1_5b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_3b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 3B (36 layers, 16 heads, 2 KV heads, dim 2048, tied).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_3b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_7b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 7B (28 layers, 28 heads, 4 KV heads, dim 3584).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_7b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_14b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 14B (48 layers, 40 heads, 8 KV heads, dim 5120).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_14b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_32b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 32B (64 layers, 40 heads, 8 KV heads, dim 5120).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_32b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )


def longlora_qwen2_5_72b(max_seq_len: int = 131072, **knobs: Any) -> TransformerDecoder:
    """LongLoRA Qwen2.5 72B (80 layers, 64 heads, 8 KV heads, dim 8192).

    Args:
        max_seq_len: Extended context length.
        **knobs: Any keyword of :func:`longlora_qwen2` except the shapes (LoRA, RoPE and S² settings).

    Returns:
        The LongLoRA ``TransformerDecoder``.
    """
    return sized(
        longlora_qwen2,
        "qwen2_5_72b",
        max_seq_len,
        knobs,
        takes_tie=True,
        defaults={"rope_scaling": _QWEN_YARN},
    )
