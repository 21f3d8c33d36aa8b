"""In-process tests of the torchtune recipe registration (longlora_tune/config/tune_registry.py), its hook."""

import copy
import importlib.util
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torchtune
from torchtune import _recipe_registry

import _longlora_tune_hook as hook
from longlora_tune import resources
from longlora_tune.config import tune_registry as _tune_registry

REPO = Path(__file__).resolve().parents[1]


def _builtin_registry() -> types.SimpleNamespace:
    """A private copy of torchtune's registry holding only its built-in (relative path) entries."""
    builtins = [r for r in _recipe_registry._ALL_RECIPES if not os.path.isabs(r.file_path)]
    return types.SimpleNamespace(
        Recipe=_recipe_registry.Recipe, Config=_recipe_registry.Config, _ALL_RECIPES=copy.deepcopy(builtins)
    )


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def plugin_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Throwaway recipes/configs exercising every discovery rule (never written into the package)."""
    recipes, configs = tmp_path / "recipes", tmp_path / "configs"
    for name in ("alpha_distributed", "beta_eval", "_helper", "__init__"):
        _write(recipes / f"{name}.py", "print('hi')\n")
    _write(recipes / "notes.txt", "not a recipe\n")
    _write(configs / "a.yaml", "x: 1\n")  # no declaration -> default recipe
    _write(configs / "eval" / "b.yaml", "# Passkey eval.\n\n#  recipe:  beta_eval\nx: 1\n")  # comment rule
    _write(configs / "beta_eval" / "c.yaml", "x: 1\n")  # sub-folder rule
    _write(configs / "eval" / "d.yaml", "x: 1\n")  # grouping folder naming no recipe -> default
    _write(configs / "e.yaml", "x: 1\n# recipe: beta_eval\n")  # comment after the header is ignored
    _write(configs / "beta_eval" / "f.yaml", "# recipe: alpha_distributed\nx: 1\n")  # comment beats folder
    return recipes, configs


def _by_name(registry: types.SimpleNamespace) -> dict[str, object]:
    return {r.name: r for r in registry._ALL_RECIPES}


def test_discovery_rules_and_absolute_paths(plugin_tree: tuple[Path, Path]) -> None:
    recipes_dir, configs_dir = plugin_tree
    registry = _builtin_registry()
    n_builtin = len(registry._ALL_RECIPES)

    added = _tune_registry.register(
        registry, recipes_dir=recipes_dir, configs_dir=configs_dir, default_recipe="alpha_distributed"
    )

    assert added == ["alpha_distributed", "beta_eval"]
    assert len(registry._ALL_RECIPES) == n_builtin + 2
    recipes = _by_name(registry)
    alpha, beta = recipes["alpha_distributed"], recipes["beta_eval"]
    assert alpha.supports_distributed and beta.supports_distributed  # all our recipes run under torchrun
    assert alpha.file_path == str((recipes_dir / "alpha_distributed.py").resolve())
    assert [c.name for c in alpha.configs] == ["a", "beta_eval/f", "e", "eval/d"]
    assert [c.name for c in beta.configs] == ["beta_eval/c", "eval/b"]
    for recipe in (alpha, beta):
        assert os.path.isabs(recipe.file_path) and os.path.isfile(recipe.file_path)
        for config in recipe.configs:
            assert os.path.isabs(config.file_path)
            assert Path(config.file_path) == (configs_dir / f"{config.name}.yaml").resolve()


def test_register_is_idempotent(plugin_tree: tuple[Path, Path]) -> None:
    recipes_dir, configs_dir = plugin_tree
    registry = _builtin_registry()
    kwargs = dict(recipes_dir=recipes_dir, configs_dir=configs_dir, default_recipe="alpha_distributed")
    _tune_registry.register(registry, **kwargs)
    snapshot = copy.deepcopy(registry._ALL_RECIPES)

    assert _tune_registry.register(registry, **kwargs) == []
    assert registry._ALL_RECIPES == snapshot


def test_unknown_recipe_comment_warns_and_falls_back(tmp_path: Path) -> None:
    _write(tmp_path / "recipes" / "main_distributed.py", "")
    _write(tmp_path / "configs" / "typo.yaml", "# recipe: main_distribute\nx: 1\n")
    registry = _builtin_registry()

    with pytest.warns(UserWarning, match="names unknown recipe 'main_distribute'"):
        _tune_registry.register(
            registry,
            recipes_dir=tmp_path / "recipes",
            configs_dir=tmp_path / "configs",
            default_recipe="main_distributed",
        )

    assert [c.name for c in _by_name(registry)["main_distributed"].configs] == ["typo"]


def test_builtin_names_are_never_shadowed(tmp_path: Path) -> None:
    builtin_recipe = "lora_finetune_distributed"
    builtin_config = "llama2/7B_lora"
    _write(tmp_path / "recipes" / f"{builtin_recipe}.py", "")
    _write(tmp_path / "recipes" / "mine_distributed.py", "")
    _write(tmp_path / "configs" / f"{builtin_config}.yaml", "x: 1\n")
    _write(tmp_path / "configs" / "mine.yaml", "x: 1\n")
    registry = _builtin_registry()
    before = copy.deepcopy(registry._ALL_RECIPES)

    with pytest.warns(UserWarning) as record:
        added = _tune_registry.register(
            registry,
            recipes_dir=tmp_path / "recipes",
            configs_dir=tmp_path / "configs",
            default_recipe="mine_distributed",
        )

    messages = " ".join(str(w.message) for w in record)
    assert f"recipe name {builtin_recipe!r} is already registered" in messages
    assert f"config name {builtin_config!r} is already registered" in messages
    assert added == ["mine_distributed"]
    assert registry._ALL_RECIPES[: len(before)] == before  # built-ins untouched
    assert [c.name for c in _by_name(registry)["mine_distributed"].configs] == ["mine"]


def test_package_recipes_and_configs_register_without_clashes() -> None:
    registry = _builtin_registry()
    builtin_recipes = {r.name for r in registry._ALL_RECIPES}
    builtin_configs = {c.name for r in registry._ALL_RECIPES for c in r.configs}
    # The repository keeps recipes/ and configs/ at the top level, as torchtune does.
    assert resources.recipes_dir() == REPO / "recipes" and resources.configs_dir() == REPO / "configs"
    on_disk = {p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_")}

    added = _tune_registry.register(registry)

    assert sorted(added) == sorted(on_disk)
    assert not builtin_recipes & set(added)
    names = [r.name for r in registry._ALL_RECIPES]
    config_names = [c.name for r in registry._ALL_RECIPES for c in r.configs]
    assert len(names) == len(set(names)) and len(config_names) == len(set(config_names))
    ours = [r for r in registry._ALL_RECIPES if r.name in added]
    for recipe in ours:
        assert Path(recipe.file_path).is_file()
        assert Path(recipe.file_path).is_relative_to(resources.recipes_dir())
        for config in recipe.configs:
            assert config.name not in builtin_configs
            assert Path(config.file_path).is_file()
    # Every packaged config is reachable by name once its owner recipe exists.
    packaged = {
        p.relative_to(resources.configs_dir()).with_suffix("").as_posix()
        for p in resources.configs_dir().rglob("*.yaml")
    }
    if _tune_registry.DEFAULT_RECIPE in added:
        assert packaged == {c.name for r in ours for c in r.configs}


def test_hook_wraps_only_the_registry_module_and_registers(
    plugin_tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipes_dir, configs_dir = plugin_tree
    monkeypatch.setattr(resources, "recipes_dir", lambda: recipes_dir)
    monkeypatch.setattr(resources, "configs_dir", lambda: configs_dir)
    monkeypatch.setattr(_tune_registry, "DEFAULT_RECIPE", "alpha_distributed")
    finder = hook._RegistryHookFinder()

    assert finder.find_spec("torchtune._cli.run", torchtune.__path__) is None
    spec = finder.find_spec("torchtune._recipe_registry", torchtune.__path__)
    assert isinstance(spec.loader, hook._RegisteringLoader)
    module = importlib.util.module_from_spec(spec)  # a fresh copy; sys.modules is not touched
    spec.loader.exec_module(module)

    names = [r.name for r in module.get_all_recipes()]
    assert names[-2:] == ["alpha_distributed", "beta_eval"]
    assert names[0] == "full_finetune_single_device"
    assert "_ALL_RECIPES" in inspect.getsource(module)  # loader attributes still reach the real loader


def test_hook_reports_but_never_raises(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(module: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_tune_registry, "register", broken)
    hook._register(types.SimpleNamespace())

    err = capsys.readouterr().err
    assert "longlora_tune: could not register recipes with torchtune: RuntimeError('boom')" in err


def test_hook_import_is_torch_free_and_installs_once() -> None:
    code = (
        "import sys, _longlora_tune_hook, longlora_tune.config.tune_registry\n"
        "_longlora_tune_hook.install()\n"
        "hooks = [f for f in sys.meta_path if getattr(f, '_longlora_tune_registry_hook', False)]\n"
        "print(len(hooks), 'torch' in sys.modules, 'torchtune' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["1", "False", "False"]
    assert out.stderr == ""
