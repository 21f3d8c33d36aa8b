"""Short tiny-model runs of the recipe for the memory-lever tests: a lever must give the losses without it.

Shared by the activation-checkpointing and sequence-tiling recipe tests: the same tiny Llama 2 (and a
QLoRA-sized one), the same corpus, runs of a few steps compared step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, run_recipe
from test_longlora_distributed import _losses, _overrides

from longlora_tune.quickstart import tiny

TINY = CONFIGS / "tiny_demo.yaml"
QLORA = CONFIGS / "tiny_qlora.yaml"


def make_lever_assets(root: Path) -> dict[str, Path]:
    """The tiny base, a QLoRA-sized base and a corpus under ``root``."""
    base = tiny.make_hf_checkpoint(root / "base")
    # QLoRA's NF4 needs weights in whole 64 x 256 blocks (tests/recipes/test_qlora.py uses the same sizes).
    qbase = tiny.make_hf_checkpoint(root / "qbase", embed_dim=256, intermediate_dim=512)
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    return {"root": root, "base": base, "qbase": qbase, "corpus": corpus, "cache": root / "cache"}


def run_steps(
    assets: dict[str, Path], out: Path, *, steps: int, config: Path = TINY, **extra: object
) -> dict[int, float]:
    """Train ``steps`` steps in this process (no exports); the QLoRA config gets the QLoRA-sized base."""
    cfg = OmegaConf.load(config)
    values = {"max_steps": steps, "export_formats": "[]", **extra}
    if config == QLORA:
        values["checkpoint_dir"] = assets["qbase"]
    cfg.merge_with_dotlist(_overrides(assets, out, **values))
    run_recipe(cfg)
    return _losses(out)


def assert_same_losses(got: dict[int, float], want: dict[int, float], *, steps: int, rel: float) -> None:
    """Every step 1..``steps`` logged, each loss equal to ``want``'s within ``rel``."""
    assert sorted(got) == list(range(1, steps + 1)), got
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=rel, abs=0), (step, got[step], loss)
