"""Result files of the evaluation recipes: JSON, CSV, a table (printed and as text) and a PNG plot.

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``) and only after
all of them have been rendered, so a failure (a plot that cannot be drawn, a value JSON cannot hold) leaves
the previous results as they were, and an interrupted run never leaves a half-written file. Rows in which
no length was evaluated are not written at all: an empty table never replaces earlier results.

A row whose ``skipped`` value is a reason (a perplexity length the data is too short for) is a skipped
length: the JSON and CSV keep the reason in that column, the table marks the row ``skipped`` and gives
the reason below it, the plot marks its x position on the axis. An interrupted run's results carry a note
(``incomplete``: which signal stopped it, which lengths were not evaluated) in the JSON, under the table
and in the plot's title. Plots use matplotlib's ``Agg`` backend: no display is needed.

:func:`report_sweep` is the evaluation recipes' one report tail: the finished rows, the files and table on
rank 0, and the end of an interrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from longlora_tune._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from longlora_tune.eval.sweep import Sweep

__all__ = [
    "SKIPPED_KEY",
    "ReportLayout",
    "format_table",
    "plot_series",
    "report_sweep",
    "series_figure",
    "write_csv",
    "write_json",
    "write_results",
]

#: The row key whose value, when set, is the reason a length was skipped.
SKIPPED_KEY = "skipped"


def _skip_reason(row: Mapping[str, Any]) -> str | None:
    return row.get(SKIPPED_KEY) or None


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: skipped lengths are written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (non-finite floats become null).

    Args:
        path: output file.
        payload: JSON-serialisable mapping.

    Returns:
        The path.
    """
    return atomic_write_json(path, _json_safe(payload))


def _is_nested(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple))


