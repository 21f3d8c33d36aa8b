"""LongLoRA model builders, the family record, and the transform that turns a torchtune decoder into LongLoRA.

Families (see :mod:`longlora_tune.models.families`): Llama 2 (``longlora_llama2*``), Llama 3 / 3.1 / 3.2 /
3.3 (``longlora_llama3*``), Mistral (``longlora_mistral*``) and Qwen2 / Qwen2.5 (``longlora_qwen2*``). Each
family has a component builder taking every shape and sized builders named like torchtune's.

The builders are resolved on first use (PEP 562): configs name them as ``longlora_tune.models.<builder>``,
while the torch-free family record and shapes (``models.families``, ``models.shapes``) must stay cheap to
import for the planner and the ``tune`` start-up hook.
"""

from __future__ import annotations

from longlora_tune._lazy import lazy_exports

#: Builder or transform -> the submodule that defines it.
_EXPORTS = {
    "apply_longlora": "longlora",
    "longlora_llama2": "llama2",
    "longlora_llama2_7b": "llama2",
    "longlora_llama2_13b": "llama2",
    "longlora_llama2_70b": "llama2",
    "longlora_llama3": "llama3",
    "longlora_llama3_1_8b": "llama3",
    "longlora_llama3_1_70b": "llama3",
    "longlora_llama3_2_1b": "llama3",
    "longlora_llama3_2_3b": "llama3",
    "longlora_llama3_3_70b": "llama3",
    "longlora_llama3_8b": "llama3",
    "longlora_mistral": "mistral",
    "longlora_mistral_7b": "mistral",
    "longlora_qwen2": "qwen2",
    "longlora_qwen2_5_0_5b": "qwen2",
    "longlora_qwen2_5_1_5b": "qwen2",
    "longlora_qwen2_5_3b": "qwen2",
    "longlora_qwen2_5_7b": "qwen2",
    "longlora_qwen2_5_14b": "qwen2",
    "longlora_qwen2_5_32b": "qwen2",
    "longlora_qwen2_5_72b": "qwen2",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
