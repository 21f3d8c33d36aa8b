"""``activation_checkpointing_layers`` in the longlora_distributed recipe (tiny random Llama 2, CPU, gloo).

Checkpointing the first N of the two decoder layers must train exactly as checkpointing both: with FSDP2
(every run here shards, one rank or two), with ``compile: true``, with QLoRA's NF4 base and with context
parallelism (the recomputed layer repeats its halo exchange on both ranks).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lever_runs import QLORA, TINY, assert_same_losses, make_lever_assets, run_steps
from recipe_runner import RecipeFailed
from test_longlora_distributed import _env, _losses, _overrides, _recipe_cmd

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
EXTRA = {"max_steps": STEPS, "export_formats": "[]"}  # for the torchrun runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_lever_assets(tmp_path_factory.mktemp("ac"))


def _run(assets: dict[str, Path], out: Path, config: Path = TINY, **extra: object) -> dict[int, float]:
    return run_steps(assets, out, steps=STEPS, config=config, **extra)


def _assert_same(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert_same_losses(got, want, steps=STEPS, rel=rel)


@pytest.fixture(scope="module")
def every_layer(assets) -> dict[int, float]:
    return _run(assets, assets["root"] / "all")


@pytest.mark.parametrize("layers", [0, 1])
def test_some_layers_give_the_losses_of_every_layer(assets, every_layer, tmp_path, layers, caplog):
    caplog.set_level("INFO")
    losses = _run(assets, tmp_path / "o", activation_checkpointing_layers=layers)
    assert f"Activation checkpointing: {layers} decoder layer(s)" in caplog.text
    # float32 on CPU: the recomputed forward is the same computation, so the losses are identical.
    _assert_same(losses, every_layer, rel=1e-6)


def test_some_layers_with_compile(assets, every_layer, tmp_path, monkeypatch):
    # aot_eager: what inductor compiles, without minutes of C++ builds (as the recipe's compile test).
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    losses = _run(assets, tmp_path / "o", compile="true", activation_checkpointing_layers=1)
    _assert_same(losses, every_layer, rel=1e-4)  # the recipe's compile-vs-eager tolerance


def test_some_layers_with_qlora(assets, tmp_path, caplog):
    caplog.set_level("INFO")
    want = _run(assets, tmp_path / "all", config=QLORA)
    got = _run(assets, tmp_path / "one", config=QLORA, activation_checkpointing_layers=1)
    assert "Activation checkpointing: 1 decoder layer(s)" in caplog.text
    _assert_same(got, want, rel=1e-6)


@pytest.mark.slow
def test_some_layers_with_context_parallelism(assets, every_layer, tmp_path):
    # 2 ranks sharing each sequence, only the first layer recomputed, against one process recomputing both
    # (tests/recipes/test_context_parallel_recipe.py's tolerance: float summation order across ranks).
    out = tmp_path / "cp2"
    overrides = _overrides(assets, out, **EXTRA, context_parallel_degree=2, activation_checkpointing_layers=1)
    cmd = _recipe_cmd(TINY, overrides, nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    _assert_same(_losses(out), every_layer, rel=1e-5)


def test_more_layers_than_the_model_has_is_one_line(assets, tmp_path):
    with pytest.raises(RecipeFailed) as err:
        _run(assets, tmp_path / "o", activation_checkpointing_layers=3)
    assert err.value.message == (
        "activation_checkpointing_layers=3 is more than the model's 2 decoder layers; use at most 2 or 'all'"
    )
    assert err.value.code == 2
