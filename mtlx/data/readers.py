"""Readers: a task's split on disk -> a list of `Example`s, with every bad row reported.

Formats: GLUE-style TSV (tab-separated, no quoting: GLUE texts contain bare quotes, which is why
Hugging Face's GLUE processors read them with ``quotechar=None``), CSV (RFC 4180 quoting), JSONL
(SuperGLUE), SQuAD JSON, and, in `mtlx.data.conll`, CoNLL-U and CoNLL-2003. Files are read as
bytes and decoded line by line, so invalid UTF-8 is reported with its line. GLUE's quirks are
handled: a UTF-8 BOM before the header (MRPC), header-less files (CoLA train/dev), a missing final
newline (CoLA dev), CRLF line ends.

Each reader checks what it reads (columns present, labels in the label set, numeric scores,
non-empty text, answers found at their offsets) and applies the error policy of
`mtlx.data.errors`: raise naming file and line, or skip and count per reason.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mtlx.data.errors import DataError, ReadReport, RowErrors
from mtlx.data.tasks import TaskSpec, get_task


@dataclasses.dataclass(frozen=True)
class Example:
    """One example as read, before tokenization.

    texts:   the text fields in `spec.text_fields` order; the words for token classification.
    label:   class index (classification, multiple choice: index of the right choice),
             float (regression), tuple of class indices (multilabel), or None (unlabelled split).
    tags:    token classification: one class index per word.
    answers: span tasks: ((answer text, character offset in the context), ...).
    choices: multiple choice: the candidate texts (fewer than the task's choice fields when
             its source.min_choices lets trailing ones be empty).
    uid:     the example's id in the file (or "" when it has none).
    line:    1-based line where the example starts in its file (0 where lines do not apply).
    """
    texts: tuple = ()
    label: Any = None
    tags: tuple = ()
    answers: tuple = ()
    choices: tuple = ()
    uid: str = ""
    line: int = 0


@dataclasses.dataclass
class SplitData:
    """The examples of one split of one task, with the read report (what was skipped and why)."""
    task: TaskSpec
    split: str
    examples: list
    report: ReadReport
    path: str
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.examples)


def sample_root() -> Path:
    """The real-data sample shipped in the package (layout as the full data; see its README)."""
    return Path(str(importlib.resources.files("mtlx.data").joinpath("sample")))


def with_local_files(spec: TaskSpec, cache_dir=None) -> TaskSpec:
    """`spec` with its files local: a source root or split file given as a URL (gs://...; a
    task config's "root" or "files") is copied once into this host's cache
    (mtlx.paths.local_copy) and the spec points at the copy. Local paths are left as they are."""
    from mtlx import paths
    source = getattr(spec, "source", None)
    if source is None or not hasattr(source, "files"):
        return spec
    what = f"task {spec.name!r}"
    root = source.root
    if root and paths.is_url(root):
        root = str(paths.local_copy(root, what=f"{what} root", cache_dir=cache_dir))
    files = tuple(
        dataclasses.replace(f, path=str(paths.local_copy(
            f.path, what=f"{what} split {f.split!r}", cache_dir=cache_dir)))
        if paths.is_url(f.path) else f
        for f in source.files)
    if root == source.root and files == source.files:
        return spec
    return dataclasses.replace(spec, source=dataclasses.replace(source, root=root, files=files))


def resolve_path(spec: TaskSpec, split: str, data_root=None, dirs: Optional[Mapping[str, Any]] = None) -> Path:
    """Where `split` of `spec` lives: dirs[spec.source.root] if given, else data_root/root.

    data_root defaults to the embedded sample. `dirs={"glue": "/data/glue_data"}` points the GLUE
    tasks at a GLUE directory in the official layout (CoLA/, SST-2/, ... inside it).
    """
    entry = spec.source.file(split) if split in spec.splits else None
    if entry is None:
        raise ValueError(f"task {spec.name!r} has no split {split!r}; its splits: {list(spec.splits)}")
    dirs = dict(dirs or {})
    root = spec.source.root
    if root in dirs:
        base = Path(dirs[root])
    elif Path(root).is_absolute():
        base = Path(root)
    else:
        base = Path(data_root if data_root is not None else sample_root()) / root
    path = base / entry.path
    if not path.is_file():
        hint = (f"data root {data_root or sample_root()}" +
                (f"; pass dirs={{{root!r}: <folder>}} or data_root=" if root else ""))
        raise FileNotFoundError(
            f"task {spec.name!r}, split {split!r}: file not found: {path} ({hint})")
    return path


def load_split(task, split: Optional[str] = None, *, data_root=None,
               dirs: Optional[Mapping[str, Any]] = None, on_error: str = "raise",
               backend: str = "files", tfds_data_dir=None) -> SplitData:
    """Reads one split of a task (a name or a TaskSpec) into Examples.

    backend="files" reads the source files under data_root (default: the embedded sample);
    backend="tfds" reads the prepared tensorflow-datasets version (ArrayRecord, no TensorFlow).
    on_error="raise" stops at the first malformed row with DataError (file and line);
    on_error="skip" skips such rows and counts them in the returned report. A split with no
    examples is always an error.
    """
    spec = get_task(task)
    split = split or spec.train_split
    if backend == "tfds":
        from mtlx.data.tfds_source import read_tfds
        return read_tfds(spec, split, data_dir=tfds_data_dir, on_error=on_error)
    if backend != "files":
        raise ValueError(f"backend must be 'files' or 'tfds', got {backend!r}")
    path = resolve_path(spec, split, data_root, dirs)
    entry = spec.source.file(split)
    errors = RowErrors(on_error, path, spec.name)
    fmt = spec.source.format
    if fmt in ("tsv", "csv"):
        examples = _read_delimited(spec, entry, path, errors)
    elif fmt == "jsonl":
        examples = _read_jsonl(spec, entry, path, errors)
    elif fmt == "squad":
        examples = _read_squad(spec, entry, path, errors)
    else:
        from mtlx.data import conll
        examples = conll.read(spec, entry, path, errors)
    report = errors.finish(len(examples))
    return SplitData(spec, split, examples, report, str(path), entry.labelled)


# ----------------------------------------------------------------------------- shared checks

class Undecodable:
    """A line that is not valid UTF-8, as `decoded_lines` yields it: the record it belongs to
    (a row, a CSV record spanning lines, a CoNLL sentence) is bad as a whole, and it is the
    format's reader that knows that record. `text`: the line decoded with replacement
    characters (so a CSV record or a sentence can still be delimited)."""

    def __init__(self, line: int, byte: int, text: str):
        self.line, self.byte, self.text = line, byte, text

    @property
    def message(self) -> str:
        return f"invalid UTF-8 at byte {self.byte} of line {self.line}"


def decoded_lines(path: Path, errors: RowErrors):
    """Yields (line number, text) for each line, `Undecodable` for a line that is not UTF-8
    (the reader rejects the record holding it through the error policy).

    Splits on "\\n" only (a CR before it is dropped) so a bare CR inside a field stays text;
    a final line without newline is kept; the UTF-8 BOM of line 1 is removed.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, Undecodable(i, e.start, raw.decode("utf-8", "replace"))
            continue
        if i == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield i, text


def label_index(spec: TaskSpec, raw: Any) -> Optional[int]:
    """Index of a label as written in the file, or None if it is outside the label set."""
    raw = _label_text(raw)
    try:
        return spec.raw_labels.index(raw)
    except ValueError:
        return None


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def make_example(spec: TaskSpec, record: Mapping[str, Any], labelled: bool, errors: RowErrors,
                 *, line: int = 0, where: Optional[str] = None) -> Optional[Example]:
    """Builds and checks an Example from a {field: value} record; None if the row is skipped."""
    loc = dict(line=line or None, where=where)
    texts = []
    for field in spec.text_fields:
        value = record.get(field)
        if value is None or not str(value).strip():
            errors.bad("empty_text", f"field {field!r} is empty", **loc)
            return None
        texts.append(str(value))
    choices = ()
    if spec.head == "multiple_choice" and spec.source.choice_list:
        choices = _listed_choices(spec, record.get(spec.source.choice_list), errors, loc)
        if choices is None:
            return None
    elif spec.head == "multiple_choice":
        fields = spec.source.choices
        choices = tuple(str(record.get(f) or "") for f in fields)
        filled = [bool(c.strip()) for c in choices]
        # a varying number of candidates (source.min_choices): the empty fields come last
        n = len(choices) if not spec.source.min_choices else (
            max((i + 1 for i, f in enumerate(filled) if f), default=0))
        empty = [f for f, ok in zip(fields[:n], filled[:n]) if not ok]
        if empty:
            errors.bad("empty_text", f"choice field(s) {empty} are empty"
                       + (" (only trailing choice fields may be empty)" if spec.source.min_choices else ""),
                       **loc)
            return None
        if n < max(spec.source.min_choices, 2):
            errors.bad("empty_text", f"{n} of the choice fields {list(fields)} are filled, fewer "
                       f"than min_choices={spec.source.min_choices}", **loc)
            return None
        choices = choices[:n]
    label = None
    if labelled:
        raw = record.get("label")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            errors.bad("missing_columns", "the label is missing", **loc)
            return None
        label = _parse_label(spec, raw, len(choices), errors, loc)
        if label is None:
            return None
    uid = record.get("id")
    return Example(texts=tuple(texts), label=label, choices=choices,
                   uid="" if uid is None else str(uid), line=line)


def _listed_choices(spec: TaskSpec, raw: Any, errors: RowErrors, loc: dict) -> Optional[tuple]:
    """The candidates of one list field (source.choice_list): a JSON array (a list already in
    JSONL, a JSON text in a TSV/CSV cell) of non-empty texts, as many as the task takes."""
    field, most, least = spec.source.choice_list, spec.source.max_choices, spec.source.min_choices
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.bad("bad_json", f"choice list field {field!r} is not a JSON array: {e.msg} "
                       f"(column {e.colno} of {raw[:60]!r})", **loc)
            return None
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                              for c in value):
        errors.bad("bad_json", f"choice list field {field!r} must be a list of texts, got "
                   f"{str(raw)[:60]!r}", **loc)
        return None
    choices = tuple(str(c) for c in value)
    empty = [i for i, c in enumerate(choices) if not c.strip()]
    if empty:
        errors.bad("empty_text", f"candidate(s) {empty} of choice list field {field!r} are empty", **loc)
        return None
    n = len(choices)
    if n > most or n < (least or most):
        want = f"between min_choices={least} and max_choices={most}" if least else \
            f"max_choices={most} (set min_choices for a varying number)"
        errors.bad("bad_choices",
                   f"choice list field {field!r} holds {n} candidates; the task takes {want}", **loc)
        return None
    return choices


