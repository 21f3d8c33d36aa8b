"""Build the evaluation model: full attention, RoPE factor from the training length, weights from disk.

Two layouts are supported:

* a merged Hugging Face checkpoint (``<output_dir>/hf`` of our training recipe, or any Llama 2 HF
  folder): torchtune's ``llama2`` component with :func:`~longlora_tune.models.apply_longlora`
  (``use_full_attn=True``) and the checkpoint's weights;
* a base HF checkpoint plus our unmerged ``adapter/`` folder: ``longlora_llama2`` built with the
  adapter's ``longlora.json`` keyword arguments, the base weights (``strict=False``: LoRA weights are not in
  the base), then ``adapter/trainable.safetensors`` (LoRA + embeddings + norms).

RoPE factor rule (REFERENCE §3: evaluation takes the factor from the TRAINING length, never from the
evaluation length): an explicit ``rope_scaling_factor`` wins; else ``training_length`` gives
``position_interpolation_factor(training_length, max_position_embeddings, existing_factor)``; else the
adapter's recorded factor; else the checkpoint's own ``rope_scaling`` (1 when it has none).

Also here: device/dtype resolution and the optional ``torch.distributed`` set-up the eval recipes share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torchtune import config as tt_config
from torchtune import training
from torchtune.models.llama2 import llama2

from longlora_tune.checkpointing import (
    TRAINABLE_FILE,
    llama2_kwargs_from_hf_config,
    load_hf_model_state,
    load_trainable_state,
    read_hf_config,
)
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import apply_longlora
from longlora_tune.modules.position_interpolation import check_rope_factor, position_interpolation_factor
from longlora_tune.modules.s2_attention import S2AttentionConfig

__all__ = [
    "close_eval_runtime",
    "eval_model_from_config",
    "eval_rope_factor",
    "eval_runtime",
    "init_distributed",
    "load_eval_model",
    "resolve_device",
    "resolve_dtype",
    "tokenizer_from_config",
]

# Arguments of torchtune's llama2() component builder that a Hugging Face config determines.
_LLAMA2_ARGS = (
    "vocab_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "embed_dim",
    "intermediate_dim",
    "norm_eps",
    "rope_base",
)
# S² is never used at evaluation; a fixed, always-valid group size avoids ratio checks against whatever
# max_seq_len the evaluation needs.
_FULL_ATTENTION = S2AttentionConfig(group_size=2, group_size_ratio=None, use_full_attn=True)
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(device: str | None = None) -> torch.device:
    """The evaluation device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None/``"auto"`` (CUDA when available). Under torchrun
            a bare ``"cuda"`` becomes ``cuda:$LOCAL_RANK``.

    Returns:
        The device.

    Raises:
        LongLoRAConfigError: if CUDA is requested but not available, or the name is invalid.
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LongLoRAConfigError(
            f"device={device!r} is not a valid device name (use cpu, cuda or auto)"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LongLoRAConfigError(f"device={device!r} but CUDA is not available; set device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The model dtype.

    Args:
        dtype: ``bf16``, ``fp16``, ``fp32`` (or the long names); None means bf16 on CUDA, fp32 on CPU.
        device: the evaluation device.

    Returns:
        The torch dtype.

    Raises:
        LongLoRAConfigError: for an unknown name.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise LongLoRAConfigError(f"dtype={dtype!r} is not supported; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun; do nothing in a plain single process.

    Args:
        device: this rank's device (selects nccl for CUDA, gloo for CPU).

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` without torchrun.
    """
    if not training.is_distributed():
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def eval_rope_factor(
    hf_config: dict[str, Any],
    *,
    training_length: int | None = None,
    rope_scaling_factor: float | None = None,
    adapter_factor: float | None = None,
) -> float:
    """RoPE linear factor for evaluation, from the training length (never the evaluation length).

    Args:
        hf_config: the checkpoint's ``config.json``.
        training_length: the context length the model was trained at (e.g. 100000 -> factor 25 for a
            4096-token base).
        rope_scaling_factor: an explicit factor; overrides everything else.
        adapter_factor: the factor recorded in an unmerged adapter's ``longlora.json``.

    Returns:
        The factor (>= 1).

    Raises:
        LongLoRAConfigError: if both ``training_length`` and ``rope_scaling_factor`` are given, or a value
            is invalid.
    """
    if training_length is not None and rope_scaling_factor is not None:
        raise LongLoRAConfigError(
            f"give either training_length={training_length} or rope_scaling_factor={rope_scaling_factor}, "
            "not both (the factor follows from the training length)"
        )
    arch = llama2_kwargs_from_hf_config(hf_config)
    existing = arch["existing_rope_scaling_factor"]
    try:
        if rope_scaling_factor is not None:
            return check_rope_factor(rope_scaling_factor, "rope_scaling_factor")
        if training_length is not None:
            return position_interpolation_factor(
                int(training_length), arch["original_max_seq_len"], existing_factor=existing
            )
    except ValueError as e:
        raise LongLoRAConfigError(str(e)) from e
    if adapter_factor is not None:
        return float(adapter_factor)
    return existing


def _read_adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "longlora.json"
    if not path.is_file():
        raise LongLoRAConfigError(
            f"adapter_dir={str(adapter_dir)!r} has no longlora.json; point it at the adapter/ folder a "
            "longlora_distributed run writes"
        )
    meta = json.loads(path.read_text())
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("model"), dict)
        or "_component_" not in meta["model"]
    ):
        raise LongLoRAConfigError(
            f"{path} has no 'model' entry with a _component_ (not a longlora.json export)"
        )
    return meta


def load_eval_model(
    checkpoint_dir: str | Path | None,
    *,
    max_seq_len: int,
    adapter_dir: str | Path | None = None,
    training_length: int | None = None,
    rope_scaling_factor: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a full-attention evaluation model and load its weights.

    Args:
        checkpoint_dir: Hugging Face Llama checkpoint folder (merged training output, or the base model
            when ``adapter_dir`` is given; None then means the adapter's recorded base checkpoint).
        max_seq_len: longest sequence the evaluation runs (prompt + generated tokens); sizes the RoPE cache.
        adapter_dir: optional unmerged ``adapter/`` folder (``longlora.json`` + ``trainable.safetensors``);
            the model is rebuilt from ``longlora.json``'s ``model`` entry.
        training_length: context length the model was trained at (sets the RoPE factor).
        rope_scaling_factor: explicit RoPE factor (instead of ``training_length``).
        device: device to build the model on.
        dtype: parameter dtype.

    Returns:
        ``(model, info)``: the model in eval mode, and a dict with ``rope_scaling_factor``,
        ``checkpoint_dir``, ``adapter_dir`` and ``max_seq_len`` for the results file.

    Raises:
        LongLoRAConfigError: for missing files or inconsistent settings.
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise LongLoRAConfigError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    device = torch.device(device)
    meta = None
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        meta = _read_adapter_meta(adapter_dir)
        if checkpoint_dir is None:
            checkpoint_dir = meta.get("base_checkpoint_dir")
    if checkpoint_dir is None:
        raise LongLoRAConfigError(
            "checkpoint_dir is not set; point it at a Hugging Face Llama checkpoint folder"
        )
    checkpoint_dir = Path(checkpoint_dir)
    hf_config = read_hf_config(checkpoint_dir)
    arch = llama2_kwargs_from_hf_config(hf_config)
    weights = load_hf_model_state(checkpoint_dir, dtype=dtype)

    if meta is None:
        factor = eval_rope_factor(
            hf_config, training_length=training_length, rope_scaling_factor=rope_scaling_factor
        )
        with training.set_default_dtype(dtype), device:
            model = llama2(**{k: arch[k] for k in _LLAMA2_ARGS}, max_seq_len=max_seq_len)
            apply_longlora(model, s2=_FULL_ATTENTION, rope_scaling_factor=factor)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise LongLoRAConfigError(
                f"checkpoint {checkpoint_dir} does not match its config.json: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}"
            )
    else:
        trainable = adapter_dir / TRAINABLE_FILE
        if not trainable.is_file():
            raise LongLoRAConfigError(f"adapter_dir={str(adapter_dir)!r} has no {TRAINABLE_FILE}")
        factor = eval_rope_factor(
            hf_config,
            training_length=training_length,
            rope_scaling_factor=rope_scaling_factor,
            adapter_factor=meta.get("rope_scaling_factor"),
        )
        # The trained architecture, with full attention and this evaluation's length; S² settings are
        # irrelevant at evaluation, so a fixed valid group size replaces the trained one.
        overrides = dict(
            max_seq_len=max_seq_len,
            rope_scaling_factor=factor,
            use_full_attn=True,
            s2_group_size=2,
            s2_group_size_ratio=None,
            lora_dropout=0.0,
        )
        with training.set_default_dtype(dtype), device:
            model = tt_config.instantiate(OmegaConf.create(meta["model"]), **overrides)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise LongLoRAConfigError(
                f"base checkpoint {checkpoint_dir} has weights the adapter's model lacks: "
                f"{sorted(unexpected)[:4]}"
            )
        loaded = set(load_trainable_state(model, trainable))
        not_loaded = sorted(set(missing) - loaded)
        if not_loaded:
            raise LongLoRAConfigError(
                f"neither {checkpoint_dir} nor {trainable} holds {len(not_loaded)} weights "
                f"(first: {not_loaded[0]}); the adapter was trained on a different model"
            )
    model.eval()
    model.requires_grad_(False)
    info = {
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_dir": None if adapter_dir is None else str(adapter_dir),
        "rope_scaling_factor": factor,
        "max_seq_len": max_seq_len,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return model, info


def eval_runtime(cfg: Any) -> tuple[torch.device, torch.dtype, int, int]:
    """Device, dtype and ``(rank, world_size)`` from an eval config's ``device`` and ``dtype`` keys.

    Args:
        cfg: the recipe config (``device``: auto|cpu|cuda, ``dtype``: bf16|fp16|fp32|null).

    Returns:
        ``(device, dtype, rank, world_size)``; joins the process group under torchrun.
    """
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype"), device)
    rank, world_size = init_distributed(device)
    return device, dtype, rank, world_size


def close_eval_runtime() -> None:
    """Leave the process group :func:`eval_runtime` joined under torchrun; do nothing otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def eval_model_from_config(
    cfg: Any, *, max_seq_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_eval_model` with the config keys ``checkpoint_dir``, ``adapter_dir``, ``training_length``
    and ``rope_scaling_factor``.

    Args:
        cfg: the recipe config.
        max_seq_len: longest sequence the evaluation runs.
        device: model device.
        dtype: model dtype.

    Returns:
        ``(model, info)`` as :func:`load_eval_model`.

    Raises:
        LongLoRAConfigError: if ``checkpoint_dir`` is not set, or as :func:`load_eval_model`.
    """
    return load_eval_model(
        cfg.get("checkpoint_dir"),
        max_seq_len=max_seq_len,
        adapter_dir=cfg.get("adapter_dir"),
        training_length=cfg.get("training_length"),
        rope_scaling_factor=cfg.get("rope_scaling_factor"),
        device=device,
        dtype=dtype,
    )


def tokenizer_from_config(cfg: Any) -> Any:
    """Instantiate ``cfg.tokenizer`` (a torchtune tokenizer component), checking its file first.

    Args:
        cfg: the recipe config.

    Returns:
        The tokenizer, or None when the config has no ``tokenizer`` entry.

    Raises:
        LongLoRAConfigError: if the tokenizer file does not exist.
    """
    if not cfg.get("tokenizer"):
        return None
    path = cfg.tokenizer.get("path")
    if path is not None and not Path(path).is_file():
        raise LongLoRAConfigError(
            f"tokenizer.path={path!r} does not exist; point it at the model's tokenizer.model"
        )
    return tt_config.instantiate(cfg.tokenizer)
