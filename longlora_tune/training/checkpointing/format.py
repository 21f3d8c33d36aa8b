"""The checkpoint folder format: its file names, the manifest, writing the files and verifying them.

A step folder ``<output_dir>/checkpoints/step_NNNNNN/`` holds TRAINABLE_FILE, OPTIMIZER_FILE,
RECIPE_STATE_FILE, CONFIG_FILE and, written last, MANIFEST_FILE: format version, step, run id, the
checkpoint the run resumed from, a write sequence number and each file's size and sha256. What LongLoRA
trains (LoRA matrices, token embeddings, norms) is one safetensors file in torchtune names
(:mod:`longlora_tune.models.trainable`), also used by the ``adapter/`` export. Folders without a manifest
(written before manifests existed) are still read when their files load, with a warning. Which folder a
run writes or resumes is :mod:`~longlora_tune.training.checkpointing.lineage`'s business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from longlora_tune._io import atomic_path, atomic_write_json
from longlora_tune.errors import CheckpointDamagedError
from longlora_tune.models.trainable import TRAINABLE_FILE, read_trainable_state, save_trainable_state

log = logging.getLogger(__name__)

#: Name of the trainable-state file: :data:`longlora_tune.models.trainable.TRAINABLE_FILE`.
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
#: Manifest key of the training data's fingerprint (``dataset.fingerprint``; None: the dataset has none).
#: Manifests written before it existed lack the key.
DATASET_FINGERPRINT_KEY = "dataset_fingerprint"
MANIFEST_VERSION = 1
#: Checkpoint folders are ``step_000100`` etc., so lexical and numeric order agree.
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
#: Another run's checkpoint moved aside by a save at the same step (see ``lineage.write_checkpoint``).
ASIDE_DIR_RE = re.compile(r"^step_(\d+)\.(?:abandoned|ancestor)-[0-9a-z]+(?:-\d+)?$")


def step_dir_name(step: int) -> str:
    """Return the checkpoint folder name of a training step (``step_000100``).

    Args:
        step: optimizer steps completed.

    Returns:
        The folder name.
    """
    return f"step_{step:06d}"


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
    if not isinstance(m.get(DATASET_FINGERPRINT_KEY), (str, type(None))):
        return f"has an invalid {DATASET_FINGERPRINT_KEY} entry"
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


def step_from_name(name: str) -> Optional[int]:
    """Return the step a ``step_N`` folder name (or one moved aside) holds, or None for other names.

    Args:
        name: a folder name.

    Returns:
        The step, or None.
    """
    m = STEP_DIR_RE.match(name) or ASIDE_DIR_RE.match(name)
    return int(m.group(1)) if m else None


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


def write_checkpoint_files(
    folder: Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    recipe_state: dict[str, Any],
    config: Any,
    step: int,
    run_id: str,
    resumed_from: Optional[CheckpointRef],
    write_seq: int,
    dataset_fingerprint: Optional[str] = None,
) -> dict[str, Any]:
    """Write a checkpoint's files into ``folder`` (the temporary folder of an atomic save), manifest last.

    Args:
        folder: an empty folder (``atomic_directory``'s temporary one).
        trainable: full trainable tensors (torchtune names).
        optimizer_state: full optimizer state dict (loadable with ``weights_only=True``).
        recipe_state: step, data position, schedule, RNG states, ... (loadable with ``weights_only=True``).
        config: the run config (an OmegaConf config or dict, saved resolved, or YAML text).
        step: the training step.
        run_id: the run writing it.
        resumed_from: the checkpoint that run started from (None for a fresh run).
        write_seq: its write sequence number in the checkpoints folder.
        dataset_fingerprint: the content hash of the training data and tokenizer (None: not known).

    Returns:
        The manifest written.
    """
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "run_id": run_id,
        "resumed_from": resumed_from.to_json() if resumed_from else None,
        "write_seq": write_seq,
        DATASET_FINGERPRINT_KEY: dataset_fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_trainable_state(trainable, folder / TRAINABLE_FILE)
    # atomic_path inside the temporary folder: a disk-full error then names the file.
    with atomic_path(folder / OPTIMIZER_FILE) as f:
        torch.save(optimizer_state, f)
    with atomic_path(folder / RECIPE_STATE_FILE) as f:
        torch.save(recipe_state, f)
    with atomic_path(folder / CONFIG_FILE) as f:
        _write_config(config, f)
    manifest["files"] = {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RECIPE_STATE_FILE, CONFIG_FILE)
    }
    # Last: a folder with a manifest has all its files.
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


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
