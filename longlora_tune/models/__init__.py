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
from longlora_tune.models.families import FAMILIES

#: Builder or transform -> the submodule that defines it (the builders as the family record lists them).
_EXPORTS = {"apply_longlora": "longlora"}
for _family in FAMILIES.values():
    for _name in (_family.builder.rsplit(".", 1)[-1], *_family.sized_builders):
        _EXPORTS[_name] = _family.builder_module

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
