"""LongLoRA continued pretraining and long-context fine-tuning with FSDP2.

    tune run longlora_distributed --config llama2_7b_100k                      # one process
    tune run --nproc_per_node 8 longlora_distributed --config llama2_7b_100k   # torchrun (add --nnodes ...)
    tune cp longlora_distributed . && tune run longlora_distributed.py --config my.yaml   # your own copy

One process is a process group of size one, so the code path is the same everywhere. The recipe trains
whatever model the config builds (``longlora_tune.models.longlora_llama2_7b`` brings S² attention and
position interpolation with it) and reads top to bottom: ``setup`` (model, tokenizer, data, optimizer,
schedule, resumed state) -> ``train`` (token-weighted loss over micro-batches and ranks, clipping,
periodic checkpoints) -> ``export`` (``hf/``, ``peft/``, ``adapter/``) -> ``cleanup``. Everything a test or
another tool needs (config checks, the trainable set, the checkpoint format, sharding, exports) lives in
the ``longlora_tune`` library; this file holds the training loop.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torchtune import config, training, utils
from tqdm import tqdm

from longlora_tune._compat import import_object
from longlora_tune.auto_choice import resolve_auto_settings
from longlora_tune.config import loading
from longlora_tune.config.validation import (
    EXPORT_FORMATS,
    batch_settings,
    build_meta_model,
    check_dataset_size,
    data_parallel_size,
    download_repo,
    training_length,
    validate_config_in_worker,
)
from longlora_tune.data.loader import DEFAULT_COLLATE, build_dataloader, pad_multiple
from longlora_tune.errors import (
    CheckpointWriteError,
    Interrupted,
    LongLoRAConfigError,
    RaisedOnRankZero,
    TrainingDivergedError,
    config_error_once_per_node,
    report_errors,
    signals_as_interrupts,
)
from longlora_tune.hf import export
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.trainable import set_trainable_params, trainable_param_names
from longlora_tune.modules.context_parallel import (
    context_parallel_attention,
    split_batch_for_context_parallel,
)
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.modules.s2_attention import describe_backend
from longlora_tune.training import qlora
from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing
from longlora_tune.training.checkpoint_manager import (
    NOTHING_SAVED,
    CheckpointManager,
    TrainingPosition,
    gather_full_state,
)
from longlora_tune.training.compile import compile_model_and_loss, padded_lengths
from longlora_tune.training.distributed import (
    close_process_group,
    fp32_trainable_policy,
    init_process_group,
    parallel_layout,
    rank_and_world_size,
    resolve_device,
    resolve_dtype,
    run_on_rank_zero,
    seed_rank,
    shard_model,
)
from longlora_tune.training.metric_logging import build_metric_logger, rounded_metrics
from longlora_tune.training.sequence_tiling import apply_sequence_tiling
from longlora_tune.training.weights import load_starting_state

log = utils.get_logger("INFO")


class LongLoRARecipeDistributed:
    """LongLoRA training with FSDP2 on any number of ranks (one included).

    ``setup`` builds everything (model on the meta device, sharded, then filled from the base checkpoint;
    tokenizer; data; optimizer; schedule; resumed state), ``train`` runs ``max_steps`` optimizer steps with
    periodic checkpoints, ``export`` writes the ``hf/``, ``peft/`` and ``adapter/`` outputs, ``cleanup``
    closes the logger.

    Args:
        cfg: the parsed config (see ``configs/llama2_7b_100k.yaml`` for every key).

    Raises:
        LongLoRAConfigError: on invalid settings.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank_and_world_size()
        self.is_rank_zero = self.rank == 0
        self.device = resolve_device(cfg.get("device", None))
        self.dtype = resolve_dtype(cfg.get("dtype", "bf16"), self.device)
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.seed = int(cfg.get("seed", 0))
        # With ``epochs`` instead, set from the dataset's size in ``_setup_data``.
        self.max_steps = int(cfg.max_steps) if cfg.get("max_steps", None) is not None else 0
        self.batch_size = int(cfg.batch_size)
        # Context parallelism: the ranks of one cp group share each sequence, so batches count dp ranks.
        data_parallel_size(cfg, self.world_size)
        self.layout = parallel_layout(self.device.type, int(cfg.get("context_parallel_degree", 1)))
        self.global_batch_size, self.grad_accum = batch_settings(cfg, self.layout.dp_size)
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.save_every_n_steps = int(cfg.get("save_every_n_steps", 0) or 0)
        self.log_every_n_steps = int(cfg.get("log_every_n_steps", 1))
        self.log_peak_memory = bool(cfg.get("log_peak_memory_stats", True)) and self.device.type == "cuda"
        self.extras = tuple(cfg.get("trainable_extras", ("embed", "norm")))
        self.export_formats = tuple(cfg.get("export_formats", EXPORT_FORMATS))
        # Recipe state, restored on resume.
        self.position = TrainingPosition()
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints",
            cfg=cfg,
            device=self.device,
            global_batch_size=self.global_batch_size,
            keep_last_n=cfg.get("keep_last_n", None),
        )
        self.metric_logger = None
        self.rope_facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build model, tokenizer, data, loss, optimizer and schedule; restore a checkpoint if asked.

        Everything that can fail on the config or the data (model shapes on the meta device, tokenizer,
        dataset) comes before the base weights are loaded, which takes minutes at 7B.
        """
        cfg = self.cfg
        seed_rank(self.seed)
        resume_dir = self.checkpoints.resume_point(cfg.get("resume_from_checkpoint", False))

        self.base = HFBaseModel.read(cfg.checkpoint_dir, repo_id=download_repo(cfg))
        model = self._build_model()
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.loss_fn = config.instantiate(cfg.loss)
        self.ignore_index = int(getattr(self.loss_fn, "ignore_index", -100))
        self._setup_data()
        # Only now: the model and data checks above leave no output_dir (or logs/) behind when they fail.
        self.checkpoints.claim_output_dir(
            resume_dir, dataset_fingerprint=self.dataset_fingerprint, exports=self.export_formats
        )
        if self.is_rank_zero:
            self.metric_logger = build_metric_logger(
                cfg.get("metric_logger", None), self.output_dir / "logs", self.checkpoints.run_id
            )
            self.metric_logger.log_config(cfg)
        self.model = self._load_model(model, resume_dir)
        # Detected by class name as in torchtune: the model must return the logits in the same chunks.
        if self.loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self.model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        elif hasattr(self.loss_fn, "set_model_output"):
            # longlora_tune.modules.linear_ce: the model's forward ends with the fused projection + loss.
            self.loss_fn.set_model_output(self.model)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.lr_scheduler = self._make_scheduler()
        if resume_dir is not None:
            self.position = self.checkpoints.load(
                resume_dir,
                model=self.model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                optimizer_cfg=cfg.optimizer,
            )
            utils.log_rank_zero(log, f"Resumed from {resume_dir} at step {self.position.global_step}")
        self.act_ctx = training.get_act_offloading_ctx_manager(
            self.model, bool(cfg.get("enable_activation_offloading", False))
        )

    def _build_model(self) -> torch.nn.Module:
        """The model on the meta device (no memory), checked against the training length."""
        built = build_meta_model(self.cfg, self.base, self.dtype)
        self.model_info, self.rope_facts = built.info, built.rope_facts
        return built.model

    def _load_model(self, model: torch.nn.Module, resume_dir: Optional[Path]) -> torch.nn.Module:
        """Trainable set, activation checkpointing, FSDP2, then the weights (base, LoRA init, resumed)."""
        cfg = self.cfg
        counts = set_trainable_params(model, extras=self.extras)
        self.trainable_names = sorted(trainable_param_names(model, extras=self.extras))
        utils.log_rank_zero(log, f"Trainable parameters: {dict(counts)}")
        if cfg.get("compile", False):
            # torchtune's order: layers are compiled before activation checkpointing and FSDP2 wrap them.
            # S² specialises the graph on the sequence length: one compile per padded length.
            lengths = padded_lengths(
                cfg.get("pad_to_multiple_of", None), self.model_info.group_size, training_length(cfg) or 0
            )
            self.loss_fn = compile_model_and_loss(
                model,
                self.loss_fn,
                device=self.device,
                max_lengths=lengths,
                verbose=self.is_rank_zero,
            )

        if cfg.get("enable_activation_checkpointing", True):
            # The first N layers (all by default); see longlora_tune.training.activation_checkpointing for
            # why.
            wrapped = apply_activation_checkpointing(model, cfg.get("activation_checkpointing_layers", "all"))
            utils.log_rank_zero(log, f"Activation checkpointing: {wrapped} decoder layer(s)")
        tile = cfg.get("sequence_tile_tokens", None)  # see longlora_tune.training.sequence_tiling
        if apply_sequence_tiling(model, tile):
            tiled = "attention prefixes, MLP blocks and the final norm"
            utils.log_rank_zero(log, f"Sequence tiling: {tiled} in tiles of {tile} tokens")
        mp_policy = fp32_trainable_policy(model, self.dtype, bool(cfg.get("fp32_trainable_params", True)))
        self.quantized = qlora.has_nf4_params(model)
        if self.quantized:
            qlora.check_nf4_shardable(model, self.world_size)
        shard_model(
            model,
            reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)),
            mp_policy=mp_policy,
            ignored_params=qlora.fsdp_ignored_params(model, self.world_size),
        )
        model.to_empty(device=self.device)

        load_starting_state(model, self.base, seed=self.seed, device=self.device, resume_dir=resume_dir)
        model.train()
        backend = describe_backend(cfg.model.get("s2_backend", "auto"), self.device, self.dtype)
        utils.log_rank_zero(
            log,
            f"Model ready: S2 group size {self.model_info.group_size} ({backend}), "
            f"RoPE factor {self.model_info.rope_scaling_factor}, {self.world_size} rank(s) "
            f"({self.layout.dp_size} data x {self.layout.cp_degree} context parallel), "
            f"gradient accumulation {self.grad_accum}",
        )
        return model

    def _setup_data(self) -> None:
        cfg = self.cfg
        extra = self.base.dataset_overrides(cfg.dataset, self.tokenizer)
        if "eos_id" in extra:
            utils.log_rank_zero(
                log,
                f"Documents end with the base model's eos_token_id {extra['eos_id']} (config.json), not "
                f"the tokenizer's eos_id {getattr(self.tokenizer, 'eos_id', None)} (set dataset.eos_id to "
                "choose)",
            )
        try:
            dataset = config.instantiate(cfg.dataset, self.tokenizer, **extra)
        except (ValueError, FileNotFoundError) as e:
            raise LongLoRAConfigError(f"dataset: {e}") from e
        train_len = training_length(cfg) or 0
        self.steps_per_epoch = check_dataset_size(
            len(dataset), train_len, self.global_batch_size, self.layout.dp_size
        )
        if cfg.get("epochs", None) is not None:
            self.max_steps = int(cfg.epochs) * self.steps_per_epoch
        # SFT datasets count samples trimmed or dropped to fit; a PackedDataset keeps its samples in ``ds``.
        samples = getattr(dataset, "ds", dataset)
        # Content of the data files and the tokenizer (pretraining blocks), checked on resume.
        self.dataset_fingerprint = getattr(samples, "fingerprint", None)
        if hasattr(samples, "num_trimmed") or hasattr(samples, "num_skipped"):
            utils.log_rank_zero(
                log,
                f"Dataset: {getattr(samples, 'num_trimmed', 0)} samples trimmed to fit {train_len} tokens "
                f"(num_trimmed), {getattr(samples, 'num_skipped', 0)} skipped (num_skipped)",
            )
        self.dataloader, self.sampler = build_dataloader(
            dataset,
            batch_size=self.batch_size,
            global_batch_size=self.global_batch_size,
            rank=self.layout.dp_rank,
            world_size=self.layout.dp_size,
            seed=self.seed,
            shuffle=bool(cfg.get("shuffle", True)),
            packed=bool(cfg.dataset.get("packed", False)),
            collate_fn=cfg.get("collate_fn", DEFAULT_COLLATE),
            pad_to_multiple_of=pad_multiple(
                cfg.get("pad_to_multiple_of", None),
                self.model_info.group_size,
                train_len,
                context_parallel_degree=self.layout.cp_degree,
            ),
            pad_id=int(getattr(self.tokenizer, "pad_id", 0) or 0),
            ignore_index=self.ignore_index,
            num_workers=int(cfg.get("num_workers", 0)),
        )
        utils.log_rank_zero(
            log,
            f"Dataset: {len(dataset)} sequences of up to {train_len} tokens, "
            f"{self.steps_per_epoch} steps per epoch",
        )

    def _make_scheduler(self) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        cfg_sched = self.cfg.get("lr_scheduler", None)
        if cfg_sched is None:
            return None
        target = import_object(cfg_sched._component_)
        extra = {}
        if "num_training_steps" in inspect.signature(target).parameters:
            extra["num_training_steps"] = self.max_steps
        return config.instantiate(cfg_sched, self.optimizer, **extra)

    # ------------------------------------------------------------------ checkpoints

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
            self._diverged(f"trainable weights became NaN/inf after step {self.position.global_step}")

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step (rank 0 writes, all ranks gather).

        Returns:
            The checkpoint folder.
        """
        self._check_finite_weights()
        return self.checkpoints.save(
            self.position,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            trainable_names=self.trainable_names,
            recipe_state={
                "world_size": self.world_size,
                "context_parallel_degree": self.layout.cp_degree,
                "seed": self.seed,
            },
        )

    def _diverged(self, what: str) -> None:
        last = self.checkpoints.last
        where = f"last good checkpoint: {last}" if last else "no checkpoint saved"
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
        saved_step = self.position.global_step if self.checkpoints.last is not None else -1
        # The context manager closes the bar before an error message is printed.
        with tqdm(
            total=self.max_steps,
            initial=self.position.global_step,
            disable=not self.is_rank_zero,
            desc="train",
        ) as pbar:
            while self.position.global_step < self.max_steps:
                self.sampler.set_position(self.position.epoch, self.position.epoch_position)
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
                    self.position.global_step += 1
                    self.position.epoch_position += self.global_batch_size
                    metrics["tokens_per_second_per_gpu"] = seen / (time.perf_counter() - t0)
                    if self.log_peak_memory:
                        metrics.update(training.get_memory_stats(device=self.device))
                    step = self.position.global_step
                    if self.metric_logger is not None and step % self.log_every_n_steps == 0:
                        self.metric_logger.log_dict(rounded_metrics(metrics), step=step)
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    if self.save_every_n_steps and self.position.global_step % self.save_every_n_steps == 0:
                        self.save_checkpoint()
                        saved_step = self.position.global_step
                    if self.position.global_step >= self.max_steps:
                        break
                    micro, seen = 0, 0
                    loss_sum.zero_()
                    tokens.zero_()
                    t0 = time.perf_counter()
                else:
                    # The sampler yields whole steps only, so an exhausted epoch has no leftover micro-batch.
                    self.position.epoch += 1
                    self.position.epoch_position = 0
        if saved_step != self.position.global_step:
            self.save_checkpoint()

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        shifted, attention = False, contextlib.nullcontext()
        if self.layout.cp_degree > 1:
            # This rank's slice: labels shifted before the split, global positions; the S² layers exchange
            # halos, in backward too (activation checkpointing recomputes the attention there).
            part = split_batch_for_context_parallel(
                batch, rank=self.layout.cp_rank, degree=self.layout.cp_degree, ignore_index=self.ignore_index
            )
            batch, shifted = part.batch, True
            docs = part.document_ids.to(self.device) if part.document_ids is not None else None
            attention = context_parallel_attention(self.model, group=self.layout.cp_group, document_ids=docs)
        with attention:
            loss, n_tokens = summed_token_loss(
                self.model,
                self.loss_fn,
                batch,
                device=self.device,
                ignore_index=self.ignore_index,
                context=self.act_ctx,
                labels_shifted=shifted,
            )
            loss.backward()
        return loss.detach().to(torch.float64), n_tokens, batch["tokens"].numel()

    def _optimizer_step(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
        total = int(tokens.item())
        loss = float(loss_sum.item()) / max(total, 1)
        if not math.isfinite(loss):
            self._diverged(f"loss is {loss} at step {self.position.global_step + 1}")
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
                self._diverged(f"gradient norm is {grad_norm} at step {self.position.global_step + 1}")
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
        if not self.export_formats:
            return {}
        trainable = gather_full_state(self.model, self.trainable_names)
        full = {}
        if "hf" in self.export_formats and self.quantized:
            # The NF4 base dequantized: the weights the adapter was trained against.
            full = qlora.gather_full_state_dict(self.model, self.device)
        elif "hf" in self.export_formats:
            full = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        info = export.LongLoRAExportInfo(
            model_config={**OmegaConf.to_container(self.cfg.model, resolve=True), **self.rope_facts},
            rope_scaling_factor=self.model_info.rope_scaling_factor,
            group_size=self.model_info.group_size,
            trainable_extras=list(self.extras),
            base_checkpoint_dir=str(self.base.path),
            hf_repo_id=self.cfg.get("hf_repo_id", None),
            training_length=training_length(self.cfg),
            global_step=self.position.global_step,
            rope=self.model_info.rope,
        )

        def write() -> dict[str, Path]:
            written: dict[str, Path] = {}
            # Each folder is written all-or-nothing: a crash or a full disk leaves no half-written export.
            if "hf" in self.export_formats:
                written["hf"] = export.save_merged_hf_checkpoint(
                    full, self.output_dir / "hf", base=self.base, model_info=self.model_info, dtype=self.dtype
                )
            if "peft" in self.export_formats:
                written["peft"] = export.save_peft(
                    trainable,
                    self.output_dir / "peft",
                    base=self.base,
                    model_info=self.model_info,
                    base_model_name_or_path=self.cfg.get("hf_repo_id", None) or str(self.base.path),
                    quantized_base=self.quantized,
                )
            if "adapter" in self.export_formats:
                written["adapter"] = export.save_adapter(trainable, self.output_dir / "adapter", info)
            return written

        try:
            # A full disk on rank 0 stops every rank (rather than leaving them at the barrier).
            out = run_on_rank_zero(write)
        except CheckpointWriteError as e:
            raise CheckpointWriteError(
                e.path,
                checkpoint=False,
                needed_bytes=e.needed_bytes,
                fix=f"free disk space, then run the same command with resume_from_checkpoint=true: it "
                f"exports again from {self.checkpoints.last} without training",
            ) from e
        dist.barrier()
        return out

    def cleanup(self) -> None:
        """Close the metric logger and give ``output_dir`` back."""
        if self.metric_logger is not None:
            self.metric_logger.close()
        self.checkpoints.release()


def run(cfg: DictConfig) -> dict[str, Path]:
    """Validate, train and export.

    Args:
        cfg: the recipe config.

    Returns:
        Export format -> output folder.

    Raises:
        LongLoRAConfigError: on a bad config or missing files (before any heavy work where possible).
        TrainingDivergedError: when the loss, gradients or weights stop being finite.
    """
    checked = validate_config_in_worker(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    created = init_process_group(resolve_device(cfg.get("device", None)), solo_group=True)
    recipe = None
    with signals_as_interrupts() as watch:
        try:
            # `auto` memory levers: chosen for this run's budget (the same on every rank), written into cfg,
            # before output_dir is touched. One run per output_dir: the checkpoint manager takes its lock
            # (see claim_output_dir).
            device = resolve_device(cfg.get("device", None))
            for line in config_error_once_per_node(lambda: resolve_auto_settings(cfg, checked, device)):
                utils.log_rank_zero(log, line)
            recipe = LongLoRARecipeDistributed(cfg)
            recipe.setup()
            recipe.train()
            outputs = recipe.export()
            if recipe.is_rank_zero:
                where = {"checkpoint": recipe.checkpoints.last, **outputs, "logs": recipe.output_dir / "logs"}
                print("LongLoRA training finished. Outputs:", file=sys.stderr)
                for name, path in where.items():
                    print(f"  {name:>10}: {path}", file=sys.stderr)
            return outputs
        except BaseException as e:
            if not watch.explains(e):
                raise
            # Every rank got the signal (or lost a peer that did); rank 0 says where the run stands.
            hint = (
                NOTHING_SAVED if recipe is None else recipe.checkpoints.stop_hint(recipe.position.global_step)
            )
            stop = Interrupted(watch.signum or signal.SIGINT, hint)
            if rank_and_world_size()[0] == 0:
                raise stop from None
            raise RaisedOnRankZero(stop.code, str(stop)) from None
        finally:
            if recipe is not None:
                recipe.cleanup()
            # The model and its meshes go first, so closing the group frees its backend (see there).
            recipe = None
            close_process_group(created)


@report_errors
@loading.parse
def recipe_main(cfg: DictConfig) -> None:
    """LongLoRA continued pretraining / long-context fine-tuning (see the module docstring)."""
    run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
