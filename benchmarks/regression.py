"""Benchmark regression check: our speed ratio to the transformers + PEFT peer against a recorded value.

``scripts/bench_regression.sh`` reruns ``python -m benchmarks --peer`` and hands its JSON here:

* ``python -m benchmarks.regression check RESULT.json [--baseline FILE]`` compares every
  (sequence length, our variant) ratio recorded in the baseline with the same ratio in the result and
  prints one line; exit status 0 when none dropped by more than the tolerance (10% by default), 1 when one
  did, 2 when the result cannot be compared (missing rows, a failed case, other settings than recorded);
* ``python -m benchmarks.regression record RESULT.json [--baseline FILE]`` writes the result's
  ratios as the new baseline (with the command, host, torch version and date they come from).

The ratio is ``peer step time / our step time`` (our tokens/s over the peer's). All three of the bench's
ratios are recorded: ``median_ratio`` (median wall-clock step), ``best_ratio`` (fastest steps) and
``cpu_median_ratio`` (median process CPU time). ``--metric auto`` (the default) checks
``cpu_median_ratio`` on a CPU and ``median_ratio`` on CUDA: a one-thread CPU run's wall time includes the
time it waited for a core, so on a shared machine its wall ratio follows the load (recorded side by side
under a load of 8 on 2 cores: wall median 0.59x, CPU time 1.08x), while on a GPU only wall time means
anything.
Speed is not part of the test suite: only this comparison logic is tested, on hand-made JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longlora_tune._io import atomic_write_json

__all__ = [
    "AUTO",
    "DEFAULT_BASELINE",
    "DEFAULT_TOLERANCE",
    "METRICS",
    "Comparison",
    "baseline_from_result",
    "compare_to_baseline",
    "main",
]

#: The versioned baseline next to the script.
DEFAULT_BASELINE = Path(__file__).resolve().parents[1] / "scripts" / "bench_baseline.json"
#: A drop of more than this fraction of the recorded ratio fails the check.
DEFAULT_TOLERANCE = 0.10
#: Ratios of ``benchmarks``'s ``peer`` rows that a baseline records.
METRICS = ("median_ratio", "best_ratio", "cpu_median_ratio")
#: ``metric="auto"``: CPU time on a CPU, wall time on CUDA (see the module docstring).
AUTO = "auto"
#: Case settings that must match between the baseline and a result for the ratios to be comparable.
SETTINGS = (
    "shape",
    "layers",
    "batch_size",
    "device",
    "dtype",
    "threads",
    "activation_checkpointing",
    "checkpoint_layers",
    "loss_chunks",
    "compile",
)


@dataclass
class Comparison:
    """Outcome of comparing a benchmark result with the baseline.

    Attributes:
        status: ``"ok"``, ``"regression"`` or ``"incomparable"``.
        metric: The ratio compared.
        tolerance: The allowed relative drop.
        rows: One dict per compared (sequence length, variant): ``seq_len``, ``ours``, ``baseline``,
            ``current`` and ``change`` (current / baseline - 1).
        problems: Why the result could not be compared (status ``"incomparable"``).
    """

    status: str
    metric: str
    tolerance: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 ok, 1 regression, 2 incomparable."""
        return {"ok": 0, "regression": 1}.get(self.status, 2)

    def line(self) -> str:
        """One line saying what was compared and the verdict."""
        if self.status == "incomparable":
            return "bench regression: CANNOT COMPARE: " + "; ".join(self.problems)
        parts = [
            f"seq {r['seq_len']} {r['ours']}: {r['current']:.3f}x vs recorded {r['baseline']:.3f}x "
            f"({100 * r['change']:+.1f}%)"
            for r in self.rows
        ]
        verdict = "OK" if self.status == "ok" else "REGRESSION"
        return (
            f"bench regression: {verdict}: ours/peer {self.metric} "
            f"(fails below -{100 * self.tolerance:.0f}%): " + "; ".join(parts)
        )


def _settings(result: dict[str, Any]) -> dict[str, Any]:
    cases = [r for r in result.get("results", []) if r.get("variant") != "peer"]
    return {key: cases[0].get(key) for key in SETTINGS} if cases else {}


