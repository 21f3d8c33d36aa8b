"""The weights a training run starts from.

A run starts from the base checkpoint's weights, a seeded LoRA initialisation (the same numbers for every
world size) and -- when resuming -- the trained tensors laid *over* the base ones, so trained embeddings
and norms win over the base model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.trainable import check_state_fits
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.distributed import init_lora_weights

__all__ = ["starting_state"]


def starting_state(
    base: HFBaseModel,
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    seed: int,
    resume_dir: Optional[Path] = None,
) -> dict[str, torch.Tensor]:
    """The model's full starting state, each tensor in its parameter's dtype.

    Args:
        base: the base checkpoint.
        specs: the model's parameter name -> (shape, dtype).
        seed: LoRA initialisation seed.
        resume_dir: a verified checkpoint folder whose trained tensors go over the base ones, or None.

    Returns:
        name -> tensor for every parameter of the model.

    Raises:
        LongLoRAConfigError: when the base checkpoint or the resumed tensors do not fit the model.
    """
    shapes = {k: shape for k, (shape, _) in specs.items()}
    state = base.load_state_dict()
    check_state_fits(
        state, shapes, source=str(base.path), fix="the model config does not match the checkpoint"
    )
    state.update(init_lora_weights(set(specs) - set(state), shapes, seed=seed))
    if resume_dir is not None:
        trained = ckpt_format.read_checkpoint_trainable(resume_dir)
        check_state_fits(
            trained, shapes, source=str(resume_dir), fix="resume with the config it was trained with"
        )
        state.update(trained)
    # Key by key, so only one tensor exists twice at a time (the 70B state is 138 GB).
    for k in list(state):
        state[k] = state[k].to(specs[k][1])
    return state
