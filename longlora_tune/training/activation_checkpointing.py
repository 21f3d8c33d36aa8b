"""Activation checkpointing of some or all decoder layers: one function for the recipe and the benchmark.

``enable_activation_checkpointing: true`` recomputes every decoder layer in backward, which costs about a
third of a step's compute. ``activation_checkpointing_layers: N`` checkpoints only N of them, so a run that
fits the GPU with some layers' activations kept whole does not pay for recomputing those;
``python -m longlora_tune.plan`` suggests the smallest N that fits.

**Which layers: the first N** (closest to the embedding). Backward visits the layers from the last to the
first, so the layers that keep their activations are back-propagated first and free them before the
first checkpointed layer is recomputed: the recompute never overlaps the kept activations. Checkpointing
the last N (or N spread out) would recompute a layer while the earlier layers' activations are still
held, adding a whole layer's activations to the peak. With the first N, any ``0 < N < num_layers`` even
peaks lower than ``N = num_layers`` in the layer-backward phase
(:func:`longlora_tune.plan.activations.activation_bytes`).

The wrapping is torchtune's (``training.set_activation_checkpointing``: torch's non-reentrant
``checkpoint_wrapper``, given the recompute context of :func:`is_recomputing`), applied to the chosen
``TransformerSelfAttentionLayer`` modules only. Order in a
recipe, as for all layers: trainable parameters, ``compile`` (layers compiled in place, the wrapper then
wraps the compiled layer), activation checkpointing, fp32 master copies, FSDP2 (``fully_shard`` finds the
layers inside their wrappers by torchtune's shard conditions), then the weights (QLoRA's NF4 weights
included). Context parallelism needs nothing more: every rank checkpoints the same layers, so the halo
exchange that a recomputed layer repeats in backward is repeated on all ranks.

**What a recompute may skip.** A recompute reruns the layer only to rebuild the tensors its backward needs;
its outputs are discarded, and non-reentrant checkpointing stops it right after the last saved tensor is
rebuilt. :func:`is_recomputing` says when such a rerun is under way, so a computation that saves its input
before its own work and is the layer's last saving op (the tiled MLP block of
``longlora_tune.training.sequence_tiling``) can return an unfilled output instead of repeating that work.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Union

from torch import nn

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.training.auto_settings import ALL_LAYERS, parse_checkpoint_layers

__all__ = [
    "apply_activation_checkpointing",
    "checkpoint_layer_count",
    "decoder_layers",
    "is_recomputing",
]

LayerSetting = Union[int, str, None]

_KEY = "activation_checkpointing_layers"

# Set in the thread that reruns a checkpointed layer, for the duration of the rerun.
_RECOMPUTING = contextvars.ContextVar("longlora_recomputing", default=False)


def is_recomputing() -> bool:
    """Whether a layer wrapped by :func:`apply_activation_checkpointing` is being recomputed right now.

    Returns:
        True inside the backward-time rerun of a checkpointed layer, whose outputs are discarded.
    """
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # torch.utils.checkpoint's context_fn: nothing around the forward, the flag around the recompute.
    return contextlib.nullcontext(), _recomputation()


def checkpoint_layer_count(setting: LayerSetting, num_layers: int) -> int:
    """The number of decoder layers to checkpoint for an ``activation_checkpointing_layers`` value.

    Args:
        setting: ``"all"`` or None (every layer), or an int in ``[0, num_layers]`` (``"auto"`` resolved).
        num_layers: Decoder layers of the model.

    Returns:
        The count N (the first N layers are checkpointed).

    Raises:
        LongLoRAConfigError: If ``setting`` is not accepted by :func:`parse_checkpoint_layers` (``"auto"``
            included) or is more than ``num_layers``.
    """
    count = parse_checkpoint_layers(setting, allow_auto=False)
    if count is None:
        return num_layers
    if count > num_layers:
        raise LongLoRAConfigError(
            f"{_KEY}={count} is more than the model's {num_layers} decoder layers; "
            f"use at most {num_layers} or 'all'"
        )
    return count


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's torchtune decoder layers in forward order (``TransformerDecoder.layers``' order).

    Args:
        model: A torchtune decoder (possibly compiled, not yet checkpointed).

    Returns:
        Its ``TransformerSelfAttentionLayer`` modules.
    """
    from torchtune.modules import TransformerSelfAttentionLayer

    return [m for m in model.modules() if isinstance(m, TransformerSelfAttentionLayer)]


def apply_activation_checkpointing(model: nn.Module, layers: LayerSetting = ALL_LAYERS) -> int:
    """Wrap the first N decoder layers of ``model`` in torchtune's (non-reentrant) activation checkpointing.

    Call it after ``compile`` and before FSDP2 sharding, as the recipe does (see the module docstring).

    Args:
        model: A torchtune decoder whose layers are not wrapped yet.
        layers: ``"all"``/None or the number N of layers to checkpoint (0 wraps nothing).

    Returns:
        N, the number of layers wrapped.

    Raises:
        LongLoRAConfigError: On a bad ``layers`` value (see :func:`checkpoint_layer_count`) or a model without
            torchtune decoder layers when some are asked for.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from torchtune import training

    found = decoder_layers(model)
    if not found and layers != 0:
        parse_checkpoint_layers(layers, allow_auto=False)  # a bad value is reported as such first
        raise LongLoRAConfigError(
            f"activation checkpointing: {type(model).__name__} has no torchtune "
            "TransformerSelfAttentionLayer; set enable_activation_checkpointing=false"
        )
    count = checkpoint_layer_count(layers, len(found))
    if count == 0:
        return 0
    # Identity, not type: only the chosen layer objects are wrapped.
    chosen = {id(m) for m in found[:count]}
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in chosen)
    # torchtune's default wrapper (non-reentrant) with the recompute flag of is_recomputing.
    wrapper = functools.partial(checkpoint_wrapper, context_fn=_checkpoint_contexts)
    training.set_activation_checkpointing(model, auto_wrap_policy=policy, checkpoint_wrapper_fn=wrapper)
    return count
