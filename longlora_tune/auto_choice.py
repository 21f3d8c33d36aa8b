"""The settings set to ``auto``, chosen at start-up: the memory levers by the planner for the run's real
settings, ``compile`` by where compiling is known to work.

The recipe calls :func:`resolve_auto_settings` on every rank after the config checks and before
``output_dir`` is touched. It describes the run to the planner as the checks derived it -- the built
model's sizes, training length, batch, S² group, LoRA, QLoRA, dtype, context-parallel degree and FSDP world
size (:func:`plan_arguments`) -- and lets :func:`longlora_tune.plan.choose_settings` pick the ``auto`` keys
(:data:`longlora_tune.training.auto_settings.AUTO_KEYS`): the fewest step FLOPs that fit the memory budget,
activation offloading only when nothing fits without it (and then with every layer checkpointed). It writes
the values into the config and returns one log line per choice. A run nothing fits is a one-line
:class:`~longlora_tune.errors.LongLoRAConfigError` with the planner's verdict and the levers to try.
``compile: auto`` is resolved last, because activation offloading (one of the planner's choices) rules it
out (:func:`longlora_tune.training.compile.compile_choice`).

This module sits above ``plan`` and ``config`` in the layers (``pyproject.toml``): the config checks cannot
ask the planner, which imports them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from longlora_tune.config.validation import CheckedConfig
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.families import family_of_builder
from longlora_tune.plan import ChosenSettings, choose_settings
from longlora_tune.plan.config_settings import run_settings
from longlora_tune.plan.facts import GIB
from longlora_tune.training.auto_settings import (
    AUTO,
    MemoryBudget,
    apply_settings,
    auto_keys,
    memory_budget,
)
from longlora_tune.training.compile import compile_choice, padded_lengths

__all__ = ["choose_auto_settings", "plan_arguments", "resolve_auto_settings"]

_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")


def plan_arguments(cfg: DictConfig, checked: CheckedConfig) -> dict[str, Any]:
    """The planner's arguments for a checked run (its ``auto`` keys left at the planner's defaults).

    Args:
        cfg: The recipe config (checked).
        checked: What ``validate_config`` derived, with the built model's ``shape``.

    Returns:
        Keyword arguments for :func:`longlora_tune.plan.planner.plan` (without ``gpu_memory_gib``).

    Raises:
        LongLoRAConfigError: When the config sets no training length or the model's sizes are unknown.
    """
    info = checked.model
    if checked.shape is None or checked.training_length is None or info.lora_rank is None:
        raise LongLoRAConfigError(
            "auto settings need the training length and a torchtune LoRA decoder's sizes; "
            "give the levers values"
        )
    family = family_of_builder(str(cfg.model.get("_component_", "")))
    kwargs = run_settings(cfg)
    # What the checks derived from the built model and the world size overrides what the keys say.
    kwargs.update(
        model=checked.shape,
        family=family.name if family is not None else None,
        seq_len=checked.training_length,
        max_seq_len=info.max_seq_len or checked.training_length,
        gpus=checked.world_size,
        batch_size=checked.batch_size,
        global_batch_size=checked.global_batch_size,
        context_parallel_degree=checked.context_parallel_degree,
        s2=info.group_size is not None,
        group_size=info.group_size,
        lora_rank=info.lora_rank,
        # The planner counts LoRA on the attention projections (LongLoRA's); LoRA on the MLP is not modelled.
        lora_modules=tuple(m for m in info.lora_targets if m in _ATTENTION_PROJECTIONS),
        suggest=False,
    )
    return kwargs


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def choose_auto_settings(
    plan_kwargs: dict[str, Any], *, budget_gib: float, auto: list[str], offloading_available: bool
) -> ChosenSettings:
    """The values of the ``auto`` keys, chosen by :func:`longlora_tune.plan.choose_settings`.

    Args:
        plan_kwargs: The run for the planner (:func:`plan_arguments`).
        budget_gib: Memory per device.
        auto: The keys to choose (a subset of ``AUTO_KEYS``).
        offloading_available: Whether activation offloading can run (CUDA); otherwise it stays off.

    Returns:
        The planner's choice; its ``settings`` hold exactly the ``auto`` keys, and ``plan.fits`` is False
        when nothing fits (the settings are then those with the lowest peak).

    Raises:
        LongLoRAConfigError: When the planner refuses the run's settings.
    """
    checkpointing = plan_kwargs["activation_checkpointing"]
    fixed: dict[str, Any] = {}
    if "enable_activation_offloading" in auto and not (offloading_available and checkpointing):
        # torchtune's offloading runs on CUDA streams, and pays only for checkpointed layers' inputs.
        fixed["enable_activation_offloading"] = False
    if "activation_checkpointing_layers" in auto and not checkpointing:
        fixed["activation_checkpointing_layers"] = 0
    free = [key for key in auto if key not in fixed]
    kwargs = {k: v for k, v in plan_kwargs.items() if k not in ("model", "seq_len", "suggest")}
    if "enable_activation_offloading" in fixed:
        kwargs["activation_offloading"] = False
    try:
        chosen = choose_settings(
            plan_kwargs["model"], plan_kwargs["seq_len"], budget_gib=budget_gib, free=free, **kwargs
        )
    except ValueError as e:
        raise LongLoRAConfigError(f"auto settings: the planner refuses the run's settings: {e}") from e
    chosen.settings = {key: {**chosen.settings, **fixed}[key] for key in auto}
    for key, value in fixed.items():
        why = "not available on this device" if key == "enable_activation_offloading" else "checkpointing off"
        chosen.reasons.append(f"{key}: {_text(value)} ({why})")
    return chosen


def _no_fit_error(chosen: ChosenSettings, budget: MemoryBudget) -> str:
    """The one line for a run nothing fits: the lowest peak, its settings and the planner's levers."""
    settings = ", ".join(f"{k}={_text(v)}" for k, v in chosen.settings.items())
    advice = [
        line
        for line in chosen.plan.suggestions
        if line.startswith("cheapest that fits") or (line.startswith("longest length") and "none" not in line)
    ]
    hint = advice[0] if advice else "batch_size=1, model.quantize_base=true, more GPUs or context parallelism"
    return (
        f"auto settings: nothing fits the {budget.gib:.1f} GiB budget ({budget.source}); planner peak "
        f"{chosen.plan.peak_bytes / GIB:.1f} GiB even with {settings}; try {hint}"
    )


