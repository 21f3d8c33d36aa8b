"""Our checkpoint folders: their file format, writers and readers, listing and pruning.

Base weights are read from Hugging Face folders by :mod:`longlora_tune.hf.base`. What LongLoRA trains (LoRA
matrices, token embeddings, norms) is saved as one safetensors file in torchtune names, used both by
resumable checkpoints and by the ``adapter/`` export. Checkpoint folders are written through
:func:`atomic_directory`, so a crash while saving never damages the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from longlora_tune._io import (
    atomic_directory,
    atomic_path,
    atomic_write_json,
)
from longlora_tune.errors import CheckpointDamagedError, LongLoRAConfigError
from longlora_tune.models.trainable import TRAINABLE_FILE, read_trainable_state, save_trainable_state

log = logging.getLogger(__name__)

# The step-folder format. ``<output_dir>/checkpoints/step_NNNNNN/`` holds TRAINABLE_FILE, OPTIMIZER_FILE,
# RECIPE_STATE_FILE, CONFIG_FILE and, written last, MANIFEST_FILE: format version, step, run id, the
# checkpoint the run resumed from, a write sequence number (1 + the highest in the folder) and each file's
# size and sha256. Resuming follows write order and lineage, not step numbers: a run resumed from an early
# step writes the newest checkpoints. A save over another run's folder of the same step moves that folder
# aside (``step_N.abandoned-<run>`` / ``step_N.ancestor-<run>``) instead of deleting it. Folders without a
# manifest (written before manifests existed) still resume when their files load, with a warning.

#: Name of the trainable-state file inside a checkpoint or ``adapter/`` folder.
#: Full (unsharded) optimizer state inside a checkpoint folder.
OPTIMIZER_FILE = "optimizer.pt"
#: Step, data position, LR schedule and RNG states inside a checkpoint folder.
RECIPE_STATE_FILE = "recipe_state.pt"
#: The resolved run config inside a checkpoint folder (informative; resuming does not read it).
CONFIG_FILE = "config.yaml"
#: Lineage and each file's size and sha256, written last into a checkpoint folder.
MANIFEST_FILE = "manifest.json"
#: Files a checkpoint must have to be resumed from.
REQUIRED_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RECIPE_STATE_FILE)
MANIFEST_FORMAT = "longlora_tune.checkpoint"
MANIFEST_VERSION = 1
#: Checkpoint folders are ``step_000100`` etc., so lexical and numeric order agree.
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
#: Another run's checkpoint moved aside by a save at the same step (see :func:`write_checkpoint`).
_ASIDE_DIR_RE = re.compile(r"^step_(\d+)\.(?:abandoned|ancestor)-[0-9a-z]+(?:-\d+)?$")
#: Leftovers of interrupted saves (atomic_directory) and prunes (prune_checkpoints).
_HIDDEN_SAVE_RE = re.compile(r"^\.(?P<name>step_\d+)\.(?P<kind>tmp|old)-.+$")
_DELETING_RE = re.compile(r"^\.deleting-.+$")


def step_dir_name(step: int) -> str:
    """Return the checkpoint folder name of a training step (``step_000100``).

    Args:
        step: optimizer steps completed.

    Returns:
        The folder name.
    """
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------------------
# RNG state (saved per rank; numpy arrays become tensors so torch.load(weights_only=True) can read them)
# ----------------------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """Capture this process's random number generators (torch CPU, CUDA of ``device``, Python, numpy).

    Args:
        device: the training device; its CUDA generator is included when it is a CUDA device.

    Returns:
        A state that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back.
    """
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


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore generators captured by :func:`rng_state` (the CUDA one only when both sides have it).

    Args:
        state: what :func:`rng_state` returned (possibly after a save/load round trip).
        device: the training device.
    """
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
# Lineage: which run wrote a checkpoint, which checkpoint that run started from, and in what order
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """The identity of a checkpoint as recorded in the manifests of a run that resumed from it.

    Attributes:
        dir: the folder's name when the run started from it.
        step: its training step.
        run_id: the run that wrote it (None: written before manifests existed).
        write_seq: its write sequence number (0 for checkpoints without a manifest).
    """

    dir: str
    step: int
    run_id: Optional[str]
    write_seq: int

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form.

        Returns:
            A JSON-serialisable dict.
        """
        return {"dir": self.dir, "step": self.step, "run_id": self.run_id, "write_seq": self.write_seq}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointRef:
        """Parse the manifest form.

        Args:
            d: what :meth:`to_json` returned.

        Returns:
            The reference.
        """
        run_id = d.get("run_id")
        run = None if run_id is None else str(run_id)
        return cls(str(d["dir"]), int(d["step"]), run, int(d["write_seq"]))


@dataclass(frozen=True)
class Lineage:
    """What every checkpoint of one run records about that run; made once per run start.

    Attributes:
        run_id: a fresh uuid (hex) for this run.
        resumed_from: the checkpoint this run started from (None for a fresh run).
        resumed_from_path: where that checkpoint was when the run started (not saved in manifests).
    """

    run_id: str
    resumed_from: Optional[CheckpointRef] = None
    resumed_from_path: Optional[Path] = None


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
        return _STEP_DIR_RE.match(self.path.name) is not None

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


def read_manifest(checkpoint: str | Path) -> Optional[dict[str, Any]]:
    """Read and check the shape of a checkpoint's ``manifest.json``.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        The manifest, or None when the folder has none (written before manifests existed).

    Raises:
        CheckpointDamagedError: if the manifest exists but is unreadable, malformed or from a newer format.
    """
    ckpt = Path(checkpoint)
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamagedError(ckpt, MANIFEST_FILE, f"is unreadable ({e})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointDamagedError(ckpt, MANIFEST_FILE, problem)
    return manifest


def _manifest_problem(m: Any) -> Optional[str]:
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        return f"is not a {MANIFEST_FORMAT} manifest"
    if not isinstance(m.get("version"), int) or m["version"] > MANIFEST_VERSION:
        return f"has format version {m.get('version')!r}; this longlora_tune reads up to {MANIFEST_VERSION}"
    if not isinstance(m.get("step"), int) or not isinstance(m.get("write_seq"), int):
        return "lacks step or write_seq"
    if not isinstance(m.get("run_id"), str):
        return "lacks run_id"
    files = m.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        return "lacks a valid file list"
    # A name is a file inside the checkpoint folder: `ckpt / name` must never read or hash another file.
    foreign = next((n for n in files if not _is_plain_file_name(n)), None)
    if foreign is not None:
        return f"lists {foreign!r}, which is not a file name inside the checkpoint folder"
    ref = m.get("resumed_from")
    if ref is not None:
        try:
            CheckpointRef.from_json(ref)
        except (KeyError, TypeError, ValueError, AttributeError):
            return "has an invalid resumed_from entry"
    return None


def _is_plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _step_from_name(name: str) -> Optional[int]:
    m = _STEP_DIR_RE.match(name) or _ASIDE_DIR_RE.match(name)
    return int(m.group(1)) if m else None


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
        return CheckpointInfo(path, _step_from_name(path.name) or 0, has_manifest=True, problem=e.detail)
    if manifest is None:
        step = _step_from_name(path.name)
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
        if p.is_dir() and (_STEP_DIR_RE.match(p.name) or _ASIDE_DIR_RE.match(p.name))
    ]
    return sorted(found, key=_write_order)


def _lineage_chain(
    infos: list[CheckpointInfo], start: CheckpointInfo | CheckpointRef
) -> list[CheckpointInfo]:
    """``start`` and the checkpoints it descends from, newest first.

    A run's checkpoints up to ``start`` (by write order), then the checkpoint that run resumed from and
    that run's checkpoints up to it, and so on. Checkpoints without a manifest form one run, in step order.
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
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR_RE.match(p.name))]
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


