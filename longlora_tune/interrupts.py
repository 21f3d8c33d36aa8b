"""Ctrl-C and SIGTERM as a clean stop: one line, the conventional exit code, no traceback from any rank.

A stopped run loses nothing: checkpoints are written all-or-nothing, so the last one on disk is intact
whatever the moment of the signal. What a user needs is that line (which checkpoint, which command
continues) instead of a traceback per rank. :func:`stop_on_signals` turns the first SIGINT or SIGTERM into
:class:`Interrupted` wherever the main thread is; a rank blocked in a collective when another rank exits
sees a communication error instead, which :meth:`SignalWatch.explains` attributes to the signal too.
Torch-free: the ``tune run`` launcher uses :func:`exit_code_for` as well.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any, Optional

__all__ = ["Interrupted", "SignalWatch", "exit_code_for", "stop_on_signals"]

#: The shell's convention: 128 + the signal number.
_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM (a ``BaseException``, like ``KeyboardInterrupt``).

    Args:
        signum: the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = _EXIT_CODES.get(signum, 128 + signum)


class SignalWatch:
    """What :func:`stop_on_signals` saw: the first signal received, if any."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def exit_code(self) -> Optional[int]:
        """130 for SIGINT, 143 for SIGTERM, None when no signal arrived."""
        return None if self.signum is None else _EXIT_CODES.get(self.signum, 128 + self.signum)

    def explains(self, error: BaseException) -> bool:
        """Whether ``error`` is the stop: the signal itself, or any error raised after it arrived.

        Args:
            error: the exception that ended the run.

        Returns:
            True if a signal was received (then the error is its consequence: a collective whose peer left).
        """
        return isinstance(error, (Interrupted, KeyboardInterrupt)) or self.signum is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SignalWatch]:
    """Raise :class:`Interrupted` in the main thread on the first SIGINT or SIGTERM; restore the handlers.

    A second signal while the stop unwinds is recorded but raises nothing, so cleanup (closing the
    process group, releasing the output-folder lock) still runs.

    Yields:
        The :class:`SignalWatch` of this block.
    """
    watch = SignalWatch()

    def handler(signum: int, frame: Any) -> None:
        if watch.signum is not None:
            return  # already stopping
        watch.signum = signum
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _EXIT_CODES}
    try:
        yield watch
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def exit_code_for(error: BaseException) -> Optional[int]:
    """The exit code of a stop that ``error`` reports, or None when it is not one.

    Recognises :class:`Interrupted`, ``KeyboardInterrupt``, torchrun's ``SignalException`` (the launcher was
    signalled) and torchrun's ``ChildFailedError`` when every worker ended with a stop's exit code.

    Args:
        error: an exception that ended a run or its launcher.

    Returns:
        130 / 143, or None.
    """
    if isinstance(error, Interrupted):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return _EXIT_CODES[signal.SIGINT]
    sigval = getattr(error, "sigval", None)  # torch.distributed.elastic's SignalException
    if sigval is not None:
        return _EXIT_CODES.get(int(sigval), 128 + int(sigval))
    failures = getattr(error, "failures", None)  # torch.distributed.elastic's ChildFailedError
    if isinstance(failures, dict) and failures:
        codes = {getattr(f, "exitcode", None) for f in failures.values()}
        if len(codes) == 1 and codes <= set(_EXIT_CODES.values()):
            return codes.pop()
    return None
