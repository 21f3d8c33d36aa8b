"""Result files of the evaluation recipes: JSON, CSV, a printed table and a PNG plot.

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``), so an
interrupted run never leaves a half-written result next to a finished one. Plots use matplotlib's
``Agg`` backend: no display is needed.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from longlora_tune._io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["format_table", "plot_series", "series_figure", "write_csv", "write_json", "write_results"]


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
    if not rows:
        raise ValueError("write_csv needs at least one row")
    columns = [k for k in rows[0] if not any(_is_nested(r.get(k)) for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, precision: int = 4) -> str:
    """Format rows as an aligned plain-text table.

    Args:
        rows: the rows.
        columns: keys to show, in order.
        precision: significant digits of floats.

    Returns:
        The table, one line per row plus a header and a rule.
    """

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{precision}g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
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
) -> Any:
    """Build the matplotlib figure of one line with markers (NaN points are left out).

    The x axis has one tick at every x value, labelled with that value (rounded to a whole number), and
    no other ticks: every evaluated length is named under its point.

    Args:
        x: x values (the evaluated lengths).
        y: y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        log_x: base-2 logarithmic x axis; None chooses it when the x values grow by a factor of at least
            1.5 from one to the next (context lengths that double), else linear.
        y_limits: fixed y range, e.g. (0, 1) for accuracy.

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

    Returns:
        The path.
    """
    fig = series_figure(x, y, xlabel=xlabel, ylabel=ylabel, title=title, log_x=log_x, y_limits=y_limits)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


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
    print_columns: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json`` (meta + rows), ``<stem>.csv`` (rows) and ``<stem>.png`` (``y_key`` vs ``x_key``).

    The CSV holds the flat columns only (per-trial lists stay in the JSON); the plot labels every x value
    and uses a log2 x axis only for doubling sweeps (:func:`series_figure`).

    Args:
        output_dir: folder (created if missing).
        stem: file name without extension.
        rows: result rows.
        meta: run settings stored next to the rows in the JSON file; a ``note`` among them is printed
            under the table too.
        x_key: row key of the x values.
        y_key: row key of the y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        y_limits: fixed y range of the plot.
        print_columns: when given, also print the rows as a table of these columns and the written paths.

    Returns:
        ``{"json": path, "csv": path, "png": path}``.
    """
    out = Path(output_dir)
    files = {
        "json": write_json(out / f"{stem}.json", {**meta, "results": list(rows)}),
        "csv": write_csv(out / f"{stem}.csv", rows),
        "png": plot_series(
            out / f"{stem}.png",
            [r[x_key] for r in rows],
            [r[y_key] for r in rows],
            xlabel=xlabel,
            ylabel=ylabel,
            title=title,
            y_limits=y_limits,
        ),
    }
    if print_columns is not None:
        print(format_table(rows, print_columns), flush=True)
        if meta.get("note"):
            print(f"note: {meta['note']}", flush=True)
        print(f"results: {files['json']} {files['csv']} {files['png']}", flush=True)
    return files
