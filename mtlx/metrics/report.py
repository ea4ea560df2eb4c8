"""Plain-text table of per-task metrics, printed by the training loop at the end of a run."""

from __future__ import annotations

import math
import sys
from typing import Mapping, Optional, TextIO


def format_metrics_table(results: Mapping[str, Mapping[str, float]], *, digits: int = 4,
                         scale: float = 1.0, missing: str = "-",
                         title: Optional[str] = None) -> str:
    """One row per task, one column per metric name (in first-seen order), aligned.

    scale multiplies every value (100 prints percentages as papers do). A metric a task does
    not have shows `missing`. NaN shows as "nan".
    """
    if not results:
        raise ValueError("mtlx.metrics.report: no task results to print")
    columns: list[str] = []
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"mtlx.metrics.report: results[{task!r}] must be a {{metric: value}} mapping, got "
                f"{type(metrics).__name__}")
        for name in metrics:
            if name not in columns:
                columns.append(name)
    header = ["task"] + columns
    rows = []
    for task, metrics in results.items():
        row = [str(task)]
        for name in columns:
            if name not in metrics:
                row.append(missing)
                continue
            value = metrics[name]
            try:
                value = float(value) * scale
            except (TypeError, ValueError):
                raise ValueError(
                    f"mtlx.metrics.report: results[{task!r}][{name!r}] = {value!r} is not a number")
            row.append("nan" if math.isnan(value) else f"{value:.{digits}f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        # Task names left-aligned, numbers right-aligned so their decimals line up.
        return "  ".join([cells[0].ljust(widths[0])]
                         + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def print_metrics_table(results: Mapping[str, Mapping[str, float]], *,
                        file: Optional[TextIO] = None, **kwargs) -> str:
    """Prints `format_metrics_table(results, **kwargs)` (to stdout by default) and returns it."""
    table = format_metrics_table(results, **kwargs)
    print(table, file=file if file is not None else sys.stdout)
    return table
