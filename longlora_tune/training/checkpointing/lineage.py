"""Run lineage: which run wrote a checkpoint, which checkpoint it started from, and which one resume picks.

Resuming follows write order and lineage, not step numbers: a run resumed from an early step writes the
newest checkpoints. A save over another run's folder of the same step moves that folder aside
(``step_N.abandoned-<run>`` / ``step_N.ancestor-<run>``) instead of deleting it. Checkpoint folders are
written through :func:`~longlora_tune._io.atomic_directory`, so a crash while saving never damages the
previous checkpoint.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from longlora_tune._io import atomic_directory, tensor_bytes
from longlora_tune.errors import CheckpointDamagedError, LongLoRAConfigError
from longlora_tune.training.checkpointing.format import (
    ASIDE_DIR_RE,
    STEP_DIR_RE,
    CheckpointRef,
    read_manifest,
    read_recipe_state,
    step_from_name,
    verify_checkpoint,
    write_checkpoint_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lineage:
    """What every checkpoint of one run records about that run; made once per run start.

    Attributes:
        run_id: a fresh uuid (hex) for this run.
        resumed_from: the checkpoint this run started from (None for a fresh run).
        resumed_from_path: where that checkpoint was when the run started (not saved in manifests).
        dataset_fingerprint: the training data's fingerprint, set once the dataset is built (None: unknown).
    """

    run_id: str
    resumed_from: Optional[CheckpointRef] = None
    resumed_from_path: Optional[Path] = None
    dataset_fingerprint: Optional[str] = None


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint folder and what its manifest says (without checking its files).

    Attributes:
        path: the folder.
        step: its training step.
        run_id: the run that wrote it (None: no manifest).
        write_seq: its write sequence number in the checkpoints folder (0: no manifest).
        resumed_from: the checkpoint its run started from.
        has_manifest: whether it has a ``manifest.json``.
        problem: why its manifest cannot be read (None when it can, or when there is none).
    """

    path: Path
    step: int
    run_id: Optional[str] = None
    write_seq: int = 0
    resumed_from: Optional[CheckpointRef] = None
    has_manifest: bool = False
    problem: Optional[str] = None

    @property
    def live(self) -> bool:
        """Whether the folder has its ``step_N`` name (not moved aside as another branch's)."""
        return STEP_DIR_RE.match(self.path.name) is not None

    def ref(self) -> CheckpointRef:
        """Return the reference a run resuming from this checkpoint records.

        Returns:
            The reference.
        """
        return CheckpointRef(self.path.name, self.step, self.run_id, self.write_seq)


def start_lineage(resumed_from: Optional[str | Path] = None) -> Lineage:
    """Start a run's lineage: a new run id, and the checkpoint the run resumes from (if any).

    Args:
        resumed_from: the checkpoint folder the run resumes from; None for a fresh run.

    Returns:
        The lineage to pass to every :func:`write_checkpoint` of this run.

    Raises:
        CheckpointDamagedError: if that checkpoint's manifest cannot be read.
    """
    run_id = uuid.uuid4().hex
    if resumed_from is None:
        return Lineage(run_id)
    path = Path(resumed_from).expanduser()
    info = checkpoint_info(path)
    if info.problem:
        read_manifest(path)  # raises the error that made ``problem``
    return Lineage(run_id, info.ref(), path)


def checkpoint_info(checkpoint: str | Path) -> CheckpointInfo:
    """Describe a checkpoint folder from its manifest (files are not checked: see :func:`verify_checkpoint`).

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        Its info; an unreadable manifest is reported in ``problem`` instead of raising.
    """
    path = Path(checkpoint)
    try:
        manifest = read_manifest(path)
    except CheckpointDamagedError as e:
        return CheckpointInfo(path, step_from_name(path.name) or 0, has_manifest=True, problem=e.detail)
    if manifest is None:
        step = step_from_name(path.name)
        if step is None:
            # A renamed pre-manifest checkpoint: its step is only in recipe_state.pt.
            try:
                step = int(read_recipe_state(path)["global_step"])
            except (LongLoRAConfigError, KeyError, TypeError, ValueError):
                step = 0
        return CheckpointInfo(path, step)
    ref = manifest.get("resumed_from")
    return CheckpointInfo(
        path,
        int(manifest["step"]),
        run_id=manifest["run_id"],
        write_seq=int(manifest["write_seq"]),
        resumed_from=CheckpointRef.from_json(ref) if ref is not None else None,
        has_manifest=True,
    )