# ----------------------------------------------------------------------------------------------------------
# Writing and verifying a checkpoint folder
# ----------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_config(config: Any, path: Path) -> None:
    if isinstance(config, str):
        path.write_text(config, encoding="utf-8")
        return
    from omegaconf import OmegaConf

    cfg = config if OmegaConf.is_config(config) else OmegaConf.create(config)
    OmegaConf.save(cfg, path, resolve=True)


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
    ``manifest.json`` (step, run id, resumed-from checkpoint, write sequence number, and each file's size
    and sha256). The write sequence number is one more than the highest one in the checkpoints folder.

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
    step = _step_from_name(final.name)
    if step is None:
        step = int(recipe_state["global_step"])
    chain = _lineage_chain(infos, lineage.resumed_from) if lineage.resumed_from else []
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
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "run_id": lineage.run_id,
        "resumed_from": lineage.resumed_from.to_json() if lineage.resumed_from else None,
        "write_seq": 1 + max((i.write_seq for i in infos), default=0),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(final, previous=previous, keep_replaced=aside) as tmp:
        save_trainable_state(trainable, tmp / TRAINABLE_FILE)
        # atomic_path inside the temporary folder: a disk-full error then names the file.
        with atomic_path(tmp / OPTIMIZER_FILE) as f:
            torch.save(optimizer_state, f)
        with atomic_path(tmp / RECIPE_STATE_FILE) as f:
            torch.save(recipe_state, f)
        with atomic_path(tmp / CONFIG_FILE) as f:
            _write_config(config, f)
        manifest["files"] = {
            name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RECIPE_STATE_FILE, CONFIG_FILE)
        }
        # Last: a folder with a manifest has all its files.
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    if aside is not None:
        log.warning(
            f"moved {final.name} of another run aside to {aside.name} ({why}); delete it by hand if unneeded"
        )
    return final


