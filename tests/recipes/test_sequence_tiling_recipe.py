"""``sequence_tile_tokens`` in the longlora_distributed recipe (tiny random Llama 2, CPU, gloo).

Two steps with the MLP blocks tiled must give the losses of two steps without: with activation
checkpointing on and off, tiles that do and do not divide the 256-token sequences, FSDP2 (every run here
shards), QLoRA's NF4 base, and context parallelism (each rank tiles its own slice).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, RecipeFailed, run_recipe
from test_longlora_distributed import _env, _losses, _overrides, _recipe_cmd

from longlora_tune.quickstart import tiny

REPO = Path(__file__).resolve().parents[2]
TINY = CONFIGS / "tiny_demo.yaml"
QLORA = CONFIGS / "tiny_qlora.yaml"
STEPS = 2
EXTRA = {"max_steps": STEPS, "export_formats": "[]"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiling")
    base = tiny.make_hf_checkpoint(root / "base")
    # QLoRA's NF4 needs weights in whole 64 x 256 blocks (as tests/recipes/test_qlora.py).
    qbase = tiny.make_hf_checkpoint(root / "qbase", embed_dim=256, intermediate_dim=512)
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    return {"root": root, "base": base, "qbase": qbase, "corpus": corpus, "cache": root / "cache"}


def _run(assets: dict[str, Path], out: Path, config: Path = TINY, **extra: object) -> dict[int, float]:
    cfg = OmegaConf.load(config)
    values = {**EXTRA, **extra}
    if config == QLORA:
        values["checkpoint_dir"] = assets["qbase"]
    cfg.merge_with_dotlist(_overrides(assets, out, **values))
    run_recipe(cfg)
    return _losses(out)


def _assert_same(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=rel, abs=0), (step, got[step], loss)


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
    assert f"Sequence tiling: each MLP block in tiles of {tile} tokens" in caplog.text
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
    assert "Sequence tiling: each MLP block in tiles of 48 tokens" in proc.stdout + proc.stderr
    _assert_same(_losses(out), untiled, rel=1e-5)


def test_a_bad_tile_size_is_one_line(assets, tmp_path):
    with pytest.raises(RecipeFailed) as err:
        _run(assets, tmp_path / "o", sequence_tile_tokens=0)
    assert err.value.message.startswith("sequence_tile_tokens=0 must be a positive integer or null")
    assert err.value.code == 2