def _parse_label(spec: TaskSpec, raw: Any, num_choices: int, errors: RowErrors, loc: dict):
    if spec.head == "regression":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            errors.bad("bad_score", f"regression target {raw!r} is not a finite number", **loc)
            return None
        return value
    if spec.head == "multiple_choice":
        text = _label_text(raw)
        if not text.isdigit() or int(text) >= num_choices:
            errors.bad("unknown_label", f"label {raw!r} is not a choice index in 0..{num_choices - 1}", **loc)
            return None
        return int(text)
    if spec.head == "multilabel":
        parts = raw if isinstance(raw, (list, tuple)) else [
            p for p in str(raw).split(spec.source.label_separator) if p.strip()]
        idx = [label_index(spec, p) for p in parts]
        if None in idx:
            bad = [p for p, i in zip(parts, idx) if i is None]
            errors.bad("unknown_label", f"label(s) {bad} not in the label set {list(spec.raw_labels)}", **loc)
            return None
        return tuple(sorted(set(idx)))
    if spec.head == "seq2seq" and not spec.labels:
        if spec.target == "score":
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                errors.bad("bad_score", f"score {raw!r} is not a finite number", **loc)
                return None
            return value
        text = str(raw).strip()
        if not text:
            errors.bad("empty_text", "the target text is empty", **loc)
            return None
        return text
    idx = label_index(spec, raw)
    if idx is None:
        errors.bad("unknown_label", f"label {_label_text(raw)!r} is not in the label set "
                   f"{list(spec.raw_labels)}", **loc)
        return None
    return idx


