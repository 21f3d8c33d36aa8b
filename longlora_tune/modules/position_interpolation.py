"""Linear position interpolation (PI) for rotary position embeddings: the factor rules.

LongLoRA extends a model's context by dividing every position by a factor before the rotary embedding,
so that a ``factor * L_orig`` token sequence occupies the position range the model was trained on. The
factor is an integer ``ceil(L / L_orig)`` (8192 -> 2, 32768 -> 8, 100000 -> 25 for ``L_orig`` = 4096),
the same ``{"type": "linear", "factor": f}`` entry Hugging Face's ``rope_scaling`` uses, so a model trained
here and exported with that entry reproduces our positions exactly. The module that rotates by it is
:class:`longlora_tune.modules.rope_scaling.LinearScaledRotaryPositionalEmbeddings`. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from longlora_tune.errors import LongLoRAConfigError

__all__ = [
    "check_positive_int",
    "check_rope_factor",
    "position_interpolation_factor",
]


def check_positive_int(value: Any, name: str) -> int:
    """Validate a length or count setting: a positive int (not a bool).

    Args:
        value: the value to check.
        name: the setting's name, used in the error message.

    Returns:
        The value.

    Raises:
        LongLoRAConfigError: if ``value`` is not a positive int.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LongLoRAConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def check_rope_factor(value: Any, name: str) -> float:
    """Validate a linear RoPE factor: a finite number >= 1 (1 = no interpolation).

    Args:
        value: the factor to check.
        name: the setting's name, used in the error message.

    Returns:
        The factor as a float.

    Raises:
        ValueError: if ``value`` is not a finite number >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LongLoRAConfigError(f"{name} must be a number >= 1, got {value!r}")
    value = float(value)
    # A linear factor below 1 would stretch positions (extrapolate), which PI never does.
    if not math.isfinite(value) or value < 1.0:
        raise LongLoRAConfigError(
            f"{name} must be a finite number >= 1 (1 = no interpolation), got {value!r}"
        )
    return value


def position_interpolation_factor(
    target_len: int, original_len: int = 4096, existing_factor: float = 1.0
) -> float:
    """Linear RoPE scaling factor for training or evaluating at ``target_len`` tokens.

    The rule is ``max(existing_factor, ceil(target_len / original_len))``, where ``original_len`` is the
    base model's *unscaled* context (Hugging Face ``max_position_embeddings``, 4096 for Llama 2):

    * a checkpoint whose existing factor already covers ``target_len`` keeps it (a model extended to
      32k with factor 8 and trained further at 8k stays at 8: lowering the factor would move every
      position it has learned);
    * otherwise the factor becomes ``ceil(target_len / original_len)``: it *replaces* the existing factor
      rather than multiplying it, since both are measured against the same unscaled ``original_len``.

    LongLoRA's own scripts compare against ``original_len * existing_factor`` and then divide by that
    product, which can lower an existing factor (8 -> 2 when extending a 32k model to 64k); the ``max``
    form above never does. For evaluation, pass the *training* length, never the evaluation length.

    Args:
        target_len: Context length to support (training sequence length), e.g. 100_000.
        original_len: Unscaled context of the base model (``max_position_embeddings``).
        existing_factor: Linear factor already in the checkpoint's ``rope_scaling`` (1.0 if none).

    Returns:
        The factor as a float (an integer value unless ``existing_factor`` is fractional and kept).

    Raises:
        ValueError: If a length is not a positive int or ``existing_factor`` is not a number >= 1.
    """
    check_positive_int(target_len, "target_len")
    check_positive_int(original_len, "original_len")
    existing = check_rope_factor(existing_factor, "existing_factor")
    return float(max(existing, math.ceil(target_len / original_len)))
