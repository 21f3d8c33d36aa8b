"""The planner: memory and FLOPs of a training run before it runs, and settings that make it fit.

``python -m longlora_tune.plan --config NAME --gpus P --gpu-memory GiB``. Importable without torch (the
terms are arithmetic over :mod:`longlora_tune.models.shapes`); only the checks that build a model on the
meta device import it, inside the function that needs it. One job per module:

* :mod:`~longlora_tune.plan.facts`: byte sizes and the settings the recipe derives (family, group size,
  checkpointed layers);
* :mod:`~longlora_tune.plan.flops`: FLOPs of a step;
* :mod:`~longlora_tune.plan.activations`: what autograd keeps per layer, the loss and backward phases;
* :mod:`~longlora_tune.plan.memory`: parameter counts, state and FSDP bytes, NF4, the per-GPU peak;
* :mod:`~longlora_tune.plan.communication`: bytes per layer of each context-parallel design;
* :mod:`~longlora_tune.plan.scenario`: the validated settings, priced at any what-if;
* :mod:`~longlora_tune.plan.suggestions`: the longest length that fits and the levers that make a run fit;
* :mod:`~longlora_tune.plan.choose`: :func:`choose_settings`, the levers that fit a budget (``auto``);
* :mod:`~longlora_tune.plan.planner`: :func:`plan`; :mod:`~longlora_tune.plan.result`: :class:`Plan`
  and its report;
* :mod:`~longlora_tune.plan.config_settings`: planner arguments from a recipe config;
* :mod:`~longlora_tune.plan.cli`: ``python -m longlora_tune.plan``.

The public API other code calls (the recipe's ``auto`` settings among them): :func:`plan`, :class:`Plan`,
:func:`load_config_settings`, :func:`choose_settings` (with :class:`ChosenSettings`) and the CLI's
:func:`main`.
"""

from longlora_tune.plan.choose import ChosenSettings, choose_settings
from longlora_tune.plan.cli import main
from longlora_tune.plan.config_settings import load_config_settings
from longlora_tune.plan.planner import plan
from longlora_tune.plan.result import Plan

__all__ = ["ChosenSettings", "Plan", "choose_settings", "load_config_settings", "main", "plan"]