def _check_file(ckpt: Path, name: str, entry: dict[str, Any]) -> Path:
    f = ckpt / name
    if not f.is_file():
        raise CheckpointDamagedError(ckpt, name, "is missing")
    size = f.stat().st_size
    if size != entry["size"]:
        raise CheckpointDamagedError(ckpt, name, f"has {size} bytes, manifest.json says {entry['size']}")
    if _sha256(f) != entry["sha256"]:
        raise CheckpointDamagedError(ckpt, name, "does not match its sha256 in manifest.json")
    return f


def _check_safetensors(ckpt: Path, name: str) -> None:
    """Check that a safetensors file is whole: its header parses and its size is what the header implies."""
    f = ckpt / name
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointDamagedError(ckpt, name, f"is not a valid safetensors file ({e})") from None
    if 8 + n + end != size:
        raise CheckpointDamagedError(ckpt, name, f"has {size} bytes, its header needs {8 + n + end}")


def _load_pt(ckpt: Path, name: str, *, mmap: bool = False) -> Any:
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointDamagedError(ckpt, name, f"cannot be loaded ({first})") from None


def verify_checkpoint(checkpoint: str | Path) -> Optional[dict[str, Any]]:
    """Check a checkpoint folder against its manifest: every listed file present, right size, right sha256.

    A folder without ``manifest.json`` (written before manifests existed) is accepted with a warning when
    its three required files are present and load (safetensors header and size, ``torch.load``); without
    checksums, a damaged byte inside a tensor cannot be noticed there.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        The manifest (None for a pre-manifest checkpoint).

    Raises:
        CheckpointDamagedError: naming the folder and the damaged file.
    """
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_dir():
        raise CheckpointDamagedError(ckpt, None, "is not a folder")
    manifest = read_manifest(ckpt)
    if manifest is None:
        for name in REQUIRED_FILES:
            if not (ckpt / name).is_file():
                raise CheckpointDamagedError(ckpt, name, "is missing (and there is no manifest.json)")
        _check_safetensors(ckpt, TRAINABLE_FILE)
        _load_pt(ckpt, OPTIMIZER_FILE, mmap=True)
        _load_pt(ckpt, RECIPE_STATE_FILE)
        log.warning(
            f"{ckpt} has no {MANIFEST_FILE} (written before checkpoints had one); its files load, "
            "so it is used without checksums"
        )
        return None
    for name in REQUIRED_FILES:
        if name not in manifest["files"]:
            raise CheckpointDamagedError(ckpt, name, f"is not listed in {MANIFEST_FILE}")
    for name, entry in manifest["files"].items():
        _check_file(ckpt, name, entry)
    return manifest


