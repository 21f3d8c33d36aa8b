"""Where the shipped recipes and configs are, installed or in a source checkout.

The repository keeps them at the top level (``recipes/``, ``configs/``), as torchtune does; the wheel
carries them inside the package (``longlora_tune/recipes``, ``longlora_tune/configs``) because torchtune's
own wheel already owns the top-level name ``recipes``. The package location is resolved through
``importlib.resources``; in an editable install or a source checkout the folders sit beside the package.
Torch-free: the ``tune`` start-up hook imports it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["config_path", "configs_dir", "recipe_path", "recipes_dir"]


def _bundled(name: str, pattern: str) -> Path:
    package = Path(str(importlib.resources.files("longlora_tune")))
    for candidate in (package / name, package.parent / name):
        # A folder counts only if it holds such files (a stale __pycache__ left behind does not).
        if candidate.is_dir() and next(candidate.glob(pattern), None) is not None:
            return candidate.resolve()
    raise FileNotFoundError(
        f"longlora_tune's {name}/ folder is missing (looked in {package / name} and "
        f"{package.parent / name}); reinstall the package"
    )


def recipes_dir() -> Path:
    """The folder of recipe scripts (``longlora_distributed.py``, ...).

    Returns:
        Its absolute path.

    Raises:
        FileNotFoundError: if the installation lacks it.
    """
    return _bundled("recipes", "*.py")


def configs_dir() -> Path:
    """The folder of YAML configs (``tiny_demo.yaml``, ``eval/...``).

    Returns:
        Its absolute path.

    Raises:
        FileNotFoundError: if the installation lacks it.
    """
    return _bundled("configs", "**/*.yaml")


def recipe_path(name: str) -> Path:
    """The script of a shipped recipe, e.g. ``recipe_path("longlora_distributed")``.

    Args:
        name: recipe name (file stem).

    Returns:
        The file path.

    Raises:
        FileNotFoundError: if there is no such recipe.
    """
    path = recipes_dir() / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.py"))
        raise FileNotFoundError(f"no recipe named {name!r}; shipped recipes: {known}")
    return path


def config_path(name: str) -> Path:
    """The file of a shipped config: ``config_path("tiny_demo")``, ``config_path("eval/tiny_passkey")``.

    Args:
        name: config name (path under ``configs/`` without ``.yaml``).

    Returns:
        The file path.

    Raises:
        FileNotFoundError: if there is no such config.
    """
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config named {name!r} under {configs_dir()}")
    return path
