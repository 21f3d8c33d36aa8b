"""Every up-front validation of the training recipe, and the recipe's key schema.

These checks need neither a process group nor a model: they read the config, the file system (the base
model's files) and whether CUDA exists, so they can run before any heavy work -- in every rank of a
run, and once more in the ``tune run`` launcher before torchrun starts the workers
(:mod:`longlora_tune.preflight`). Every problem is one :class:`~longlora_tune.errors.LongLoRAConfigError`
line naming the value and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

# Only check_base_files reads the base model's folder, through this module attribute.
from longlora_tune import checkpointing
from longlora_tune.errors import LongLoRAConfigError

#: Hugging Face repository used in download hints when the config names none.
DEFAULT_REPO_HINT = "meta-llama/Llama-2-7b-hf"
#: The export formats the recipe can write (``export_formats``).
EXPORT_FORMATS = ("hf", "peft", "adapter")


def gradient_accumulation_steps(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``batch_size * world_size * steps == global_batch_size``.

    Args:
        global_batch_size: sequences per optimizer step over all ranks.
        batch_size: sequences per micro-batch on one rank.
        world_size: number of ranks.

    Returns:
        The gradient accumulation steps.

    Raises:
        LongLoRAConfigError: if the numbers are not positive or do not divide.
    """
    for name, value in (("global_batch_size", global_batch_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LongLoRAConfigError(f"{name}={value!r} must be a positive integer")
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise LongLoRAConfigError(
            f"global_batch_size={global_batch_size} is not divisible by batch_size={batch_size} x "
            f"world_size={world_size} = {per_step}; "
            f"choose a global_batch_size that is a multiple of {per_step}"
        )
    return global_batch_size // per_step


def check_output_dir(output_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Refuse an ``output_dir`` inside (or equal to) the base model's ``checkpoint_dir``.

    Args:
        output_dir: where the run writes.
        checkpoint_dir: the base model folder.

    Raises:
        LongLoRAConfigError: if ``output_dir`` lies inside ``checkpoint_dir``.
    """
    out = Path(output_dir).expanduser().resolve()
    ckpt = Path(checkpoint_dir).expanduser().resolve()
    if out == ckpt or ckpt in out.parents:
        raise LongLoRAConfigError(
            f"output_dir={output_dir} is inside checkpoint_dir={checkpoint_dir}; "
            "write outputs elsewhere so the base model is never overwritten"
        )


def check_base_files(
    checkpoint_dir: str | Path, tokenizer_path: Optional[str], repo_id: Optional[str]
) -> None:
    """Check that the base model's config, weights and tokenizer exist.

    Args:
        checkpoint_dir: the Hugging Face checkpoint folder.
        tokenizer_path: the tokenizer file from the config (``tokenizer.path``), or None.
        repo_id: Hugging Face repo id for the download hint.

    Raises:
        LongLoRAConfigError: naming the missing path and the ``tune download`` command.
    """
    checkpointing.read_hf_config(checkpoint_dir, repo_id=repo_id)
    checkpointing.hf_weight_files(checkpoint_dir, repo_id=repo_id)
    if tokenizer_path is not None and not Path(tokenizer_path).expanduser().is_file():
        raise LongLoRAConfigError(
            f"tokenizer not found: {tokenizer_path}; download the base model with: "
            f"{checkpointing.download_command(repo_id, checkpoint_dir)}"
        )


def check_training_length(train_len: int, model_max_seq_len: int, group_size: Optional[int]) -> None:
    """Check the training sequence length against the model and the S² group size.

    Args:
        train_len: tokens per training sequence (``dataset.block_size`` or ``tokenizer.max_seq_len``).
        model_max_seq_len: the model's ``max_seq_len``.
        group_size: the S² group size, or None when training with full attention.

    Raises:
        LongLoRAConfigError: if the length exceeds the model or is not a multiple of the group size.
    """
    if train_len > model_max_seq_len:
        raise LongLoRAConfigError(
            f"training length {train_len} exceeds model.max_seq_len={model_max_seq_len}; "
            "set them to the same value"
        )
    if group_size is not None and train_len % group_size:
        raise LongLoRAConfigError(
            f"training length {train_len} is not divisible by the S2 group size {group_size}; "
            f"use a length that is a multiple of {group_size} or change model.s2_group_size_ratio"
        )


def check_dataset_size(num_sequences: int, train_len: int, global_batch_size: int, world_size: int) -> int:
    """Check that the dataset fills at least one optimizer step; return the steps per epoch.

    Args:
        num_sequences: sequences (blocks) in the dataset.
        train_len: tokens per sequence, for the message.
        global_batch_size: sequences per optimizer step.
        world_size: ranks (the sampler drops the remainder of ``num_sequences / world_size``).

    Returns:
        Optimizer steps per pass over the data.

    Raises:
        LongLoRAConfigError: if the dataset has no full block or fewer sequences than one step needs.
    """
    if num_sequences == 0:
        raise LongLoRAConfigError(
            f"the dataset yields no full block of {train_len} tokens; add data or lower dataset.block_size"
        )
    steps = (num_sequences // world_size * world_size) // global_batch_size
    if steps == 0:
        raise LongLoRAConfigError(
            f"the dataset yields {num_sequences} blocks of {train_len} tokens but one optimizer step needs "
            f"global_batch_size={global_batch_size}; add data or lower global_batch_size"
        )
    return steps


def training_length(cfg: DictConfig) -> Optional[int]:
    """The training sequence length a config asks for.

    The first set of ``dataset.block_size`` (pretraining blocks), ``dataset.max_seq_len`` (SFT samples)
    and ``tokenizer.max_seq_len``.

    Args:
        cfg: the recipe config.

    Returns:
        The length, or None when the config sets none of them.
    """
    for section, key in (("dataset", "block_size"), ("dataset", "max_seq_len"), ("tokenizer", "max_seq_len")):
        length = cfg[section].get(key, None)
        if length is not None:
            return int(length)
    return None


def check_sft_batching(cfg: DictConfig) -> None:
    """Check the batching settings of variable-length (SFT) data against the S² attention settings.

    Args:
        cfg: the recipe config.

    Raises:
        LongLoRAConfigError: for a bad ``pad_to_multiple_of``, packing with an S² backend that cannot take
            the document mask, or wrap-around S² on right-padded batches.
    """
    multiple = cfg.get("pad_to_multiple_of", None)
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1):
        raise LongLoRAConfigError(
            f"pad_to_multiple_of={multiple!r} must be a positive integer or null (= the S2 group size)"
        )
    model = cfg.model
    if model.get("use_full_attn", False):
        return  # torchtune's own attention takes dense and flex masks alike
    backend = model.get("s2_backend", "auto")
    if cfg.dataset.get("packed", False):
        from torchtune.modules.attention_utils import _SUPPORTS_FLEX_ATTENTION

        # padded_collate_packed builds a flex BlockMask where flex attention is supported, else a dense mask.
        if backend == "flash" or (backend == "sdpa" and _SUPPORTS_FLEX_ATTENTION):
            raise LongLoRAConfigError(
                f"dataset.packed=true needs an S2 backend that takes the document mask, not "
                f"model.s2_backend={backend}; set model.s2_backend=auto"
            )
    elif model.get("s2_wrap_around", False) and cfg.dataset.get("block_size", None) is None:
        raise LongLoRAConfigError(
            "model.s2_wrap_around=true lets the first tokens attend the padding at the end of right-padded "
            "samples; set model.s2_wrap_around=false or dataset.packed=true"
        )


def validate_config(cfg: DictConfig, world_size: int) -> int:
    """Checks that need neither a process group nor a model; run before any heavy work.

    Args:
        cfg: the recipe config.
        world_size: number of ranks the run will use.

    Returns:
        Gradient accumulation steps.

    Raises:
        LongLoRAConfigError: on the first problem found, as one line naming the value and the fix.
    """
    required = ("output_dir", "checkpoint_dir", "model", "tokenizer", "dataset", "optimizer", "loss")
    for key in (*required, "batch_size", "global_batch_size"):
        if cfg.get(key, None) is None:
            raise LongLoRAConfigError(f"config key {key!r} is missing")
    max_steps, epochs = cfg.get("max_steps", None), cfg.get("epochs", None)
    if (max_steps is None) == (epochs is None):
        raise LongLoRAConfigError(
            f"set exactly one of max_steps and epochs (got max_steps={max_steps}, epochs={epochs}); "
            "set the other to null"
        )
    for name, value in (("max_steps", max_steps), ("epochs", epochs)):
        if value is not None and int(value) < 1:
            raise LongLoRAConfigError(f"{name}={value} must be >= 1")
    check_sft_batching(cfg)
    ga = gradient_accumulation_steps(int(cfg.global_batch_size), int(cfg.batch_size), world_size)
    check_output_dir(cfg.output_dir, cfg.checkpoint_dir)
    for key in ("use_dora", "quantize_base"):
        if cfg.model.get(key, False):
            raise LongLoRAConfigError(
                f"model.{key}=true is not supported by longlora_distributed; set it to false"
            )
    unknown = set(cfg.get("export_formats", EXPORT_FORMATS)) - set(EXPORT_FORMATS)
    if unknown:
        raise LongLoRAConfigError(
            f"export_formats has unknown entries {sorted(unknown)}; use {list(EXPORT_FORMATS)}"
        )
    repo = cfg.get("hf_repo_id", None) or DEFAULT_REPO_HINT
    check_base_files(cfg.checkpoint_dir, cfg.tokenizer.get("path", None), repo)
    device = cfg.get("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LongLoRAConfigError("device=cuda but no CUDA device is available; set device=cpu for CPU")
    if cfg.get("enable_activation_offloading", False) and device != "cuda":
        raise LongLoRAConfigError(
            "enable_activation_offloading=true needs device=cuda; set it to false on CPU"
        )
    if device == "cpu" and cfg.model.get("s2_backend", "auto") == "flex":
        # torch refuses FlexAttention's backward on CPU; fail here rather than at the first step.
        raise LongLoRAConfigError(
            "model.s2_backend=flex cannot train on CPU (no FlexAttention backward there); use sdpa or auto"
        )
    return ga