def _flat_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # Nested values (lists and dicts, such as the passkey results' per-trial records) have no place in a
    # flat table; the JSON file keeps them.
    return [k for k in rows[0] if not any(_is_nested(r.get(k)) for r in rows)]


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        raise ValueError("write_csv needs at least one row")
    columns = _flat_columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (dicts with the same keys) as CSV with a header line.

    Nested values (lists and dicts, such as the passkey results' per-trial records) are left out: a
    flat table cannot hold them, and the JSON file written next to the CSV has them.

    Args:
        path: output file.
        rows: the rows; the first row's keys are the columns.

    Returns:
        The path.

    Raises:
        ValueError: if there are no rows.
    """
    return atomic_write_text(path, _csv_text(rows))


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    precision: int = 4,
    incomplete: str | None = None,
) -> str:
    """Format rows as an aligned plain-text table, each column as wide as its widest value or header.

    A skipped row (``skipped`` holds a reason) shows its missing values as ``-`` and ``skipped`` in a last
    ``note`` column; its reason follows the table as ``skipped <first column's value>: <reason>``, so a
    long reason does not widen every row.

    Args:
        rows: the rows.
        columns: keys to show, in order (numbers right-aligned).
        precision: significant digits of floats.
        incomplete: when the run was interrupted, the note saying so (last line: ``incomplete: <note>``).

    Returns:
        The table (a header, a rule, one line per row), then the skip reasons and the incomplete note.
    """

    def fmt(v: Any, skipped: bool) -> str:
        if v is None or (skipped and isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{precision}g}"
        return str(v)

    reasons = [_skip_reason(r) for r in rows]
    header = list(columns)
    cells = [[fmt(r.get(c), why is not None) for c in columns] for r, why in zip(rows, reasons)]
    notes = [f"skipped {row[0]}: {why}" for row, why in zip(cells, reasons) if why is not None]
    if notes:
        header.append("note")
        for row, why in zip(cells, reasons):
            row.append("" if why is None else "skipped")
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        aligned = [v.rjust(w) for v, w in zip(values[: len(columns)], widths)]
        aligned += [v.ljust(w) for v, w in zip(values[len(columns) :], widths[len(columns) :])]
        return "  ".join(aligned).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *map(line, cells), *notes]
    if incomplete is not None:
        lines.append(f"incomplete: {incomplete}")
    return "\n".join(lines)


def _tick_label(value: float) -> str:
    # Lengths are token counts: whole numbers read best; a mean prompt length is rounded to one.
    return f"{round(value):d}"


def _use_log_x(xs: Sequence[float]) -> bool:
    # A doubling sweep (2k, 4k, 8k, ...) spreads evenly on a log axis; an evenly spaced one (5k, 10k, ...,
    # 100k) would crowd its largest lengths into the right edge, so it stays linear.
    distinct = sorted(set(xs))
    if len(distinct) < 2 or distinct[0] <= 0:
        return False
    return all(b / a >= 1.5 for a, b in zip(distinct, distinct[1:]))


def series_figure(
    x: Sequence[float],
    y: Sequence[float],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool | None = None,
    y_limits: tuple[float, float] | None = None,
    skipped: Sequence[float] = (),
) -> Any:
    """Build the matplotlib figure of one line with markers (NaN points are left out).

    The x axis has one tick at every x value, labelled with that value (rounded to a whole number), and
    no other ticks: every evaluated length is named under its point. A skipped length has no y value; an
    ``x`` on the axis at its tick, labelled "skipped", says so instead of leaving a bare tick.

    Args:
        x: x values (the evaluated lengths).
        y: y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        log_x: base-2 logarithmic x axis; None chooses it when the x values grow by a factor of at least
            1.5 from one to the next (context lengths that double), else linear.
        y_limits: fixed y range, e.g. (0, 1) for accuracy.
        skipped: the x values of the skipped lengths.

    Returns:
        The ``matplotlib.figure.Figure`` (Agg canvas, no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    points = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
    ticks = sorted({float(a) for a in x if a is not None and math.isfinite(a)})
    labels = [_tick_label(t) for t in ticks]
    # Wider figures for long sweeps, and slanted labels once they would touch.
    width = min(16.0, max(6.0, 0.5 * len(ticks)))
    fig = Figure(figsize=(width, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o")
    if skipped:
        # x in data units, y in axes units: the marks sit on the x axis whatever the y range is.
        on_axis = ax.get_xaxis_transform()
        ax.plot(
            list(skipped),
            [0.0] * len(skipped),
            linestyle="none",
            marker="x",
            markersize=9,
            markeredgewidth=2,
            color="tab:red",
            transform=on_axis,
            clip_on=False,
        )
        for s in skipped:
            ax.annotate(
                "skipped",
                (s, 0.0),
                xycoords=on_axis,
                xytext=(0, 8),
                textcoords="offset points",
                ha="center",
                va="bottom",
                color="tab:red",
                fontsize=8,
            )
    if _use_log_x(ticks) if log_x is None else log_x:
        ax.set_xscale("log", base=2)
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter(labels))
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ticks) > 1 and ax.get_xscale() == "log":
            # The log axis has no room outside the points by default; pad so end labels are not clipped.
            ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)
    crowded = sum(len(label) for label in labels) * 0.09 > width * 0.8  # ~0.09 inch per label character
    if crowded:
        for label in ax.get_xticklabels():
            label.set_rotation(45)
            label.set_horizontalalignment("right")
    if y_limits is not None:
        ax.set_ylim(*y_limits)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_series(
    path: str | Path,
    x: Sequence[float],
    y: Sequence[float],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool | None = None,
    y_limits: tuple[float, float] | None = None,
    skipped: Sequence[float] = (),
) -> Path:
    """Plot one line with markers to a PNG file, one labelled x tick per point (see :func:`series_figure`).

    Args:
        path: output ``.png``.
        x: x values.
        y: y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        log_x: base-2 logarithmic x axis; None chooses by the spacing of ``x``.
        y_limits: fixed y range, e.g. (0, 1) for accuracy.
        skipped: the x values of the skipped lengths (marked on the axis).

    Returns:
        The path.
    """
    fig = series_figure(
        x, y, xlabel=xlabel, ylabel=ylabel, title=title, log_x=log_x, y_limits=y_limits, skipped=skipped
    )
    return atomic_write_bytes(path, _png_bytes(fig))


def write_results(
    output_dir: str | Path,
    stem: str,
    *,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    x_key: str,
    y_key: str,
    xlabel: str,
    ylabel: str,
    title: str,
    y_limits: tuple[float, float] | None = None,
    columns: Sequence[str] | None = None,
    echo: bool = False,
    incomplete: str | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json`` (meta + rows), ``.csv`` (rows), ``.txt`` (the table) and ``.png`` (``y_key`` vs
    ``x_key``), all rendered before the first is written; write nothing when no row was evaluated.

    The CSV holds the flat columns only (per-trial lists stay in the JSON); the plot labels every x value,
    marks the skipped ones and uses a log2 x axis only for doubling sweeps (:func:`series_figure`). The
    JSON's ``incomplete`` is None for a finished run, else the note saying what stopped it.

    Args:
        output_dir: folder (created if missing).
        stem: file name without extension.
        rows: result rows; a row with a ``skipped`` reason is a skipped length.
        meta: run settings stored next to the rows in the JSON file; a ``note`` among them is printed
            under the table too.
        x_key: row key of the x values.
        y_key: row key of the y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        y_limits: fixed y range of the plot.
        columns: row keys shown in the table; None: every flat column but ``skipped`` (its reasons
            follow the table).
        echo: also print the table and the written paths.
        incomplete: for an interrupted run, what stopped it and which lengths were not evaluated.

    Returns:
        ``{"json": path, "csv": path, "txt": path, "png": path}``, or ``{}`` when every row was skipped
        (or there are none): earlier results in ``output_dir`` are then left as they were.
    """
    if all(_skip_reason(r) is not None for r in rows):
        return {}
    out = Path(output_dir)
    if columns is None:
        columns = [c for c in _flat_columns(rows) if c != SKIPPED_KEY]
    table = format_table(rows, columns, incomplete=incomplete)
    figure = series_figure(
        [r[x_key] for r in rows],
        [r[y_key] for r in rows],
        xlabel=xlabel,
        ylabel=ylabel,
        title=title if incomplete is None else f"{title} (incomplete)",
        y_limits=y_limits,
        skipped=[r[x_key] for r in rows if _skip_reason(r) is not None],
    )
    csv_text, png = _csv_text(rows), _png_bytes(figure)
    files = {
        "json": write_json(out / f"{stem}.json", {**meta, "incomplete": incomplete, "results": list(rows)}),
        "csv": atomic_write_text(out / f"{stem}.csv", csv_text),
        "txt": atomic_write_text(out / f"{stem}.txt", table + "\n"),
        "png": atomic_write_bytes(out / f"{stem}.png", png),
    }
    if echo:
        print(table, flush=True)
        if meta.get("note"):
            print(f"note: {meta['note']}", flush=True)
        print("results: " + " ".join(str(p) for p in files.values()), flush=True)
    return files


@dataclasses.dataclass(frozen=True)
class ReportLayout:
    """How an evaluation recipe's result files show its rows (:func:`write_results`' presentation).

    Attributes:
        stem: the file name when the config sets no ``output_name``.
        x_key: row key of the plot's x values.
        y_key: row key of the plot's y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title; `` (RoPE factor f)`` of the evaluated model follows it.
        columns: row keys shown in the table.
        y_limits: fixed y range of the plot.
    """

    stem: str
    x_key: str
    y_key: str
    xlabel: str
    ylabel: str
    title: str
    columns: Sequence[str]
    y_limits: Optional[tuple[float, float]] = None


def report_sweep(
    cfg: Any,
    sweep: Sweep[Any],
    layout: ReportLayout,
    *,
    recipe: str,
    model_info: Mapping[str, Any],
    rank: int,
    world_size: int,
    start: float,
    **settings: Any,
) -> list[dict[str, Any]]:
    """The evaluation recipes' tail: write the finished lengths, print the table, end an interrupted run.

    Rank 0 writes ``<output_dir>/<output_name>.{json,csv,txt,png}`` (:func:`write_results`, marked
    incomplete when a signal stopped the sweep) with the run's settings in the JSON; then a stopped sweep
    ends the run (:meth:`~longlora_tune.eval.sweep.Sweep.raise_if_stopped`) on every rank.

    Args:
        cfg: the recipe config (``output_dir``, optional ``output_name``).
        sweep: the evaluated lengths' results (each with ``to_dict()``).
        layout: how the files show the rows.
        recipe: the recipe's name, recorded in the JSON.
        model_info: what the model loader reports (its ``rope_scaling_factor`` goes into the title).
        rank: this process's rank.
        world_size: the number of processes.
        start: ``time.perf_counter()`` when the evaluation began.
        **settings: the recipe's own settings for the JSON (a ``note`` is printed under the table too).

    Returns:
        The result rows (one dict per finished length).

    Raises:
        Interrupted: after writing the finished lengths, when SIGINT or SIGTERM stopped the sweep.
    """
    rows = [result.to_dict() for result in sweep.results]
    files = None
    if rank == 0:
        meta = {
            "recipe": recipe,
            "model": dict(model_info),
            **settings,
            "world_size": world_size,
            "seconds": round(time.perf_counter() - start, 3),
        }
        files = write_results(
            cfg.output_dir,
            cfg.get("output_name", layout.stem),
            rows=rows,
            meta=meta,
            x_key=layout.x_key,
            y_key=layout.y_key,
            xlabel=layout.xlabel,
            ylabel=layout.ylabel,
            title=f"{layout.title} (RoPE factor {model_info['rope_scaling_factor']:g})",
            y_limits=layout.y_limits,
            columns=list(layout.columns),
            echo=True,
            incomplete=sweep.incomplete,
        )
    sweep.raise_if_stopped(files, cfg.output_dir)
    return rows
