"""``compile: true``: torch.compile each decoder layer and the loss, as torchtune 0.6.1's recipes do.

``compile: auto`` (the shipped configs') resolves at start-up to true wherever compiling is known to work
(:func:`compile_choice`).

torchtune compiles per layer (every ``TransformerSelfAttentionLayer`` gets ``module.compile()``, so all
layers share one compiled graph and compile time does not grow with depth) and compiles only the
upcast + cross-entropy of a chunked loss (the chunking stays eager). :func:`compile_model_and_loss` calls
those torchtune utilities and adds what LongLoRA needs around them:

* a one-line :class:`~longlora_tune.errors.LongLoRAConfigError` when this machine cannot compile
  (no Triton on CUDA, no C++ compiler on CPU) instead of a traceback at the first step;
* the compiled loss is *returned* (torchtune's recipe drops the return value, which silently leaves an
  unchunked loss eager);
* dynamo's recompile limit raised to the number of padded sequence lengths training can see. The S²
  pattern depends on the sequence length ``n`` (group boundaries are Python ints), so the layer graph is
  specialised per length: one compile per distinct padded length (``train_len / pad_to_multiple_of`` of
  them at most). Past the limit dynamo would silently run the remaining lengths eagerly.

S² attention compiles without graph breaks on the sdpa backend (both forms, with or without a dense
mask) and with full attention. The flash-attn kernel and the CUDA flex kernel run outside the graph
(``torch.compiler.disable``): one break around each kernel call, the rest of the layer stays compiled.

Order in a recipe (the same as torchtune's ``lora_finetune_distributed``): build the model, set the
trainable parameters, **compile**, then activation checkpointing, fp32 master copies, FSDP2 sharding and
loading the weights. ``compile()`` is lazy (nothing is traced before the first forward), so the later
wrapping, dtype casts and ``to_empty`` are all seen by the first trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from longlora_tune.data.loader import pad_multiple
from longlora_tune.errors import LongLoRAConfigError

__all__ = [
    "AUTO_COMPILE_MAX_LENGTHS",
    "DEFAULT_BACKEND",
    "check_compile_supported",
    "compile_choice",
    "compile_model_and_loss",
    "padded_lengths",
]

log = logging.getLogger(__name__)

#: torchtune's default; its utilities read the backend from ``TORCH_COMPILE_BACKEND``.
DEFAULT_BACKEND = "inductor"

#: ``compile: auto`` stays eager when training can see more padded lengths than this (S² at G = N/4 pads
#: to at most 4; a small ``pad_to_multiple_of`` for SFT can give hundreds, each a compile).
AUTO_COMPILE_MAX_LENGTHS = 8


def _backend() -> str:
    return os.environ.get("TORCH_COMPILE_BACKEND", DEFAULT_BACKEND)


def _why_not_compilable(device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` with the configured backend cannot run on ``device``; None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if _backend() != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton on CUDA (pip install the triton matching torch)"
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as e:  # inductor raises its own error types when no compiler is found
            return f"torch.compile on CPU needs a C++ compiler for inductor ({e}); install g++"
    return None


def check_compile_supported(device: torch.device) -> None:
    """Raise a one-line error when ``torch.compile`` with the configured backend cannot run here.

    Args:
        device: the training device.

    Raises:
        LongLoRAConfigError: when dynamo does not support this Python, or inductor lacks Triton (CUDA) or
            a C++ compiler (CPU).
    """
    why = _why_not_compilable(device)
    if why is not None:
        raise LongLoRAConfigError(f"compile=true: {why}; set compile=false")


def padded_lengths(
    pad_to_multiple_of: Optional[int], group_size: Optional[int], train_len: int
) -> Optional[int]:
    """How many distinct padded sequence lengths training can feed the model: one compile each.

    Args:
        pad_to_multiple_of: the config's ``pad_to_multiple_of`` (None = the S² group size).
        group_size: the model's S² group size (None with full attention).
        train_len: the training length (0 when unknown).

    Returns:
        ``train_len / multiple``, or None when lengths are not rounded (or the training length is unknown).
    """
    multiple = pad_multiple(pad_to_multiple_of, group_size, 0)
    return train_len // multiple if multiple and train_len else None


def compile_choice(
    device: torch.device,
    *,
    context_parallel_degree: int,
    activation_offloading: bool,
    lengths: Optional[int] = None,
) -> tuple[bool, str]:
    """What ``compile: auto`` resolves to for a run, and why.

    Compiled layers are faster and keep less (inductor fuses the element-wise work around the matmuls and
    frees its intermediates), and a training run amortises the compile of its first step many times over,
    so ``auto`` compiles wherever that is known to work: not with context parallelism (the halo exchange
    is not traced), not with activation offloading (its saved-tensor hooks around compiled layers are
    unchecked), not where this machine cannot compile, and not when training can see more than
    :data:`AUTO_COMPILE_MAX_LENGTHS` padded lengths (each would compile: minutes apiece).

    Args:
        device: the training device.
        context_parallel_degree: the run's ``context_parallel_degree``.
        activation_offloading: whether activation offloading is on (after its own ``auto`` choice).
        lengths: the distinct padded lengths training can see (:func:`padded_lengths`; None = unknown).

    Returns:
        Whether to compile, and the reason for the log line.
    """
    if context_parallel_degree > 1:
        return False, f"context_parallel_degree={context_parallel_degree}: the halo exchange is not traced"
    if activation_offloading:
        return False, "activation offloading is on: its hooks are not checked around compiled layers"
    if lengths is not None and lengths > AUTO_COMPILE_MAX_LENGTHS:
        return False, (
            f"{lengths} padded sequence lengths would each compile (more than {AUTO_COMPILE_MAX_LENGTHS}); "
            "a larger pad_to_multiple_of gives fewer"
        )
    why = _why_not_compilable(device)
    if why is not None:
        return False, why
    return True, f"{_backend()} compiles on {device.type}; the first step of each sequence length compiles"


def compile_model_and_loss(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    *,
    device: torch.device,
    max_lengths: Optional[int] = None,
    verbose: bool = True,
) -> Any:
    """Compile every decoder layer of ``model`` in place and return the compiled loss.

    Call it after the trainable parameters are set and before activation checkpointing and FSDP2
    sharding (see the module docstring). The backend is ``TORCH_COMPILE_BACKEND`` (default inductor), as
    in torchtune.

    Args:
        model: a torchtune ``TransformerDecoder`` (e.g. from ``longlora_llama2``).
        loss_fn: the loss; a ``CEWithChunkedOutputLoss`` gets its cross-entropy compiled in place, any
            other loss is wrapped whole.
        device: the training device (to check that compiling can work there).
        max_lengths: how many distinct padded sequence lengths training will feed the model (e.g.
            ``train_len // pad_to_multiple_of``); raises dynamo's recompile limit to leave room for one
            graph per length. None keeps the limit.
        verbose: log what is compiled (pass ``is_rank_zero``).

    Returns:
        The loss to use from now on (the same object for a chunked loss, a compiled wrapper otherwise;
        attributes such as ``ignore_index`` read through).

    Raises:
        LongLoRAConfigError: when compiling cannot work on this machine, or the model has no decoder
            layer to compile.
    """
    from torchtune import modules, training

    check_compile_supported(device)
    layers = [m for m in model.modules() if isinstance(m, modules.TransformerSelfAttentionLayer)]
    if not layers:
        raise LongLoRAConfigError(
            f"compile=true: {type(model).__name__} has no torchtune TransformerSelfAttentionLayer to "
            "compile; set compile=false"
        )
    if max_lengths is not None:
        # +2: the first trace and an eval-mode graph (S² off) besides one graph per training length.
        limit = int(max_lengths) + 2
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
    training.compile_model(model, verbose=verbose)
    compiled_loss = training.compile_loss(loss_fn, verbose=verbose)
    if verbose:
        log.info(
            f"torch.compile ({_backend()}): {len(layers)} decoder layers and the loss; the first step of "
            "each sequence length compiles"
        )
    return compiled_loss
