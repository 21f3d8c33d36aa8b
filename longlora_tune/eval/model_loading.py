"""Build the evaluation model: full attention, RoPE factor from the training length, weights from disk.

Two layouts are supported:

* a merged Hugging Face checkpoint (``<output_dir>/hf`` of our training recipe, or any supported HF
  folder): the family's torchtune component (its record's ``base_builder``, the family picked from
  ``config.json`` by :mod:`longlora_tune.models.families`) with :func:`~longlora_tune.models.apply_longlora`
  (full attention) and the checkpoint's weights. The RoPE is the checkpoint's own method and factor
  (linear, yarn or llama3, exactly as its ``config.json`` states them);
* a base HF checkpoint plus our unmerged ``adapter/`` folder: the LongLoRA builder named in the
  adapter's ``longlora.json`` with its keyword arguments (including the trained ``rope_scaling``) over the
  base folder's RoPE facts, the base weights (``strict=False``: LoRA weights are not in the base), then
  ``adapter/trainable.safetensors`` (LoRA + embeddings + norms).

RoPE factor rule: evaluation uses the factor the model was TRAINED with, never one derived from the
evaluation length. An explicit ``rope_scaling_factor`` wins; otherwise the checkpoint's own factor (the
merged ``config.json``'s ``rope_scaling``, or the adapter's ``longlora.json``); ``training_length`` only
supplies ``ceil(training_length / max_position_embeddings)`` when the checkpoint records no factor, and a
disagreement between the two is a warning naming both.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torchtune import config as tt_config
from torchtune import training

from longlora_tune._compat import import_object
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models import apply_longlora
from longlora_tune.models.families import trusted_builder
from longlora_tune.models.trainable import TRAINABLE_FILE, load_trainable_state
from longlora_tune.modules.position_interpolation import check_rope_factor, position_interpolation_factor
from longlora_tune.modules.rope_config import RopeScaling, rope_for_training
from longlora_tune.training.distributed import (
    close_process_group,
    init_process_group,
    rank_and_world_size,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "checkpoint_tokenizer",
    "close_eval_runtime",
    "eval_model_from_config",
    "eval_rope_factor",
    "eval_runtime",
    "load_eval_model",
    "tokenizer_from_config",
]

log = logging.getLogger(__name__)


def eval_rope_factor(
    base: HFBaseModel,
    *,
    training_length: int | None = None,
    rope_scaling_factor: float | None = None,
    checkpoint_factor: float | None = None,
) -> float:
    """RoPE linear factor for evaluation: the one the model was trained with.

    Args:
        base: the checkpoint the weights come from (its ``rope_scaling`` and ``max_position_embeddings``).
        training_length: the context length the model was trained at; supplies
            ``ceil(training_length / max_position_embeddings)`` only when the checkpoint records no factor.
        rope_scaling_factor: an explicit factor; overrides everything else.
        checkpoint_factor: the factor recorded with unmerged weights (``longlora.json``); None to use the
            checkpoint's own ``rope_scaling``.

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
    try:
        if rope_scaling_factor is not None:
            return check_rope_factor(rope_scaling_factor, "rope_scaling_factor")
        recorded = checkpoint_factor if checkpoint_factor is not None else base.rope_scaling_factor
        has_record = checkpoint_factor is not None or recorded != 1.0
        if training_length is None:
            return float(recorded)
        derived = position_interpolation_factor(
            int(training_length), base.original_max_seq_len, existing_factor=base.rope_scaling_factor
        )
    except ValueError as e:
        raise LongLoRAConfigError(str(e)) from e
    if not has_record:
        return derived
    if derived != recorded:
        log.warning(
            "RoPE factor: the checkpoint was trained with factor %g, training_length=%d would give %g; "
            "using the checkpoint's %g (set rope_scaling_factor to override)",
            recorded,
            int(training_length),
            derived,
            recorded,
        )
    return float(recorded)


def _uses_linear_path(base: HFBaseModel) -> bool:
    """A family on LongLoRA's linear path (Llama 2) with linear or no RoPE scaling: the original loader,
    factor rule and modules, unchanged."""
    return base.family.linear_rope_path and base.rope.rope_type in ("default", "linear")


