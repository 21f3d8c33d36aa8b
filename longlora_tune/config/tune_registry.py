"""Make the stock ``tune`` CLI know longlora_tune's recipes and configs by name.

torchtune 0.6.1 has no plugin registry: ``tune ls``, ``tune cp``, ``tune cat`` and ``tune run`` only
look names up in the hard-coded list ``torchtune._recipe_registry._ALL_RECIPES``. They join each entry's
``file_path`` onto torchtune's own folder with ``pathlib`` (``ROOT / "recipes" / file_path``), and an
absolute right-hand side replaces the left, so an entry with an ABSOLUTE path points at our installed
file and then runs exactly like a built-in recipe (``runpy.run_path``, or torchrun with the script path).

:func:`register` appends one ``Recipe`` per recipe file of this package. The import hook installed by
``longlora_tune_hook.pth`` (module ``_longlora_tune_hook``) calls it right after
``torchtune._recipe_registry`` is first imported, so no torch import happens at interpreter start-up.

Discovery rules (files are found by scanning the installed package, nothing is listed by hand):

- Recipes: every ``recipes/<name>.py`` except ``_private.py`` files (installed: inside the package, see
  :mod:`longlora_tune.resources`).
  The recipe name is the file stem. Every recipe is registered with ``supports_distributed=True``
  (torchtune only uses the flag to refuse torchrun flags): the training recipe and both eval recipes
  run on one process or under torchrun.
- Configs: every ``configs/**/*.yaml``. The config name is its path relative to
  ``configs/`` without ``.yaml`` (``llama2_7b_100k``, ``eval/llama2_7b_passkey``). Its recipe is, first
  match wins:

  1. the recipe named by a ``# recipe: <name>`` line in the comment block at the top of the file;
  2. the recipe named like the config's first sub-folder (``configs/longlora_eval_passkey/x.yaml``);
  3. otherwise :data:`DEFAULT_RECIPE` (the training recipe).

  A ``# recipe:`` comment naming no existing recipe falls back to rule 3 with a warning; a sub-folder
  naming no recipe (``configs/eval/``) is just a grouping folder. Because
  ``tune run`` searches every recipe's configs when the named recipe has none of that name, ownership
  only decides where ``tune ls`` prints a config; any recipe can run any config.

Names that already belong to torchtune (recipe or config) are skipped with a warning, never shadowed.
Configs are only listed under a recipe that exists in the package (torchtune has no place for orphan
configs); such a config still runs by path.

:func:`register` also installs :func:`install_preflight`: ``tune run --nproc_per_node N`` with one of our
recipes checks the config once in the launcher (:mod:`longlora_tune.config.preflight`) before torchrun starts.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from longlora_tune import resources
from longlora_tune._compat import recipe_list, registered_config_file, wrap_distributed_launch

DEFAULT_RECIPE = "longlora_distributed"

_RECIPE_COMMENT = re.compile(r"#\s*recipe\s*:\s*([A-Za-z0-9_.-]+)\s*$")


def discover_recipes(recipes_dir: Path) -> dict[str, Path]:
    """Find the recipe files of the package.

    Args:
        recipes_dir: Folder holding one ``<name>.py`` file per recipe.

    Returns:
        Recipe name (file stem) to absolute file path, sorted by name; empty if the folder is missing.
    """
    if not recipes_dir.is_dir():
        return {}
    return {p.stem: p.resolve() for p in sorted(recipes_dir.glob("*.py")) if not p.name.startswith("_")}


def config_recipe_name(config_path: Path, configs_dir: Path) -> tuple[str | None, bool]:
    """Read which recipe a config declares, by header comment or sub-folder name.

    Args:
        config_path: A YAML file inside ``configs_dir``.
        configs_dir: The configs root the sub-folder rule is relative to.

    Returns:
        ``(name, explicit)``: the declared recipe name (None when the config declares none) and whether it
        came from a ``# recipe:`` comment (True) rather than from the first sub-folder's name (False).
    """
    with open(config_path, encoding="utf-8") as f:
        for line in f:
            stripped = line.strip()
            if not stripped:
                continue
            if not stripped.startswith("#"):
                break  # only the leading comment block is read
            match = _RECIPE_COMMENT.match(stripped)
            if match:
                return match.group(1), True
    parts = config_path.relative_to(configs_dir).parts
    return (parts[0] if len(parts) > 1 else None), False


def discover_configs(
    recipe_names: set[str], configs_dir: Path, default_recipe: str
) -> dict[str, list[tuple[str, Path]]]:
    """Group the package's configs by the recipe they belong to.

    A sub-folder that names no recipe is a plain grouping folder (``configs/eval/``); a ``# recipe:``
    comment naming an unknown recipe warns. Both fall back to ``default_recipe``.

    Args:
        recipe_names: Names of the recipes found by :func:`discover_recipes`.
        configs_dir: Root of the YAML configs.
        default_recipe: Recipe that owns configs declaring none.

    Returns:
        Recipe name to a name-sorted list of ``(config name, absolute path)``.
    """
    grouped: dict[str, list[tuple[str, Path]]] = {}
    if not configs_dir.is_dir():
        return grouped
    for path in sorted(configs_dir.rglob("*.yaml")):
        name = path.relative_to(configs_dir).with_suffix("").as_posix()
        declared, explicit = config_recipe_name(path, configs_dir)
        owner = declared if declared in recipe_names else default_recipe
        if explicit and declared not in recipe_names:
            warnings.warn(
                f"longlora_tune: config {name!r} names unknown recipe {declared!r}; "
                f"listing it under {default_recipe!r}",
                stacklevel=2,
            )
        grouped.setdefault(owner, []).append((name, path.resolve()))
    return grouped


def register(
    registry: ModuleType | None = None,
    *,
    recipes_dir: Path | None = None,
    configs_dir: Path | None = None,
    default_recipe: str | None = None,
) -> list[str]:
    """Append this package's recipes and configs to torchtune's recipe list (idempotent).

    Args:
        registry: The ``torchtune._recipe_registry`` module; imported when None. The import hook passes
            the module it has just executed.
        recipes_dir: Folder scanned for recipes; None means the installed ones
            (:func:`longlora_tune.resources.recipes_dir`).
        configs_dir: Folder scanned for configs; None means :func:`longlora_tune.resources.configs_dir`.
        default_recipe: Recipe that owns configs declaring none; None means :data:`DEFAULT_RECIPE`.

    Returns:
        Names of the recipes this call added (empty on a repeated call).
    """
    if registry is None:
        from torchtune import _recipe_registry as registry

    all_recipes = recipe_list(registry)
    recipes = discover_recipes(resources.recipes_dir() if recipes_dir is None else recipes_dir)
    configs = discover_configs(
        set(recipes),
        resources.configs_dir() if configs_dir is None else configs_dir,
        DEFAULT_RECIPE if default_recipe is None else default_recipe,
    )
    existing = {r.name: r for r in all_recipes}
    ours = {str(path) for path in recipes.values()}
    # Config names must stay unique across torchtune's recipes and ours (tune run searches them all).
    taken_configs = {c.name for r in all_recipes if r.file_path not in ours for c in r.configs}

    added = []
    for name, path in recipes.items():
        if name in existing:
            if existing[name].file_path != str(path):
                warnings.warn(
                    f"longlora_tune: recipe name {name!r} is already registered "
                    f"({existing[name].file_path}); not registering {path}",
                    stacklevel=2,
                )
            continue
        entries = []
        for config_name, config_path in configs.get(name, []):
            if config_name in taken_configs:
                warnings.warn(
                    f"longlora_tune: config name {config_name!r} is already registered; "
                    f"use its path {config_path} instead",
                    stacklevel=2,
                )
                continue
            entries.append(registry.Config(name=config_name, file_path=str(config_path)))
            taken_configs.add(config_name)
        all_recipes.append(
            registry.Recipe(
                name=name,
                file_path=str(path),
                configs=entries,
                supports_distributed=True,
            )
        )
        added.append(name)
    install_preflight()
    return added


def config_file(config: str, recipe: str = DEFAULT_RECIPE) -> str:
    """The file ``tune run <recipe> --config <config>`` reads: a registered name's file, else ``config``.

    Our recipes and configs are registered first (:func:`register`, idempotent), so names resolve in a
    checkout without the start-up hook too.

    Args:
        config: a config name (``tiny_demo``, ``eval/tiny_passkey``, one of torchtune's) or a file path.
        recipe: the recipe whose configs are searched first, as ``tune run`` does.

    Returns:
        The path to read (``config`` itself when it names no registered config).
    """
    register()
    found = registered_config_file(config, recipe)
    return config if found is None else str(found)


def install_preflight() -> bool:
    """Make ``tune run`` check our recipes' configs once before torchrun starts the workers (idempotent).

    Only our recipe files are checked (:func:`longlora_tune.config.preflight.check_before_launch`);
    torchtune's recipes and single-process runs go through unchanged.

    Returns:
        Whether the check is in place (False when torchtune's run command cannot be wrapped; the workers
        then still validate).
    """

    def before_launch(recipe: str, recipe_args: list[str], nproc_per_node: Any, nnodes: Any) -> None:
        ours = {str(path): name for name, path in discover_recipes(resources.recipes_dir()).items()}
        name = ours.get(str(Path(recipe).resolve()))
        if name is not None:
            from longlora_tune.config.preflight import check_before_launch

            check_before_launch(name, recipe_args, nproc_per_node, nnodes)

    return wrap_distributed_launch(before_launch)
