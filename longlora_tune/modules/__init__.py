"""LongLoRA's attention and position modules for torchtune decoders."""

from longlora_tune.modules.position_interpolation import (
    LinearScaledRotaryPositionalEmbeddings,
    position_interpolation_factor,
)
from longlora_tune.modules.s2_attention import S2Attention, S2AttentionConfig, shifted_sparse_attention

__all__ = [
    "LinearScaledRotaryPositionalEmbeddings",
    "S2Attention",
    "S2AttentionConfig",
    "position_interpolation_factor",
    "shifted_sparse_attention",
]
