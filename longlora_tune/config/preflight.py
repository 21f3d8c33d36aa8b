"""Pre-flight: check a recipe's config once in the ``tune run`` launcher, before torchrun starts workers.

Under ``tune run --nproc_per_node N <recipe> ...`` every worker parses and validates the config itself, so
a config error used to be printed once per rank and then buried under torchrun's ``ChildFailedError``
report (and the launcher's exit code was 1). The registry hook (:func:`longlora_tune.config.tune_registry.
install_preflight`) calls :func:`check_before_launch` in the launcher instead: it reads the config exactly
as the workers will (:func:`~longlora_tune.config.loading.load_config`, torchtune's own parser), for every
recipe of ours, runs the recipe's up-front checks with the world size torchrun is about to use, and on a
problem prints ``longlora_tune: error: ...`` once and exits with code 2 before any worker exists. A config
that passes is launched unchanged (the workers check it again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from omegaconf import DictConfig

from longlora_tune.config.loading import load_config
from longlora_tune.config.validation import validate_config
from longlora_tune.errors import report_errors

#: Recipe name -> its up-front checks ``(cfg, world_size)``. Recipes without an entry launch unchecked.
PREFLIGHT_CHECKS: dict[str, Callable[[DictConfig, int], Any]] = {"longlora_distributed": validate_config}


def torchrun_world_size(nproc_per_node: Any, nnodes: Any) -> Optional[int]:
    """The number of ranks torchrun will start: processes per node x nodes.

    Args:
        nproc_per_node: torchrun's ``--nproc_per_node`` (a number, or ``auto``/``gpu``/``cpu``/...).
        nnodes: torchrun's ``--nnodes`` (``N`` or ``MIN:MAX``).

    Returns:
        The world size, or None when it is not fixed before launch (an elastic ``MIN:MAX`` range with
        MIN != MAX) or torchrun cannot determine it (it reports that itself).
    """
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    try:
        min_nodes, max_nodes = parse_min_max_nnodes(str(nnodes))
        per_node = determine_local_world_size(str(nproc_per_node))
    except (ValueError, RuntimeError):
        return None
    return per_node * min_nodes if min_nodes == max_nodes else None


def preflight(recipe_name: str, recipe_args: Sequence[str], world_size: Optional[int]) -> bool:
    """Read the config a recipe's workers will get, and run the recipe's up-front checks on it.

    Args:
        recipe_name: the recipe's registered name.
        recipe_args: its ``--config`` and overrides.
        world_size: the ranks torchrun will start, or None when unknown (the checks then run in the workers).

    Returns:
        Whether checks ran (False: no checks for this recipe, or the world size is not known yet; the
        config was still read).

    Raises:
        LongLoRAConfigError: when the config cannot be read, or on the first config problem.
    """
    cfg = load_config(recipe_args)
    checks = PREFLIGHT_CHECKS.get(recipe_name)
    if checks is None or world_size is None:
        return False
    checks(cfg, world_size)
    return True


@report_errors
def check_before_launch(
    recipe_name: str, recipe_args: Sequence[str], nproc_per_node: Any, nnodes: Any
) -> bool:
    """:func:`preflight` for the ``tune run`` launcher: a config error ends the launcher.

    Args:
        recipe_name: the recipe's registered name.
        recipe_args: its ``--config`` and overrides.
        nproc_per_node: torchrun's ``--nproc_per_node``.
        nnodes: torchrun's ``--nnodes``.

    Returns:
        Whether checks ran.

    Raises:
        SystemExit: with code 2 after printing ``longlora_tune: error: <message>`` on a config problem.
    """
    return preflight(recipe_name, recipe_args, torchrun_world_size(nproc_per_node, nnodes))
