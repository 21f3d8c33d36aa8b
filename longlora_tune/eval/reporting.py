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

__all__ = ["format_table", "plot_series", "write_csv", "write_json", "write_results"]


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


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (dicts with the same keys) as CSV with a header line.

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
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
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


def plot_series(
    path: str | Path,
    x: Sequence[float],
    y: Sequence[float],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    y_limits: tuple[float, float] | None = None,
) -> Path:
    """Plot one line with markers to a PNG file (NaN points are left out).

    Args:
        path: output ``.png``.
        x: x values.
        y: y values.
        xlabel: x axis label.
        ylabel: y axis label.
        title: plot title.
        log_x: base-2 logarithmic x axis (context lengths double).
        y_limits: fixed y range, e.g. (0, 1) for accuracy.

    Returns:
        The path.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o")
    if log_x:
        ax.set_xscale("log", base=2)
    if y_limits is not None:
        ax.set_ylim(*y_limits)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
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

    Args:
        output_dir: folder (created if missing).
        stem: file name without extension.
        rows: result rows.
        meta: run settings stored next to the rows in the JSON file.
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
            log_x=True,
            y_limits=y_limits,
        ),
    }
    if print_columns is not None:
        print(format_table(rows, print_columns), flush=True)
        print(f"results: {files['json']} {files['csv']} {files['png']}", flush=True)
    return files
