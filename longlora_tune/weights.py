"""The weights a training run starts from, and the one check that a state dict fits a model.

A run starts from the base checkpoint's weights, a seeded LoRA initialisation (the same numbers for every
world size) and -- when resuming -- the trained tensors laid *over* the base ones, so trained embeddings
and norms win over the base model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from longlora_tune import checkpointing
from longlora_tune.distributed import init_lora_weights
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.hf import HFBaseModel

__all__ = ["check_state_fits", "starting_state"]


def check_state_fits(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], *, source: str, fix: str
) -> None:
    """Check that every tensor of ``state`` is a parameter of the model with the same shape.

    Args:
        state: name -> tensor (torchtune names).
        shapes: the model's parameter name -> shape.
        source: where ``state`` comes from, for the message (a folder or file).
        fix: what the user should do, for the message.

    Raises:
        LongLoRAConfigError: naming the first unknown or misshapen tensor, ``source`` and ``fix``.
    """
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise LongLoRAConfigError(
            f"{source} holds {len(unknown)} tensors the model lacks (first: {unknown[0]}); {fix}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise LongLoRAConfigError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(shapes[name])}; {fix}"
            )


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
        trained = checkpointing.read_checkpoint_trainable(resume_dir)
        check_state_fits(
            trained, shapes, source=str(resume_dir), fix="resume with the config it was trained with"
        )
        state.update(trained)
    # Key by key, so only one tensor exists twice at a time (the 70B state is 138 GB).
    for k in list(state):
        state[k] = state[k].to(specs[k][1])
    return state