def baseline_from_result(result: dict[str, Any], *, note: str = "") -> dict[str, Any]:
    """The baseline to record from a ``python -m benchmarks --peer --out`` JSON.

    Args:
        result: The bench JSON (``results``, ``peer`` rows, ``command``, ``host``...).
        note: Free text kept with the record (machine load, why it was re-recorded).

    Returns:
        The baseline: ``ratios`` (``{seq_len: {variant: {metric: value}}}``), the case ``settings`` and
        where the numbers come from.

    Raises:
        ValueError: If the result has no peer comparison or did not complete.
    """
    if not result.get("peer"):
        raise ValueError("the result has no ours-vs-peer rows: run the bench with --peer")
    if not result.get("complete", False):
        raise ValueError("the result is incomplete (a round was cut short): rerun before recording it")
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for row in result["peer"]:
        ratios.setdefault(str(row["seq_len"]), {})[row["ours"]] = {m: float(row[m]) for m in METRICS}
    return {
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "how": "scripts/bench_regression.sh --record (python -m benchmarks.regression record)",
        "command": result.get("command"),
        "host": result.get("host"),
        "cpu_count": result.get("cpu_count"),
        "torch": result.get("torch"),
        "note": note,
        "settings": _settings(result),
        "ratios": ratios,
    }


def compare_to_baseline(
    result: dict[str, Any],
    baseline: dict[str, Any],
    *,
    metric: str = AUTO,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Comparison:
    """Compare the ours/peer ratios of a bench result with the recorded ones.

    A ratio fails when ``current < recorded * (1 - tolerance)``; a faster result never fails.

    Args:
        result: ``python -m benchmarks --peer --out`` JSON.
        baseline: A :func:`baseline_from_result` record.
        metric: One of :data:`METRICS`, or ``"auto"``: ``cpu_median_ratio`` when the baseline was measured
            on a CPU, else ``median_ratio``.
        tolerance: Allowed relative drop (0.10 = 10%).

    Returns:
        The :class:`Comparison`.

    Raises:
        ValueError: On an unknown metric or a tolerance outside ``[0, 1)``.
    """
    if metric == AUTO:
        on_cpu = (baseline.get("settings") or {}).get("device") == "cpu"
        metric = "cpu_median_ratio" if on_cpu else "median_ratio"
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {[AUTO, *METRICS]}, got {metric!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    comparison = Comparison("ok", metric, tolerance)
    problems = comparison.problems
    recorded = baseline.get("ratios") or {}
    if not recorded:
        problems.append("the baseline records no ratios")
    wanted, got = baseline.get("settings") or {}, _settings(result)
    differing = [f"{k}={got.get(k)!r} (recorded {v!r})" for k, v in wanted.items() if got.get(k) != v]
    if differing:
        problems.append("measured with other settings than recorded: " + ", ".join(differing))
    errors = [r for r in result.get("results", []) if "error" in r]
    for r in errors:
        problems.append(f"case {r.get('variant')} seq {r.get('seq_len')} failed: {r['error']}")
    rows = {(str(r["seq_len"]), r["ours"]): r for r in result.get("peer", [])}
    for seq_len, variants in recorded.items():
        for ours, values in variants.items():
            row = rows.get((seq_len, ours))
            if row is None:
                if not errors:
                    problems.append(
                        f"no ours-vs-peer row for seq {seq_len} {ours} (run the bench with --peer)"
                    )
                continue
            if metric not in values:
                problems.append(f"the baseline has no {metric} for seq {seq_len} {ours}")
                continue
            before, now = float(values[metric]), float(row[metric])
            change = now / before - 1
            comparison.rows.append(
                {"seq_len": int(seq_len), "ours": ours, "baseline": before, "current": now, "change": change}
            )
            if now < before * (1 - tolerance):
                comparison.status = "regression"
    if problems:
        comparison.status = "incomparable"
    return comparison


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{what} {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is not a JSON object")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``check`` or ``record``).

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok / recorded, 1 regression, 2 incomparable or a usage error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.regression", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["check", "record"])
    parser.add_argument("result", type=Path, help="JSON written by python -m benchmarks --peer --out")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument(
        "--metric",
        choices=[AUTO, *METRICS],
        default=AUTO,
        help="auto (default): cpu_median_ratio for a CPU baseline, median_ratio for CUDA",
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed drop (0.10)")
    parser.add_argument("--note", default="", help="record: free text kept with the baseline")
    args = parser.parse_args(argv)
    try:
        result = _load(args.result, "result")
        if args.action == "record":
            record = baseline_from_result(result, note=args.note)
            atomic_write_json(args.baseline, record, indent=2)
            values = "; ".join(
                f"seq {seq} {ours}: " + ", ".join(f"{m} {v:.3f}x" for m, v in ratios.items())
                for seq, by in record["ratios"].items()
                for ours, ratios in by.items()
            )
            print(f"bench regression: recorded {args.baseline}: {values}")
            return 0
        comparison = compare_to_baseline(
            result, _load(args.baseline, "baseline"), metric=args.metric, tolerance=args.tolerance
        )
    except ValueError as err:
        print(f"bench regression: error: {err}", file=sys.stderr)
        return 2
    print(comparison.line())
    return comparison.exit_code


if __name__ == "__main__":
    sys.exit(main())