# ----------------------------------------------------------------------------- TSV / CSV

def _column_indices(spec: TaskSpec, entry, header: Optional[list], path: Path) -> dict:
    """field -> column index, checking that every needed column exists."""
    columns = dict(entry.columns or spec.source.columns)
    needed = list(spec.text_fields) + list(spec.source.choice_fields)
    missing_fields = [f for f in needed if f not in columns]
    if missing_fields:
        raise DataError(f"no column mapping for field(s) {missing_fields}", path=path, task=spec.name)
    if entry.labelled and "label" not in columns:
        raise DataError(f"split {entry.split!r} is labelled but the column mapping has no 'label'",
                        path=path, task=spec.name)
    out = {}
    for field, col in columns.items():
        if field == "label" and not entry.labelled:
            continue
        if isinstance(col, int):
            out[field] = col
        elif header is None:
            raise DataError(f"column {col!r} of field {field!r} is a name but the file has no "
                            f"header; use a 0-based index", path=path, task=spec.name)
        elif col in header:
            out[field] = header.index(col)
        elif field == "id":
            continue  # ids are optional
        else:
            raise DataError(f"column {col!r} (field {field!r}) not in the header {header}",
                            path=path, line=1, task=spec.name)
    return out


def _read_delimited(spec: TaskSpec, entry, path: Path, errors: RowErrors) -> list:
    tsv = spec.source.format == "tsv"
    lines = decoded_lines(path, errors)
    if tsv:
        rows = ((i, text if isinstance(text, Undecodable) else text.split("\t"))
                for i, text in lines)
    else:
        rows = _csv_rows(lines, path)
    header, index, examples = None, None, []
    for line, cols in rows:
        if isinstance(cols, Undecodable):
            if entry.header and header is None:
                raise DataError(f"the header is not UTF-8: {cols.message}", path=path,
                                line=line, task=spec.name)
            errors.report.rows_read += 1
            errors.bad("invalid_utf8", cols.message, line=cols.line)
            continue
        if entry.header and header is None:
            header = [c.strip() for c in cols]
            index = _column_indices(spec, entry, header, path)
            continue
        if index is None:
            index = _column_indices(spec, entry, None, path)
        if cols == [""]:
            continue  # a blank line holds no data
        errors.report.rows_read += 1
        if header is not None and len(cols) != len(header):
            reason = "missing_columns" if len(cols) < len(header) else "extra_columns"
            errors.bad(reason, f"{len(cols)} columns, the header has {len(header)}", line=line)
            continue
        need = max(index.values()) + 1
        if len(cols) < need:
            errors.bad("missing_columns", f"{len(cols)} columns, need at least {need}", line=line)
            continue
        record = {field: cols[i] for field, i in index.items()}
        ex = make_example(spec, record, entry.labelled, errors, line=line)
        if ex is not None:
            examples.append(ex)
    return examples


