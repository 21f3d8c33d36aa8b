"""The verdict's other half: what fits, the longest length, and which settings to suggest.

Every answer is a what-if priced by the same :class:`~longlora_tune.plan.scenario.Scenario` as the plan
itself: the peak for each number of checkpointed layers, the longest length that fits, and the levers
(settings of the recipe) that make a run fit, alone and together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longlora_tune.plan.facts import GIB
from longlora_tune.plan.memory import quantizable
from longlora_tune.plan.scenario import Scenario

__all__ = [
    "SUGGESTED_TILE_TOKENS",
    "checkpoint_suggestion",
    "checkpointing_peaks",
    "lever_suggestions",
    "longest_fitting",
    "setting_texts",
]

_FUSED_LOSS = "longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss"
#: The tile size the planner suggests: one tile's SwiGLU tensors are then about 1.3 GiB at Llama 3's width.
SUGGESTED_TILE_TOKENS = 8192


def checkpointing_peaks(scenario: Scenario) -> list[int]:
    """The peak per GPU with the first N layers checkpointed, for N = 0 .. ``num_layers`` (index N).

    Args:
        scenario: The planned settings.

    Returns:
        Peak bytes per N, everything else as planned.
    """
    return [
        scenario.peak(scenario.seq_len, checkpoint_layers=n)[1] for n in range(scenario.shape.num_layers + 1)
    ]


def checkpoint_suggestion(scenario: Scenario, peaks: list[int]) -> dict[str, Any] | None:
    """Memory-budgeted activation checkpointing: the smallest N whose peak fits and what it saves.

    Args:
        scenario: The planned settings.
        peaks: :func:`checkpointing_peaks` of the scenario.

    Returns:
        ``layers`` (N), its ``peak_bytes``, and the FLOPs it saves per step against checkpointing every
        layer (``flops_saved_vs_all`` and ``fraction_of_step_saved_vs_all``); None when no N fits.
    """
    fitting = [n for n, p in enumerate(peaks) if p <= scenario.capacity]
    if not fitting:
        return None
    k = fitting[0]
    every = scenario.flops(activation_checkpointing=True, checkpoint_layers=None)
    some = scenario.flops(activation_checkpointing=k > 0, checkpoint_layers=k)
    saved = every.total - some.total
    return {
        "layers": k,
        "peak_bytes": peaks[k],
        "flops_saved_vs_all": saved,
        "fraction_of_step_saved_vs_all": saved / every.total,
    }


def longest_fitting(scenario: Scenario, *, size_loss_chunks: bool = False, **overrides: Any) -> int:
    """The longest length that fits with ``overrides``: whole 1024-token slices per context-parallel rank.

    Searched up to 64 times the planned length (activation memory grows monotonically with the length).

    Args:
        scenario: The planned settings.
        size_loss_chunks: Size the loss chunks for each length tried (:func:`loss_chunks_for`) instead of
            keeping the planned count.
        **overrides: Settings to change (``memory_per_gpu`` keywords).

    Returns:
        The length in tokens, 0 when none fits.
    """
    unit = 1024 * overrides.get("context_parallel_degree", scenario.context_parallel_degree)

    def fits(length: int) -> bool:
        chunks = {"loss_chunks": loss_chunks_for(scenario, length, **overrides)} if size_loss_chunks else {}
        return scenario.fits(length, **overrides, **chunks)

    lo, hi = 0, max(scenario.seq_len, 1024) * 64 // unit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * unit):
            lo = mid
        else:
            hi = mid - 1
    return lo * unit


def _candidates(scenario: Scenario) -> list[tuple[str, dict[str, Any]]]:
    """The levers not yet pulled: (the setting to type, the what-if overrides)."""
    from longlora_tune.config import validation as config_checks

    s, layers = scenario, scenario.shape.num_layers
    candidates: list[tuple[str, dict[str, Any]]] = []
    if s.checkpoint_layers < layers:
        text = (
            "enable_activation_checkpointing=True"
            if not s.checkpoint_layers
            else "activation_checkpointing_layers=all"
        )
        candidates.append((text, {"checkpoint_layers": layers}))
    if not s.fsdp and s.gpus > 1:
        candidates.append(("shard with FSDP (torchtune distributed recipe)", {"fsdp": True}))
    if s.batch_size > 1:
        # The recipe derives the accumulation from global_batch_size; say what it becomes.
        global_batch_size = s.global_batch_size
        accumulation = (
            f"gradient accumulation {config_checks.gradient_accumulation_steps(global_batch_size, 1, s.gpus)}"
            f" (global_batch_size {global_batch_size} unchanged)"
            if global_batch_size is not None
            else f"{s.batch_size}x the gradient accumulation steps"
        )
        candidates.append((f"batch_size=1 with {accumulation}", {"batch_size": 1}))
    if s.dtype == "fp32":
        candidates.append(("dtype=bf16", {"dtype": "bf16"}))
    if not s.activation_offloading:
        candidates.append(
            ("enable_activation_offloading=True (host RAM, PCIe traffic)", {"activation_offloading": True})
        )
    if not s.linear_ce:
        candidates.append((f"loss._component_={_FUSED_LOSS} (no fp32 log-probs kept)", {"linear_ce": True}))
    chunks = loss_chunks_for(s)
    if chunks > s.loss_chunks:
        candidates.append((f"loss.num_output_chunks={chunks} (smaller loss chunks)", {"loss_chunks": chunks}))
    if not s.quantize_base and quantizable(s.shape):
        candidates.append(("model.quantize_base=true (QLoRA: NF4 base weights)", {"quantize_base": True}))
    if s.sequence_tile_tokens is None:
        candidates.append(
            (
                f"sequence_tile_tokens={SUGGESTED_TILE_TOKENS} (each MLP block over tiles of tokens)",
                {"sequence_tile_tokens": SUGGESTED_TILE_TOKENS},
            )
        )
    # No fsdp_cpu_offload suggestion: the recipe has no such setting (cpu_offload stays a what-if).
    return candidates


def lever_suggestions(scenario: Scenario) -> list[str]:
    """The verdict's advice for a run that does not fit, each lever with the setting to type.

    One line per lever not yet pulled, in order of the FLOPs it adds per step (recompute, the tiled MLP's
    rerun; the others add none), saying whether it fits alone; then the cheapest set of levers that fits
    (:func:`cheapest_levers`), all of them together, the longest length with all of them, and the
    smallest context-parallel degree that fits alone.

    Args:
        scenario: The planned settings (whose peak does not fit).

    Returns:
        The suggestion lines.
    """
    s = scenario
    planned_flops = s.flops().total
    ranked = []
    for text, override in _candidates(s):
        flop_keys = {k: override[k] for k in ("checkpoint_layers", "sequence_tile_tokens") if k in override}
        if "checkpoint_layers" in flop_keys:
            flop_keys["activation_checkpointing"] = override["checkpoint_layers"] > 0
        added = s.flops(**flop_keys).total - planned_flops
        step = s.peak(s.seq_len, **override)
        notes = [f"+{added / 1e12:.1f} TFLOPs per step"] if added > 0 else []
        if override.get("activation_offloading"):
            notes.append(f"{step.host / GIB:.1f} GiB pinned host memory per GPU")
        line = f"{text}: {'fits' if step.peak <= s.capacity else 'not enough alone'}"
        ranked.append((added, line + (f" ({', '.join(notes)})" if notes else ""), override))
    ranked.sort(key=lambda item: item[0])  # stable: equal costs keep the order of _candidates
    lines = [line for _, line, _ in ranked]
    combined: dict[str, Any] = {}
    for _, _, override in ranked:
        combined.update(override)
    cheapest = cheapest_levers(s)
    if cheapest.fits:
        host = s.peak(s.seq_len, **cheapest.overrides).host
        lines.append(
            f"cheapest that fits: {', '.join(setting_texts(s, cheapest.overrides))} (peak "
            f"{cheapest.peak_bytes / GIB:.1f} GiB, {(cheapest.flops - planned_flops) / 1e12:+.1f} TFLOPs per "
            f"step" + (f", {host / GIB:.1f} GiB pinned host memory per GPU" if host else "") + ")"
        )
    if combined and len(ranked) > 1:
        peak_all = s.peak(s.seq_len, **combined).peak
        lines.append(
            f"all of the above together: peak {peak_all / GIB:.1f} GiB "
            f"({'fits' if peak_all <= s.capacity else 'still too big'})"
        )
    reach = longest_fitting(s, **combined)
    lines.append(
        f"longest length that fits{' with the changes above' if combined else ''}: "
        + (f"{reach} tokens" if reach else "none")
    )
    if s.s2:
        # Context parallelism divides the activations instead (the smallest degree that fits alone).
        for more in range(s.context_parallel_degree + 1, s.gpus + 1):
            if s.gpus % more or s.seq_len % more or (s.seq_len // more) % (s.group_size // 2):
                continue
            if s.fits(s.seq_len, context_parallel_degree=more):
                lines.append(f"context_parallel_degree={more}: fits")
                break
    return lines


def setting_texts(scenario: Scenario, overrides: dict[str, Any]) -> list[str]:
    """The recipe config settings to type for planner overrides (``key=value``, as ``tune run`` takes them).

    Args:
        scenario: The planned settings.
        overrides: :data:`LEVERS` keywords and their new values.

    Returns:
        One ``key=value`` per override.
    """
    texts = []
    for key, value in overrides.items():
        if key == "checkpoint_layers":
            if value > 0 and not scenario.checkpoint_layers:
                texts.append("enable_activation_checkpointing=true")
            layers = "all" if value == scenario.shape.num_layers else value
            texts.append(f"activation_checkpointing_layers={layers}")
        elif key == "loss_chunks":
            texts.append(f"loss.num_output_chunks={value}")
        elif key == "sequence_tile_tokens":
            texts.append(f"sequence_tile_tokens={'null' if value is None else value}")
        elif key == "activation_offloading":
            texts.append(f"enable_activation_offloading={str(value).lower()}")
        elif key == "linear_ce":
            loss = _FUSED_LOSS if value else "torchtune.modules.loss.CEWithChunkedOutputLoss"
            texts.append(f"loss._component_={loss}")
        elif key == "quantize_base":
            texts.append(f"model.quantize_base={str(value).lower()}")
    return texts


# ----------------------------------------------------------------------------------------------------
# The cheapest set of levers that fits
# ----------------------------------------------------------------------------------------------------

#: The levers :func:`cheapest_levers` may pull, by their :func:`~longlora_tune.plan.memory.memory_per_gpu`
#: keyword.
LEVERS = (
    "checkpoint_layers",
    "loss_chunks",
    "sequence_tile_tokens",
    "activation_offloading",
    "linear_ce",
    "quantize_base",
)


def loss_chunks_for(scenario: Scenario, length: int | None = None, **overrides: Any) -> int:
    """The fewest loss chunks that give the lowest peak: the loss phase is then no larger than the layer
    phase, or, when it cannot be, as small as chunks of at least 1024 tokens make it.

    More chunks cost no FLOPs (the same products in smaller pieces); chunks of fewer than 1024 tokens
    would only add launches. Powers of two are tried, from 1.

    Args:
        scenario: The planned settings.
        length: Training length of the what-if (default the planned one).
        **overrides: Other settings of the what-if.

    Returns:
        The chunk count (``loss.num_output_chunks``).
    """
    length = scenario.seq_len if length is None else length
    tokens = scenario.batch_size * -(
        -length // overrides.get("context_parallel_degree", scenario.context_parallel_degree)
    )
    best, best_peak, chunks = 1, None, 1
    while True:
        peak = scenario.peak(length, **{**overrides, "loss_chunks": chunks})[1]
        if best_peak is None or peak < best_peak:
            best, best_peak = chunks, peak
        if chunks * 2 * 1024 > tokens:
            return best
        chunks *= 2


@dataclass(frozen=True)
class LeverChoice:
    """One set of levers and what it costs.

    Attributes:
        overrides: The :func:`~longlora_tune.plan.memory.memory_per_gpu` keywords it changes.
        peak_bytes: Peak per GPU with them.
        fits: Whether that peak fits the GPU.
        flops: FLOPs of the step with them (recompute included).
    """

    overrides: dict[str, Any]
    peak_bytes: int
    fits: bool
    flops: float


def cheapest_levers(scenario: Scenario, levers: Sequence[str] = LEVERS) -> LeverChoice:
    """The levers among ``levers`` that fit the GPU at the least cost, else the set with the lowest peak.

    Cost, compared in this order: QLoRA added (it changes what is trained), activation offloading added
    (host memory and PCIe traffic, CUDA only; tried with every layer checkpointed), the step's FLOPs
    (recompute of the checkpointed layers and the tiled MLP's rerun), the fused loss added, then fewer
    loss chunks. Loss chunks are sized by :func:`loss_chunks_for` for every combination; tiling is tried
    at :data:`SUGGESTED_TILE_TOKENS` (or the planned tile) and off; every number of checkpointed layers is
    tried.

    Args:
        scenario: The planned settings.
        levers: The :data:`LEVERS` that may change; the others keep their planned values.

    Returns:
        The :class:`LeverChoice`.

    Raises:
        ValueError: For a name that is not in :data:`LEVERS`.
    """
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise ValueError(f"unknown levers {unknown}; choose from {list(LEVERS)}")
    s = scenario

    def options(key: str, free: Sequence[Any]) -> list[Any]:
        planned = s.memory_settings[key]
        return list(dict.fromkeys([planned, *free])) if key in levers else [planned]

    layers = range(s.shape.num_layers + 1) if "checkpoint_layers" in levers else [s.checkpoint_layers]
    planned_tile = s.sequence_tile_tokens
    tiles = options("sequence_tile_tokens", [None, planned_tile or SUGGESTED_TILE_TOKENS])
    best: tuple[tuple[Any, ...], LeverChoice] | None = None
    for qlora in options("quantize_base", [False, True] if quantizable(s.shape) else [False]):
        for offload in options("activation_offloading", [False, True]):
            for fused in options("linear_ce", [False, True]):
                for tile in tiles:
                    # Offloading pays off with every layer checkpointed: only their inputs cross PCIe
                    # and sit in host memory (torchtune's advice); offloading whole layers would pin
                    # host memory of the order of the activations themselves.
                    for n in [s.shape.num_layers] if offload and not s.activation_offloading else layers:
                        overrides: dict[str, Any] = {
                            "checkpoint_layers": n,
                            "sequence_tile_tokens": tile,
                            "activation_offloading": offload,
                            "linear_ce": fused,
                            "quantize_base": qlora,
                        }
                        if "loss_chunks" in levers:
                            overrides["loss_chunks"] = loss_chunks_for(s, **overrides)
                        peak = s.peak(s.seq_len, **overrides)[1]
                        fits = peak <= s.capacity
                        flops = s.flops(
                            activation_checkpointing=n > 0, checkpoint_layers=n, sequence_tile_tokens=tile
                        ).total
                        added = [
                            overrides[k] != s.memory_settings[k]
                            for k in ("quantize_base", "activation_offloading")
                        ]
                        key = (
                            (
                                0,
                                *added,
                                flops,
                                fused != s.linear_ce,
                                overrides.get("loss_chunks", s.loss_chunks),
                            )
                            if fits
                            else (1, peak)
                        )
                        if best is None or key < best[0]:
                            changed = {k: v for k, v in overrides.items() if v != s.memory_settings[k]}
                            best = (key, LeverChoice(changed, peak, fits, flops))
    assert best is not None
    return best[1]
