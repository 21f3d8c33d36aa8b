"""SIGINT and SIGTERM inside ``signals_as_interrupts``: one exception, one line, the shell's exit codes."""

from __future__ import annotations

import signal

import pytest

from longlora_tune.errors import Interrupted, exit_code, report_errors, signals_as_interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_the_block_is_interrupted_and_the_handlers_come_back(signum: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info, signals_as_interrupts():
        signal.raise_signal(signum)
    assert info.value.signum == signum and exit_code(info.value) == 128 + signum
    assert str(info.value) == f"stopped by {signal.Signals(signum).name}"
    # A KeyboardInterrupt to code that catches those; never swallowed by `except Exception`.
    assert isinstance(info.value, KeyboardInterrupt) and not isinstance(info.value, Exception)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_report_errors_ends_an_interrupted_run_with_one_line(
    signum: int, code: int, capsys: pytest.CaptureFixture
) -> None:
    @report_errors
    def main() -> None:
        with signals_as_interrupts():
            try:
                signal.raise_signal(signum)
            except Interrupted as stop:
                raise stop.with_detail("2 of 3 lengths finished") from None

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == code
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == f"longlora_tune: stopped by {name}; 2 of 3 lengths finished\n"


def test_a_plain_keyboard_interrupt_outside_the_block_is_left_alone() -> None:
    # Recipes that do not opt in (training, for now) keep Python's own Ctrl-C behaviour.
    @report_errors
    def main() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        main()
