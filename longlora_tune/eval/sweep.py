"""A sweep over evaluation lengths that keeps the lengths it finished when SIGINT or SIGTERM stops it.

The eval recipes run inside :func:`longlora_tune.errors.signals_as_interrupts`, so either signal raises
:class:`~longlora_tune.errors.Interrupted` wherever the evaluation is. :meth:`Sweep.until_interrupted`
stops the sweep there and keeps the results of the lengths already done; the recipe writes them, marked
with :attr:`Sweep.incomplete`, and :meth:`Sweep.raise_if_stopped` then ends the run with one line saying
what was kept (exit 130 or 143, from ``report_errors``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Optional, TypeVar

from longlora_tune.errors import Interrupted

__all__ = ["Sweep"]

R = TypeVar("R")


@dataclass
class Sweep(Generic[R]):
    """The lengths one run evaluates, in order, the results finished so far and what stopped it, if anything.

    Attributes:
        lengths: the requested lengths.
        results: one result per finished length, in the order of ``lengths``.
        stopped: the interruption that ended the sweep early; None while it runs or once it finished.
    """

    lengths: Sequence[int]
    results: list[R] = field(default_factory=list)
    stopped: Optional[Interrupted] = None

    @contextlib.contextmanager
    def until_interrupted(self) -> Iterator[list[R]]:
        """Run the block that appends one result per length; an interruption ends it, keeping the results.

        Yields:
            :attr:`results`, to append each length's result to as soon as it is done.
        """
        try:
            yield self.results
        except Interrupted as stop:
            self.stopped = stop

    @property
    def incomplete(self) -> Optional[str]:
        """None for a finished sweep, else the note for the result files: the signal, the lengths left."""
        if self.stopped is None:
            return None
        left = ", ".join(str(length) for length in self.lengths[len(self.results) :])
        return (
            f"stopped by {self.stopped.signal_name} after {len(self.results)} of {len(self.lengths)} "
            f"lengths; not evaluated: {left}"
        )

    def raise_if_stopped(self, files: Optional[Mapping[str, Path]], output_dir: str | Path) -> None:
        """End an interrupted run with the signal's exit code and one line saying what was kept.

        Args:
            files: what :func:`~longlora_tune.eval.reporting.write_results` wrote (``{}``: nothing, as no
                finished length was evaluated); None on a rank that does not write.
            output_dir: the results folder.

        Raises:
            Interrupted: when the sweep was stopped, with the number of finished lengths and where their
                results are (or that nothing was written).
        """
        if self.stopped is None:
            return
        done = f"{len(self.results)} of {len(self.lengths)} lengths finished"
        if files is None:
            raise self.stopped.with_detail(done)
        if not files:
            raise self.stopped.with_detail(
                f"{done}; nothing was written and the results in {output_dir} are unchanged"
            )
        raise self.stopped.with_detail(f"{done}; partial results in {files['json']}, marked incomplete")
