"""The sweep keeps the lengths finished before SIGINT/SIGTERM and says what it kept."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from longlora_tune.errors import Interrupted, signals_as_interrupts
from longlora_tune.eval.sweep import Sweep


def _stopped_after(finished: int, lengths: list[int], signum: int = signal.SIGTERM) -> Sweep[int]:
    sweep: Sweep[int] = Sweep(lengths)
    with signals_as_interrupts(), sweep.until_interrupted() as results:
        for length in lengths:
            if len(results) == finished:
                signal.raise_signal(signum)
            results.append(length)
    return sweep


def test_a_finished_sweep_is_complete_and_raises_nothing(tmp_path: Path) -> None:
    sweep = _stopped_after(3, [1, 2, 3])
    assert sweep.results == [1, 2, 3] and sweep.stopped is None and sweep.incomplete is None
    sweep.raise_if_stopped({}, tmp_path)


def test_a_stopped_sweep_keeps_what_finished_and_says_where_it_is(tmp_path: Path) -> None:
    sweep = _stopped_after(1, [2048, 4096, 8192])
    assert sweep.results == [2048]
    assert sweep.incomplete == "stopped by SIGTERM after 1 of 3 lengths; not evaluated: 4096, 8192"
    json_file = tmp_path / "perplexity.json"
    expected = {
        # What the writing rank wrote, that no finished length was evaluated, a rank that writes nothing.
        f"1 of 3 lengths finished; partial results in {json_file}, marked incomplete": {"json": json_file},
        f"1 of 3 lengths finished; nothing was written and the results in {tmp_path} are unchanged": {},
        "1 of 3 lengths finished": None,
    }
    for detail, files in expected.items():
        with pytest.raises(Interrupted) as info:
            sweep.raise_if_stopped(files, tmp_path)
        assert str(info.value) == f"stopped by SIGTERM; {detail}" and info.value.code == 143
