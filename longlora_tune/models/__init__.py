"""LongLoRA model builders and the transform that turns a torchtune decoder into a LongLoRA model.

Families (see :mod:`longlora_tune.families`): Llama 2 (``longlora_llama2*``), Llama 3 / 3.1 / 3.2 / 3.3
(``longlora_llama3*``), Mistral (``longlora_mistral*``) and Qwen2 / Qwen2.5 (``longlora_qwen2*``). Each family
has a component builder taking every shape and sized builders named like torchtune's.
"""

from longlora_tune.models.llama2 import (
    longlora_llama2,
    longlora_llama2_7b,
    longlora_llama2_13b,
    longlora_llama2_70b,
)
from longlora_tune.models.llama3 import (
    longlora_llama3,
    longlora_llama3_1_8b,
    longlora_llama3_1_70b,
    longlora_llama3_2_1b,
    longlora_llama3_2_3b,
    longlora_llama3_3_70b,
    longlora_llama3_8b,
)
from longlora_tune.models.longlora import apply_longlora
from longlora_tune.models.mistral import longlora_mistral, longlora_mistral_7b
from longlora_tune.models.qwen2 import (
    longlora_qwen2,
    longlora_qwen2_5_0_5b,
    longlora_qwen2_5_1_5b,
    longlora_qwen2_5_3b,
    longlora_qwen2_5_7b,
    longlora_qwen2_5_14b,
    longlora_qwen2_5_32b,
    longlora_qwen2_5_72b,
)

__all__ = [
    "apply_longlora",
    "longlora_llama2",
    "longlora_llama2_13b",
    "longlora_llama2_70b",
    "longlora_llama2_7b",
    "longlora_llama3",
    "longlora_llama3_1_70b",
    "longlora_llama3_1_8b",
    "longlora_llama3_2_1b",
    "longlora_llama3_2_3b",
    "longlora_llama3_3_70b",
    "longlora_llama3_8b",
    "longlora_mistral",
    "longlora_mistral_7b",
    "longlora_qwen2",
    "longlora_qwen2_5_0_5b",
    "longlora_qwen2_5_14b",
    "longlora_qwen2_5_1_5b",
    "longlora_qwen2_5_32b",
    "longlora_qwen2_5_3b",
    "longlora_qwen2_5_72b",
    "longlora_qwen2_5_7b",
]
