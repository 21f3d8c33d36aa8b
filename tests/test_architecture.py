"""The package's architecture: layer and no-cycle contracts that catch a violation, a torch-free planner.

CI runs ``lint-imports`` on the repository with the contracts in ``pyproject.toml``. These tests prove that
the same contracts fail on a temporary package tree that breaks them (a cycle hidden by a function-level
import, a lower layer importing a higher one), so a green CI step means something.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as in CI

REPO = Path(__file__).resolve().parents[1]
# The venv running the tests has it beside its python, whether or not the venv is activated.
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _contracts() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def _tree(root: Path, files: dict[str, str]) -> None:
    """A skeleton of our packages (every layer, empty) plus ``files``."""
    contracts = _contracts()
    packages = {"benchmarks", *contracts["root_packages"]}
    for c in contracts["contracts"]:
        packages.update(c.get("layers", []))
    for name in packages:
        init = root / Path(*name.split(".")) / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.touch()
    for rel, text in files.items():
        (root / rel).write_text(text)
    lines = ["[tool.importlinter]", f"root_packages = {contracts['root_packages']!r}"]
    for c in contracts["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        lines.extend(f"{key} = {value!r}" for key, value in c.items())
    (root / "pyproject.toml").write_text("\n".join(lines).replace("'", '"') + "\n")


def _lint(root: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS, "lint-imports is not installed (pip install -e '.[dev]')"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_contracts_pass_on_a_clean_tree(tmp_path: Path) -> None:
    _tree(tmp_path, {"longlora_tune/training/weights.py": "from longlora_tune.models import shapes\n"})
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_cycle_hidden_in_a_function_fails_the_check(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "longlora_tune/training/weights.py": "from longlora_tune.training import checkpointing\n",
            "longlora_tune/training/checkpointing.py": (
                "def read():\n    from longlora_tune.training import weights\n    return weights\n"
            ),
        },
    )
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "No cycles are allowed in longlora_tune.training" in proc.stdout


def test_a_lower_layer_importing_a_higher_one_fails_the_check(tmp_path: Path) -> None:
    _tree(tmp_path, {"longlora_tune/modules/loss.py": "import longlora_tune.training\n"})
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "longlora_tune.modules is not allowed to import longlora_tune.training" in proc.stdout


@pytest.mark.parametrize(
    "module",
    [
        "longlora_tune.plan",
        "longlora_tune.models.families",
        "longlora_tune.models.shapes",
        "longlora_tune.modules.rope_config",
        # The config checks and their CLI: torch only once a check builds a model or reads a checkpoint.
        "longlora_tune.config.validation, longlora_tune.config.check",
    ],
)
def test_planner_family_record_and_config_import_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _map_entries() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Repository map", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.strip().splitlines() if line.strip()]


def test_the_readme_map_lists_every_module_and_only_what_exists() -> None:
    entries = _map_entries()
    missing_on_disk = [e for e in entries if not (REPO / e).exists()]
    assert not missing_on_disk, f"the README map names paths that do not exist: {missing_on_disk}"
    modules = sorted(
        p.relative_to(REPO).as_posix()
        for folder in ("longlora_tune", "benchmarks")
        for p in (REPO / folder).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )
    unlisted = [m for m in modules if m not in entries]
    assert not unlisted, f"modules missing from the README's repository map: {unlisted}"
