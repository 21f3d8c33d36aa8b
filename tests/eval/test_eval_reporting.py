"""Result files: every length labelled on the plot, skipped lengths marked, nested per-trial records kept out
of the CSV, incomplete runs marked, nothing replaced when rendering fails or nothing was evaluated."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from longlora_tune.errors import Interrupted, signals_as_interrupts
from longlora_tune.eval.reporting import ReportLayout, format_table, report_sweep, write_results
from longlora_tune.eval.sweep import Sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plotted_figure(
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
    x: list[float],
    y: list[float],
    skipped: list[str | None] | None = None,
    **kwargs: Any,
) -> Figure:
    """Write results as the eval recipes do and catch the figure saved (the PNG alone cannot be inspected)."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self: Figure, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    rows = [{"mean_prompt_tokens": a, "accuracy": b} for a, b in zip(x, y)]
    for row, reason in zip(rows, skipped or []):
        row["skipped"] = reason
    files = write_results(
        out,
        "passkey",
        rows=rows,
        meta={},
        x_key="mean_prompt_tokens",
        y_key="accuracy",
        xlabel="prompt length (tokens)",
        ylabel="passkey accuracy",
        title="t",
        y_limits=(-0.05, 1.05),
        **kwargs,
    )
    assert files["png"].read_bytes()[:8] == PNG_MAGIC and len(saved) == 1
    return saved[0]


@pytest.mark.parametrize(
    "x, scale",
    [
        # The tiny passkey sweep (mean prompt lengths): log2 ticks labelled one point (256) of three.
        ([157.5, 254.0, 381.7], "log"),
        # Perplexity lengths double: log2 axis, each length labelled.
        ([2048, 4096, 8192, 16384, 32768, 65536, 100000], "log"),
        # The 100k passkey sweep (interval 5000): evenly spaced, so a linear axis with 20 labels.
        ([n - 2.3 for n in range(5000, 100001, 5000)], "linear"),
    ],
    ids=["tiny-passkey", "perplexity-doubling", "passkey-100k-interval"],
)
def test_every_evaluated_length_gets_its_own_readable_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, x: list[float], scale: str
) -> None:
    fig = _plotted_figure(monkeypatch, tmp_path, x, [0.5] * len(x))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == scale
    visible = [t for t in ax.xaxis.get_major_ticks() if ax.get_xlim()[0] <= t.get_loc() <= ax.get_xlim()[1]]
    assert [t.get_loc() for t in visible] == pytest.approx(x)  # ticks at exactly the evaluated lengths
    assert [t.label1.get_text() for t in visible] == [str(round(v)) for v in x]
    assert ax.xaxis.get_minor_locator()() == []  # no unlabelled log2 minor ticks between them
    renderer = canvas.get_renderer()
    boxes = [t.label1.get_window_extent(renderer) for t in visible]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.width for b in boxes), "a tick label is cut off"


def test_an_explicit_scale_overrides_the_automatic_choice() -> None:
    from longlora_tune.eval.reporting import series_figure

    doubling = series_figure([2048, 4096, 8192], [1, 2, 3], xlabel="l", ylabel="p", title="t", log_x=False)
    assert doubling.axes[0].get_xscale() == "linear"
    even = series_figure([5000, 10000, 15000], [1, 2, 3], xlabel="l", ylabel="p", title="t", log_x=True)
    assert even.axes[0].get_xscale() == "log"
    assert list(even.axes[0].get_xticks()) == [5000, 10000, 15000]


