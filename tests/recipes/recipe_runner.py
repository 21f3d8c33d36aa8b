"""Run the training recipe script by path, in this process, the way ``tune run`` does (``runpy``).

Recipes are scripts, not modules: tests never import them. In-process runs keep the fast tests fast (no
interpreter and torch start-up per run); multi-process runs use torchrun on the same script.
"""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from longlora_tune import resources
from longlora_tune.config.validation import training_length
from longlora_tune.data.loader import build_dataloader, pad_multiple
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.longlora import describe

RECIPE = resources.recipe_path("longlora_distributed")
CONFIGS = resources.configs_dir()


class RecipeFailed(Exception):
    """The recipe exited non-zero; ``str()`` is its one-line error message (without the prefix)."""

    def __init__(self, code: int, message: str, stderr: str) -> None:
        super().__init__(message)
        self.code, self.message, self.stderr = code, message, stderr


def run_recipe_argv(argv: list[str]) -> str:
    """Run ``recipes/longlora_distributed.py ARGV`` in this process.

    Returns:
        What the run wrote to stderr.

    Raises:
        RecipeFailed: when it exits non-zero (the message is its ``longlora_tune: error:`` line).
    """
    err = io.StringIO()
    old_argv = sys.argv
    sys.argv = [str(RECIPE), *map(str, argv)]
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(RECIPE), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    text = err.getvalue()
    if code:
        lines = [x for x in text.splitlines() if x.startswith("longlora_tune: error: ")]
        message = lines[-1].removeprefix("longlora_tune: error: ") if lines else text[-2000:]
        raise RecipeFailed(code, message, text)
    return text


def run_recipe(cfg: DictConfig) -> str:
    """Save ``cfg`` to a YAML file and run the recipe on it (see :func:`run_recipe_argv`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        OmegaConf.save(cfg, path)
        return run_recipe_argv(["--config", str(path)])


def model_from_adapter(adapter_dir: Path, base_dir: Path) -> torch.nn.Module:
    """The trained model rebuilt from ``adapter/longlora.json``: base weights, then the trained tensors.

    An NF4 base (``quantize_base``) is quantized from the full-precision weights on load, as the recipe does.
    """
    import json

    from longlora_tune.models import trainable
    from longlora_tune.training.checkpointing import format as ckpt_format

    meta = json.loads((adapter_dir / "longlora.json").read_text())
    model = config.instantiate(OmegaConf.create(meta["model"]))
    missing, unexpected = model.load_state_dict(HFBaseModel.read(base_dir).load_state_dict(), strict=False)
    assert not unexpected
    loaded = trainable.load_trainable_state(model, adapter_dir / ckpt_format.TRAINABLE_FILE)
    assert set(missing) <= set(loaded)
    return model.eval()


def training_parts(cfg: DictConfig, *, train: bool = True) -> dict:
    """The pieces the recipe builds, without sharding: model with base weights, loss, tokenizer, data.

    Built through the same library functions the recipe calls, for tests of what one batch does.
    """
    tokenizer = config.instantiate(cfg.tokenizer)
    model = config.instantiate(cfg.model)
    base = HFBaseModel.read(cfg.checkpoint_dir)
    missing, unexpected = model.load_state_dict(base.load_state_dict(), strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    model.train(train)
    loss_fn = config.instantiate(cfg.loss)
    if loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    dataset = config.instantiate(cfg.dataset, tokenizer)
    group = describe(model).group_size
    loader, sampler = build_dataloader(
        dataset,
        batch_size=int(cfg.batch_size),
        global_batch_size=int(cfg.global_batch_size),
        rank=0,
        world_size=1,
        seed=int(cfg.get("seed", 0)),
        shuffle=bool(cfg.get("shuffle", True)),
        packed=bool(cfg.dataset.get("packed", False)),
        pad_to_multiple_of=pad_multiple(cfg.get("pad_to_multiple_of", None), group, training_length(cfg)),
        pad_id=int(getattr(tokenizer, "pad_id", 0) or 0),
    )
    sampler.set_position(0, 0)
    return {"model": model, "loss_fn": loss_fn, "dataset": dataset, "loader": loader, "sampler": sampler,
            "device": torch.device("cpu"), "batch_size": int(cfg.batch_size)}  # fmt: skip
