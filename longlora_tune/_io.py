"""Atomic file writing: the one implementation every module that writes files uses.

A file is written under a hidden temporary name in its destination folder, fsynced, given the permissions
a plain ``open`` would give it (0666 minus the umask; ``mkstemp`` makes 0600 files) and renamed over the
destination with ``os.replace``; the folder is then fsynced so the rename itself survives a crash. If
writing fails the temporary file is removed and the destination is left as it was, so a reader never sees
a half-written file. A failure because the disk is full becomes a one-line
:class:`~longlora_tune.errors.CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Optional

from longlora_tune.errors import CheckpointWriteError

__all__ = [
    "atomic_directory",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "fsync_dir",
    "fsync_file",
    "is_disk_full",
    "tensor_bytes",
]

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Writers that do not raise OSError: torch.save's C++ stream ("basic_ios::clear: iostream error", then
# "unexpected pos" / "file write failed") and safetensors' Rust writer ("... (os error 28)").
_DISK_FULL_MARKERS = (
    "no space left on device",
    "disk quota exceeded",
    "basic_ios::clear",
    "file write failed",
    "os error 28",
    "os error 122",
)


def is_disk_full(exc: BaseException) -> bool:
    """Tell whether a write failed because the disk (or the user's quota) is full.

    The whole ``__cause__``/``__context__`` chain is searched, because torch.save reports the real failure
    only as the context of a later one.

    Args:
        exc: the exception a writer raised.

    Returns:
        True for ``ENOSPC``/``EDQUOT`` and for the messages torch and safetensors give for them.
    """
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointWriteError):
            return True
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(e, Exception) and any(m in str(e).lower() for m in _DISK_FULL_MARKERS):
            return True
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return False


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: dicts, lists and tuples of tensors and other values.

    Duck-typed (``numel`` and ``element_size``), so this module stays free of torch.

    Args:
        obj: a state dict, optimizer state, or a tensor.

    Returns:
        The sum of ``numel() * element_size()`` over every tensor in it.
    """
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel()) * int(obj.element_size())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def current_umask() -> int:
    """Return the process umask (reading it means setting it, so it is set straight back).

    Returns:
        The umask bits.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | Path) -> None:
    """Flush a closed file's contents to disk.

    Args:
        path: the file.
    """
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk, where the platform allows it.

    Args:
        path: the folder.
    """
    # Not all platforms allow opening or fsyncing a directory; durability of the rename is then best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new contents to by name; commit it when the block ends.

    For writers that take a file name (``safetensors.torch.save_file``). Parent folders are created.

    Args:
        path: the destination file.

    Yields:
        An empty temporary file next to ``path``; on normal exit it is fsynced and renamed to ``path``,
        on an exception it is deleted and ``path`` is untouched.

    Raises:
        CheckpointWriteError: when the write failed because the disk is full (the temporary file is gone).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(path, checkpoint=False) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears only complete, when the block ends without an error.

    For writers that stream into a file handle. Parent folders are created.

    Args:
        path: the destination file.
        mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).

    Yields:
        A file object writing to a temporary file next to ``path``.

    Raises:
        ValueError: if ``mode`` is not ``"w"`` or ``"wb"``.
        CheckpointWriteError: when the write failed because the disk is full.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created).

    Args:
        path: the destination file.
        data: the complete contents.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically as UTF-8 (parent folders are created).

    Args:
        path: the destination file.
        text: the complete contents.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **json_kwargs: Any) -> Path:
    """Write ``obj`` as JSON plus a final newline to ``path`` atomically (parent folders are created).

    Args:
        path: the destination file.
        obj: a JSON-serialisable object.
        **json_kwargs: passed to :func:`json.dumps`; ``indent`` defaults to 2.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    json_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


class _NotGiven:
    """Marks an argument that was left out (None is a meaningful value for ``previous``)."""


_NOT_GIVEN = _NotGiven()


@contextlib.contextmanager
def atomic_directory(
    final_path: str | Path,
    *,
    previous: str | Path | None | _NotGiven = _NOT_GIVEN,
    keep_replaced: Optional[Path] = None,
    needed_bytes: Optional[int] = None,
) -> Iterator[Path]:
    """Write a folder all-or-nothing.

    Yields a fresh hidden temporary folder next to ``final_path``. When the block ends normally, every file
    in it is fsynced and the folder is renamed to ``final_path`` (an existing ``final_path`` is replaced only
    then). When the block raises, the temporary folder is deleted and ``final_path`` is left untouched.

    Args:
        final_path: where the finished folder should appear.
        previous: for checkpoints, the intact earlier checkpoint (None: there is none) that a disk-full
            error names; leave it out for other folders (exports).
        keep_replaced: move an existing ``final_path`` here (must not exist) instead of deleting it.
        needed_bytes: about how much the folder holds once written, for a disk-full message.

    Yields:
        The temporary folder to write into.

    Raises:
        CheckpointWriteError: when writing failed because the disk is full (the temporary folder is gone).
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
        if final.exists() and keep_replaced is not None:
            # Old folder aside first, new one in second: a crash in between leaves the old one under its new
            # name and the new one hidden, never a lost checkpoint.
            os.replace(final, keep_replaced)
            os.replace(tmp, final)
        elif final.exists():
            # A folder cannot be os.replace'd onto a non-empty one: move the old one aside first, and
            # delete it only after the new one is in place.
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            where = final
            if isinstance(e, CheckpointWriteError):
                # Name the file inside the finished folder, not the temporary one that is gone.
                with contextlib.suppress(ValueError):
                    where = final / Path(e.path).relative_to(tmp)
            if isinstance(previous, _NotGiven):
                raise CheckpointWriteError(where, checkpoint=False, needed_bytes=needed_bytes) from e
            raise CheckpointWriteError(where, previous=previous, needed_bytes=needed_bytes) from e
        raise