def test_nested_trial_records_stay_in_json_and_out_of_csv(tmp_path: Path) -> None:
    rows = [
        {"target_length": 160, "accuracy": 0.5, "trials": [{"seed": 0, "passed": True}]},
        {"target_length": 256, "accuracy": float("nan"), "trials": [{"seed": 0, "passed": False}]},
    ]
    files = write_results(
        tmp_path,
        "passkey",
        rows=rows,
        meta={"recipe": "x"},
        x_key="target_length",
        y_key="accuracy",
        xlabel="l",
        ylabel="a",
        title="t",
    )
    with files["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["target_length", "accuracy"]
    assert table[1] == {"target_length": "256", "accuracy": "nan"}
    payload = json.loads(files["json"].read_text())
    assert payload["results"][0]["trials"] == [{"seed": 0, "passed": True}]
    assert payload["results"][1]["accuracy"] is None  # JSON has no NaN


REASON = "the data has 400 tokens; length 512 needs at least 577"


def _perplexity_rows() -> list[dict[str, Any]]:
    return [
        {"eval_length": 48, "num_windows": 5, "perplexity": 582.19, "skipped": None},
        {"eval_length": 96, "num_windows": 4, "perplexity": 562.77, "skipped": None},
        {"eval_length": 512, "num_windows": 0, "perplexity": math.nan, "skipped": REASON},
    ]


def _write(out: Path, rows: list[dict[str, Any]], **kwargs: Any) -> dict[str, Path]:
    return write_results(
        out,
        "perplexity",
        rows=rows,
        meta={"recipe": "x"},
        x_key="eval_length",
        y_key="perplexity",
        xlabel="l",
        ylabel="p",
        title="Perplexity",
        **kwargs,
    )


def test_the_table_is_as_wide_as_its_values_and_gives_skip_reasons_below() -> None:
    lines = format_table(_perplexity_rows(), ["eval_length", "num_windows", "perplexity"]).splitlines()
    table, notes = lines[:5], lines[5:]
    assert table[0].split() == ["eval_length", "num_windows", "perplexity", "note"]
    assert table[2].split() == ["48", "5", "582.2"]
    assert table[4].split() == ["512", "0", "-", "skipped"]
    # Widths from the values and headers: no cell is padded to the reason's length.
    assert max(len(line) for line in table) == len("eval_length  num_windows  perplexity  skipped")
    assert notes == [f"skipped 512: {REASON}"]


def test_a_skipped_length_is_marked_on_the_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = _plotted_figure(
        monkeypatch, tmp_path, [2048, 4096, 8192], [9.0, 8.0, math.nan], skipped=[None, None, "too short"]
    )
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [8192]
    # On the x axis (bottom of the plot area) whatever the y range.
    _, y_shown = marks[0].get_transform().transform((8192, marks[0].get_ydata()[0]))
    assert y_shown == pytest.approx(ax.bbox.y0)
    assert [(t.get_text(), t.xy[0]) for t in ax.texts] == [("skipped", 8192)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2048", "4096", "8192"]


def test_an_incomplete_run_is_marked_in_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    note = "stopped by SIGINT after 2 of 3 lengths; not evaluated: 8192"
    fig = _plotted_figure(
        monkeypatch, tmp_path, [2048, 4096], [0.5, 0.5], incomplete=note, columns=["accuracy"], echo=True
    )
    assert "incomplete" in fig.axes[0].get_title()
    assert json.loads((tmp_path / "passkey.json").read_text())["incomplete"] == note
    table = (tmp_path / "passkey.txt").read_text().splitlines()
    assert table[-1] == f"incomplete: {note}"
    assert capsys.readouterr().out.splitlines()[: len(table)] == table

    _write(tmp_path, _perplexity_rows()[:1])
    assert json.loads((tmp_path / "perplexity.json").read_text())["incomplete"] is None


def _earlier_results(out: Path) -> dict[str, bytes]:
    out.mkdir(exist_ok=True)
    for suffix in ("json", "csv", "txt", "png"):
        (out / f"perplexity.{suffix}").write_text(f"an earlier run's {suffix}")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_plot_that_fails_to_render_replaces_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _earlier_results(tmp_path)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer broke"):
        _write(tmp_path, _perplexity_rows())
    # Every file is rendered before the first is replaced; no temporary file is left behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_rows_with_nothing_evaluated_replace_no_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = _earlier_results(tmp_path)
    assert _write(tmp_path, _perplexity_rows()[2:], echo=True) == {}
    assert _write(tmp_path, [], incomplete="stopped by SIGINT after 0 of 1 lengths; not evaluated: 48") == {}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert capsys.readouterr().out == ""


class _Row:
    def __init__(self, length: int, score: float) -> None:
        self.length, self.score = length, score

    def to_dict(self) -> dict:
        return {"length": self.length, "score": self.score}


_LAYOUT = ReportLayout(
    stem="score", x_key="length", y_key="score", xlabel="tokens", ylabel="score", title="Score",
    columns=("length", "score"),
)  # fmt: skip


def test_report_sweep_writes_the_rows_with_the_run_settings_and_prints_the_table(tmp_path, capsys):
    sweep: Sweep[_Row] = Sweep([16, 32])
    with sweep.until_interrupted() as finished:
        finished += [_Row(16, 0.5), _Row(32, 0.25)]
    cfg = OmegaConf.create({"output_dir": str(tmp_path)})
    info = {"rope_scaling_factor": 2.0, "checkpoint_dir": "/ckpt"}
    rows = report_sweep(
        cfg, sweep, _LAYOUT, recipe="r", model_info=info, rank=0, world_size=1, start=0.0, stride=4, note="n"
    )
    assert rows == [{"length": 16, "score": 0.5}, {"length": 32, "score": 0.25}]
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["results"] == rows and saved["incomplete"] is None
    assert {k: saved[k] for k in ("recipe", "model", "stride", "note", "world_size")} == {
        "recipe": "r", "model": info, "stride": 4, "note": "n", "world_size": 1,
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score.csv", "score.json", "score.png", "score.txt"]
    out = capsys.readouterr().out
    assert (tmp_path / "score.txt").read_text() in out and "note: n" in out


def test_report_sweep_of_a_stopped_sweep_writes_it_incomplete_then_ends_the_run(tmp_path):
    sweep: Sweep[_Row] = Sweep([16, 32])
    with signals_as_interrupts(), sweep.until_interrupted() as finished:
        finished.append(_Row(16, 0.5))
        signal.raise_signal(signal.SIGTERM)
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "rank0"), "output_name": "mine"})
    kwargs = dict(recipe="r", model_info={"rope_scaling_factor": 1.0}, world_size=2, start=0.0)
    with pytest.raises(Interrupted, match="partial results in .*mine.json, marked incomplete"):
        report_sweep(cfg, sweep, _LAYOUT, rank=0, **kwargs)
    saved = json.loads((tmp_path / "rank0" / "mine.json").read_text())
    assert saved["incomplete"].startswith("stopped by SIGTERM after 1 of 2") and len(saved["results"]) == 1
    # Another rank writes nothing and ends the same way.
    cfg.output_dir = str(tmp_path / "rank1")
    with pytest.raises(Interrupted, match="1 of 2 lengths finished$"):
        report_sweep(cfg, sweep, _LAYOUT, rank=1, **kwargs)
    assert not (tmp_path / "rank1").exists()
