"""The LongLoRA trainable set (LoRA+) and the file it is saved in.

LongLoRA trains LoRA on the attention projections *and* unfreezes the token embedding and all
normalisation scales; without them long-context perplexity is much worse (paper Table 2). The LM head
stays frozen. This module is the one place that decides which parameters that is: the recipe uses it to
set ``requires_grad``, build the optimizer, save/resume, and the exports (``hf/``, ``peft/``, ``adapter/``)
to write them. The trained tensors travel in one safetensors file in torchtune names
(:data:`TRAINABLE_FILE`), read by resume, the adapter export and the evaluation loader alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtune.modules import RMSNorm
from torchtune.modules.peft import get_adapter_params

from longlora_tune._io import atomic_path
from longlora_tune.errors import LongLoRAConfigError

__all__ = [
    "TRAINABLE_EXTRAS",
    "TRAINABLE_FILE",
    "check_state_fits",
    "load_trainable_state",
    "read_trainable_state",
    "save_trainable_state",
    "set_trainable_params",
    "trainable_param_names",
    "trainable_state_dict",
    "unwrapped_name",
]

log = logging.getLogger(__name__)

#: The trained tensors of a checkpoint or an ``adapter/`` export (torchtune names).
TRAINABLE_FILE = "trainable.safetensors"

#: The non-LoRA groups LongLoRA can train (all of them by default: LoRA+).
TRAINABLE_EXTRAS = ("embed", "norm")

_NORM_TYPES = (RMSNorm, nn.RMSNorm, nn.LayerNorm)
# Wrappers (activation checkpointing, torch.compile, FSDP1) insert these into parameter names; state dicts
# gathered by torch.distributed.checkpoint do not have them, so names are compared without them.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_LORA_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".magnitude")
# torchtune names of the same modules, for state dicts (no module types available): the token embedding
# and the ``scale`` of any ``*norm`` module (sa_norm, mlp_norm, the final norm).
_EMBED_KEY = "tok_embeddings.weight"
_NORM_KEY = re.compile(r"(?:^|\.)[A-Za-z_]*norm\.scale$")


def unwrapped_name(name: str) -> str:
    """A parameter name without activation-checkpointing / compile / FSDP1 wrapper parts (as in a gathered
    state dict)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _check_extras(extras: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extras, str):
        raise ValueError(f"extras must be a list such as ['embed', 'norm'], not the string {extras!r}")
    extras = tuple(extras)
    unknown = [e for e in extras if e not in TRAINABLE_EXTRAS]
    if unknown:
        raise ValueError(
            f"Unknown trainable extras {unknown}; choose from {list(TRAINABLE_EXTRAS)} (or [] for LoRA only)"
        )
    return extras


def _groups(model: nn.Module, extras: tuple[str, ...]) -> dict[str, set[str]]:
    """Trainable parameter names of ``model`` per group: lora, embed, norm (empty when not selected)."""
    groups: dict[str, set[str]] = {"lora": {unwrapped_name(n) for n in get_adapter_params(model)}}
    embed: set[str] = set()
    norm: set[str] = set()
    for name, module in model.named_modules():
        if (
            "embed" in extras
            and isinstance(module, nn.Embedding)
            and name.rsplit(".", 1)[-1] == "tok_embeddings"
        ):
            embed.update(unwrapped_name(f"{name}.{p}") for p, _ in module.named_parameters(recurse=False))
        if "norm" in extras and isinstance(module, _NORM_TYPES):
            norm.update(
                unwrapped_name(f"{name}.{p}" if name else p)
                for p, _ in module.named_parameters(recurse=False)
            )
    if "embed" in extras and not embed:
        raise ValueError(
            f"extras has 'embed' but {type(model).__name__} has no nn.Embedding named tok_embeddings; "
            "use extras without 'embed' for this model"
        )
    if "norm" in extras and not norm:
        raise ValueError(f"extras has 'norm' but {type(model).__name__} has no RMSNorm/LayerNorm modules")
    groups["embed"] = embed
    groups["norm"] = norm
    return groups


