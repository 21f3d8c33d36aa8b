"""Every private torchtune 0.6.1 name longlora_tune relies on, in one place.

torchtune is no longer developed upstream and is pinned to 0.6.1, but its private names are still the
most fragile contact surface: if a future pin moves, this is the only module to fix. Each accessor says
why the public API does not suffice. Imports are lazy so the torch-free start-up hook can import this
module without pulling in torch.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional


def attention_call(mha: Any) -> Callable[..., Any]:
    """The attention kernel callable of a torchtune ``MultiHeadAttention``.

    Why private: ``MultiHeadAttention.forward`` computes projections, RoPE, KV cache and GQA expansion,
    then calls ``self._attention_call(q, k, v, mask, dropout_p, is_causal)``. Replacing that one callable is
    the only way to change the attention pattern (S²) without copying ``forward``.

    Args:
        mha: a ``torchtune.modules.MultiHeadAttention``.

    Returns:
        The current callable.
    """
    return mha._attention_call


def set_attention_call(mha: Any, fn: Callable[..., Any]) -> None:
    """Replace the attention kernel callable of a ``MultiHeadAttention`` (see :func:`attention_call`).

    Args:
        mha: a ``torchtune.modules.MultiHeadAttention``.
        fn: the new callable; an ``nn.Module`` becomes a child module (no parameters, names unchanged).
    """
    mha._attention_call = fn


def flex_attention_supported() -> bool:
    """Whether torchtune builds FlexAttention ``BlockMask``s for packed batches on this machine.

    Why private: ``padded_collate_packed`` decides between a ``BlockMask`` and a dense mask with this
    module-level flag; a recipe must know which one the S² backend will receive before training starts.

    Returns:
        torchtune's ``_SUPPORTS_FLEX_ATTENTION``.
    """
    from torchtune.modules.attention_utils import _SUPPORTS_FLEX_ATTENTION

    return bool(_SUPPORTS_FLEX_ATTENTION)


def hf_to_tune_names() -> dict[str, str | None]:
    """torchtune's Hugging Face -> torchtune weight-name table for Llama-style models.

    Why private: the PEFT export must name LoRA and ``modules_to_save`` tensors the way Hugging Face does,
    and torchtune exposes the mapping only as ``convert_weights._FROM_HF`` (its public ``tune_to_hf``
    converts whole state dicts and cannot be asked for one name).

    Returns:
        ``{hf_name_pattern: tune_name_pattern or None}``.
    """
    from torchtune.models import convert_weights

    return dict(convert_weights._FROM_HF)


def recipe_list(registry: ModuleType) -> list[Any]:
    """The list behind ``tune ls/cp/run`` names.

    Why private: torchtune 0.6.1 has no plugin registry; ``tune`` only knows the hard-coded
    ``_recipe_registry._ALL_RECIPES``, so plugins append to it.

    Args:
        registry: the ``torchtune._recipe_registry`` module.

    Returns:
        The mutable list of ``Recipe`` entries.
    """
    return registry._ALL_RECIPES


def registered_recipe_names() -> set[str]:
    """Names the ``tune`` CLI resolves (torchtune's and, when our start-up hook is installed, ours).

    Why private: ``get_all_recipes`` lives in the private module ``torchtune._recipe_registry``.

    Returns:
        The recipe names; empty when torchtune is not importable.
    """
    try:
        from torchtune._recipe_registry import get_all_recipes
    except ImportError:
        return set()
    return {r.name for r in get_all_recipes()}


def registered_config_file(name: str, recipe: str) -> Optional[Path]:
    """The file ``tune run <recipe> --config <name>`` reads when ``name`` is a registered config name.

    Why private: the lookup is ``torchtune._cli.run.Run._get_config`` (the named recipe's configs first,
    then every recipe's) and its entries' ``file_path`` is joined onto ``torchtune._cli.run.ROOT``
    (absolute for ours, relative for torchtune's own); neither is public.

    Args:
        name: the ``--config`` value.
        recipe: the recipe the config is run with.

    Returns:
        The config file, or None when ``name`` is no registered config (``tune run`` then reads it as a
        path).
    """
    from torchtune._cli.run import ROOT
    from torchtune._recipe_registry import get_all_recipes

    recipes = get_all_recipes()
    ordered = [r for r in recipes if r.name == recipe] + [r for r in recipes if r.name != recipe]
    for entry in ordered:
        for config in entry.configs:
            if config.name == name:
                return Path(ROOT) / "recipes" / "configs" / config.file_path
    return None


def wrap_distributed_launch(before_launch: Callable[[str, list[str], Any, Any], None]) -> bool:
    """Call ``before_launch(recipe, recipe_args, nproc_per_node, nnodes)`` in the ``tune run`` launcher,
    right before it starts torchrun for a registered recipe (idempotent); a run stopped by SIGINT/SIGTERM
    then ends the launcher with the workers' exit code instead of torchrun's traceback.

    Why private: torchtune 0.6.1 offers no hook between resolving a recipe and launching torchrun; wrapping
    ``torchtune._cli.run.Run._run_distributed(self, args, is_builtin)`` is the only place to check a config
    once instead of once per worker.

    Args:
        before_launch: raises/exits to stop the launch; returns to let it go on.

    Returns:
        Whether the wrapper is in place (False when ``torchtune._cli.run`` is missing, or is itself being
        imported right now, i.e. it imported the registry first).
    """
    import functools
    import sys

    if "torchtune._cli.run" in sys.modules and not hasattr(sys.modules["torchtune._cli.run"], "Run"):
        return False  # partly imported: importing it again here would not give the class
    try:
        from torchtune._cli.run import Run
    except ImportError:
        return False
    original = Run._run_distributed
    if getattr(original, "_longlora_preflight", False):
        return True

    @functools.wraps(original)
    def _run_distributed(self: Any, args: Any, is_builtin: bool) -> Any:
        # is_builtin: the recipe came from the registry (ours are registered with absolute paths).
        if not is_builtin:
            return original(self, args, is_builtin)
        before_launch(str(args.recipe), list(args.recipe_args), args.nproc_per_node, args.nnodes)
        from longlora_tune.errors import stop_exit_code

        try:
            return original(self, args, is_builtin)
        except BaseException as e:
            # Ctrl-C reaches torchrun and its workers alike: the workers report it (rank 0, one line), so
            # torchrun's SignalException / ChildFailedError traceback would only repeat it.
            code = stop_exit_code(e)
            if code is None:
                raise
            sys.exit(code)

    _run_distributed._longlora_preflight = True  # type: ignore[attr-defined]
    Run._run_distributed = _run_distributed
    return True


def import_object(path: Any, where: str = "component") -> Any:
    """The object a config's dotted path names (``_component_``, ``collate_fn``), found as torchtune finds it.

    Why private: ``torchtune.config._utils._get_component_from_path`` is the lookup ``config.instantiate``
    uses; resolving a path with it means a config check accepts exactly what instantiation will accept.
    Its multi-line ``InstantiationError`` becomes one config-error line naming the key.

    Args:
        path: the dotted path (``package.module.attribute``).
        where: the config key, for the message (``model._component_``).

    Returns:
        The object.

    Raises:
        LongLoRAConfigError: if the path is not a string or cannot be imported.
    """
    from torchtune.config._errors import InstantiationError
    from torchtune.config._utils import _get_component_from_path

    from longlora_tune.errors import LongLoRAConfigError

    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise LongLoRAConfigError(f"{where}={path!r} must be a dotted path such as torch.optim.AdamW")
    try:
        return _get_component_from_path(path)
    except InstantiationError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        message = f"{where}={path} cannot be imported ({cause}); check the dotted path"
        raise LongLoRAConfigError(message) from e
