"""LongLoRA continued pretraining (and long-context fine-tuning) with FSDP2.

Run with ``tune run longlora_distributed --config llama2_7b_100k`` (one process), under torchrun
(``tune run --nproc_per_node 8 longlora_distributed --config llama2_7b_100k``; add ``--nnodes`` /
``--rdzv_endpoint`` for several nodes), or as ``python -m longlora_tune.recipes.longlora_distributed``.
One process is simply a process group of size one, so the code path is the same everywhere.

The recipe trains whatever model the config builds (``longlora_tune.models.longlora_llama2_7b`` brings S²
attention and position interpolation with it); what it adds is the LongLoRA training loop:

* the trainable set (LoRA + token embeddings + norms) from :mod:`longlora_tune.peft`, AdamW over it only;
* base weights from a Hugging Face checkpoint folder, loaded once on rank 0 and broadcast into the
  FSDP2-sharded model together with a seeded LoRA initialisation (identical for every world size);
* token-weighted loss over gradient accumulation and ranks (a step's gradient does not depend on how the
  global batch is split), chunked cross-entropy, gradient clipping, warm-up + constant LR;
* supervised fine-tuning (``longlora_tune.data.longalpaca_dataset``): samples right-padded to a multiple of
  the S² group size (``pad_to_multiple_of``), or packed (``dataset.packed``) with per-document positions
  and a document mask that S² ANDs with its groups; ``epochs`` may replace ``max_steps``;
* resumable checkpoints (trainable weights, optimizer, schedule, data position, RNG) written atomically;
* exports: merged Hugging Face model with ``rope_scaling``, PEFT adapter, and our own adapter format.
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchtune import config, modules, training, utils
from torchtune.data import padded_collate_packed
from torchtune.training.metric_logging import DiskLogger
from tqdm import tqdm

from longlora_tune import checkpointing, export
from longlora_tune.errors import LongLoRAConfigError, TrainingDivergedError, report_errors
from longlora_tune.modules.s2_attention import S2Attention, flash_attn_available
from longlora_tune.peft import set_trainable_params, trainable_param_names

log = utils.get_logger("INFO")

#: Hugging Face repository used in download hints when the config names none.
_DEFAULT_REPO_HINT = "meta-llama/Llama-2-7b-hf"
_RECIPE_STATE_FILE = "recipe_state.pt"
_OPTIMIZER_FILE = "optimizer.pt"
_EXPORT_FORMATS = ("hf", "peft", "adapter")


# ----------------------------------------------------------------------------------------------------------
# Up-front validation: cheap checks on the config and the file system, before any process group or model.
# ----------------------------------------------------------------------------------------------------------


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
    unknown = set(cfg.get("export_formats", _EXPORT_FORMATS)) - set(_EXPORT_FORMATS)
    if unknown:
        raise LongLoRAConfigError(
            f"export_formats has unknown entries {sorted(unknown)}; use {list(_EXPORT_FORMATS)}"
        )
    repo = cfg.get("hf_repo_id", None) or _DEFAULT_REPO_HINT
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


# ----------------------------------------------------------------------------------------------------------
# Data order that can be restored exactly
# ----------------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that starts part-way into an epoch's permutation without reading skipped data.

    The epoch's order is a seeded permutation of the whole dataset (the same for every world size).
    Position ``p`` counts sequences already consumed by *all* ranks; rank ``r`` takes permutation entries
    ``p + r, p + r + W, ...``, so a run resumed with another world size continues with exactly the
    sequences not yet seen. Only whole optimizer steps are yielded (the tail that cannot fill
    ``global_batch_size`` is left for the next epoch's permutation).

    Args:
        dataset: map-style dataset.
        num_replicas: world size.
        rank: this rank.
        global_batch_size: sequences per optimizer step over all ranks.
        shuffle: permute each epoch (seeded) or keep dataset order.
        seed: permutation seed (plus the epoch number).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        global_batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.global_batch_size = global_batch_size
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Select the epoch and how many of its sequences all ranks together already consumed."""
        self.set_epoch(epoch)
        self.start = start

    def _usable(self) -> int:
        return len(self.dataset) // self.global_batch_size * self.global_batch_size  # type: ignore[arg-type]

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        else:
            order = list(range(len(self.dataset)))  # type: ignore[arg-type]
        return iter(order[self.start + self.rank : self._usable() : self.num_replicas])

    def __len__(self) -> int:
        return max(0, self._usable() - self.start) // self.num_replicas