def _checked_file(checkpoint: str | Path, name: str) -> tuple[Path, Path]:
    ckpt = Path(checkpoint).expanduser()
    manifest = read_manifest(ckpt)
    if manifest is None:
        if not (ckpt / name).is_file():
            raise CheckpointDamagedError(ckpt, name, "is missing")
        return ckpt, ckpt / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointDamagedError(ckpt, name, f"is not listed in {MANIFEST_FILE}")
    return ckpt, _check_file(ckpt, name, entry)


def read_recipe_state(checkpoint: str | Path) -> dict[str, Any]:
    """Load ``recipe_state.pt`` of a checkpoint after checking it against the manifest.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        The recipe state (``weights_only=True`` load, on CPU).

    Raises:
        CheckpointDamagedError: if the file is missing, fails its manifest check or does not load.
    """
    ckpt, _ = _checked_file(checkpoint, RECIPE_STATE_FILE)
    return _load_pt(ckpt, RECIPE_STATE_FILE)


def read_saved_config(checkpoint: str | Path) -> dict[str, Any]:
    """Read ``config.yaml`` of a checkpoint as plain data, after checking it against the manifest.

    It is parsed with a safe YAML loader and never resolved: a folder from elsewhere may hold
    ``${oc.env:...}`` interpolations, which must compare as text rather than read this machine's
    environment into the log.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        The saved config as nested dicts and lists.

    Raises:
        CheckpointDamagedError: if the file is missing, fails its manifest check or is not a YAML mapping.
    """
    import yaml
    from omegaconf import OmegaConf

    ckpt, path = _checked_file(checkpoint, CONFIG_FILE)
    try:
        # OmegaConf's own (safe) YAML loader reads values exactly as the run's config was read.
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointDamagedError(ckpt, CONFIG_FILE, f"is not valid YAML ({first})") from None
    if not isinstance(saved, dict):
        raise CheckpointDamagedError(ckpt, CONFIG_FILE, "is not a YAML mapping")
    return saved


def read_optimizer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Load ``optimizer.pt`` of a checkpoint after checking it against the manifest.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        The full optimizer state dict (``weights_only=True`` load, on CPU).

    Raises:
        CheckpointDamagedError: if the file is missing, fails its manifest check or does not load.
    """
    ckpt, _ = _checked_file(checkpoint, OPTIMIZER_FILE)
    return _load_pt(ckpt, OPTIMIZER_FILE)


def read_checkpoint_trainable(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Load ``trainable.safetensors`` of a checkpoint after checking it against the manifest.

    Args:
        checkpoint: the checkpoint folder.

    Returns:
        Parameter name -> tensor (CPU).

    Raises:
        CheckpointDamagedError: if the file is missing, fails its manifest check or does not load.
    """
    ckpt, path = _checked_file(checkpoint, TRAINABLE_FILE)
    try:
        return read_trainable_state(path)
    except Exception as e:  # safetensors raises its own error type for a bad file
        raise CheckpointDamagedError(ckpt, TRAINABLE_FILE, f"cannot be loaded ({e})") from None


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
        for info in _lineage_chain(good, good[-1]):
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


# ----------------------------------------------------------------------------------------------------------
# Housekeeping: pruning, leftovers of interrupted saves, the output_dir lock
# ----------------------------------------------------------------------------------------------------------

_others_reported: dict[Optional[str], frozenset[str]] = {}


