"""Every Python path and command the README shows exists: a user starting from the README alone succeeds.

Checked without running heavy work: each ``longlora_tune.…`` dotted name (in code spans and code blocks)
imports; each ``from longlora_tune… import …`` line in a code block imports; each ``python -m MODULE`` names
a runnable module; each ``tune run/cp NAME --config CONFIG`` names a shipped recipe and config; each
``scripts/…`` and ``configs/…`` path exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from longlora_tune import resources

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CODE_BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
CODE = "\n".join(CODE_BLOCKS) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", README))


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


DOTTED = sorted(set(re.findall(r"\blonglora_tune(?:\.[A-Za-z_][A-Za-z0-9_]*)+", CODE)))
FROM_IMPORTS = sorted(set(re.findall(r"^\s*from (longlora_tune[\w.]*) import ([\w, ]+)$", CODE, flags=re.M)))
PYTHON_M = sorted(set(re.findall(r"python -m ([\w.]+)", CODE)))
TUNE_RUNS = sorted(set(re.findall(r"tune run (?:--nproc_per_node \d+ )?([\w.]+) --config ([\w/.]+)", CODE)))
PATHS = sorted(
    set(
        re.findall(
            r"(?<![\w/])((?:scripts|configs|recipes|docs|tests)/[\w/.-]+\.(?:sh|yaml|py|md))\b", README
        )
    )
)


def test_readme_mentions_what_this_test_checks() -> None:
    # Guards against the patterns silently matching nothing after a README rewrite.
    assert len(DOTTED) >= 8 and FROM_IMPORTS and len(PYTHON_M) >= 4 and len(TUNE_RUNS) >= 4 and PATHS


@pytest.mark.parametrize("dotted", DOTTED)
def test_dotted_names_import(dotted: str) -> None:
    _resolve(dotted)


@pytest.mark.parametrize(("module", "names"), FROM_IMPORTS)
def test_from_imports_work(module: str, names: str) -> None:
    mod = importlib.import_module(module)
    for name in (n.strip() for n in names.split(",")):
        assert hasattr(mod, name), f"from {module} import {name}"


@pytest.mark.parametrize("module", PYTHON_M)
def test_python_m_modules_exist(module: str) -> None:
    if not module.startswith(("longlora_tune", "benchmarks")):
        pytest.skip(f"{module} is not ours")
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


@pytest.mark.parametrize(("recipe", "config"), TUNE_RUNS)
def test_tune_run_names_exist(recipe: str, config: str) -> None:
    if recipe.endswith(".py"):
        assert recipe == "longlora_distributed.py"  # the `tune cp` copy the README runs
    else:
        resources.recipe_path(recipe)
    if not config.endswith(".yaml"):
        resources.config_path(config)


@pytest.mark.parametrize("path", PATHS)
def test_repository_paths_exist(path: str) -> None:
    assert (REPO / path).exists(), path


def test_ci_runs_the_readme_test_command() -> None:
    # .ci/run must test exactly as a user following the README would.
    block = README.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert block.startswith("python -m pytest"), block
    ci = (REPO / ".ci" / "run").read_text()
    assert f"\n{block} " in ci or f"\n{block}\n" in ci, (block, ci)
