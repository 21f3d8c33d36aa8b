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
from longlora_tune.models.trainable import check_state_fits, unwrapped_name
from longlora_tune.training import qlora
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.distributed import init_lora_weights, run_on_rank_zero

__all__ = ["load_starting_state", "starting_state"]


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


def load_starting_state(
    model: torch.nn.Module,
    base: HFBaseModel,
    *,
    seed: int,
    device: torch.device,
    resume_dir: Optional[Path] = None,
) -> None:
    """Fill a sharded model (FSDP2, materialised with ``to_empty``) with its :func:`starting_state`.

    Rank 0 assembles the full state and the other ranks receive their shards by broadcast; NF4 weights go
    through :func:`longlora_tune.training.qlora.load_full_state_dict`. RoPE caches are rebuilt on
    ``device`` afterwards (``to_empty`` left them uninitialised).

    Args:
        model: The sharded model.
        base: The base checkpoint.
        seed: LoRA initialisation seed.
        device: This rank's device.
        resume_dir: A verified checkpoint folder whose trained tensors go over the base ones, or None.

    Raises:
        LongLoRAConfigError: When the base checkpoint or the resumed tensors do not fit the model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torchtune import training

    # Parameters, not model.state_dict(): torchtune's hooks would dequantize unsharded NF4 weights.
    specs = {unwrapped_name(k): (tuple(v.shape), v.dtype) for k, v in model.named_parameters()}
    full_sd = (
        run_on_rank_zero(
            lambda: starting_state(base, specs, seed=seed, resume_dir=resume_dir), share_result=False
        )
        or {}
    )
    if qlora.has_nf4_params(model):
        qlora.load_full_state_dict(model, full_sd, device)
    else:
        set_model_state_dict(
            model,
            full_sd,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
        )
    del full_sd
    with device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.validate_no_params_on_meta_device(model)
