"""The LongLoRA transform for any torchtune ``TransformerDecoder``.

LongLoRA changes two things inside every attention layer and nothing else: the rotary embedding divides
positions by the interpolation factor, and the attention call uses shifted sparse attention (S²) while
training. Both are swapped in place on torchtune's ``MultiHeadAttention`` modules, so parameter names,
LoRA layers, checkpoint conversion, FSDP sharding and activation checkpointing are untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.modules import MultiHeadAttention, RotaryPositionalEmbeddings

from longlora_tune.modules.position_interpolation import LinearScaledRotaryPositionalEmbeddings
from longlora_tune.modules.s2_attention import S2Attention, S2AttentionConfig

__all__ = ["apply_longlora"]


def apply_longlora(
    model: nn.Module,
    *,
    s2: S2AttentionConfig,
    rope_scaling_factor: float,
    rope_base: float | None = None,
) -> nn.Module:
    """Turn a torchtune decoder into a LongLoRA model, in place.

    For every ``MultiHeadAttention``:

    * ``pos_embeddings`` (a plain :class:`~torchtune.modules.RotaryPositionalEmbeddings`) is replaced by
      :class:`LinearScaledRotaryPositionalEmbeddings` with the same ``dim``, ``max_seq_len`` and ``base``
      (or ``rope_base``) and ``rope_scaling_factor``. A RoPE module shared by several layers stays shared.
    * ``_attention_call`` becomes an :class:`S2Attention` child module wrapping the original call, with
      ``G = s2.resolve_group_size(mha.max_seq_len)``. It uses S² only in training mode.

    Neither replacement has parameters or persistent buffers, so ``state_dict`` keys are unchanged and
    torchtune's checkpointers load and save the model as before. The new RoPE is created on the device of
    the old one, so this works on a meta-device model; call ``rope_init()`` after materialising, as
    torchtune recipes already do.

    Args:
        model: A torchtune ``TransformerDecoder`` (or any module containing ``MultiHeadAttention``).
        s2: S² settings.
        rope_scaling_factor: Linear position-interpolation factor (>= 1), e.g. from
            :func:`~longlora_tune.modules.position_interpolation.position_interpolation_factor`.
        rope_base: RoPE base to use instead of the original module's (torchtune's ``lora_llama2``
            builder hard-codes 10000); None keeps the original.

    Returns:
        The same ``model``, modified.

    Raises:
        ValueError: If the model has no ``MultiHeadAttention``, LongLoRA was already applied, a layer's
            positional embedding is not plain RoPE, its head count is odd while S² is enabled, or a
            setting is invalid.
    """
    if not isinstance(s2, S2AttentionConfig):
        raise ValueError(f"s2 must be an S2AttentionConfig, got {type(s2).__name__}")
    if rope_base is not None and (
        isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 0
    ):
        raise ValueError(f"rope_base must be a positive number or None, got {rope_base!r}")
    # Validates the factor once, with a clear message, before anything is modified.
    LinearScaledRotaryPositionalEmbeddings(dim=2, max_seq_len=1, scaling_factor=rope_scaling_factor)
    attentions = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not attentions:
        raise ValueError(
            f"apply_longlora found no torchtune MultiHeadAttention in {type(model).__name__}; "
            "build the model with a torchtune builder such as lora_llama2"
        )

    # Check every layer before changing any, so a failure leaves the model as it was.
    group_sizes = {}
    for name, mha in attentions:
        if isinstance(mha._attention_call, S2Attention) or isinstance(
            mha.pos_embeddings, LinearScaledRotaryPositionalEmbeddings
        ):
            raise ValueError(f"apply_longlora was already applied to this model ({name} is converted)")
        if type(mha.pos_embeddings) is not RotaryPositionalEmbeddings:
            raise ValueError(
                f"{name}.pos_embeddings is {type(mha.pos_embeddings).__name__}; apply_longlora needs plain "
                "torchtune RotaryPositionalEmbeddings to add linear position interpolation"
            )
        if mha.num_heads % 2 and not s2.use_full_attn:
            raise ValueError(
                f"{name} has {mha.num_heads} heads; S2 attention splits heads in two halves and needs an "
                "even count (or set use_full_attn=True)"
            )
        group_sizes[name] = s2.resolve_group_size(mha.max_seq_len)

    scaled: dict[int, LinearScaledRotaryPositionalEmbeddings] = {}
    for name, mha in attentions:
        rope = mha.pos_embeddings
        if id(rope) not in scaled:
            with torch.device(rope.theta.device):
                scaled[id(rope)] = LinearScaledRotaryPositionalEmbeddings(
                    dim=rope.dim,
                    max_seq_len=rope.max_seq_len,
                    base=rope.base if rope_base is None else rope_base,
                    scaling_factor=rope_scaling_factor,
                )
        mha.pos_embeddings = scaled[id(rope)]
        mha._attention_call = S2Attention(group_sizes[name], s2, mha._attention_call)
    return model
