"""Tiny assets shared by the evaluation tests (made once per session, in a temporary folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from longlora_tune.quickstart.tiny import make_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama 2 HF checkpoint (64-token original context) with its tokenizer."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("eval_ckpt") / "hf", max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ckpt: Path):
    """torchtune Llama 2 tokenizer of the tiny checkpoint."""
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(tiny_ckpt / "tokenizer.model"), prompt_template=None)


@pytest.fixture
def run_eval_recipe(monkeypatch: pytest.MonkeyPatch):
    """Run a shipped eval recipe script by path in this process (as ``tune run`` does), with a shipped config.

    Returns a function ``(recipe, config, *overrides)``; the script ends with ``SystemExit``.
    """
    import runpy
    import sys

    from longlora_tune import resources

    def run(recipe: str, config: str, *overrides: str) -> None:
        script = resources.recipe_path(recipe)
        argv = [str(script), "--config", str(resources.config_path(config)), *overrides]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(script), run_name="__main__")

    return run
