"""``sequence_tile_tokens`` in the longlora_distributed recipe (tiny random Llama 2, CPU, gloo).

Two steps with the MLP blocks tiled must give the losses of two steps without: with activation
checkpointing on and off, tiles that do and do not divide the 256-token sequences, FSDP2 (every run here
shards), QLoRA's NF4 base, and context parallelism (each rank tiles its own slice).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lever_runs import QLORA, TINY, assert_same_losses, make_lever_assets, run_steps
from recipe_runner import RecipeFailed
from test_longlora_distributed import _env, _losses, _overrides, _recipe_cmd

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
EXTRA = {"max_steps": STEPS, "export_formats": "[]"}  # for the torchrun runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_lever_assets(tmp_path_factory.mktemp("tiling"))


def _run(assets: dict[str, Path], out: Path, config: Path = TINY, **extra: object) -> dict[int, float]:
    return run_steps(assets, out, steps=STEPS, config=config, **extra)


def _assert_same(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert_same_losses(got, want, steps=STEPS, rel=rel)


@pytest.fixture(scope="module")
def untiled(assets) -> dict[int, float]:
    return _run(assets, assets["root"] / "untiled")


@pytest.mark.parametrize(
    ("tile", "checkpointing"),
    [(100, "true"), (64, "false")],
    ids=["short_last_tile_ac", "dividing_no_ac"],
)
def test_tiled_steps_give_the_untiled_losses(assets, untiled, tmp_path, caplog, tile, checkpointing):
    caplog.set_level("INFO")
    losses = _run(
        assets, tmp_path / "o", sequence_tile_tokens=tile, enable_activation_checkpointing=checkpointing
    )
    assert (
        f"Sequence tiling: attention prefixes, MLP blocks and the final norm in tiles of {tile} tokens"
        in caplog.text
    )
    # float32 on CPU: the same computations on fewer rows at a time.
    _assert_same(losses, untiled, rel=1e-6)


def test_tiled_steps_with_qlora(assets, tmp_path):
    want = _run(assets, tmp_path / "untiled", config=QLORA)
    got = _run(assets, tmp_path / "tiled", config=QLORA, sequence_tile_tokens=96)
    _assert_same(got, want, rel=1e-6)


@pytest.mark.slow
def test_tiled_steps_with_context_parallelism(assets, untiled, tmp_path):
    # 2 ranks sharing each sequence (128 tokens each, tiles of 48), against one untiled process
    # (tests/recipes/test_context_parallel_recipe.py's tolerance: float summation order across ranks).
    out = tmp_path / "cp2"
    overrides = _overrides(assets, out, **EXTRA, context_parallel_degree=2, sequence_tile_tokens=48)
    proc = subprocess.run(
        _recipe_cmd(TINY, overrides, nproc=2),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (
        "Sequence tiling: attention prefixes, MLP blocks and the final norm in tiles of 48 tokens"
        in proc.stdout + proc.stderr
    )
    _assert_same(_losses(out), untiled, rel=1e-5)


def test_a_bad_tile_size_is_one_line(assets, tmp_path):
    with pytest.raises(RecipeFailed) as err:
        _run(assets, tmp_path / "o", sequence_tile_tokens=0)
    assert err.value.message.startswith("sequence_tile_tokens=0 must be a positive integer, auto or null")
    assert err.value.code == 2
