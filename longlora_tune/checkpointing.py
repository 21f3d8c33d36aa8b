"""Our checkpoint folders: their file format, writers and readers, listing and pruning.

Base weights are read from Hugging Face folders by :mod:`longlora_tune.hf`. What LongLoRA trains (LoRA
matrices, token embeddings, norms) is saved as one safetensors file in torchtune names, used both by
resumable checkpoints and by the ``adapter/`` export. Checkpoint folders are written through
:func:`atomic_directory`, so a crash while saving never damages the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from longlora_tune._io import atomic_path, current_umask, fsync_dir, fsync_file
from longlora_tune.errors import LongLoRAConfigError

#: Name of the trainable-state file inside a checkpoint or ``adapter/`` folder.
TRAINABLE_FILE = "trainable.safetensors"
#: Checkpoint folders are ``step_000100`` etc., so lexical and numeric order agree.
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")


def save_trainable_state(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write trainable tensors (torchtune names) to a safetensors file, atomically.

    Args:
        state_dict: parameter name -> full (unsharded) tensor.
        path: output ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "names": "torchtune"})


def read_trainable_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_trainable_state`.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        Parameter name -> tensor (CPU).

    Raises:
        LongLoRAConfigError: if the file is missing.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LongLoRAConfigError(f"trainable state not found: {path}")
    return load_file(str(path))


def load_trainable_state(model: nn.Module, path: str | Path) -> list[str]:
    """Load trainable tensors from a file into a plain or FSDP2-sharded model; other weights stay as they are.

    On a sharded model every rank must call this (each reads the file and keeps its shard).

    Args:
        model: the model (torchtune names).
        path: file written by :func:`save_trainable_state`.

    Returns:
        The loaded parameter names.

    Raises:
        LongLoRAConfigError: if the file holds names the model does not have or tensors of the wrong shape.
    """
    sd = read_trainable_state(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(sd) - set(params))
    if unknown:
        raise LongLoRAConfigError(
            f"{path} holds {len(unknown)} tensors the model lacks (first: {unknown[0]}); "
            "it was saved from a different model config"
        )
    for name, tensor in sd.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LongLoRAConfigError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
    if any(hasattr(p, "device_mesh") for p in params.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = {k: v.to(params[k].dtype) for k, v in sd.items()}
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for name, tensor in sd.items():
                params[name].copy_(tensor)
    return sorted(sd)


@contextlib.contextmanager
def atomic_directory(final_path: str | Path) -> Iterator[Path]:
    """Write a folder all-or-nothing.

    Yields a fresh hidden temporary folder next to ``final_path``. When the block ends normally, every file
    in it is fsynced and the folder is renamed to ``final_path`` (an existing ``final_path`` is replaced only
    then). When the block raises, the temporary folder is deleted and ``final_path`` is left untouched.

    Args:
        final_path: where the finished folder should appear.

    Yields:
        The temporary folder to write into.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    # mkdtemp creates the folder private (0700); give it the permissions a plain mkdir would.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(root) / name)
            fsync_dir(Path(root))
        if final.exists():
            # A folder cannot be os.replace'd onto a non-empty one: move the old one aside first, and
            # delete it only after the new one is in place.
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def step_dir_name(step: int) -> str:
    """Return the checkpoint folder name of a training step (``step_000100``).

    Args:
        step: optimizer steps completed.

    Returns:
        The folder name.
    """
    return f"step_{step:06d}"


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """List complete checkpoint folders (``step_N``) under ``checkpoints_dir``, oldest first.

    Temporary folders of interrupted saves are hidden (dot-prefixed) and never listed.

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
    """Return the newest checkpoint folder, or None.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.

    Returns:
        The folder with the highest step, or None when there is none.
    """
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_dir: str | Path, keep_last_n: Optional[int]) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` checkpoint folders.

    Args:
        checkpoints_dir: the ``output_dir/checkpoints`` folder.
        keep_last_n: how many to keep; None or <= 0 keeps all.

    Returns:
        The deleted folders.
    """
    if not keep_last_n or keep_last_n <= 0:
        return []
    doomed = list_checkpoints(checkpoints_dir)[:-keep_last_n]
    for p in doomed:
        # Hide the folder first (one atomic rename) so a crash mid-delete never leaves a partial step_N
        # that looks like a checkpoint.
        hidden = p.with_name(f".deleting-{p.name}-{uuid.uuid4().hex[:8]}")
        os.replace(p, hidden)
        shutil.rmtree(hidden)
    return doomed
