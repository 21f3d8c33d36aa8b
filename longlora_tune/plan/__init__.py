"""The planner: memory and FLOPs of a training run before it runs, and settings that make it fit.

``python -m longlora_tune.plan --config NAME --gpus P --gpu-memory GiB``. Importable without torch (the
terms are arithmetic over :mod:`longlora_tune.models.shapes`); only the checks that build a model on the
meta device import it, inside the function that needs it.

* :mod:`~longlora_tune.plan.planner`: FLOPs, activation and state memory per phase, the verdict and its
  suggestions, the CLI;
* :mod:`~longlora_tune.plan.communication`: bytes per layer of each context-parallel design.

The public API other code calls (the recipe's ``auto`` settings among them): :func:`plan`, :class:`Plan`,
:func:`load_config_settings` and the CLI's :func:`main`.
"""

from longlora_tune.plan.planner import Plan, load_config_settings, main, plan

__all__ = ["Plan", "load_config_settings", "main", "plan"]
