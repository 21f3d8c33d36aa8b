"""Result files: every evaluated length labelled on the plot, nested per-trial records kept out of the CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from longlora_tune.eval.reporting import write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plotted_figure(monkeypatch: pytest.MonkeyPatch, out: Path, x: list[float], y: list[float]) -> Figure:
    """Write results as the eval recipes do and catch the figure saved (the PNG alone cannot be inspected)."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self: Figure, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    rows = [{"mean_prompt_tokens": a, "accuracy": b} for a, b in zip(x, y)]
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
