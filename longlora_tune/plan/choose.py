"""Settings that fit a memory budget at the least FLOPs: what the recipe's ``auto`` settings ask the planner.

:func:`choose_settings` takes :func:`~longlora_tune.plan.plan`'s keywords and a budget, and returns the
recipe config values of four levers (``activation_checkpointing_layers``, ``loss.num_output_chunks``,
``sequence_tile_tokens``, ``enable_activation_offloading``) chosen by
:func:`~longlora_tune.plan.suggestions.cheapest_levers`, the plan with them, and one line per choice.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from longlora_tune.models.shapes import ModelShape
from longlora_tune.plan.facts import GIB
from longlora_tune.plan.planner import plan, planned_scenario
from longlora_tune.plan.result import Plan
from longlora_tune.plan.suggestions import cheapest_levers

__all__ = ["AUTO_KEYS", "ChosenSettings", "choose_settings"]

#: The recipe config keys :func:`choose_settings` may choose, and the planner keyword each one is.
AUTO_KEYS = {
    "activation_checkpointing_layers": "checkpoint_layers",
    "loss.num_output_chunks": "loss_chunks",
    "sequence_tile_tokens": "sequence_tile_tokens",
    "enable_activation_offloading": "activation_offloading",
}


@dataclass
class ChosenSettings:
    """What :func:`choose_settings` chose.

    Attributes:
        settings: Recipe config values by key (the keys of :data:`AUTO_KEYS` that were free, plus
            ``enable_activation_checkpointing``, true exactly when at least one layer is checkpointed):
            ``activation_checkpointing_layers`` is ``"all"`` or an int, ``loss.num_output_chunks`` an int,
            ``sequence_tile_tokens`` an int or None, ``enable_activation_offloading`` a bool.
        plan: The :class:`~longlora_tune.plan.Plan` with these settings (``plan.fits`` is False when
            nothing fits the budget; the settings are then those with the lowest peak).
        reasons: One line per chosen key, saying why.
    """

    settings: dict[str, Any]
    plan: Plan
    reasons: list[str] = field(default_factory=list)


def choose_settings(
    model: str | ModelShape,
    seq_len: int,
    *,
    budget_gib: float,
    free: Collection[str] = tuple(AUTO_KEYS),
    **plan_kwargs: Any,
) -> ChosenSettings:
    """The lever settings that fit ``budget_gib`` per GPU at the least FLOPs, for the recipe's ``auto`` mode.

    The run is planned as :func:`~longlora_tune.plan.plan` plans it (same keywords, same defaults); the
    levers named in ``free`` are then chosen: loss chunks and activation offloading cost no FLOPs, fewer
    checkpointed layers save recompute FLOPs, sequence tiling costs an MLP forward per layer. Among the
    combinations that fit, the one without offloading (host memory, PCIe traffic, CUDA only) is preferred
    when one fits, then the fewest FLOPs per step, then the fewest loss chunks. Levers not in ``free``
    keep the values the keywords give.

    Args:
        model: As :func:`~longlora_tune.plan.plan`.
        seq_len: As :func:`~longlora_tune.plan.plan`.
        budget_gib: GiB per GPU the run must fit (plan's ``gpu_memory_gib``; pass what the device has, or
            less to leave headroom).
        free: Keys of :data:`AUTO_KEYS` to choose (default all four).
        **plan_kwargs: :func:`~longlora_tune.plan.plan`'s other keywords (not ``gpu_memory_gib`` or
            ``suggest``).

    Returns:
        The :class:`ChosenSettings`.

    Raises:
        ValueError: As :func:`~longlora_tune.plan.plan`, for an unknown key in ``free``, or when
            ``gpu_memory_gib`` or ``suggest`` is passed.
    """
    for key in ("gpu_memory_gib", "suggest"):
        if key in plan_kwargs:
            raise ValueError(f"choose_settings takes budget_gib, not {key}")
    unknown = sorted(set(free) - set(AUTO_KEYS))
    if unknown:
        raise ValueError(f"choose_settings: unknown keys {unknown} in free; choose from {list(AUTO_KEYS)}")
    scenario, arguments = planned_scenario(model, seq_len, gpu_memory_gib=budget_gib, **plan_kwargs)
    choice = cheapest_levers(scenario, [AUTO_KEYS[k] for k in free])
    chosen = {**{AUTO_KEYS[k]: scenario.memory_settings[AUTO_KEYS[k]] for k in free}, **choice.overrides}
    n = chosen.get("checkpoint_layers", scenario.checkpoint_layers)
    arguments.update(chosen, activation_checkpointing=n > 0)
    result = plan(**arguments)

    layers = scenario.shape.num_layers
    values = {
        "activation_checkpointing_layers": "all" if n == layers else n,
        "loss.num_output_chunks": result.loss_chunks,
        "sequence_tile_tokens": result.sequence_tile_tokens,
        "enable_activation_offloading": result.activation_offloading,
    }
    settings = {k: values[k] for k in free}
    settings["enable_activation_checkpointing"] = n > 0
    verdict = (
        f"peak {result.peak_bytes / GIB:.1f} GiB of {budget_gib:g} GiB"
        if result.fits
        else f"nothing fits: the lowest peak is {result.peak_bytes / GIB:.1f} GiB of {budget_gib:g} GiB"
    )
    reasons = [f"{scenario.name} at {seq_len} tokens: {verdict}, {choice.flops / 1e12:.1f} TFLOPs per step"]
    reasons += _reasons(result, settings, free)
    return ChosenSettings(settings=settings, plan=result, reasons=reasons)


def _reasons(result: Plan, settings: dict[str, Any], free: Collection[str]) -> list[str]:
    layers = result.shape.num_layers
    lines = []
    if "activation_checkpointing_layers" in free:
        n = result.checkpoint_layers
        lines.append(
            f"activation_checkpointing_layers: {settings['activation_checkpointing_layers']} "
            + (
                "(every layer recomputed: fewer do not fit)"
                if n == layers
                else f"({n} of {layers} layers recomputed: the fewest that fit with the other choices)"
            )
        )
    if "loss.num_output_chunks" in free:
        lines.append(
            f"loss.num_output_chunks: {result.loss_chunks} (the fewest chunks that give the lowest peak; "
            "more cost no FLOPs)"
        )
    if "sequence_tile_tokens" in free:
        tile = result.sequence_tile_tokens
        lines.append(
            "sequence_tile_tokens: null (no MLP rerun needed)"
            if tile is None
            else f"sequence_tile_tokens: {tile} (the MLP blocks' activations would not fit whole)"
        )
    if "enable_activation_offloading" in free:
        lines.append(
            f"enable_activation_offloading: {str(result.activation_offloading).lower()} "
            + (
                "(the saved activations do not fit the GPU otherwise)"
                if result.activation_offloading
                else "(fits without host memory)"
            )
        )
    return lines