def trainable_param_names(model: nn.Module, extras: Iterable[str] = TRAINABLE_EXTRAS) -> set[str]:
    """Names of the parameters LongLoRA trains in ``model``: the single source of truth.

    Selected by module type, not by name matching: LoRA/DoRA adapter parameters (torchtune's
    ``adapter_params``), plus with ``"embed"`` the weight of the ``nn.Embedding`` named ``tok_embeddings``,
    plus with ``"norm"`` the parameters of every ``RMSNorm``/``LayerNorm`` (each layer's ``sa_norm`` and
    ``mlp_norm`` and the final ``norm``). The LM head ``output`` is never included (unless it carries LoRA,
    whose adapter weights are LoRA). Names are given without activation-checkpointing/compile wrapper
    prefixes, i.e. as in a gathered state dict.

    Args:
        model: A torchtune decoder with LoRA layers (any device, including meta).
        extras: Subset of ``("embed", "norm")``; ``()`` trains LoRA only (the paper's ablation).

    Returns:
        The parameter names.

    Raises:
        ValueError: On an unknown extra, or an extra the model does not have.
    """
    groups = _groups(model, _check_extras(extras))
    return groups["lora"] | groups["embed"] | groups["norm"]


def set_trainable_params(model: nn.Module, extras: Iterable[str] = TRAINABLE_EXTRAS) -> dict[str, int]:
    """Set ``requires_grad`` on exactly the LongLoRA trainable set and freeze everything else.

    Args:
        model: A torchtune decoder with LoRA layers.
        extras: Subset of ``("embed", "norm")`` (see :func:`trainable_param_names`).

    Returns:
        Parameter counts (elements): ``lora``, ``embed``, ``norm``, ``total_trainable``, ``total``.
        For Llama 2 7B with the defaults: 8,388,608 + 131,072,000 + 266,240 = 139,726,848 of 6.75B.

    Raises:
        ValueError: On an unknown extra, or an extra the model does not have.
    """
    groups = _groups(model, _check_extras(extras))
    names = groups["lora"] | groups["embed"] | groups["norm"]
    counts = dict.fromkeys(("lora", "embed", "norm", "total_trainable", "total"), 0)
    for name, param in model.named_parameters():
        name = unwrapped_name(name)
        trainable = name in names
        param.requires_grad_(trainable)
        counts["total"] += param.numel()
        if trainable:
            counts["total_trainable"] += param.numel()
            for group in ("lora", "embed", "norm"):
                if name in groups[group]:
                    counts[group] += param.numel()
    log.info(
        "Trainable parameters: LoRA %s + embedding %s + norms %s = %s of %s (%.2f%%)",
        f"{counts['lora']:,}",
        f"{counts['embed']:,}",
        f"{counts['norm']:,}",
        f"{counts['total_trainable']:,}",
        f"{counts['total']:,}",
        100.0 * counts["total_trainable"] / max(counts["total"], 1),
    )
    return counts


def trainable_state_dict(model: nn.Module, extras: Iterable[str] = TRAINABLE_EXTRAS) -> dict[str, Any]:
    """The trainable subset of a model, nothing dropped: the tensors :func:`trainable_param_names` names.

    Values are the detached parameters (DTensors stay DTensors under FSDP2: gather before saving).

    Args:
        model: A torchtune decoder with LoRA layers.
        extras: Subset of ``("embed", "norm")``.

    Returns:
        ``{torchtune name: tensor}`` for LoRA + the selected extras, keys without wrapper prefixes.

    Raises:
        ValueError: On an unknown extra, or an extra the model does not have.
    """
    names = trainable_param_names(model, _check_extras(extras))
    return {unwrapped_name(n): p.detach() for n, p in model.named_parameters() if unwrapped_name(n) in names}


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


def save_trainable_state(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write trainable tensors (torchtune names) to a safetensors file, atomically.

    Args:
        state_dict: parameter name -> full (unsharded) tensor.
        path: output ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "names": "torchtune"})


def read_trainable_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_trainable_state`.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        Parameter name -> tensor (CPU).

    Raises:
        LongLoRAConfigError: if the file is missing.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LongLoRAConfigError(f"trainable state not found: {path}")
    return load_file(str(path))


def load_trainable_state(model: nn.Module, path: str | Path) -> list[str]:
    """Load trainable tensors from a file into a plain or FSDP2-sharded model; other weights stay as they are.

    On a sharded model every rank must call this (each reads the file and keeps its shard).

    Args:
        model: the model (torchtune names).
        path: file written by :func:`save_trainable_state`.

    Returns:
        The loaded parameter names.

    Raises:
        LongLoRAConfigError: if the file holds names the model does not have or tensors of the wrong shape.
    """
    sd = read_trainable_state(path)
    params = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    check_state_fits(sd, shapes, source=str(path), fix="it was saved from a different model config")
    if any(hasattr(p, "device_mesh") for p in params.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = {k: v.to(params[k].dtype) for k, v in sd.items()}
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for name, tensor in sd.items():
                params[name].copy_(tensor)
    return sorted(sd)