def resolve_auto_settings(cfg: DictConfig, checked: CheckedConfig, device: Any) -> list[str]:
    """Choose the ``auto`` settings of ``cfg`` for this run and write them into ``cfg`` (every rank).

    The memory levers come first (the planner's choice); then ``compile: auto``, which depends on whether
    activation offloading was chosen (:func:`longlora_tune.training.compile.compile_choice`).

    Args:
        cfg: The recipe config, checked by ``validate_config`` (changed in place).
        checked: What ``validate_config`` derived.
        device: This rank's ``torch.device``.

    Returns:
        One log line per choice, e.g. ``auto: activation_checkpointing_layers=12 (planner peak 71.3 GiB of
        78.0 GiB budget, free GPU memory; the fewest of 32 that fit)``; empty when nothing is ``auto``.

    Raises:
        LongLoRAConfigError: When no candidate fits (the planner's verdict and the levers to try).
    """
    lines = _resolve_memory_levers(cfg, checked, device)
    if cfg.get("compile", False) == AUTO:
        cfg.compile, why = compile_choice(
            device,
            context_parallel_degree=checked.context_parallel_degree,
            activation_offloading=cfg.get("enable_activation_offloading", False) is True,
            lengths=padded_lengths(
                cfg.get("pad_to_multiple_of", None), checked.model.group_size, checked.training_length or 0
            ),
        )
        lines.append(f"auto: compile: {_text(cfg.compile)} ({why})")
    return lines


def _resolve_memory_levers(cfg: DictConfig, checked: CheckedConfig, device: Any) -> list[str]:
    """The planner's choice of the ``auto`` memory levers, written into ``cfg``; its log lines."""
    auto = auto_keys(cfg)
    if not auto:
        return []
    budget = memory_budget(cfg, device)
    kwargs = plan_arguments(cfg, checked)
    chosen = choose_auto_settings(
        kwargs, budget_gib=budget.gib, auto=auto, offloading_available=device.type == "cuda"
    )
    if not chosen.plan.fits:
        raise LongLoRAConfigError(_no_fit_error(chosen, budget))
    apply_settings(cfg, chosen.settings)
    summary, *per_key = chosen.reasons
    return [f"auto: {summary} (budget: {budget.source})", *(f"auto: {line}" for line in per_key)]
