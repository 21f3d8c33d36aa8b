"""Housekeeping of a run's output folder: pruning old checkpoints, leftovers of interrupted saves, the lock.

Only the run holding :class:`OutputDirLock` prunes and cleans up: another run's save in progress looks
like a leftover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from longlora_tune.errors import LongLoRAConfigError, human_bytes
from longlora_tune.training.checkpointing.lineage import lineage_chain, scan_checkpoints

log = logging.getLogger(__name__)

#: Leftovers of interrupted saves (atomic_directory) and prunes (prune_checkpoints).
_HIDDEN_SAVE_RE = re.compile(r"^\.(?P<name>step_\d+)\.(?P<kind>tmp|old)-.+$")
_DELETING_RE = re.compile(r"^\.deleting-.+$")

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
        chain = [i for i in reversed(lineage_chain(infos, mine[-1])) if i.live]
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
    return _clean(Path(checkpoints_dir), _HIDDEN_SAVE_RE, deleting=True)


def clean_export_leftovers(output_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove what interrupted exports left in ``output_dir``, as :func:`clean_leftovers` does for saves.

    An export killed while it was written (SIGKILL, power loss) leaves its hidden temporary folder
    (``.hf.tmp-*``), never a half-written ``hf/``; one killed between the two renames that replace an
    earlier export leaves that export as ``.hf.old-*``, which is renamed back. Call it only while holding
    :class:`OutputDirLock`.

    Args:
        output_dir: the run's output folder.
        names: the export folder names (``hf``, ``peft``, ``adapter``).

    Returns:
        The removed paths.
    """
    alternatives = "|".join(re.escape(n) for n in names)
    if not alternatives:
        return []
    return _clean(Path(output_dir), re.compile(rf"^\.(?P<name>{alternatives})\.(?P<kind>tmp|old)-.+$"))


def _clean(root: Path, hidden: re.Pattern[str], *, deleting: bool = False) -> list[Path]:
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = hidden.match(p.name)
        if not m and not (deleting and _DELETING_RE.match(p.name)):
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
        log.info(f"removed {p} left by an interrupted save ({human_bytes(size)})")
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
