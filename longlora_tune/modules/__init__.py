"""LongLoRA's attention, position and loss modules for torchtune decoders.

The names below resolve on first use (PEP 562), so the torch-free :mod:`longlora_tune.modules.s2_heads`
(the head-split rule the planner shares) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "LinearScaledRotaryPositionalEmbeddings": "position_interpolation",
    "position_interpolation_factor": "position_interpolation",
    "S2Attention": "s2_attention",
    "S2AttentionConfig": "s2_attention",
    "shifted_sparse_attention": "s2_attention",
    "shifted_heads": "s2_heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
