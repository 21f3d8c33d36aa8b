"""Errors that longlora_tune recipes report as one line instead of a traceback.

Every recipe's ``recipe_main`` catches these, prints ``longlora_tune: error: <message>`` to stderr and exits
with a non-zero code, so a wrong path or an inconsistent config reads like a command-line error.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, Optional, TypeVar

#: Exit code for a bad config or missing files (the argparse convention for usage errors).
CONFIG_ERROR_EXIT_CODE = 2
#: Exit code for a run stopped because the loss or the weights stopped being finite.
DIVERGED_EXIT_CODE = 3
#: Exit code for a checkpoint or export that could not be written because the disk is full.
WRITE_FAILED_EXIT_CODE = 4


class LongLoRAConfigError(ValueError):
    """A bad config value or a missing file; the message names the value/path and the fix."""


class TrainingDivergedError(RuntimeError):
    """The loss, gradient norm or weights became NaN/inf; the run stopped without saving that state."""


class CheckpointDamagedError(LongLoRAConfigError):
    """A checkpoint folder fails its manifest check (missing, truncated or altered file).

    Attributes:
        path: the checkpoint folder.
        file: the damaged file's name inside it (None when the folder itself is the problem).
        detail: what is wrong, without the fix, for log lines.
    """

    def __init__(
        self, path: str | os.PathLike[str], file: Optional[str], problem: str, *, fix: Optional[str] = None
    ) -> None:
        self.path = path
        self.file = file
        #: What is wrong, without the fix (e.g. ``optimizer.pt is missing``), for log lines.
        self.detail = f"{file} {problem}" if file else problem
        head = f"checkpoint {path} is damaged: {self.detail}" if file else f"{path} {problem}"
        fix = fix or "resume from an earlier checkpoint (resume_from_checkpoint=<folder>) or start a new run"
        super().__init__(f"{head}; {fix}")


class CheckpointWriteError(RuntimeError):
    """The disk filled up while a checkpoint (or another output) was written; nothing earlier was changed.

    The partial output has been removed by the writer before this is raised.

    Attributes:
        path: what was being written.
        previous: the intact earlier checkpoint (None: there is none), when ``checkpoint`` is true.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        previous: Optional[str | os.PathLike[str]] = None,
        checkpoint: bool = True,
    ) -> None:
        self.path = path
        self.previous = previous
        head = f"no space left on device while writing {path}"
        if not checkpoint:
            tail = "the partial output was removed and what was there before is unchanged; free disk space"
        elif previous is None:
            tail = "there is no previous checkpoint; free disk space and start again"
        else:
            tail = (
                f"the previous checkpoint {previous} is intact; free disk space, "
                f"then resume with resume_from_checkpoint={previous}"
            )
        super().__init__(f"{head}; {tail}")


class RaisedOnRankZero(Exception):
    """Raised on the other ranks when rank 0 stopped with one of our errors, which rank 0 reports.

    Exits silently with rank 0's code, so the user reads the error once, not once per rank.

    Attributes:
        code: rank 0's exit code.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def exit_code(error: BaseException) -> Optional[int]:
    """The exit code :func:`report_errors` gives an error, or None when it is not one of ours.

    Args:
        error: the exception.

    Returns:
        2 (config), 3 (diverged), 4 (disk full), rank 0's code, or None.
    """
    if isinstance(error, LongLoRAConfigError):
        return CONFIG_ERROR_EXIT_CODE
    if isinstance(error, TrainingDivergedError):
        return DIVERGED_EXIT_CODE
    if isinstance(error, CheckpointWriteError):
        return WRITE_FAILED_EXIT_CODE
    if isinstance(error, RaisedOnRankZero):
        return error.code
    return None


_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

#: How long a worker whose local rank is not 0 waits before it exits on a config error (see below).
QUIET_RANK_GRACE_S = 60.0


def config_error_once_per_node(check: Callable[[], _T]) -> _T:
    """Run ``check`` in a recipe process that may be one of several torchrun workers on this node.

    Reading and checking a config gives every process on a node the same answer (same files, overrides,
    world size and CUDA), so only local rank 0 reports a :class:`LongLoRAConfigError`: it raises, and
    :func:`report_errors` prints the one line. The node's other workers exit with code 2 without printing.
    They first wait a little (torchrun stops the other workers when the first one exits, so an early exit
    could stop local rank 0 before it printed); torchrun ends them as soon as local rank 0 has exited.

    Args:
        check: the reading or checking to run.

    Returns:
        What ``check`` returns.

    Raises:
        LongLoRAConfigError: on local rank 0 (or without torchrun), when ``check`` raises it.
    """
    try:
        return check()
    except LongLoRAConfigError:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            raise
        _exit_quietly()


def _exit_quietly() -> NoReturn:
    time.sleep(QUIET_RANK_GRACE_S)
    sys.exit(CONFIG_ERROR_EXIT_CODE)


def report_errors(fn: _F) -> _F:
    """Decorate a ``recipe_main`` so LongLoRA errors end the process with one line and an exit code.

    ``LongLoRAConfigError`` (including ``CheckpointDamagedError``) exits with code 2,
    ``TrainingDivergedError`` with code 3 and ``CheckpointWriteError`` (disk full) with code 4, each after
    printing ``longlora_tune: error: <message>`` to stderr; ``RaisedOnRankZero`` exits with rank 0's code
    without printing (rank 0 did); other exceptions propagate unchanged (with traceback).

    Args:
        fn: the function to wrap (usually ``recipe_main``; put this decorator *above* ``@loading.parse``).

    Returns:
        The wrapped function.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RaisedOnRankZero as e:
            sys.exit(e.code)  # rank 0 prints the message
        except (LongLoRAConfigError, TrainingDivergedError, CheckpointWriteError) as e:
            _exit_with(e, exit_code(e))

    return wrapper  # type: ignore[return-value]


def _exit_with(error: Exception, code: int) -> None:
    message = " ".join(str(error).split("\n"))
    print(f"longlora_tune: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