# ----------------------------------------------------------------------------------------------------------
# RNG state (saved per rank; numpy arrays become tensors so torch.load(weights_only=True) can read them)
# ----------------------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


class LongLoRARecipeDistributed:
    """LongLoRA training with FSDP2 on any number of ranks (one included).

    ``setup`` builds everything (model on the meta device, sharded, then filled from the base checkpoint;
    tokenizer; data; optimizer; schedule; resumed state), ``train`` runs ``max_steps`` optimizer steps with
    periodic checkpoints, ``export`` writes the ``hf/``, ``peft/`` and ``adapter/`` outputs, ``cleanup``
    closes the logger.

    Args:
        cfg: the parsed config (see ``longlora_tune/configs/llama2_7b_100k.yaml`` for every key).

    Raises:
        LongLoRAConfigError: on invalid settings.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(device=cfg.get("device", None))
        self.dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=self.device)
        if self.dtype == torch.float16:
            raise LongLoRAConfigError("dtype=fp16 is not supported (no loss scaling); use bf16 or fp32")
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.checkpoint_dir = Path(cfg.checkpoint_dir).expanduser()
        self.repo_id = cfg.get("hf_repo_id", None) or _DEFAULT_REPO_HINT
        self.seed = int(cfg.get("seed", 0))
        # With ``epochs`` instead, set from the dataset's size in ``_setup_data``.
        self.max_steps = int(cfg.max_steps) if cfg.get("max_steps", None) is not None else 0
        self.batch_size = int(cfg.batch_size)
        self.global_batch_size = int(cfg.global_batch_size)
        self.grad_accum = gradient_accumulation_steps(
            self.global_batch_size, self.batch_size, self.world_size
        )
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.save_every_n_steps = int(cfg.get("save_every_n_steps", 0) or 0)
        self.keep_last_n = cfg.get("keep_last_n", None)
        self.log_every_n_steps = int(cfg.get("log_every_n_steps", 1))
        self.log_peak_memory = bool(cfg.get("log_peak_memory_stats", True)) and self.device.type == "cuda"
        self.extras = tuple(cfg.get("trainable_extras", ("embed", "norm")))
        self.export_formats = tuple(cfg.get("export_formats", _EXPORT_FORMATS))
        # Recipe state, restored on resume.
        self.global_step = 0
        self.epoch = 0
        self.epoch_position = 0
        self.last_checkpoint: Optional[Path] = None
        self.metric_logger = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build model, tokenizer, data, loss, optimizer and schedule; restore a checkpoint if asked."""
        cfg = self.cfg
        training.set_seed(seed=self.seed)
        resume_dir = self._resume_dir()
        if self.is_rank_zero:
            if cfg.get("metric_logger", None) is None:
                self.metric_logger = DiskLogger(log_dir=str(self.output_dir / "logs"))
            else:
                self.metric_logger = config.instantiate(cfg.metric_logger)
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)

        self.hf_config = checkpointing.read_hf_config(self.checkpoint_dir, repo_id=self.repo_id)
        self.model = self._setup_model(resume_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.loss_fn = config.instantiate(cfg.loss)
        self.ignore_index = int(getattr(self.loss_fn, "ignore_index", -100))
        # Detected by class name as in torchtune: the model must return the logits in the same chunks.
        if self.loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self.model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        self._setup_data()

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.lr_scheduler = self._make_scheduler()
        if resume_dir is not None:
            self._load_training_state(resume_dir)
        self.act_ctx = training.get_act_offloading_ctx_manager(
            self.model, bool(cfg.get("enable_activation_offloading", False))
        )

    def _on_rank_zero(self, fn: Callable[[], Any], *, share_result: bool = True) -> Any:
        """Run ``fn`` on rank 0 only; if it fails, every rank raises, so none waits forever in a collective.

        Checkpoint folders then need to be visible to rank 0 only (no shared file system across nodes).

        Args:
            fn: the work.
            share_result: broadcast the (picklable) result to all ranks; otherwise the other ranks get None.

        Returns:
            ``fn``'s result.

        Raises:
            LongLoRAConfigError: on every rank when ``fn`` raised one on rank 0.
            RuntimeError: on the other ranks when ``fn`` raised anything else on rank 0 (rank 0 re-raises
                the original exception).
        """
        result, payload, error = None, [None, None], None
        if self.is_rank_zero:
            try:
                result = fn()
                payload = [result if share_result else None, None]
            except Exception as e:
                error = e
                payload = [None, (isinstance(e, LongLoRAConfigError), f"{type(e).__name__}: {e}")]
        dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        if payload[1] is not None:
            is_config_error, message = payload[1]
            if is_config_error:
                raise LongLoRAConfigError(message.split(": ", 1)[1])
            raise RuntimeError(f"rank 0 failed, stopping this rank too: {message}")
        return payload[0] if share_result else result

    def _resume_dir(self) -> Optional[Path]:
        resume = self.cfg.get("resume_from_checkpoint", False)

        def find() -> Optional[Path]:
            if resume in (False, None):
                # An earlier run's checkpoints would outrank (and prune) this run's and be what a later
                # resume_from_checkpoint=true picks up.
                stale = checkpointing.latest_checkpoint(self.checkpoints_dir)
                if stale is not None:
                    raise LongLoRAConfigError(
                        f"{self.checkpoints_dir} holds checkpoints of an earlier run (newest: {stale.name}); "
                        "set resume_from_checkpoint=true to continue it, or use a new output_dir"
                    )
                return None
            if resume is True:
                found = checkpointing.latest_checkpoint(self.checkpoints_dir)
                if found is None:
                    raise LongLoRAConfigError(
                        f"resume_from_checkpoint=true but {self.checkpoints_dir} holds no checkpoint; "
                        "set resume_from_checkpoint=false to start a new run"
                    )
                return found
            path = Path(str(resume)).expanduser()
            missing = [
                f
                for f in (checkpointing.TRAINABLE_FILE, _OPTIMIZER_FILE, _RECIPE_STATE_FILE)
                if not (path / f).is_file()
            ]
            if missing:
                raise LongLoRAConfigError(
                    f"resume_from_checkpoint={resume}: not a checkpoint folder (missing {', '.join(missing)})"
                )
            return path

        return self._on_rank_zero(find)

    def _setup_model(self, resume_dir: Optional[Path]) -> torch.nn.Module:

        cfg = self.cfg
        overrides = self._rope_override()
        try:
            with training.set_default_dtype(self.dtype), torch.device("meta"):
                model = config.instantiate(cfg.model, **overrides)
        except (ValueError, TypeError) as e:
            raise LongLoRAConfigError(f"model: {e}") from e

        # S² needs every training sequence to be made of whole groups.
        train_len = training_length(cfg)
        group_sizes = {
            m.group_size for m in model.modules() if isinstance(m, S2Attention) and not m.config.use_full_attn
        }
        # The built model's own length: a builder default (8192 for longlora_llama2_7b) counts too.
        max_seq_len = int(getattr(model, "max_seq_len", None) or cfg.model.get("max_seq_len", train_len or 0))
        if train_len is not None:
            for g in sorted(group_sizes) or [None]:
                check_training_length(train_len, max_seq_len, g)
        self.group_size = max(group_sizes) if group_sizes else None
        self.rope_scaling_factor = export.model_rope_scaling_factor(model)

        counts = set_trainable_params(model, extras=self.extras)
        self.trainable_names = sorted(trainable_param_names(model, extras=self.extras))
        utils.log_rank_zero(log, f"Trainable parameters: {dict(counts)}")

        if cfg.get("enable_activation_checkpointing", True):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        mp_policy = None
        if self.dtype != torch.float32 and cfg.get("fp32_trainable_params", True):
            # bf16 cannot hold LoRA+'s small updates: at lr 2e-5 a norm scale near 1.0 (bf16 step 2^-7)
            # or an embedding entry near 0.02 never changes. The trainable tensors therefore stay fp32
            # (master weights, fp32 AdamW state, fp32 gradient reduction) and FSDP2 casts them to the
            # compute dtype when it gathers them; the frozen base weights stay in the compute dtype.
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.float32)
            mp_policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        _shard(
            model,
            reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)),
            mp_policy=mp_policy,
        )
        model.to_empty(device=self.device)

        # Rank 0 assembles the full state (the other ranks receive their shards by broadcast).
        meta_sd = model.state_dict()
        specs = {k: (tuple(v.shape), v.dtype) for k, v in meta_sd.items()}
        del meta_sd
        full_sd = self._on_rank_zero(lambda: self._initial_state(specs, resume_dir), share_result=False) or {}
        set_model_state_dict(
            model,
            full_sd,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
        )
        del full_sd
        with self.device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        training.validate_no_params_on_meta_device(model)
        model.train()
        if self.is_rank_zero:
            log.info(
                f"Model ready: S2 group size {self.group_size} ({self._s2_backend_description()}), "
                f"RoPE factor {self.rope_scaling_factor}, {self.world_size} rank(s), "
                f"gradient accumulation {self.grad_accum}"
            )
        return model

    def _s2_backend_description(self) -> str:
        """Which S² kernel training will use, so a silent fallback from flash-attn is visible in the log."""
        backend = self.cfg.model.get("s2_backend", "auto")
        if self.group_size is None or backend != "auto":
            return f"backend {backend}"
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            if flash_attn_available():
                return "backend auto: flash-attn varlen"
            return "backend auto: SDPA, flash-attn not importable (pip install longlora-tune[flash])"
        return "backend auto: SDPA"

    def _initial_state(
        self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], resume_dir: Optional[Path]
    ) -> dict[str, torch.Tensor]:
        """The model's full starting state, each tensor in its parameter's dtype.

        Base weights, a seeded LoRA initialisation (the same numbers for every world size), then -- when
        resuming -- the trained tensors *over* the base ones (so trained embeddings and norms win).
        """
        full_sd = checkpointing.load_hf_model_state(self.checkpoint_dir, repo_id=self.repo_id)
        unexpected = sorted(set(full_sd) - set(specs))
        if unexpected:
            raise LongLoRAConfigError(
                f"{self.checkpoint_dir} has weights the model lacks (first: {unexpected[0]}); "
                "the model config does not match the checkpoint"
            )
        for k, v in full_sd.items():
            if tuple(v.shape) != specs[k][0]:
                raise LongLoRAConfigError(
                    f"{self.checkpoint_dir}: {k} has shape {tuple(v.shape)} but the model expects "
                    f"{specs[k][0]}; the model config does not match the checkpoint"
                )
        shapes = {k: shape for k, (shape, _) in specs.items()}
        full_sd.update(_init_lora(sorted(set(specs) - set(full_sd)), shapes, seed=self.seed))
        if resume_dir is not None:
            trained = checkpointing.read_trainable_state(resume_dir / checkpointing.TRAINABLE_FILE)
            wrong = sorted(k for k, v in trained.items() if shapes.get(k) != tuple(v.shape))
            if wrong:
                raise LongLoRAConfigError(
                    f"{resume_dir}: {wrong[0]} does not fit the model; "
                    "resume with the config it was trained with"
                )
            full_sd.update(trained)
        # Key by key, so only one tensor exists twice at a time (the 70B state is 138 GB).
        for k in list(full_sd):
            full_sd[k] = full_sd[k].to(specs[k][1])
        return full_sd

    def _rope_override(self) -> dict[str, Any]:
        """Builder arguments that come from the base checkpoint rather than the config.

        ``original_max_seq_len`` defaults to the checkpoint's ``max_position_embeddings`` (and must agree
        with it when set), and a checkpoint's existing linear RoPE factor is kept when it already covers
        the training length (REFERENCE §3), unless the config sets ``rope_scaling_factor``.
        """
        from longlora_tune.modules.position_interpolation import position_interpolation_factor

        kw = checkpointing.llama2_kwargs_from_hf_config(self.hf_config)
        checkpoint_ctx = kw["original_max_seq_len"]
        configured = self.cfg.model.get("original_max_seq_len", None)
        if configured is not None and int(configured) != checkpoint_ctx:
            raise LongLoRAConfigError(
                f"model.original_max_seq_len={configured} but {self.checkpoint_dir}/config.json has "
                f"max_position_embeddings={checkpoint_ctx}; set model.original_max_seq_len={checkpoint_ctx}"
            )
        overrides: dict[str, Any] = {"original_max_seq_len": checkpoint_ctx}
        existing = kw["existing_rope_scaling_factor"]
        if existing > 1.0 and self.cfg.model.get("rope_scaling_factor", None) is None:
            target = int(self.cfg.model.get("max_seq_len", checkpoint_ctx))
            overrides["rope_scaling_factor"] = position_interpolation_factor(target, checkpoint_ctx, existing)
        return overrides

    def _setup_data(self) -> None:
        cfg = self.cfg
        try:
            dataset = config.instantiate(cfg.dataset, self.tokenizer)
        except (ValueError, FileNotFoundError) as e:
            raise LongLoRAConfigError(f"dataset: {e}") from e
        train_len = training_length(cfg) or 0
        self.steps_per_epoch = check_dataset_size(
            len(dataset), train_len, self.global_batch_size, self.world_size
        )
        if cfg.get("epochs", None) is not None:
            self.max_steps = int(cfg.epochs) * self.steps_per_epoch
        # SFT datasets count samples trimmed or dropped to fit; a PackedDataset keeps its samples in ``ds``.
        samples = getattr(dataset, "ds", dataset)
        if hasattr(samples, "num_trimmed") or hasattr(samples, "num_skipped"):
            utils.log_rank_zero(
                log,
                f"Dataset: {getattr(samples, 'num_trimmed', 0)} samples trimmed to fit {train_len} tokens "
                f"(num_trimmed), {getattr(samples, 'num_skipped', 0)} skipped (num_skipped)",
            )
        self.sampler = ResumableDistributedSampler(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            global_batch_size=self.global_batch_size,
            shuffle=bool(cfg.get("shuffle", True)),
            seed=self.seed,
        )
        if cfg.dataset.get("packed", False):
            # Rows are already max_seq_len long; the collate adds per-document input_pos and a document mask.
            collate_fn: Callable = padded_collate_packed
        else:
            collate = _import_path(cfg.get("collate_fn", "longlora_tune.data.padded_collate_s2"))
            params = inspect.signature(collate).parameters
            collate_kwargs: dict[str, Any] = {"ignore_idx": self.ignore_index}
            if "pad_id" in params:
                collate_kwargs["pad_id"] = int(getattr(self.tokenizer, "pad_id", 0) or 0)
            if "pad_to_multiple_of" in params:
                collate_kwargs["pad_to_multiple_of"] = self._pad_to_multiple_of(train_len)
            collate_fn = partial(collate, **collate_kwargs)
        self.dataloader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            drop_last=True,
            num_workers=int(cfg.get("num_workers", 0)),
            # Its own generator: each new iterator draws a worker seed, which from the global RNG would
            # shift the dropout stream of a run resumed mid-epoch.
            generator=torch.Generator().manual_seed(self.seed + self.rank),
        )
        utils.log_rank_zero(
            log,
            f"Dataset: {len(dataset)} sequences of up to {train_len} tokens, "
            f"{self.steps_per_epoch} steps per epoch",
        )

    def _pad_to_multiple_of(self, train_len: int) -> Optional[int]:
        """Padded batch lengths are multiples of this: ``pad_to_multiple_of``, by default the S² group size
        (full groups; None with full attention). It must divide the training length, so that padding never
        makes a batch longer than the model accepts."""
        multiple = self.cfg.get("pad_to_multiple_of", None)
        multiple = self.group_size if multiple is None else int(multiple)
        if multiple is not None and train_len and train_len % multiple:
            raise LongLoRAConfigError(
                f"pad_to_multiple_of={multiple} does not divide the training length {train_len}; "
                "use a divisor of it (null = the S2 group size)"
            )
        return multiple

    def _make_scheduler(self) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        cfg_sched = self.cfg.get("lr_scheduler", None)
        if cfg_sched is None:
            return None
        target = _import_path(cfg_sched._component_)
        extra = {}
        if "num_training_steps" in inspect.signature(target).parameters:
            extra["num_training_steps"] = self.max_steps
        return config.instantiate(cfg_sched, self.optimizer, **extra)

    # ------------------------------------------------------------------ checkpoints

    def _load_training_state(self, ckpt: Path) -> None:
        state = self._on_rank_zero(
            lambda: torch.load(ckpt / _RECIPE_STATE_FILE, map_location="cpu", weights_only=True)
        )
        if int(state["global_batch_size"]) != self.global_batch_size:
            raise LongLoRAConfigError(
                f"{ckpt} was trained with global_batch_size={state['global_batch_size']}, the config says "
                f"{self.global_batch_size}; resume with the same global batch"
            )
        opt_sd = (
            torch.load(ckpt / _OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            if self.is_rank_zero
            else {}
        )
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            opt_sd,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.epoch_position = int(state["epoch_position"])
        rng = state["rng"]
        # Same world size: every rank continues its own streams; otherwise all take rank 0's.
        _set_rng_state(rng[self.rank] if len(rng) == self.world_size else rng[0], self.device)
        self.last_checkpoint = ckpt
        utils.log_rank_zero(log, f"Resumed from {ckpt} at step {self.global_step}")

    def _full_trainable_state(self) -> dict[str, torch.Tensor]:
        """All-gather every trainable tensor; the full tensors are kept (on CPU) on rank 0 only."""
        sharded = self.model.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name in self.trainable_names:
            t = sharded[name]
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            if self.is_rank_zero:
                out[name] = full.detach().to("cpu", copy=True)
            del full
        return out

    def _check_finite_weights(self) -> None:
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                if not torch.isfinite(local).all():
                    bad.fill_(1.0)
                    break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self._diverged(f"trainable weights became NaN/inf after step {self.global_step}")

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step (rank 0 writes, all ranks gather).

        Returns:
            The checkpoint folder.
        """
        self._check_finite_weights()
        trainable = self._full_trainable_state()
        opt_sd = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        rng_all: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng_all, _rng_state(self.device))
        final = self.checkpoints_dir / checkpointing.step_dir_name(self.global_step)
        if self.is_rank_zero:
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "epoch_position": self.epoch_position,
                "global_batch_size": self.global_batch_size,
                "world_size": self.world_size,
                "seed": self.seed,
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "rng": rng_all,
            }
            with checkpointing.atomic_directory(final) as tmp:
                checkpointing.save_trainable_state(trainable, tmp / checkpointing.TRAINABLE_FILE)
                torch.save(opt_sd, tmp / _OPTIMIZER_FILE)
                torch.save(state, tmp / _RECIPE_STATE_FILE)
                OmegaConf.save(self.cfg, tmp / "config.yaml", resolve=True)
            checkpointing.prune_checkpoints(self.checkpoints_dir, self.keep_last_n)
            log.info(f"Saved checkpoint {final}")
        dist.barrier()
        self.last_checkpoint = final
        return final

    def _diverged(self, what: str) -> None:
        where = (
            f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint saved"
        )
        raise TrainingDivergedError(
            f"{what}; stopped without saving this state ({where}); lower the learning rate or check the data"
        )

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        """Run optimizer steps until ``max_steps``, checkpointing every ``save_every_n_steps``."""
        # torchtune's cleanup_before_training calls torch.cpu.empty_cache, which does not exist.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        saved_step = self.global_step if self.last_checkpoint is not None else -1
        # The context manager closes the bar before an error message is printed.
        with tqdm(
            total=self.max_steps, initial=self.global_step, disable=not self.is_rank_zero, desc="train"
        ) as pbar:
            while self.global_step < self.max_steps:
                self.sampler.set_position(self.epoch, self.epoch_position)
                micro, seen = 0, 0
                loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
                tokens = torch.zeros((), device=self.device, dtype=torch.int64)
                t0 = time.perf_counter()
                for batch in self.dataloader:
                    n_loss, n_tokens, n_seen = self._forward_backward(batch)
                    loss_sum += n_loss
                    tokens += n_tokens
                    seen += n_seen
                    micro += 1
                    if micro < self.grad_accum:
                        continue
                    metrics = self._optimizer_step(loss_sum, tokens)
                    self.global_step += 1
                    self.epoch_position += self.global_batch_size
                    metrics["tokens_per_second_per_gpu"] = seen / (time.perf_counter() - t0)
                    if self.log_peak_memory:
                        metrics.update(training.get_memory_stats(device=self.device))
                    if self.metric_logger is not None and self.global_step % self.log_every_n_steps == 0:
                        self.metric_logger.log_dict(metrics, step=self.global_step)
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    if self.save_every_n_steps and self.global_step % self.save_every_n_steps == 0:
                        self.save_checkpoint()
                        saved_step = self.global_step
                    if self.global_step >= self.max_steps:
                        break
                    micro, seen = 0, 0
                    loss_sum.zero_()
                    tokens.zero_()
                    t0 = time.perf_counter()
                else:
                    # The sampler yields whole steps only, so an exhausted epoch has no leftover micro-batch.
                    self.epoch += 1
                    self.epoch_position = 0
        if saved_step != self.global_step:
            self.save_checkpoint()

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        # torchtune 0.6.1 datasets keep labels aligned with tokens; the recipe shifts them by one.
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], self.ignore_index)], dim=1)
        n_tokens = (labels != self.ignore_index).sum()
        # Packed batches: positions restart per document, and the document mask is ANDed with S².
        extra = {k: batch[k].to(self.device) for k in ("mask", "input_pos") if k in batch}
        with self.act_ctx:
            logits = self.model(tokens, **extra)
        if isinstance(logits, torch.Tensor):
            # An unchunked loss (e.g. torch.nn.CrossEntropyLoss) takes [tokens, vocab] logits.
            logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
        # Sum of token losses, so accumulation and ranks can be normalised by the global token count.
        loss = self.loss_fn(logits, labels) * n_tokens
        del logits
        loss.backward()
        return loss.detach().to(torch.float64), n_tokens, tokens.numel()

    def _optimizer_step(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
        total = int(tokens.item())
        loss = float(loss_sum.item()) / max(total, 1)
        if not math.isfinite(loss):
            self._diverged(f"loss is {loss} at step {self.global_step + 1}")
        # FSDP averages gradients over ranks; undo that and divide by the global token count instead.
        training.scale_grads(self.model, torch.tensor(self.world_size / max(total, 1)))
        metrics = {"loss": loss, "lr": training.get_lr(self.optimizer)}
        if self.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), max_norm=float(self.clip_grad_norm)
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                self._diverged(f"gradient norm is {grad_norm} at step {self.global_step + 1}")
            metrics["grad_norm"] = grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return metrics

    # ------------------------------------------------------------------ export

    def export(self) -> dict[str, Path]:
        """Write the requested exports (``hf/``, ``peft/``, ``adapter/``) under ``output_dir``.

        Returns:
            Format name -> folder (filled on every rank for convenience; rank 0 writes).
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        out: dict[str, Path] = {}
        if not self.export_formats:
            return out
        trainable = self._full_trainable_state()
        full = {}
        if "hf" in self.export_formats:
            full = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        info = export.LongLoRAExportInfo(
            model_config=OmegaConf.to_container(self.cfg.model, resolve=True),
            rope_scaling_factor=self.rope_scaling_factor,
            group_size=self.group_size,
            trainable_extras=list(self.extras),
            base_checkpoint_dir=str(self.checkpoint_dir),
            hf_repo_id=self.cfg.get("hf_repo_id", None),
            training_length=training_length(self.cfg),
            global_step=self.global_step,
        )
        lora_rank, lora_alpha = export.model_lora_rank_alpha(self.model)
        if self.is_rank_zero:
            if "hf" in self.export_formats:
                out["hf"] = export.save_merged_hf_checkpoint(
                    full,
                    self.output_dir / "hf",
                    base_checkpoint_dir=self.checkpoint_dir,
                    rope_scaling_factor=self.rope_scaling_factor,
                    lora_rank=lora_rank,
                    lora_alpha=lora_alpha,
                    dtype=self.dtype,
                )
            if "peft" in self.export_formats:
                out["peft"] = export.save_peft(
                    trainable,
                    self.output_dir / "peft",
                    base_config=self.hf_config,
                    base_model_name_or_path=self.cfg.get("hf_repo_id", None) or str(self.checkpoint_dir),
                    lora_rank=lora_rank,
                    lora_alpha=lora_alpha,
                    target_modules=export.model_lora_targets(self.model),
                    rope_scaling_factor=self.rope_scaling_factor,
                )
            if "adapter" in self.export_formats:
                out["adapter"] = export.save_adapter(trainable, self.output_dir / "adapter", info)
        dist.barrier()
        return out

    def cleanup(self) -> None:
        """Close the metric logger."""
        if self.metric_logger is not None:
            self.metric_logger.close()


def _init_lora(names: list[str], shapes: dict[str, tuple[int, ...]], *, seed: int) -> dict[str, torch.Tensor]:
    """Seeded full-size initial values for the LoRA matrices (torchtune's init: A Kaiming-uniform, B zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        if name.endswith("lora_a.weight"):
            t = torch.empty(shapes[name])
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        elif name.endswith("lora_b.weight"):
            t = torch.zeros(shapes[name])
        else:
            raise LongLoRAConfigError(
                f"the base checkpoint has no weight for {name}, and it is not a LoRA matrix; "
                "the model config does not match the checkpoint"
            )
        out[name] = t
    return out


def _shard(
    model: torch.nn.Module, *, reshard_after_forward: bool, mp_policy: Optional[MixedPrecisionPolicy]
) -> None:
    """FSDP2 per decoder layer (torchtune's shard conditions) and at the root, with an optional mixed
    precision policy (``training.shard_model`` in torchtune 0.6.1 takes none)."""
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for name, module in reversed(list(model.named_modules())):
        if training.get_shard_conditions(name, module):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def _import_path(path: str) -> Any:
    module, _, attr = str(path).rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError) as e:
        raise LongLoRAConfigError(f"cannot import {path}: {e}") from e


def _init_process_group(device_type: str) -> bool:
    """Join torchrun's process group, or make a one-rank group; returns True if this call created it."""
    if dist.is_initialized():
        return False
    # On GPU, CPU tensors (gathered states, RNG objects) also need a backend: add gloo next to nccl.
    backend = training.get_distributed_backend(device_type, offload_ops_to_cpu=device_type != "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def run(cfg: DictConfig) -> dict[str, Path]:
    """Validate, train and export; usable in-process (tests) as well as from :func:`recipe_main`.

    Args:
        cfg: the recipe config.

    Returns:
        Export format -> output folder.

    Raises:
        LongLoRAConfigError: on a bad config or missing files (before any heavy work where possible).
        TrainingDivergedError: when the loss, gradients or weights stop being finite.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_config(cfg, world_size)
    device_type = utils.get_device(device=cfg.get("device", None)).type
    created = _init_process_group(device_type)
    recipe = None
    try:
        recipe = LongLoRARecipeDistributed(cfg)
        recipe.setup()
        recipe.train()
        outputs = recipe.export()
        if recipe.is_rank_zero:
            where = {"checkpoint": recipe.last_checkpoint, **outputs, "logs": recipe.output_dir / "logs"}
            print("LongLoRA training finished. Outputs:", file=sys.stderr)
            for name, path in where.items():
                print(f"  {name:>10}: {path}", file=sys.stderr)
        return outputs
    finally:
        if recipe is not None:
            recipe.cleanup()
        if created:
            dist.destroy_process_group()


@report_errors
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """LongLoRA continued pretraining / long-context fine-tuning (see the module docstring)."""
    run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
