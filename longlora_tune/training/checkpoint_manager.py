"""What a training run saves and restores, behind ``resume_point`` / ``load`` / ``save``.

The recipe holds the loop; this class holds the checkpoint side of it: which checkpoint a run resumes
from (and the lineage its own checkpoints record), restoring the optimizer, schedule, data position and
RNG streams from one, and gathering the sharded state into a new one that rank 0 writes atomically
(:func:`longlora_tune.training.checkpointing.lineage.write_checkpoint`) before pruning this run's older
ones. Every rank calls every method: gathering and broadcasting are collectives, the file work runs on
rank 0 only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchtune import utils

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.checkpointing import housekeeping, lineage
from longlora_tune.training.checkpointing import rng as ckpt_rng
from longlora_tune.training.distributed import rank_and_world_size, run_on_rank_zero
from longlora_tune.training.resume import (
    apply_optimizer_settings,
    compare_dataset_fingerprint,
    compare_with_checkpoint,
)

__all__ = ["NOTHING_SAVED", "CheckpointManager", "TrainingPosition"]

# A stopped run's hint when it saved nothing (see CheckpointManager.stop_hint).
NOTHING_SAVED = "no checkpoint was saved yet, so a new run starts over"

# The recipe's console logger (torchtune's), so these lines appear where the recipe's own do.
log = utils.get_logger("INFO")


@dataclass
class TrainingPosition:
    """Where a run is: optimizer steps done, and the data position inside the current epoch.

    Attributes:
        global_step: optimizer steps completed.
        epoch: the current epoch.
        epoch_position: sequences of this epoch already consumed (a multiple of the global batch).
    """

    global_step: int = 0
    epoch: int = 0
    epoch_position: int = 0


class CheckpointManager:
    """Resume, load and save the step folders of one run in ``<output_dir>/checkpoints``.

    It also holds the ``output_dir`` lock (:class:`~longlora_tune.training.checkpointing.housekeeping.
    OutputDirLock`) from :meth:`resume_point` (when ``output_dir`` exists already) or :meth:`claim_output_dir`
    to :meth:`release`.

    Args:
        checkpoints_dir: the run's checkpoint folder.
        cfg: the run's config (saved with every checkpoint and compared on resume).
        device: the training device (its RNG stream is saved and restored).
        global_batch_size: sequences per optimizer step; a resume must keep it.
        keep_last_n: how many of this run's checkpoints to keep (None keeps all).
    """

    def __init__(
        self,
        checkpoints_dir: Path,
        *,
        cfg: DictConfig,
        device: torch.device,
        global_batch_size: int,
        keep_last_n: Optional[int] = None,
    ) -> None:
        self.checkpoints_dir = Path(checkpoints_dir)
        self.output_dir = self.checkpoints_dir.parent
        # Rank 0: one run per output_dir (two runs pruning and resuming the same checkpoints lose data).
        self._lock = housekeeping.OutputDirLock(self.output_dir)
        self.cfg = cfg
        self.device = device
        self.global_batch_size = global_batch_size
        self.keep_last_n = keep_last_n
        self.rank, self.world_size = rank_and_world_size()
        #: The newest intact checkpoint of this run: the one resumed from, then each one saved.
        self.last: Optional[Path] = None
        # Rank 0: what this run's checkpoints record about the run.
        self._lineage: Optional[lineage.Lineage] = None

    def resume_point(self, resume: Union[bool, str, Path, None]) -> Optional[Path]:
        """The verified checkpoint to resume from, or None; starts this run's checkpoint lineage.

        Args:
            resume: the config's ``resume_from_checkpoint``: false (a new run), true (the newest intact
                checkpoint of the latest run) or a checkpoint folder.

        Returns:
            The checkpoint folder (on every rank), or None.

        Raises:
            LongLoRAConfigError: a new run over an earlier run's checkpoints, ``true`` with none to resume,
                a damaged explicit checkpoint, or a run-defining setting that differs from the checkpoint's.
        """

        def find() -> Optional[Path]:
            if self.output_dir.exists():
                # Another run may be using its checkpoints. A missing output_dir is created only by
                # claim_output_dir, after every check of the config and the data.
                self._lock.acquire()
            # Interrupted saves and deletions leave hidden folders (GBs each at 7B); we hold the lock.
            housekeeping.clean_leftovers(self.checkpoints_dir)
            if resume in (False, None):
                # An earlier run's checkpoints would be what a later resume_from_checkpoint=true picks up.
                stale = lineage.latest_checkpoint(self.checkpoints_dir)
                if stale is not None:
                    raise LongLoRAConfigError(
                        f"{self.checkpoints_dir} holds checkpoints of an earlier run (newest: {stale.name}); "
                        "set resume_from_checkpoint=true to continue it, or use a new output_dir"
                    )
                found = None
            elif resume is True:
                # The newest intact checkpoint of the latest run (damaged ones are skipped with a warning).
                found = lineage.find_resumable_checkpoint(self.checkpoints_dir)
                if found is None:
                    raise LongLoRAConfigError(
                        f"resume_from_checkpoint=true but {self.checkpoints_dir} holds no checkpoint; "
                        "set resume_from_checkpoint=false to start a new run"
                    )
            else:
                found = Path(str(resume)).expanduser()
                ckpt_format.verify_checkpoint(found)
            if found is not None:
                # Settings that define the run must match the checkpoint's; the others take effect.
                saved = ckpt_format.read_saved_config(found)
                for change in compare_with_checkpoint(self.cfg, saved, str(found)):
                    log.info(f"Resume changes {change}")
            self._lineage = lineage.start_lineage(found)
            return found

        return run_on_rank_zero(find)

    def claim_output_dir(
        self,
        resumed: Optional[Path],
        *,
        dataset_fingerprint: Optional[str],
        exports: Iterable[str] = (),
    ) -> None:
        """Take ``output_dir`` for this run, once every check of the config and the data has passed.

        Creates ``output_dir`` (with its lock) if :meth:`resume_point` found none, so a run that fails its
        checks leaves nothing behind; removes what interrupted exports left there; refuses to resume on
        data or a tokenizer other than the checkpoint's; and records the fingerprint in this run's
        checkpoints.

        Args:
            resumed: the checkpoint from :meth:`resume_point`, or None.
            dataset_fingerprint: the built dataset's ``fingerprint`` (content of the data files and the
                tokenizer; None when the dataset has none).
            exports: the export folder names of this run (``hf``, ``peft``, ``adapter``).

        Raises:
            LongLoRAConfigError: if another run holds ``output_dir``, wrote checkpoints there while this
                one was starting, or the data differ from the resumed checkpoint's.
        """

        def claim() -> None:
            created_now = not self._lock.held
            self._lock.acquire()
            stale = lineage.latest_checkpoint(self.checkpoints_dir) if created_now else None
            if stale is not None:
                raise LongLoRAConfigError(
                    f"{self.checkpoints_dir} got checkpoints of another run while this one was starting "
                    f"(newest: {stale.name}); use another output_dir"
                )
            housekeeping.clean_export_leftovers(self.output_dir, exports)
            if resumed is not None:
                compare_dataset_fingerprint(
                    ckpt_format.read_manifest(resumed), dataset_fingerprint, str(resumed)
                )
            self._lineage = dataclasses.replace(self._lineage, dataset_fingerprint=dataset_fingerprint)

        run_on_rank_zero(claim, share_result=False)

    def release(self) -> None:
        """Give ``output_dir`` back (rank 0; a no-op when it was never taken)."""
        self._lock.release()

    @property
    def run_id(self) -> str:
        """This run's id (rank 0, after :meth:`resume_point`): its checkpoints and its log file carry it."""
        if self._lineage is None:
            raise RuntimeError("run_id is known on rank 0 after resume_point()")
        return self._lineage.run_id

    def stop_hint(self, step: int) -> str:
        """What a run stopped at ``step`` has kept and how to go on, for its one line (rank 0).

        The checkpoint named is the one ``resume_from_checkpoint=true`` would pick, read from disk: the
        signal may land between a save finishing and the recipe noting it.

        Args:
            step: the global step the run stopped at.

        Returns:
            e.g. ``"at step 3; checkpoint out/checkpoints/step_000003 is intact: run the same command with
            resume_from_checkpoint=true to continue from it"``.
        """
        newest = lineage.find_resumable_checkpoint(self.checkpoints_dir)
        if newest is None:
            return f"at step {step}; {NOTHING_SAVED}"
        return (
            f"at step {step}; checkpoint {newest} is intact: run the same command with "
            "resume_from_checkpoint=true to continue from it"
        )

    def load(
        self,
        ckpt: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
        optimizer_cfg: Any,
    ) -> TrainingPosition:
        """Restore the optimizer, schedule and RNG streams from a checkpoint (the trained weights are part
        of the model's starting state: :func:`longlora_tune.training.weights.starting_state`).

        The config's optimizer hyperparameters win over the restored ones
        (:func:`~longlora_tune.training.resume.apply_optimizer_settings`).
        With the same world size every rank continues its own RNG streams; otherwise all take rank 0's.

        Args:
            ckpt: the checkpoint from :meth:`resume_point`.
            model: the sharded model the optimizer trains.
            optimizer: its optimizer.
            lr_scheduler: its schedule, or None.
            optimizer_cfg: the config's ``optimizer`` section.

        Returns:
            The position to continue from.

        Raises:
            LongLoRAConfigError: if the checkpoint was trained with another global batch size.
        """
        state = run_on_rank_zero(lambda: ckpt_format.read_recipe_state(ckpt))
        if int(state["global_batch_size"]) != self.global_batch_size:
            raise LongLoRAConfigError(
                f"{ckpt} was trained with global_batch_size={state['global_batch_size']}, the config says "
                f"{self.global_batch_size}; resume with the same global batch"
            )
        opt_sd = run_on_rank_zero(lambda: ckpt_format.read_optimizer_state(ckpt), share_result=False) or {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, opt_sd, options=options)
        if lr_scheduler is not None and state.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        apply_optimizer_settings(optimizer, lr_scheduler, optimizer_cfg)
        rng = state["rng"]
        ckpt_rng.set_rng_state(rng[self.rank] if len(rng) == self.world_size else rng[0], self.device)
        self.last = ckpt
        return TrainingPosition(int(state["global_step"]), int(state["epoch"]), int(state["epoch_position"]))

    def save(
        self,
        position: TrainingPosition,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
        trainable_names: list[str],
        recipe_state: dict[str, Any],
    ) -> Path:
        """Write a resumable checkpoint of ``position`` (all ranks gather, rank 0 writes and prunes).

        Args:
            position: the step and data position being saved.
            model: the sharded model.
            optimizer: its optimizer.
            lr_scheduler: its schedule, or None.
            trainable_names: the trainable parameters (the LongLoRA trainable set), in model names.
            recipe_state: further facts of the run the recipe records (world size, seed, ...).

        Returns:
            The checkpoint folder.
        """
        trainable = gather_full_state(model, trainable_names)
        opt_sd = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        rng_all: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng_all, ckpt_rng.rng_state(self.device))
        final = self.checkpoints_dir / ckpt_format.step_dir_name(position.global_step)
        state = {
            "global_step": position.global_step,
            "epoch": position.epoch,
            "epoch_position": position.epoch_position,
            "global_batch_size": self.global_batch_size,
            **recipe_state,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "rng": rng_all,
        }

        def write() -> None:
            lineage.write_checkpoint(
                final,
                trainable=trainable,
                optimizer_state=opt_sd,
                recipe_state=state,
                config=self.cfg,
                lineage=self._lineage,
            )
            # Only this run's older checkpoints go; the one it resumed from and other runs' stay.
            resumed = self._lineage.resumed_from_path
            housekeeping.prune_checkpoints(
                self.checkpoints_dir,
                self.keep_last_n,
                run_id=self._lineage.run_id,
                protected=[resumed] if resumed is not None else [],
            )
            log.info(f"Saved checkpoint {final}")

        # A full disk on rank 0 stops every rank (rather than leaving them at the barrier).
        run_on_rank_zero(write, share_result=False)
        dist.barrier()
        self.last = final
        return final


def gather_full_state(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """All-gather the named tensors of a (possibly FSDP2-sharded) model; rank 0 keeps them, on CPU.

    Args:
        model: the model.
        names: its state-dict names to gather (every rank must pass the same list).

    Returns:
        Name -> full tensor on rank 0; an empty dict on the other ranks.
    """
    rank, _ = rank_and_world_size()
    sharded = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = sharded[name]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out