def _write_order(info: CheckpointInfo) -> tuple[int, int, str]:
    # Checkpoints without a manifest (write_seq 0) predate every one with a manifest and are in step order.
    return (info.write_seq, info.step, info.path.name)


def scan_checkpoints(checkpoints_dir: str | Path) -> list[CheckpointInfo]:
    """Describe every checkpoint folder under ``checkpoints_dir``, including ones moved aside, oldest first.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        Infos of ``step_N`` folders and of ``step_N.abandoned-*``/``step_N.ancestor-*`` folders, in write
        order (pre-manifest checkpoints first, by step).
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [
        checkpoint_info(p)
        for p in root.iterdir()
        if p.is_dir() and (STEP_DIR_RE.match(p.name) or ASIDE_DIR_RE.match(p.name))
    ]
    return sorted(found, key=_write_order)


def lineage_chain(infos: list[CheckpointInfo], start: CheckpointInfo | CheckpointRef) -> list[CheckpointInfo]:
    """``start`` and the checkpoints it descends from, newest first.

    A run's checkpoints up to ``start`` (by write order), then the checkpoint that run resumed from and
    that run's checkpoints up to it, and so on. Checkpoints without a manifest form one run, in step order.

    Args:
        infos: the checkpoints of a folder (:func:`scan_checkpoints`); damaged ones are left out.
        start: the newest checkpoint of the chain.

    Returns:
        The chain, newest first.
    """
    good = [i for i in infos if i.problem is None]
    chain: list[CheckpointInfo] = []
    run, seq, step = start.run_id, start.write_seq, start.step
    seen: set[str] = set()
    while True:
        if run is None:
            old = [i for i in good if i.run_id is None and i.step <= step]
            return chain + sorted(old, key=_write_order, reverse=True)
        if run in seen:
            return chain
        seen.add(run)
        mine = [i for i in good if i.run_id == run]
        chain += sorted((i for i in mine if i.write_seq <= seq), key=_write_order, reverse=True)
        ref = next((i.resumed_from for i in mine), None)
        if ref is None:
            return chain
        run, seq, step = ref.run_id, ref.write_seq, ref.step


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """List complete checkpoint folders (``step_N``) under ``checkpoints_dir``, in step order.

    Temporary folders of interrupted saves are hidden (dot-prefixed) and never listed, nor are folders
    moved aside as another branch's (``step_N.abandoned-*``); see :func:`scan_checkpoints` for those.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        Folders sorted by step.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """Return the most recently written checkpoint folder (the newest of the latest run), or None.

    This is write order, not step order: a run resumed from an early step writes lower steps than the run
    it branched from, and its checkpoints are the newest. Files are not checked; to resume, use
    :func:`find_resumable_checkpoint`.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        The newest ``step_N`` folder, or None when there is none.
    """
    live = [i for i in scan_checkpoints(checkpoints_dir) if i.live]
    return live[-1].path if live else None


def _aside_path(final: Path, existing: CheckpointInfo, on_lineage: bool) -> Path:
    tag = "ancestor" if on_lineage else "abandoned"
    owner = existing.run_id[:8] if existing.run_id else ("unknown" if existing.problem else "legacy")
    candidate = final.with_name(f"{final.name}.{tag}-{owner}")
    n = 2
    while candidate.exists():
        candidate = final.with_name(f"{final.name}.{tag}-{owner}-{n}")
        n += 1
    return candidate


def write_checkpoint(
    final_dir: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    recipe_state: dict[str, Any],
    config: Any,
    lineage: Lineage,
) -> Path:
    """Write one resumable checkpoint folder, all-or-nothing, with its manifest written last.

    The folder holds ``trainable.safetensors``, ``optimizer.pt``, ``recipe_state.pt``, ``config.yaml`` and
    ``manifest.json`` (step, run id, resumed-from checkpoint, write sequence number, the dataset
    fingerprint and each file's size and sha256). The write sequence number is one more than the highest
    one in the checkpoints folder.

    If ``final_dir`` already exists it is replaced only when this run wrote it. A checkpoint of another run
    at the same step (a run resumed from step 10 reaching step 15 of the run it branched from) is moved
    aside to ``step_000015.abandoned-<its run id[:8]>`` (``.ancestor-`` if this run descends from it), so no
    checkpoint is silently lost; it is kept until deleted by hand.

    Args:
        final_dir: ``<checkpoints_dir>/step_NNNNNN``.
        trainable: full trainable tensors (torchtune names).
        optimizer_state: full optimizer state dict (loadable with ``weights_only=True``).
        recipe_state: step, data position, schedule, RNG states, ... (loadable with ``weights_only=True``).
        config: the run config (an OmegaConf config or dict, saved resolved, or YAML text).
        lineage: this run's :class:`Lineage` (from :func:`start_lineage`).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointWriteError: when the disk fills up; the folder is not created and every earlier
            checkpoint is intact (the message names the one to resume from).
    """
    final = Path(final_dir)
    root = final.parent
    infos = scan_checkpoints(root)
    step = step_from_name(final.name)
    if step is None:
        step = int(recipe_state["global_step"])
    chain = lineage_chain(infos, lineage.resumed_from) if lineage.resumed_from else []
    mine = [i for i in infos if i.run_id == lineage.run_id and i.live]
    # What a disk-full message tells the user to resume from.
    if mine:
        previous: Optional[Path] = mine[-1].path
    elif chain:
        previous = chain[0].path
    else:
        previous = lineage.resumed_from_path
    aside, why = None, ""
    if final.exists():
        existing = checkpoint_info(final)
        if existing.run_id != lineage.run_id:
            on_lineage = any(i.path == existing.path for i in chain)
            aside = _aside_path(final, existing, on_lineage)
            why = "this run descends from it" if on_lineage else "a later run resumed from an earlier step"
    needed = tensor_bytes(trainable) + tensor_bytes(optimizer_state)
    with atomic_directory(final, previous=previous, keep_replaced=aside, needed_bytes=needed) as tmp:
        write_checkpoint_files(
            tmp,
            trainable=trainable,
            optimizer_state=optimizer_state,
            recipe_state=recipe_state,
            config=config,
            step=step,
            run_id=lineage.run_id,
            resumed_from=lineage.resumed_from,
            write_seq=1 + max((i.write_seq for i in infos), default=0),
            dataset_fingerprint=lineage.dataset_fingerprint,
        )
    if aside is not None:
        log.warning(
            f"moved {final.name} of another run aside to {aside.name} ({why}); delete it by hand if unneeded"
        )
    return final


def find_resumable_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """Pick the checkpoint ``resume_from_checkpoint=true`` continues: the newest intact one of the latest run.

    The latest run is the one that wrote the most recent checkpoint. Its checkpoints are tried newest first,
    then the checkpoint it resumed from and that run's earlier ones, and so on up its lineage; each is
    verified (:func:`verify_checkpoint`) and a damaged one is skipped with a warning naming the folder and
    file. Nothing is deleted. Checkpoints of abandoned branches are never picked.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        The checkpoint folder, or None when there is no checkpoint at all.

    Raises:
        CheckpointDamagedError: if there are checkpoints but none in that lineage is intact.
    """
    root = Path(checkpoints_dir)
    infos = scan_checkpoints(root)
    if not infos:
        return None
    damaged: list[str] = []
    for i in infos:
        if i.problem is not None and i.live:
            log.warning(f"skipping damaged checkpoint {i.path}: {i.problem}")
            damaged.append(i.path.name)
    good = [i for i in infos if i.problem is None]
    if good:
        for info in lineage_chain(good, good[-1]):
            try:
                verify_checkpoint(info.path)
            except CheckpointDamagedError as e:
                log.warning(f"skipping damaged checkpoint {info.path}: {e.detail}")
                damaged.append(info.path.name)
                continue
            if damaged:
                log.warning(f"resuming from {info.path}, the newest intact checkpoint of the latest run")
            return info.path
    raise CheckpointDamagedError(
        root,
        None,
        f"holds no intact checkpoint of the latest run (damaged: {', '.join(damaged)})",
        fix="resume from an intact folder with resume_from_checkpoint=<folder>, or use another output_dir",
    )
