"""``auto`` memory levers: which keys take it, the memory budget they are chosen for, writing the choice back.

Four recipe keys may be ``auto``:

* ``activation_checkpointing_layers`` (the first N decoder layers recomputed),
* ``loss.num_output_chunks`` (with :class:`~longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss`,
  whose chunk count sets how many logits exist at once),
* ``sequence_tile_tokens`` (the MLP blocks over tiles of T tokens, or off),
* ``enable_activation_offloading`` (torchtune's offloading of saved activations; CUDA only, so never
  chosen on CPU).

The recipe replaces them at start-up, before ``output_dir`` is touched, by the fastest settings the planner
says fit the budget (:func:`longlora_tune.auto_choice.resolve_auto_settings`), so the config it logs and
checkpoints holds numbers. This module holds what needs no planner: the keys, the up-front checks
(:func:`check_auto_settings`, part of ``validate_config``), the budget (:func:`memory_budget`) and writing a
choice into the config (:func:`apply_settings`). The budget is ``memory_budget_gib`` when set; otherwise, on
CUDA, the least free memory (``torch.cuda.mem_get_info``) over the ranks, so that every rank makes the same
choice; CPU runs must set ``memory_budget_gib``.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from longlora_tune.errors import LongLoRAConfigError

__all__ = [
    "ALL_LAYERS",
    "AUTO",
    "AUTO_KEYS",
    "BUDGET_KEY",
    "LINEAR_CE_LOSS",
    "MemoryBudget",
    "apply_settings",
    "auto_keys",
    "check_auto_settings",
    "host_available_gib",
    "memory_budget",
    "parse_checkpoint_layers",
]

#: The value of a memory lever chosen at start-up.
AUTO = "auto"

#: The recipe keys (dotted) that may be ``auto``, in the order their choices are logged.
AUTO_KEYS = (
    "activation_checkpointing_layers",
    "loss.num_output_chunks",
    "sequence_tile_tokens",
    "enable_activation_offloading",
)

#: The top-level key that gives the budget in GiB (required on CPU when a lever is ``auto``).
BUDGET_KEY = "memory_budget_gib"

#: The loss whose chunk count changes the memory (torchtune's chunked loss keeps every chunk's
#: log-probabilities, so more chunks save nothing).
LINEAR_CE_LOSS = "longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss"

_GIB = 1024**3

#: The ``activation_checkpointing_layers`` value that checkpoints every decoder layer (the default).
ALL_LAYERS = "all"
_LAYERS_KEY = "activation_checkpointing_layers"


def auto_keys(cfg: DictConfig) -> list[str]:
    """The keys of :data:`AUTO_KEYS` whose value in ``cfg`` is ``auto``.

    Args:
        cfg: The recipe config.

    Returns:
        Those keys, in :data:`AUTO_KEYS` order.
    """
    return [key for key in AUTO_KEYS if OmegaConf.select(cfg, key, default=None) == AUTO]


def check_auto_settings(cfg: DictConfig) -> None:
    """The up-front checks of the ``auto`` levers and of ``memory_budget_gib``.

    Args:
        cfg: The recipe config.

    Raises:
        LongLoRAConfigError: On a budget that is not a positive number, or ``loss.num_output_chunks=auto``
            with another loss than :data:`LINEAR_CE_LOSS`.
    """
    budget = cfg.get(BUDGET_KEY, None)
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or budget <= 0
    ):
        raise LongLoRAConfigError(
            f"{BUDGET_KEY}={budget!r} must be a positive number of GiB or null (null = the GPU's free "
            "memory, on CPU the host's available memory shared by its ranks)"
        )
    keys = auto_keys(cfg)
    if "loss.num_output_chunks" in keys and cfg.loss.get("_component_", None) != LINEAR_CE_LOSS:
        raise LongLoRAConfigError(
            f"loss.num_output_chunks=auto needs loss._component_={LINEAR_CE_LOSS} (with "
            f"{cfg.loss.get('_component_', None)} more chunks save no memory); give a number, e.g. 8"
        )


class MemoryBudget(NamedTuple):
    """The memory the ``auto`` levers are chosen for.

    Attributes:
        gib: The budget per device in GiB.
        source: Where it comes from, for the log line (``memory_budget_gib``, or the GPU's free memory).
    """

    gib: float
    source: str


def host_available_gib() -> float:
    """The host memory available to new allocations now (``SC_AVPHYS_PAGES``), in GiB.

    Returns:
        The available memory.
    """
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / _GIB


def memory_budget(cfg: DictConfig, device: Any) -> MemoryBudget:
    """The budget of this run: ``memory_budget_gib``, else the least free memory over the ranks.

    On CUDA that is the device's free memory; on CPU the host's available memory divided among the ranks
    on the host (``LOCAL_WORLD_SIZE``). Call it on every rank once the process group exists: the ranks agree
    on the least, so they all choose the same settings.

    Args:
        cfg: The recipe config (checked by :func:`check_auto_settings`).
        device: The ``torch.device`` this rank trains on.

    Returns:
        The budget.
    """
    budget = cfg.get(BUDGET_KEY, None)
    if budget is not None:
        return MemoryBudget(float(budget), BUDGET_KEY)
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free_gib, where = free / _GIB, "free GPU memory"
    else:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free_gib = host_available_gib() / local_ranks
        where = "available host memory" + (f" / {local_ranks} local ranks" if local_ranks > 1 else "")
    least = torch.tensor(free_gib, device=device, dtype=torch.float64)
    ranks = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        ranks = dist.get_world_size()
    return MemoryBudget(float(least.item()), where + (f", least of {ranks} ranks" if ranks > 1 else ""))


def apply_settings(cfg: DictConfig, settings: dict[str, Any]) -> None:
    """Write chosen values into the config, in place (so the logged and checkpointed config holds them).

    Args:
        cfg: The recipe config.
        settings: Dotted recipe keys (:data:`AUTO_KEYS`) -> values.

    Raises:
        KeyError: For a key outside :data:`AUTO_KEYS`.
    """
    for key, value in settings.items():
        if key not in AUTO_KEYS:
            raise KeyError(f"{key} is not an auto setting; use one of {AUTO_KEYS}")
        OmegaConf.update(cfg, key, value, merge=False)


def parse_checkpoint_layers(value: Any, *, allow_auto: bool = True) -> int | str | None:
    """The one parser of an ``activation_checkpointing_layers`` value (config, recipe, benchmark, CLIs).

    Args:
        value: ``"all"`` or None (every layer), ``"auto"`` (chosen at start-up from the memory budget,
            :mod:`longlora_tune.training.auto_settings`), or a count N >= 0 as an int or a string of digits
            (a command-line argument).
        allow_auto: Whether ``"auto"`` is accepted; where a resolved count is needed (wrapping the layers)
            it is not.

    Returns:
        None for every layer, ``"auto"``, or the count N.

    Raises:
        LongLoRAConfigError: One line naming the key and the accepted values.
    """
    if value is None or value == ALL_LAYERS:
        return None
    if value == AUTO and allow_auto:
        return AUTO
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        accepted = "all, auto or an integer >= 0" if allow_auto else "all or an integer >= 0"
        unresolved = " (auto is resolved at start-up, before the layers are wrapped)" if value == AUTO else ""
        raise LongLoRAConfigError(
            f"{_LAYERS_KEY}={value!r} must be {accepted} (the first N decoder layers are recomputed)"
            + unresolved
        )
    return value