def eval_rope(
    base: HFBaseModel, *, training_length: int | None = None, rope_scaling_factor: float | None = None
) -> RopeScaling:
    """The full RoPE setting for evaluating a merged checkpoint: the one its ``config.json`` states.

    A scaled checkpoint records what it was trained with, which wins (a ``training_length`` longer than
    the context it serves is a warning naming both). An unscaled one evaluated for a ``training_length``
    gets the family's default extension of that length (what training used); ``rope_scaling_factor`` pins
    the factor of the checkpoint's (or the family's default) method.

    Args:
        base: the checkpoint.
        training_length: the context the model was trained at.
        rope_scaling_factor: an explicit factor.

    Returns:
        The setting.

    Raises:
        LongLoRAConfigError: if both are given, or for an inexpressible combination.
    """
    if training_length is not None and rope_scaling_factor is not None:
        raise LongLoRAConfigError(
            f"give either training_length={training_length} or rope_scaling_factor={rope_scaling_factor}, "
            "not both (the factor follows from the training length)"
        )
    rope, default_type = base.rope, base.family.default_rope_type
    if rope_scaling_factor is not None:
        method = rope.rope_type if rope.rope_type != "default" else default_type
        request = {"type": method, "factor": rope_scaling_factor}
        return rope_for_training(rope, rope.context_len, request=request)
    if training_length is not None and rope.rope_type == "default":
        return rope_for_training(rope, int(training_length), default_type=default_type)
    if training_length is not None and int(training_length) > rope.context_len:
        log.warning(
            "RoPE: the checkpoint's %s setting (factor %g) serves %d tokens, less than training_length=%d; "
            "using the checkpoint's setting (set rope_scaling_factor to override)",
            rope.rope_type,
            rope.factor,
            rope.context_len,
            int(training_length),
        )
    return rope