def _csv_rows(lines, path):
    """CSV rows with the line each starts on (quoted fields may span lines)."""
    lines = iter(lines)
    start = [None]
    bad = [None]  # the first line of the record being read that is not UTF-8

    def feed():
        for i, text in lines:
            if start[0] is None:
                start[0] = i
            if isinstance(text, Undecodable):
                bad[0] = bad[0] or text
                text = text.text
            yield text + "\n"

    reader = csv.reader(feed(), strict=True)
    while True:
        start[0] = bad[0] = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"CSV does not parse: {e}", path=path, line=start[0]) from None
        yield start[0], (bad[0] if bad[0] is not None else row or [""])


# ----------------------------------------------------------------------------- JSONL

# Record transforms a task can name in `Source.preprocess` (from a config, too).
def _copa(record: dict) -> dict:
    """COPA: the connective goes before each choice ("because" for cause, "so" for effect), as in
    the SuperGLUE baselines (jiant), so the pair reads premise -> candidate."""
    word = {"cause": "because", "effect": "so"}.get(str(record.get("question", "")).strip())
    if word is None:
        return record
    out = dict(record)
    for key in ("choice1", "choice2"):
        c = str(record.get(key) or "")
        if c:
            out[key] = f"{word} {c[0].lower()}{c[1:]}"
    return out


PREPROCESSORS: dict[str, Callable[[dict], dict]] = {"copa": _copa}


