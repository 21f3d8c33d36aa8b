"""LongLoRA model builders and the transform that turns a torchtune decoder into a LongLoRA model."""

from longlora_tune.models.llama2 import (
    longlora_llama2,
    longlora_llama2_7b,
    longlora_llama2_13b,
    longlora_llama2_70b,
)
from longlora_tune.models.longlora import apply_longlora

__all__ = [
    "apply_longlora",
    "longlora_llama2",
    "longlora_llama2_13b",
    "longlora_llama2_70b",
    "longlora_llama2_7b",
]
