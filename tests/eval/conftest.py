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


# Runs a recipe script as `tune run` does (runpy), with `module.name` replaced by a wrapper that sends
# `signum` to the process itself on its `call`-th call: the signal arrives at a known point of the sweep,
# with no sleeps and no race against the parent.
_STOP_DRIVER = """
import importlib, os, runpy, sys

module_name, name, call, signum, script, *argv = sys.argv[1:]
module = importlib.import_module(module_name)
original = getattr(module, name)
calls = []


def signal_on_call(*args, **kwargs):
    calls.append(None)
    if len(calls) == int(call):
        os.kill(os.getpid(), int(signum))
    return original(*args, **kwargs)


setattr(module, name, signal_on_call)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture
def run_eval_recipe_signalled():
    """Run a shipped eval recipe in a fresh interpreter that signals itself at a chosen call of a function.

    Returns a function ``(recipe, config, *overrides, signal_in, on_call, signum)`` giving the
    ``subprocess.CompletedProcess``; ``signal_in`` is the dotted name of the function whose ``on_call``-th
    call sends ``signum`` (e.g. ``longlora_tune.eval.perplexity.score_window``, called once per window).
    """
    import os
    import subprocess
    import sys

    from longlora_tune import resources

    repo = Path(__file__).resolve().parents[2]

    def run(
        recipe: str, config: str, *overrides: str, signal_in: str, on_call: int, signum: int
    ) -> subprocess.CompletedProcess:
        module, name = signal_in.rsplit(".", 1)
        script = resources.recipe_path(recipe)
        args = [module, name, str(on_call), str(signum), str(script), "--config"]
        args += [str(resources.config_path(config)), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
        return subprocess.run(
            [sys.executable, "-c", _STOP_DRIVER, *args], env=env, capture_output=True, text=True, timeout=300
        )

    return run
