"""Bad input: the error every reader raises, and the skip policy that counts instead.

A reader meets a malformed row (missing columns, a label outside the label set, a non-numeric
score, empty text, invalid UTF-8, a broken CoNLL-U line, ...). With ``on_error="raise"`` (the
default) it raises `DataError` naming the file and line (or JSON path) and the task. With
``on_error="skip"`` it skips the row and counts it in a `ReadReport` by reason, so nothing is
dropped silently: the report is returned with the data and logged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("mtlx.data")

ON_ERROR = ("raise", "skip")

# Every reason a row can be rejected for (the keys of ReadReport.skipped).
REASONS = (
    "invalid_utf8",      # bytes that do not decode as UTF-8
    "missing_columns",   # fewer columns than the layout needs
    "extra_columns",     # more columns than the header declares
    "empty_text",        # a text field that is empty or whitespace
    "unknown_label",     # a label outside the task's label set
    "bad_score",         # a regression target that is not a finite number
    "bad_conll_line",    # a CoNLL-U / CoNLL-2003 line that does not parse
    "bad_json",          # a JSON line or record that does not parse or lacks a field
    "bad_answer",        # a QA answer whose text is not at its character offset
    "bad_choices",       # a multiple-choice list (source.choice_list) of the wrong length
)


class DataError(ValueError):
    """A data file is malformed. `path`, `line` (1-based) or `where` (e.g. a JSON path) say where."""

    def __init__(self, message: str, *, path=None, line: Optional[int] = None,
                 where: Optional[str] = None, task: Optional[str] = None,
                 reason: Optional[str] = None):
        self.path, self.line, self.where, self.task, self.reason = path, line, where, task, reason
        self.message = message
        loc = str(path) if path is not None else ""
        if line is not None:
            loc += f":{line}"
        if where:
            loc += f" [{where}]"
        prefix = f"{loc}: " if loc else ""
        suffix = f" (task {task!r})" if task else ""
        super().__init__(f"{prefix}{message}{suffix}")


@dataclasses.dataclass
class ReadReport:
    """What a reader skipped under ``on_error="skip"``: counts and the first location per reason."""
    path: str = ""
    task: str = ""
    rows_read: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)
    first: dict = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, reason: str, location: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {list(REASONS)}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first.setdefault(reason, location)

    def summary(self) -> str:
        parts = ", ".join(f"{r}: {n} (first at {self.first[r]})" for r, n in sorted(self.skipped.items()))
        return (f"task {self.task!r}, {self.path}: kept {self.rows_read - self.num_skipped} of "
                f"{self.rows_read} rows; skipped {self.num_skipped}" + (f" [{parts}]" if parts else ""))


class RowErrors:
    """Applies the error policy: raise at once, or count in the report and tell the caller to skip."""

    def __init__(self, on_error: str, path, task: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.path, self.task = on_error, path, task
        self.report = ReadReport(path=str(path), task=task)

    def bad(self, reason: str, message: str, *, line: Optional[int] = None,
            where: Optional[str] = None) -> None:
        """Raises DataError, or (skip policy) records the row; the caller then skips it."""
        if self.on_error == "raise":
            raise DataError(message, path=self.path, line=line, where=where, task=self.task,
                            reason=reason)
        loc = f"{self.path}:{line}" if line is not None else f"{self.path} [{where}]"
        self.report.add(reason, loc)

    def finish(self, num_examples: int):
        """Logs what was skipped; raises if nothing usable is left (a task with no examples)."""
        if self.report.num_skipped:
            log.warning("skipped malformed rows: %s", self.report.summary())
        if num_examples == 0:
            detail = f"; {self.report.summary()}" if self.report.num_skipped else ""
            raise DataError(f"no examples (a task needs at least one){detail}",
                            path=self.path, task=self.task)
        return self.report