def _read_jsonl(spec: TaskSpec, entry, path: Path, errors: RowErrors) -> list:
    columns = dict(entry.columns or spec.source.columns)
    transform = PREPROCESSORS.get(spec.source.preprocess) if spec.source.preprocess else None
    if spec.source.preprocess and transform is None:
        raise DataError(f"unknown preprocess {spec.source.preprocess!r}; known: {sorted(PREPROCESSORS)}",
                        path=path, task=spec.name)
    examples = []
    for line, text in decoded_lines(path, errors):
        if isinstance(text, Undecodable):
            errors.report.rows_read += 1
            errors.bad("invalid_utf8", text.message, line=line)
            continue
        if not text.strip():
            continue
        errors.report.rows_read += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.bad("bad_json", f"invalid JSON: {e.msg} at column {e.colno}", line=line)
            continue
        if not isinstance(obj, dict):
            errors.bad("bad_json", f"expected a JSON object, got {type(obj).__name__}", line=line)
            continue
        needed = [c for f, c in columns.items()
                  if f not in ("id",) and (f != "label" or entry.labelled)]
        absent = [c for c in needed if c not in obj]
        if absent:
            errors.bad("missing_columns", f"keys {absent} are missing", line=line)
            continue
        if transform is not None:
            obj = transform(obj)
        record = {field: obj.get(key) for field, key in columns.items()}
        ex = make_example(spec, record, entry.labelled, errors, line=line)
        if ex is not None:
            examples.append(ex)
    return examples


# ----------------------------------------------------------------------------- SQuAD JSON

def _read_squad(spec: TaskSpec, entry, path: Path, errors: RowErrors) -> list:
    """SQuAD v1.1/v2.0 JSON: data[].paragraphs[].{context, qas[].{id, question, answers}}.

    Each question is an Example(texts=(question, context), answers=((text, start), ...)). The
    line of each question is found from its "id" in the raw text, so errors name a line.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError("invalid UTF-8", path=path, line=line, task=spec.name, reason="invalid_utf8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path=path, line=e.lineno, task=spec.name,
                        reason="bad_json") from None
    line_of = _id_lines(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError("not SQuAD JSON: no top-level 'data' list", path=path, task=spec.name)
    examples = []
    for i, article in enumerate(doc["data"]):
        for j, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = para.get("context") if isinstance(para, dict) else None
            for k, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                errors.report.rows_read += 1
                ex = _squad_example(spec, entry, context, qa, where, line_of, errors)
                if ex is not None:
                    examples.append(ex)
    return examples


def _id_lines(text: str) -> dict:
    lines = {}
    for m in re.finditer(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"', text):
        lines.setdefault(m.group(1), text.count("\n", 0, m.start()) + 1)
    return lines


def _squad_example(spec, entry, context, qa, where, line_of, errors) -> Optional[Example]:
    if not isinstance(qa, dict) or "question" not in qa or "id" not in qa:
        errors.bad("bad_json", "question entry needs 'id' and 'question'", where=where)
        return None
    line = line_of.get(str(qa["id"]))
    loc = dict(line=line, where=None if line else where)
    if not isinstance(context, str) or not context.strip():
        errors.bad("empty_text", "paragraph context is empty", **loc)
        return None
    if not str(qa["question"]).strip():
        errors.bad("empty_text", "question is empty", **loc)
        return None
    answers = []
    for a in qa.get("answers", []) if entry.labelled else []:
        try:
            answer, start = str(a["text"]), int(a["answer_start"])
        except (KeyError, TypeError, ValueError):
            errors.bad("bad_json", "answer needs 'text' and an integer 'answer_start'", **loc)
            return None
        if context[start: start + len(answer)] != answer:
            errors.bad("bad_answer", f"answer {answer!r} is not at character {start} of the "
                       f"context (found {context[start: start + len(answer)]!r})", **loc)
            return None
        answers.append((answer, start))
    impossible = bool(qa.get("is_impossible", False))
    if entry.labelled and not answers and not impossible:
        errors.bad("bad_answer", "question has no answer and is not marked is_impossible", **loc)
        return None
    if entry.labelled and impossible and answers:
        errors.bad("bad_answer", "question is marked is_impossible but has answers", **loc)
        return None
    if entry.labelled and impossible and not spec.null_answers:
        errors.bad("bad_answer", f"question is marked is_impossible (SQuAD 2.0), but task "
                   f"{spec.name!r} answers every question (TaskSpec.null_answers=False, SQuAD "
                   f"v1.1); use a task with null_answers=True such as 'squad_v2'", **loc)
        return None
    return Example(texts=(str(qa["question"]), context), answers=tuple(answers),
                   uid=str(qa["id"]), line=line or 0)


__all__ = ["Example", "SplitData", "load_split", "resolve_path", "sample_root", "make_example",
           "label_index", "decoded_lines", "Undecodable", "PREPROCESSORS"]
