"""The memory levers set to ``auto``, chosen at start-up by the planner for the run's real settings.

The recipe calls :func:`resolve_auto_settings` on every rank after the config checks and before
``output_dir`` is touched. It asks the planner (:func:`longlora_tune.plan.planner.plan`) about the run as
the checks derived it -- the built model's sizes, training length, batch, S² group, LoRA, QLoRA, dtype,
context-parallel degree and FSDP world size -- for every candidate setting of the ``auto`` keys
(:data:`longlora_tune.training.auto_settings.AUTO_KEYS`), takes the fastest that fits the memory budget,
writes it into the config and returns one log line per choice. A run that fits with no candidate is a
one-line :class:`~longlora_tune.errors.LongLoRAConfigError` with the planner's verdict and the levers to try.

**Fastest** is the planner's step FLOPs (fewer recomputed layers, no tiling) after one rule: activation
offloading (host memory, PCIe traffic) only when nothing fits without it, and then with every layer
checkpointed; among equal FLOPs, fewer loss chunks and larger tiles (fewer, bigger matmuls).

This module sits above ``plan`` and ``config`` in the layers (``pyproject.toml``): the config checks cannot
ask the planner, which imports them. :func:`choose_settings` is the one place that calls the planner for a
choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Optional

from omegaconf import DictConfig

from longlora_tune.config.validation import CheckedConfig
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.families import family_of_builder
from longlora_tune.models.trainable import TRAINABLE_EXTRAS
from longlora_tune.plan.planner import GIB, SUGGESTED_TILE_TOKENS, Plan, plan
from longlora_tune.training.activation_checkpointing import parse_checkpoint_layers
from longlora_tune.training.auto_settings import (
    AUTO,
    LINEAR_CE_LOSS,
    MemoryBudget,
    apply_settings,
    auto_keys,
    memory_budget,
)

__all__ = ["AutoChoice", "choose_settings", "plan_arguments", "resolve_auto_settings"]

#: Candidate ``loss.num_output_chunks``, preferred first (torchtune's default 8; more only to fit).
CHUNK_CANDIDATES = (8, 32, 128)
#: Candidate ``sequence_tile_tokens``, preferred first (off; then the planner's suggested size and smaller).
TILE_CANDIDATES = (None, SUGGESTED_TILE_TOKENS, SUGGESTED_TILE_TOKENS // 4)
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")


@dataclass
class AutoChoice:
    """What :func:`choose_settings` chose.

    Attributes:
        settings: Recipe keys (dotted, :data:`~longlora_tune.training.auto_settings.AUTO_KEYS`) -> values,
            for the keys that were ``auto``.
        plan: The planner's plan of the run with those settings.
        reasons: Why each value, in ``settings`` order (one phrase per key).
    """

    settings: dict[str, Any]
    plan: Plan
    reasons: list[str] = field(default_factory=list)


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
    loss = str(cfg.loss.get("_component_", ""))
    linear_ce = loss == LINEAR_CE_LOSS
    chunked = linear_ce or loss.endswith("CEWithChunkedOutputLoss")
    family = family_of_builder(str(cfg.model.get("_component_", "")))
    kwargs: dict[str, Any] = dict(
        model=checked.shape,
        family=family.name if family is not None else None,
        seq_len=checked.training_length,
        max_seq_len=info.max_seq_len or checked.training_length,
        gpus=checked.world_size,
        batch_size=checked.batch_size,
        global_batch_size=checked.global_batch_size,
        context_parallel_degree=checked.context_parallel_degree,
        dtype=str(cfg.get("dtype", "bf16")),
        fp32_trainable_params=bool(cfg.get("fp32_trainable_params", True)),
        activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", True)),
        s2=info.group_size is not None,
        group_size=info.group_size,
        lora_rank=info.lora_rank,
        # The planner counts LoRA on the attention projections (LongLoRA's); LoRA on the MLP is not modelled.
        lora_modules=tuple(m for m in info.lora_targets if m in _ATTENTION_PROJECTIONS),
        trainable_extras=tuple(cfg.get("trainable_extras", TRAINABLE_EXTRAS)),
        quantize_base=bool(cfg.model.get("quantize_base", False)),
        linear_ce=linear_ce,
        suggest=False,
    )
    chunks = cfg.loss.get("num_output_chunks", 8)
    kwargs["loss_chunks"] = (chunks if chunks != AUTO else CHUNK_CANDIDATES[0]) if chunked else 1
    layers = parse_checkpoint_layers(cfg.get("activation_checkpointing_layers", "all"))
    if layers != AUTO:
        kwargs["checkpoint_layers"] = layers
    tile = cfg.get("sequence_tile_tokens", None)
    kwargs["sequence_tile_tokens"] = None if tile == AUTO else tile
    offload = cfg.get("enable_activation_offloading", False)
    kwargs["activation_offloading"] = offload is True
    return kwargs


def _planned(kwargs: dict[str, Any], budget_gib: float) -> Plan:
    try:
        return plan(**kwargs, gpu_memory_gib=budget_gib)
    except ValueError as e:
        raise LongLoRAConfigError(f"auto settings: the planner refuses the run's settings: {e}") from e


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in settings.items())


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def choose_settings(
    plan_kwargs: dict[str, Any],
    *,
    budget_gib: float,
    auto: list[str],
    offloading_available: bool,
) -> Optional[AutoChoice]:
    """The fastest values of the ``auto`` keys whose planned peak fits ``budget_gib``.

    Args:
        plan_kwargs: The run for the planner (:func:`plan_arguments`); the ``auto`` keys' entries are
            replaced by each candidate.
        budget_gib: Memory per device.
        auto: The keys to choose (a subset of ``AUTO_KEYS``).
        offloading_available: Whether activation offloading can run (CUDA); otherwise it stays off.

    Returns:
        The choice, or None when no candidate fits.

    Raises:
        LongLoRAConfigError: When the planner refuses the run's settings.
    """
    choose_layers = "activation_checkpointing_layers" in auto
    checkpointing = plan_kwargs["activation_checkpointing"]
    options = {
        "loss.num_output_chunks": CHUNK_CANDIDATES
        if "loss.num_output_chunks" in auto
        else (plan_kwargs["loss_chunks"],),
        "sequence_tile_tokens": TILE_CANDIDATES
        if "sequence_tile_tokens" in auto
        else (plan_kwargs["sequence_tile_tokens"],),
        "enable_activation_offloading": (plan_kwargs["activation_offloading"],),
    }
    if "enable_activation_offloading" in auto:
        # Offloading pays only for checkpointed layers' inputs, and torchtune's runs on CUDA streams only.
        can_offload = offloading_available and checkpointing
        options["enable_activation_offloading"] = (False, True) if can_offload else (False,)
    best: Optional[tuple[tuple, dict[str, Any], Plan]] = None
    for chunks_i, tile_i, offload in product(
        range(len(options["loss.num_output_chunks"])),
        range(len(options["sequence_tile_tokens"])),
        options["enable_activation_offloading"],
    ):
        kwargs = dict(
            plan_kwargs,
            loss_chunks=options["loss.num_output_chunks"][chunks_i],
            sequence_tile_tokens=options["sequence_tile_tokens"][tile_i],
            activation_offloading=offload,
        )
        if choose_layers and offload:
            # Offloading goes with every layer checkpointed (torchtune's advice): without checkpointing, all
            # of a layer's saved tensors would cross PCIe twice per step.
            kwargs["checkpoint_layers"] = None
        elif choose_layers and checkpointing:
            # One plan gives the peak for every count N of recomputed layers: the smallest that fits.
            peaks = _planned({**kwargs, "checkpoint_layers": None}, budget_gib).checkpoint_layers_peak_bytes
            fitting = [n for n, peak in enumerate(peaks) if peak <= budget_gib * GIB]
            if not fitting:
                continue
            kwargs["checkpoint_layers"] = fitting[0]
        planned = _planned(kwargs, budget_gib)
        if not planned.fits:
            continue
        score = (offload, planned.flops.total, chunks_i, tile_i)
        if best is None or score < best[0]:
            best = (score, kwargs, planned)
    if best is None:
        return None
    _, kwargs, planned = best
    layers = planned.shape.num_layers
    settings: dict[str, Any] = {}
    reasons: list[str] = []
    for key in auto:
        if key == "activation_checkpointing_layers":
            n = planned.checkpoint_layers
            settings[key] = n
            if not checkpointing:
                reasons.append("enable_activation_checkpointing=false")
            else:
                fewest = f"the fewest of the {layers} layers that fit"
                reasons.append("every layer recomputed" if n == layers else fewest)
        elif key == "loss.num_output_chunks":
            settings[key] = kwargs["loss_chunks"]
            reasons.append("the fewest chunks that fit")
        elif key == "sequence_tile_tokens":
            settings[key] = kwargs["sequence_tile_tokens"]
            reasons.append("fits untiled" if settings[key] is None else "the largest tiles that fit")
        elif key == "enable_activation_offloading":
            settings[key] = kwargs["activation_offloading"]
            if not offloading_available:
                reasons.append("not available on this device")
            elif not checkpointing:
                reasons.append("off without activation checkpointing")
            else:
                reasons.append("needed to fit" if settings[key] else "fits without")
    return AutoChoice(settings=settings, plan=planned, reasons=reasons)


def _no_fit_error(plan_kwargs: dict[str, Any], budget: MemoryBudget, auto: list[str], offload: bool) -> str:
    """The one line for a run no candidate fits: the most frugal candidate's verdict and the levers."""
    frugal = dict(
        plan_kwargs,
        loss_chunks=CHUNK_CANDIDATES[-1] if "loss.num_output_chunks" in auto else plan_kwargs["loss_chunks"],
        sequence_tile_tokens=TILE_CANDIDATES[-1]
        if "sequence_tile_tokens" in auto
        else plan_kwargs["sequence_tile_tokens"],
        activation_offloading=plan_kwargs["activation_offloading"]
        or ("enable_activation_offloading" in auto and offload and plan_kwargs["activation_checkpointing"]),
        suggest=True,
    )
    if "activation_checkpointing_layers" in auto:
        frugal["checkpoint_layers"] = None
    try:
        verdict = plan(**frugal, gpu_memory_gib=budget.gib)
    except ValueError:
        # A what-if the planner cannot plan for this model (QLoRA's NF4 blocks on a tiny one): no levers.
        verdict = _planned({**frugal, "suggest": False}, budget.gib)
    tried = {
        "activation_checkpointing_layers": "all" if plan_kwargs["activation_checkpointing"] else 0,
        "loss.num_output_chunks": frugal["loss_chunks"],
        "sequence_tile_tokens": frugal["sequence_tile_tokens"],
        "enable_activation_offloading": frugal["activation_offloading"],
    }
    levers = [s.rsplit(": ", 1)[0] for s in verdict.suggestions if s.endswith(": fits")]
    levers = [lever for lever in levers if not any(lever.startswith(k) for k in tried)]
    longest = next((s for s in verdict.suggestions if s.startswith("longest length")), None)
    generic = "batch_size=1, model.quantize_base=true, more GPUs or context parallelism"
    hint = ", ".join(levers) if levers else generic
    return (
        f"auto settings: nothing fits the {budget.gib:.1f} GiB budget ({budget.source}); planner peak "
        f"{verdict.peak_bytes / GIB:.1f} GiB even with {_describe({k: tried[k] for k in auto})}; try {hint}"
        + (f" ({longest})" if longest else "")
    )


def resolve_auto_settings(cfg: DictConfig, checked: CheckedConfig, device: Any) -> list[str]:
    """Choose the ``auto`` levers of ``cfg`` for this run and write them into ``cfg`` (every rank).

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
    auto = auto_keys(cfg)
    if not auto:
        return []
    budget = memory_budget(cfg, device)
    kwargs = plan_arguments(cfg, checked)
    offloading = device.type == "cuda"
    choice = choose_settings(kwargs, budget_gib=budget.gib, auto=auto, offloading_available=offloading)
    if choice is None:
        raise LongLoRAConfigError(_no_fit_error(kwargs, budget, auto, offloading))
    apply_settings(cfg, choice.settings)
    peak = choice.plan.peak_bytes / GIB
    return [
        f"auto: {key}={_text(value)} (planner peak {peak:.1f} GiB of {budget.gib:.1f} GiB budget, "
        f"{budget.source}; {reason})"
        for (key, value), reason in zip(choice.settings.items(), choice.reasons)
    ]