def prune_checkpoints(
    checkpoints_dir: str | Path,
    keep_last_n: Optional[int],
    *,
    run_id: Optional[str] = None,
    protected: Iterable[str | Path] = (),
    include_ancestors: bool = False,
) -> list[Path]:
    """Delete this run's checkpoint folders beyond the newest ``keep_last_n`` (in write order).

    Only checkpoints written by ``run_id`` are candidates: the checkpoint the run resumed from and every
    checkpoint of other runs (earlier segments, abandoned branches) are kept, and an INFO log line lists
    them. Each folder is hidden by one rename before it is deleted, so a crash never leaves half a ``step_N``.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.
        keep_last_n: how many of this run's checkpoints to keep; None or <= 0 keeps all.
        run_id: the current run (:attr:`Lineage.run_id`); None selects checkpoints without a manifest.
        protected: folders never deleted (e.g. the resumed-from checkpoint).
        include_ancestors: also count (and delete) the checkpoints this run descends from, i.e. earlier
            segments of a run resumed many times (preemptible jobs), so their number stays bounded. The
            checkpoint this run resumed from is still kept, and abandoned branches are never touched.

    Returns:
        The deleted folders.
    """
    if not keep_last_n or keep_last_n <= 0:
        return []
    root = Path(checkpoints_dir)
    infos = scan_checkpoints(root)
    keep = {Path(p).resolve() for p in protected}
    mine = [i for i in infos if i.live and i.problem is None and i.run_id == run_id]
    if include_ancestors and mine:
        ref = mine[-1].resumed_from
        resumed = (ref.run_id, ref.write_seq, ref.step) if ref else None
        chain = [i for i in reversed(_lineage_chain(infos, mine[-1])) if i.live]
        candidates = [i for i in chain if (i.run_id, i.write_seq, i.step) != resumed]
    else:
        candidates = mine
    doomed = [i.path for i in candidates[:-keep_last_n] if i.path.resolve() not in keep]
    others = frozenset(i.path.name for i in infos if i not in candidates)
    if others and _others_reported.get(run_id) != others:
        _others_reported[run_id] = others
        log.info(
            f"keeping {len(others)} checkpoint(s) of other runs in {root} ({', '.join(sorted(others))}); "
            "keep_last_n applies to this run's checkpoints only"
        )
    for p in doomed:
        # Hide the folder first (one atomic rename) so a crash mid-delete never leaves a partial step_N
        # that looks like a checkpoint.
        hidden = p.with_name(f".deleting-{p.name}-{uuid.uuid4().hex[:8]}")
        os.replace(p, hidden)
        shutil.rmtree(hidden)
    return doomed


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def clean_leftovers(checkpoints_dir: str | Path) -> list[Path]:
    """Remove what interrupted saves and prunes left behind.

    Removes hidden ``.step_*.tmp-*`` (unfinished saves), ``.step_*.old-*`` (replaced folders) and
    ``.deleting-*`` (half-deleted) folders, logging each with its size. An ``.old-`` folder whose
    ``step_N`` is missing (a crash between the two renames of a replace) is renamed back instead. Call it
    only while holding :class:`OutputDirLock`: another run's save in progress looks the same.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        The removed paths.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _HIDDEN_SAVE_RE.match(p.name)
        if not m and not _DELETING_RE.match(p.name):
            continue
        if m and m.group("kind") == "old" and not (root / m.group("name")).exists():
            os.replace(p, root / m.group("name"))
            log.warning(f"restored {root / m.group('name')} from {p.name} (a save stopped mid-replace)")
            continue
        size = _tree_size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.info(f"removed {p} left by an interrupted save ({_human_bytes(size)})")
        removed.append(p)
    return removed


#: Lock file inside ``output_dir`` while a run uses it.
LOCK_FILE = ".longlora.lock"
# Filesystems (some NFS/Lustre mounts) that do not implement flock.
_NO_LOCKING_ERRNOS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class OutputDirLock:
    """Exclusive use of an ``output_dir`` by one run (take it on global rank 0 only).

    The lock is an exclusive non-blocking ``flock`` on ``output_dir/.longlora.lock``, which holds the
    owner's host, pid and start time for the error message. The kernel drops the flock when the owning
    process dies, so a lock file left by a killed run is simply taken over.

    Example::

        with OutputDirLock(cfg.output_dir):
            ...  # train, save checkpoints, export

    Args:
        output_dir: the run's output folder (created if missing).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.path = self.output_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> OutputDirLock:
        """Take the lock.

        Returns:
            self.

        Raises:
            LongLoRAConfigError: if another process holds it (the message names its pid, host and start).
        """
        import fcntl

        if self._fd is not None:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise LongLoRAConfigError(
                f"output_dir {self.output_dir} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} since {holder.get('started', '?')}; "
                "wait for that run to end or use another output_dir"
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKING_ERRNOS:
                os.close(fd)
                raise
            log.warning(
                f"cannot lock {self.path} ({e.strerror}): this filesystem does not support flock, so "
                "a second run in the same output_dir would not be stopped"
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Release the lock (the lock file stays, emptied; the next run takes it over)."""
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
