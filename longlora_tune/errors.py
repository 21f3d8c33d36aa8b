"""Errors that longlora_tune recipes report as one line instead of a traceback.

Every recipe's ``recipe_main`` catches these, prints ``longlora_tune: error: <message>`` to stderr and exits
with a non-zero code, so a wrong path or an inconsistent config reads like a command-line error.

A recipe that runs its work inside :func:`signals_as_interrupts` is stopped by SIGINT (Ctrl-C) or SIGTERM
(``kill``, a scheduler's time limit, torchrun passing either on) with an :class:`Interrupted` exception: it
can write what it finished, and ``report_errors`` then ends it with ``longlora_tune: stopped by <SIGNAL>...``
and the shell's code for that signal, 128 + its number (130 for SIGINT, 143 for SIGTERM), without a
traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from types import FrameType
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


def human_bytes(n: int) -> str:
    """Format a byte count for a message (``512 B``, ``3.5 GiB``).

    Args:
        n: bytes.

    Returns:
        The count with a binary unit.
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


class CheckpointWriteError(RuntimeError):
    """The disk filled up while a checkpoint (or another output) was written; nothing earlier was changed.

    The partial output has been removed by the writer before this is raised.

    Attributes:
        path: what was being written.
        previous: the intact earlier checkpoint (None: there is none), when ``checkpoint`` is true.
        needed_bytes: about how many bytes the whole output needs (None: not known).

    Args:
        path: what was being written.
        previous: see Attributes.
        checkpoint: whether a checkpoint (rather than an export or another file) was being written.
        needed_bytes: see Attributes.
        fix: what to do, for outputs other than checkpoints (default: free disk space).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        previous: Optional[str | os.PathLike[str]] = None,
        checkpoint: bool = True,
        needed_bytes: Optional[int] = None,
        fix: Optional[str] = None,
    ) -> None:
        self.path = path
        self.previous = previous
        self.needed_bytes = needed_bytes
        head = f"no space left on device while writing {path}"
        if needed_bytes:
            head += f" (the whole output needs about {human_bytes(needed_bytes)})"
        if not checkpoint:
            tail = "the partial output was removed and what was there before is unchanged; " + (
                fix or "free disk space"
            )
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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (raised by the handlers :func:`signals_as_interrupts` installs).

    A ``KeyboardInterrupt``, so ``except Exception`` blocks let it through and code that already cleans up
    after Ctrl-C does so for SIGTERM too.

    Attributes:
        signum: the signal's number.
        detail: what the run kept, for the one line ``report_errors`` prints (None: nothing to add).
    """

    def __init__(self, signum: int, detail: Optional[str] = None) -> None:
        # Both arguments kept in args, so the exception pickles (crosses process boundaries) unchanged.
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail

    def __str__(self) -> str:
        text = f"stopped by {self.signal_name}"
        return f"{text}; {self.detail}" if self.detail else text

    @property
    def signal_name(self) -> str:
        """The signal's name, e.g. ``SIGINT``."""
        return signal.Signals(self.signum).name

    @property
    def code(self) -> int:
        """The exit code: 128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + self.signum

    def with_detail(self, detail: str) -> Interrupted:
        """The same interruption with ``detail`` (what was kept) added to its message.

        Args:
            detail: e.g. ``"2 of 3 lengths finished; partial results in out/perplexity.json"``.

        Returns:
            A new :class:`Interrupted` for the same signal.
        """
        return Interrupted(self.signum, detail)


class SignalWatch:
    """What :func:`signals_as_interrupts` saw: the first SIGINT or SIGTERM, if any.

    Attributes:
        signum: the first signal's number, or None.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def explains(self, error: BaseException) -> bool:
        """Whether ``error`` is the stop: the interruption itself, or any error raised after the signal.

        A rank blocked in a collective when its peer stopped sees a communication error, not the signal.

        Args:
            error: the exception that ended the run.

        Returns:
            True if it is a stop rather than a failure.
        """
        return isinstance(error, KeyboardInterrupt) or self.signum is not None


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[SignalWatch]:
    """Raise :class:`Interrupted` in the main thread on the first SIGINT or SIGTERM while the block runs.

    Python's default SIGTERM ends the process at once, so a run could not keep what it finished; the
    default SIGINT raises a bare ``KeyboardInterrupt`` that ``report_errors`` leaves alone. A second signal
    while the stop unwinds is recorded but raises nothing, so cleanup (writing partial results, closing the
    process group, releasing the output-folder lock) still runs. The previous handlers come back when the
    block ends. Outside the main thread (where handlers cannot be set) this does nothing.

    Yields:
        The :class:`SignalWatch` of this block.
    """
    watch = SignalWatch()
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return

    def interrupt(signum: int, frame: Optional[FrameType]) -> None:
        if watch.signum is not None:
            return  # already stopping
        watch.signum = signum
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield watch
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_exit_code(error: BaseException) -> Optional[int]:
    """The exit code of a stop that ``error`` reports in the ``tune run`` launcher, or None.

    Recognises :class:`Interrupted`, ``KeyboardInterrupt`` (130), torchrun's ``SignalException`` (the
    launcher itself was signalled) and torchrun's ``ChildFailedError`` when every worker ended with an
    interruption's code (the workers printed the line).

    Args:
        error: an exception that ended a run or its launcher.

    Returns:
        128 + the signal number, or None.
    """
    if isinstance(error, Interrupted):
        return error.code
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    sigval = getattr(error, "sigval", None)  # torch.distributed.elastic's SignalException
    if sigval is not None:
        return 128 + int(sigval)
    failures = getattr(error, "failures", None)  # torch.distributed.elastic's ChildFailedError
    if isinstance(failures, dict) and failures:
        codes = {getattr(f, "exitcode", None) for f in failures.values()}
        stops = {128 + signal.SIGINT, 128 + signal.SIGTERM}
        if len(codes) == 1 and codes <= stops:
            return codes.pop()
    return None


def exit_code(error: BaseException) -> Optional[int]:
    """The exit code :func:`report_errors` gives an error, or None when it is not one of ours.

    Args:
        error: the exception.

    Returns:
        2 (config), 3 (diverged), 4 (disk full), rank 0's code, 128 + the signal number (interrupted), or
        None.
    """
    if isinstance(error, Interrupted):
        return error.code
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
    without printing (rank 0 did); :class:`Interrupted` prints ``longlora_tune: stopped by <SIGNAL>...``
    and exits with 128 + the signal number; other exceptions, a bare ``KeyboardInterrupt`` included,
    propagate unchanged (with traceback).

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
        except Interrupted as e:
            print(f"longlora_tune: {e}", file=sys.stderr, flush=True)
            sys.exit(e.code)
        except (LongLoRAConfigError, TrainingDivergedError, CheckpointWriteError) as e:
            _exit_with(e, exit_code(e))

    return wrapper  # type: ignore[return-value]


def _exit_with(error: Exception, code: int) -> None:
    message = " ".join(str(error).split("\n"))
    print(f"longlora_tune: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