def _read_adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    """``longlora.json``, checked as data: our builder, plain values, arguments the builder takes."""
    path = adapter_dir / "longlora.json"
    if not path.is_file():
        raise LongLoRAConfigError(
            f"adapter_dir={str(adapter_dir)!r} has no longlora.json; point it at the adapter/ folder a "
            "longlora_distributed run writes"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LongLoRAConfigError(f"{path} is not valid JSON ({e})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("model"), dict)
        or "_component_" not in meta["model"]
    ):
        raise LongLoRAConfigError(
            f"{path} has no 'model' entry with a _component_ (not a longlora.json export)"
        )
    builder = trusted_builder(meta["model"]["_component_"], f"{path}: model._component_")
    params = inspect.signature(builder).parameters
    for key, value in meta["model"].items():
        if key == "_component_":
            continue
        if key not in params:
            raise LongLoRAConfigError(
                f"{path}: model.{key} is not an argument of {meta['model']['_component_']}; "
                "the file was not written by longlora_tune"
            )
        _check_plain(value, f"{path}: model.{key}")
    for key in ("base_checkpoint_dir",):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise LongLoRAConfigError(f"{path}: {key}={meta[key]!r} must be a path string")
    return meta


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything but JSON scalars, lists and string-keyed mappings without components.

    A nested ``_component_`` would be instantiated and a ``${...}`` string resolved by OmegaConf; a
    recorded builder argument never needs either.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if "${" in value:
            raise LongLoRAConfigError(f"{where}={value!r} holds an interpolation; refusing it")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if k == "_component_":
                raise LongLoRAConfigError(f"{where} names a _component_; refusing to instantiate it")
            _check_plain(item, f"{where}.{k}")
        return
    raise LongLoRAConfigError(f"{where} has a value of type {type(value).__name__}; expected plain JSON")


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
    base = HFBaseModel.read(checkpoint_dir)
    weights = base.load_state_dict(dtype=dtype)

    rope = None
    if meta is None:
        if _uses_linear_path(base):
            factor = eval_rope_factor(
                base, training_length=training_length, rope_scaling_factor=rope_scaling_factor
            )
            rope_setting: dict[str, Any] = {"rope_scaling_factor": factor}
        else:
            rope = eval_rope(base, training_length=training_length, rope_scaling_factor=rope_scaling_factor)
            factor, rope_setting = rope.factor, {"rope": rope}
        builder = import_object(base.family.base_builder, "the family's base builder")
        with training.set_default_dtype(dtype), device:
            model = builder(**base.builder_kwargs, max_seq_len=max_seq_len)
            apply_longlora(model, s2=None, **rope_setting)
    if meta is None:
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
        if meta["model"].get("rope_scaling") is not None or not _uses_linear_path(base):
            # The recorded request rebuilds the trained setting; an explicit factor replaces its factor.
            if training_length is not None and rope_scaling_factor is not None:
                eval_rope_factor(
                    base, training_length=training_length, rope_scaling_factor=rope_scaling_factor
                )
            factor = float(rope_scaling_factor or meta.get("rope_scaling_factor") or 1.0)
            trained_at = meta.get("training_length")
            if training_length is not None and trained_at is not None and int(training_length) != trained_at:
                log.warning(
                    "RoPE: the adapter was trained at %d tokens with factor %g (longlora.json); "
                    "training_length=%d does not change that (set rope_scaling_factor to override)",
                    trained_at,
                    factor,
                    int(training_length),
                )
        else:
            factor = eval_rope_factor(
                base,
                training_length=training_length,
                rope_scaling_factor=rope_scaling_factor,
                checkpoint_factor=meta.get("rope_scaling_factor"),
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
        rope_facts = base.rope_kwargs_for(meta["model"]["_component_"])
        if rope_facts:
            # The base folder's RoPE facts, exactly as the training recipe passed them.
            overrides.update(rope_facts)
            if meta["model"].get("rope_scaling") is not None:
                overrides["rope_scaling"] = {**meta["model"]["rope_scaling"], "factor": factor}
        builder = trusted_builder(meta["model"]["_component_"], "longlora.json: model._component_")
        recorded = {k: v for k, v in meta["model"].items() if k != "_component_"}
        with training.set_default_dtype(dtype), device:
            model = builder(**{**recorded, **overrides})
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
    from longlora_tune.models.longlora import describe

    rope = describe(model).rope or rope
    info = {
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_dir": None if adapter_dir is None else str(adapter_dir),
        "rope_scaling_factor": factor,
        "rope_scaling": None if rope is None else rope.rope_entry(),
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
    init_process_group(device, solo_group=False)
    rank, world_size = rank_and_world_size()
    return device, dtype, rank, world_size


def close_eval_runtime() -> None:
    """Leave the process group :func:`eval_runtime` joined under torchrun; do nothing otherwise."""
    close_process_group()


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


def checkpoint_tokenizer(
    checkpoint: str | Path, *, path: str | None = None, path_hint: str = "set tokenizer.path"
) -> tuple[Any, str]:
    """The tokenizer a checkpoint folder ships, from its files (its family's, or its ``tokenizer.json``).

    Args:
        checkpoint: the Hugging Face checkpoint folder (``config.json`` and the files name the tokenizer,
            :meth:`longlora_tune.hf.base.HFBaseModel.tokenizer_config`).
        path: replaces the tokenizer's main file (``path``: ``tokenizer.model``, Llama 3's
            ``original/tokenizer.model``, Qwen's ``vocab.json``, ``tokenizer.json``).
        path_hint: how the caller's user replaces the main file, for the missing-file message.

    Returns:
        ``(tokenizer, family name)``.

    Raises:
        LongLoRAConfigError: for a missing ``config.json`` or tokenizer file (naming it and the fix).
    """
    base = HFBaseModel.read(checkpoint)
    section = base.tokenizer_config()
    if path:
        section["path"] = str(path)
    for arg, file in section.items():
        if arg != "_component_" and not Path(file).is_file():
            hint = f"{path_hint} /path/to/it" if arg == "path" else f"put it in {checkpoint}"
            raise LongLoRAConfigError(f"tokenizer file not found: {file} ({base.family.name} {arg}); {hint}")
    section.update(base.family.tokenizer_kwargs)  # Llama 2's prompt_template: null (our templates)
    return tt_config.instantiate(OmegaConf.create(section)), base.family.name


def tokenizer_from_config(cfg: Any) -> Any:
    """The tokenizer an eval config names, or else the one its checkpoint folder ships.

    ``tokenizer`` absent or null: :func:`checkpoint_tokenizer` of ``checkpoint_dir`` (the adapter's base
    folder when only ``adapter_dir`` is set), as ``generate`` does. A ``tokenizer`` section with a
    ``_component_`` is instantiated, its ``path`` checked first.

    Args:
        cfg: the recipe config.

    Returns:
        The tokenizer.

    Raises:
        LongLoRAConfigError: if the tokenizer file does not exist, or neither folder is set.
    """
    section = cfg.get("tokenizer")
    if not section:
        checkpoint = cfg.get("checkpoint_dir")
        if checkpoint is None and cfg.get("adapter_dir") is not None:
            checkpoint = _read_adapter_meta(Path(cfg.adapter_dir)).get("base_checkpoint_dir")
        if checkpoint is None:
            raise LongLoRAConfigError(
                "checkpoint_dir is not set; point it at a Hugging Face checkpoint folder (its tokenizer too)"
            )
        hint = "set tokenizer._component_ and tokenizer.path to"
        return checkpoint_tokenizer(checkpoint, path_hint=hint)[0]
    path = section.get("path")
    if path is not None and not Path(path).is_file():
        raise LongLoRAConfigError(
            f"tokenizer.path={path!r} does not exist; point it at the model's tokenizer file"
        )
    return tt_config.instantiate(section)
