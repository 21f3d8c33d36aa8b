"""LongLoRA's attention, position and loss modules for torchtune decoders.

The names below resolve on first use (PEP 562), so the torch-free :mod:`longlora_tune.modules.s2_heads`
(the head-split rule the planner shares) imports without torch.
"""

from __future__ import annotations

from longlora_tune._lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "LinearScaledRotaryPositionalEmbeddings": "rope_scaling",
    "position_interpolation_factor": "position_interpolation",
    "S2Attention": "s2_attention",
    "S2AttentionConfig": "s2_attention",
    "shifted_sparse_attention": "s2_attention",
    "shifted_heads": "s2_heads",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
