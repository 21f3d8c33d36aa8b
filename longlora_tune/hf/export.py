"""Exports of a trained LongLoRA model.

Three formats, each written all-or-nothing with
:func:`~longlora_tune._io.atomic_directory`:

* ``hf/``: a merged Hugging Face checkpoint of the base's family (Llama, Mistral or Qwen2; LoRA folded into
  the weights, trained embeddings and norms included; every tokenizer, chat-template and generation file of
  the base beside them) whose ``config.json`` carries the trained RoPE
  method and factor (``rope_scaling = {"type": "linear", "factor": f}`` for LongLoRA's linear
  interpolation; ``yarn`` or ``llama3`` entries otherwise), so ``AutoModelForCausalLM.from_pretrained``
  reproduces the positions the model was trained with. A tied base stays tied
  (``tie_word_embeddings: true``, no ``lm_head.weight``): the trained embedding is also the head;
* ``peft/``: a PEFT LoRA adapter with the embeddings and norms as ``modules_to_save``
  (:func:`longlora_tune.hf.peft.save_peft_adapter`);
* ``adapter/``: the trainable tensors in torchtune names plus ``longlora.json`` (the model builder
  arguments, RoPE factor and S² group size), which our recipes load on top of the base model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from longlora_tune._io import atomic_directory, atomic_path, tensor_bytes
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.families import FAMILIES
from longlora_tune.models.longlora import LongLoRAModelInfo
from longlora_tune.models.trainable import TRAINABLE_FILE, save_trainable_state
from longlora_tune.modules.rope_config import RopeScaling

#: Files copied from the base checkpoint next to the merged weights.
TOKENIZER_FILES = tuple(
    dict.fromkeys(
        (
            # What each family's torchtune tokenizer reads (original/tokenizer.model for Llama 3, vocab.json
            # and merges.txt for Qwen2.5, tokenizer.json for hf_llama), so an export serves as a base folder
            # for eval and generation too.
            *(file for family in FAMILIES.values() for _, file in family.tokenizer_files),
            *(f.special_tokens_file for f in FAMILIES.values() if f.special_tokens_file),
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            # transformers 5 writes the chat template beside tokenizer_config.json (SmolLM2), not inside it.
            "chat_template.jinja",
            "generation_config.json",
        )
    )
)
#: Shard size of the merged safetensors files (Hugging Face's usual 5 GB).
MAX_SHARD_BYTES = 5 * 1024**3


def rope_scaling_entry(factor: float) -> dict[str, Any]:
    """The ``rope_scaling`` entry of a Hugging Face config for linear position interpolation.

    Both spellings of the type key are written (``type`` for transformers 4, ``rope_type`` for 5).

    Args:
        factor: the linear factor (>= 1).

    Returns:
        ``{"type": "linear", "rope_type": "linear", "factor": factor}``.
    """
    return {"type": "linear", "rope_type": "linear", "factor": float(factor)}


def rope_request(rope: RopeScaling) -> dict[str, Any]:
    """The builders' ``rope_scaling`` argument that reproduces ``rope`` over the same base checkpoint.

    Args:
        rope: the trained setting.

    Returns:
        ``{"type", "factor"}`` plus ``original_max_position_embeddings`` for yarn/llama3; unscaled RoPE is
        ``{"type": "linear", "factor": 1.0}`` (identical rotations).
    """
    if rope.rope_type == "default":
        return {"type": "linear", "factor": 1.0}
    request: dict[str, Any] = {"type": rope.rope_type, "factor": float(rope.factor)}
    if rope.rope_type in ("yarn", "llama3"):
        request["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return request


def merged_hf_config(
    base_config: Mapping[str, Any],
    rope_scaling_factor: float,
    dtype: torch.dtype,
    rope: Optional[RopeScaling] = None,
) -> dict:
    """The base model's ``config.json`` with the trained RoPE factor and the saved dtype.

    Args:
        base_config: the base checkpoint's parsed ``config.json``.
        rope_scaling_factor: the factor the model was trained with (linear; ignored when ``rope`` is given).
        dtype: dtype of the saved weights.
        rope: the full RoPE setting the model was trained with (yarn/llama3/linear); its
            :meth:`~longlora_tune.modules.rope_config.RopeScaling.to_hf_config` keys are written.

    Returns:
        The new config dict (for linear, ``max_position_embeddings`` is kept: the factor alone extends the
        context).
    """
    cfg = dict(base_config)
    if rope is not None:
        cfg.update(rope.to_hf_config(base_config))
    else:
        _set_linear_rope(cfg, rope_scaling_factor)
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = name
    return cfg


def _set_linear_rope(cfg: dict, rope_scaling_factor: float) -> None:
    cfg["rope_scaling"] = rope_scaling_entry(rope_scaling_factor)
    if isinstance(cfg.get("rope_parameters"), Mapping):
        # transformers 5 writes the RoPE settings here and would prefer them over rope_scaling.
        params = dict(cfg["rope_parameters"])
        params.update(rope_type="linear", factor=float(rope_scaling_factor))
        cfg["rope_parameters"] = params


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer and generation files of a Hugging Face checkpoint folder.

    Args:
        src_dir: the base checkpoint folder.
        dst_dir: the export folder.

    Returns:
        Names of the copied files.
    """
    copied = []
    for name in TOKENIZER_FILES:
        src, dst = Path(src_dir) / name, Path(dst_dir) / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # Through the atomic writer: safetensors alone creates its file 0600, unreadable by a serving account.
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _save_sharded_safetensors(sd: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += n
    if len(shards) == 1:
        _save_safetensors(shards[0], out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, out_dir / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_merged_hf_checkpoint(
    full_state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base: HFBaseModel,
    model_info: LongLoRAModelInfo,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Merge LoRA into the weights and write a Hugging Face checkpoint (the base's family) with its RoPE.

    Args:
        full_state_dict: the complete model state in torchtune names, LoRA matrices included (consumed:
            merged in place).
        out_dir: the export folder (replaced atomically if it exists).
        base: the base checkpoint (its ``config.json`` and tokenizer files are carried over).
        model_info: the trained model's description (RoPE factor or full setting, LoRA rank and alpha).
        dtype: dtype of the written weights; None keeps the state's dtype.
        max_shard_bytes: largest safetensors file.

    Returns:
        The export folder.
    """
    from torchtune.modules.peft import get_merged_lora_ckpt

    merged = get_merged_lora_ckpt(full_state_dict, rank=model_info.lora_rank, alpha=model_info.lora_alpha)
    if base.tie_word_embeddings:
        merged.pop("output.weight", None)  # the head is the embedding; transformers re-ties it
    hf_sd = base.to_hf_state_dict(merged)
    if dtype is not None:
        hf_sd = {k: v.to(dtype) for k, v in hf_sd.items()}
    saved_dtype = dtype or next(iter(hf_sd.values())).dtype
    out = Path(out_dir)
    with atomic_directory(out, needed_bytes=tensor_bytes(hf_sd)) as tmp:
        _save_sharded_safetensors(hf_sd, tmp, max_shard_bytes)
        config = merged_hf_config(
            base.config, model_info.rope_scaling_factor, saved_dtype, rope=model_info.rope
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(base.path, tmp)
    return out


def save_peft(
    trainable_state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base: HFBaseModel,
    model_info: LongLoRAModelInfo,
    base_model_name_or_path: str,
    quantized_base: bool = False,
) -> Path:
    """Write a PEFT adapter (LoRA + embeddings and norms as ``modules_to_save``) atomically.

    Args:
        trainable_state_dict: trainable tensors in torchtune names.
        out_dir: the export folder.
        base: the base checkpoint (head counts and sizes, RoPE base).
        model_info: the trained model's description (LoRA rank, alpha and targets, RoPE factor).
        base_model_name_or_path: what ``adapter_config.json`` names as the base model.
        quantized_base: trained against an NF4 base (QLoRA); noted in the model card.

    Returns:
        The export folder.
    """
    from longlora_tune.hf.peft import save_peft_adapter

    kw = base.builder_kwargs
    model_config = {k: kw[k] for k in ("num_heads", "num_kv_heads", "embed_dim", "rope_base")}
    if base.head_dim:
        model_config["head_dim"] = base.head_dim
    model_config["permute_qk"] = base.family.qk_permuted
    model_config["tie_word_embeddings"] = base.tie_word_embeddings
    rope = model_info.rope
    rope_config = None
    if rope is not None and rope.rope_type in ("yarn", "llama3"):
        rope_config = rope.to_hf_config(base.config)
    out = Path(out_dir)
    with atomic_directory(out, needed_bytes=tensor_bytes(dict(trainable_state_dict))) as tmp:
        save_peft_adapter(
            trainable_state_dict,
            tmp,
            model_config=model_config,
            base_model_name_or_path=base_model_name_or_path,
            lora_rank=model_info.lora_rank,
            lora_alpha=model_info.lora_alpha,
            target_modules=list(model_info.lora_targets),
            rope_scaling_factor=model_info.rope_scaling_factor,
            quantized_base=quantized_base,
            rope_config=rope_config,
        )
    return out


@dataclasses.dataclass
class LongLoRAExportInfo:
    """What ``adapter/longlora.json`` records about a run.

    Attributes:
        model_config: the config's ``model`` section (``_component_`` and builder arguments).
        rope_scaling_factor: linear RoPE factor used in training.
        group_size: S² group size (None with full attention).
        trainable_extras: non-LoRA trainable groups (``embed``, ``norm``).
        base_checkpoint_dir: the base model folder.
        hf_repo_id: the base model's Hugging Face id, if known.
        training_length: tokens per training sequence.
        global_step: optimizer steps done.
        rope: the full RoPE setting (:attr:`LongLoRAModelInfo.rope`), or None for Llama 2's linear path.
    """

    model_config: dict[str, Any]
    rope_scaling_factor: float
    group_size: Optional[int]
    trainable_extras: list[str]
    base_checkpoint_dir: str
    hf_repo_id: Optional[str] = None
    training_length: Optional[int] = None
    global_step: int = 0
    rope: Optional[RopeScaling] = None


def save_adapter(
    trainable_state_dict: dict[str, torch.Tensor], out_dir: str | Path, info: LongLoRAExportInfo
) -> Path:
    """Write ``trainable.safetensors`` (torchtune names) and ``longlora.json`` atomically.

    ``longlora.json`` holds the builder arguments with the RoPE factor (and, for RoPE settings other than
    Llama 2's linear default, the ``rope_scaling`` request) filled in, so
    ``config.instantiate`` of its ``model`` entry rebuilds the trained architecture exactly.

    Args:
        trainable_state_dict: trainable tensors in torchtune names.
        out_dir: the export folder.
        info: run metadata.

    Returns:
        The export folder.
    """
    meta = dataclasses.asdict(info)
    meta.pop("rope")
    meta["model"] = dict(meta.pop("model_config"))
    meta["model"]["rope_scaling_factor"] = float(info.rope_scaling_factor)
    meta["rope_scaling"] = rope_scaling_entry(info.rope_scaling_factor)
    if info.rope is not None:
        # The builder's rope_scaling request that rebuilds exactly this setting over the same base.
        meta["model"]["rope_scaling"] = rope_request(info.rope)
        meta["rope_scaling"] = info.rope.rope_entry() or rope_scaling_entry(1.0)
    out = Path(out_dir)
    with atomic_directory(out, needed_bytes=tensor_bytes(trainable_state_dict)) as tmp:
        save_trainable_state(trainable_state_dict, tmp / TRAINABLE_FILE)
        (tmp / "longlora.json").write_text(json.dumps(meta, indent=2))
    return out
