"""Tasks, declared once, and the registry that finds them by name.

A `TaskSpec` says everything the run needs to know about a task: where its data lives and how the
files are laid out (`Source`), which fields are text, the head kind and label set the model builds
(the model reads `spec.name`, `spec.head` and `len(spec.labels)`), the metrics (names registered in
`mtlx.metrics`), and tokenization limits. Specs are frozen and hashable, so they can key caches
and sit inside configs.

Built in: the GLUE tasks (Wang et al. 2019) in the official TSV layout and as tensorflow-datasets
``glue/*``; UD English-EWT part-of-speech tagging (CoNLL-U); CoNLL-2003 NER; SQuAD v1.1 and 2.0; and the
SuperGLUE tasks BoolQ, CB and COPA (Wang et al. 2019b) from their JSONL release. Users add a task
from a config (a TSV/CSV/JSONL file and a column mapping) with `task_from_config`, no code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

HEAD_KINDS = ("classification", "multilabel", "regression", "token_classification", "span",
              "multiple_choice", "seq2seq")
FORMATS = ("tsv", "csv", "jsonl", "conllu", "conll2003", "squad")
TRUNCATION = ("longest_first", "only_first", "only_second")
# Heads whose label set is a list of class names.
LABELLED_HEADS = ("classification", "multilabel", "token_classification")

Column = Union[str, int]


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """One split's file, relative to the source's root folder.

    `columns` overrides `Source.columns` for this file (GLUE test files have other layouts).
    `labelled=False` marks a split without gold labels (GLUE/SuperGLUE test); a labelled split
    whose file lacks the label column is an error, never silently unlabelled data.
    """
    split: str
    path: str
    header: bool = True
    columns: tuple = ()
    labelled: bool = True


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """The same task in tensorflow-datasets (read with ArrayRecord, no TensorFlow)."""
    name: str                # e.g. "glue/cola"
    fields: tuple = ()       # (our field, tfds feature) pairs, e.g. (("sentence1", "premise"),)
    splits: tuple = ()       # (our split, tfds split) pairs, e.g. (("dev", "validation"),)
    label_feature: str = "label"

    def split_name(self, split: str) -> str:
        return dict(self.splits).get(split, split)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a task's files are and how to read them.

    format:      one of FORMATS.
    root:        folder under the data root holding the files ("glue", "ud_english_ewt", ...);
                 `load_split(..., dirs={"glue": path})` points one root elsewhere (a GLUE dir).
    files:       SplitFile per split.
    columns:     (field, column) pairs: column name (header / JSON key) or 0-based index.
                 Fields are the spec's text fields, "label", optionally "id", and for multiple
                 choice the names in `choices`.
    raw_labels:  label values as written in the file, aligned with `TaskSpec.labels` (GLUE writes
                 "0"/"1" for the classes tfds calls "unacceptable"/"acceptable"); default: labels.
    choices:     multiple choice: the fields holding the candidate answers, in order.
    choice_list: multiple choice: instead of `choices`, ONE field holding the candidates as a
                 list in order (HellaSwag's "endings", SWAG-style JSONL): a JSON array in
                 JSONL, a JSON array written in the cell in TSV/CSV; with `max_choices`.
    max_choices: with `choice_list`: the rows an example takes (its candidates, then absent
                 ones); an example must hold exactly that many candidates, or between
                 `min_choices` and it when min_choices is set.
    min_choices: multiple choice with a varying number of candidates (ARC: 3 to 5): an example
                 may leave the choice fields after its first `min_choices` empty (trailing
                 only: the label indexes the fields in order); 0 (default): every choice field
                 must be filled. Each example still takes len(choices) rows (a task's rows per
                 example are fixed, so data order stays a pure function of (seed, step)); the
                 absent candidates' rows are left out of the softmax over the candidates and
                 can never be predicted.
    tag_column:  CoNLL-U field holding the tag ("upos" or "xpos").
    label_separator: multilabel: separator between the labels of one row.
    preprocess:  name of a registered record transform (see readers.PREPROCESSORS), or "".
    tfds:        the same task in tensorflow-datasets, or None.
    reference:   citation for the data.
    """
    format: str
    root: str = ""
    files: tuple = ()
    columns: tuple = ()
    raw_labels: tuple = ()
    choices: tuple = ()
    min_choices: int = 0
    choice_list: str = ""
    max_choices: int = 0
    tag_column: str = "upos"
    label_separator: str = ","
    preprocess: str = ""
    tfds: Optional[TfdsSource] = None
    reference: str = ""

    def file(self, split: str) -> SplitFile:
        for f in self.files:
            if f.split == split:
                return f
        raise ValueError(f"no split {split!r}; this source has splits {[f.split for f in self.files]}")

    @property
    def splits(self) -> tuple:
        return tuple(f.split for f in self.files)

    @property
    def choice_fields(self) -> tuple:
        """Multiple choice: the fields the candidates are read from (choice fields, or the
        one list field)."""
        return (self.choice_list,) if self.choice_list else tuple(self.choices)

    @property
    def num_choices(self) -> int:
        """Multiple choice: the rows an example takes (choice fields, or max_choices)."""
        return self.max_choices if self.choice_list else len(self.choices)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: its data, head, labels, metrics and tokenization limits.

    name:        unique key (heads, checkpoints and metrics are keyed by it, never by position).
    head:        one of HEAD_KINDS (the model's head kinds).
    labels:      class names (classification, multilabel, token classification); () otherwise.
    metrics:     names registered in mtlx.metrics (e.g. "accuracy", "mcc", "pearson", "squad").
    text_fields: the text inputs in order: one field for single sentences, two for pairs
                 (question + context for span tasks; context + question for multiple choice);
                 ("tokens",) for token classification.
    max_length:  tokens per row after truncation (specials included).
    truncation:  how a pair is cut to max_length: one of TRUNCATION.
    stride:      span tasks: overlap in tokens between the windows of a long context (0: one
                 window); token classification: > 0 cuts a long sentence into windows that
                 overlap by `stride` tokens, each word tagged in one of them (0: cut at max_length).
    train_split / eval_splits: the split names used for training and evaluation.
    target:      seq2seq only, how the label becomes the target text: "" (the class name when
                 `labels` is given, else the label column's text) or "score" (a regression
                 score rounded to 0.2 and written "3.8", as T5 does for STS-B).
    max_target_length: seq2seq: target tokens (EOS included) after truncation.
    null_answers: span tasks with unanswerable questions (SQuAD 2.0; run_qa.py's
                 --version_2_with_negative): a question is answered "" (no answer) when its
                 null score ([CLS] start + end logit, the lowest over its windows) exceeds its
                 best span's score by more than `null_score_threshold`, and it is scored with
                 SQuAD 2.0's metric. Without it, every question gets its best span (v1.1) and
                 a question marked is_impossible in the data is an error.
    null_score_threshold: run_qa.py's --null_score_diff_threshold (default 0.0).
    """
    name: str
    head: str
    source: Source
    labels: tuple = ()
    metrics: tuple = ()
    text_fields: tuple = ("sentence",)
    max_length: int = 128
    truncation: str = "longest_first"
    stride: int = 0
    train_split: str = "train"
    eval_splits: tuple = ("dev",)
    target: str = ""
    max_target_length: int = 16
    null_answers: bool = False
    null_score_threshold: float = 0.0
    description: str = ""

    def __post_init__(self):
        where = f"task {self.name!r}"
        if not self.name or not isinstance(self.name, str) or "/" in self.name:
            raise ValueError(f"task name must be a non-empty string without '/', got {self.name!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"{where}: unknown head kind {self.head!r}; known: {list(HEAD_KINDS)}")
        if self.source.format not in FORMATS:
            raise ValueError(f"{where}: unknown source format {self.source.format!r}; known: {list(FORMATS)}")
        tagged = self.source.format in ("conllu", "conll2003")
        if (self.head == "token_classification") != tagged:
            raise ValueError(
                f"{where}: token classification reads a tag per word, which only the CoNLL "
                f"formats ('conllu', 'conll2003') carry, and those formats are read for token "
                f"classification only; got head {self.head!r} with source format "
                f"{self.source.format!r}")
        if self.head in LABELLED_HEADS and not self.labels:
            raise ValueError(f"{where}: head {self.head!r} needs a label list")
        if self.head not in LABELLED_HEADS + ("seq2seq",) and self.labels:
            raise ValueError(f"{where}: head {self.head!r} takes no label list, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{where}: repeated labels in {list(self.labels)}")
        raw = self.source.raw_labels
        if raw and (len(raw) != len(self.labels) or len(set(raw)) != len(raw)):
            raise ValueError(f"{where}: source.raw_labels {list(raw)} must be distinct and align "
                             f"with labels {list(self.labels)}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"{where}: truncation must be one of {TRUNCATION}, got {self.truncation!r}")
        if self.max_length < 8:
            raise ValueError(f"{where}: max_length must be >= 8, got {self.max_length}")
        src = self.source
        if src.choice_list or src.max_choices:
            mc = src.max_choices
            if self.head != "multiple_choice" or src.choices or not src.choice_list \
                    or isinstance(mc, bool) or not isinstance(mc, int) or mc < 2:
                raise ValueError(f"{where}: choice_list (one field holding the candidates) goes "
                                 f"with max_choices >= 2 (the rows an example takes), instead of "
                                 f"choice fields, on a multiple-choice task; got "
                                 f"choice_list={src.choice_list!r}, max_choices={mc!r}, "
                                 f"choices={list(src.choices)} (head {self.head!r})")
        elif self.head == "multiple_choice" and len(src.choices) < 2:
            raise ValueError(f"{where}: multiple choice needs >= 2 choice fields in source.choices "
                             f"(or one list field: choice_list with max_choices)")
        k, m = src.num_choices, src.min_choices
        if m and (self.head != "multiple_choice" or isinstance(m, bool) or not isinstance(m, int)
                  or not 2 <= m <= k):
            raise ValueError(f"{where}: min_choices must be 0 or an integer in 2..{k} (the number "
                             f"of choice fields, or max_choices) on a multiple-choice task, got "
                             f"{m!r} (head {self.head!r})")
        if self.target not in ("", "score") or (self.target and self.head != "seq2seq"):
            raise ValueError(f"{where}: target must be '' or 'score' (seq2seq only), got {self.target!r}")
        if self.head == "seq2seq" and self.target == "score" and self.labels:
            raise ValueError(f"{where}: a 'score' target takes no label list")
        if self.null_answers and self.head != "span":
            raise ValueError(f"{where}: null_answers (unanswerable questions) is for span tasks, "
                             f"not head {self.head!r}")
        if not isinstance(self.null_score_threshold, (int, float)) or not math.isfinite(self.null_score_threshold):
            raise ValueError(f"{where}: null_score_threshold must be a finite number, got "
                             f"{self.null_score_threshold!r}")
        if not 0 <= self.stride < self.max_length // 2:
            raise ValueError(f"{where}: stride must be in [0, max_length/2), got {self.stride}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def raw_labels(self) -> tuple:
        return self.source.raw_labels or self.labels

    @property
    def splits(self) -> tuple:
        return self.source.splits


def text_to_text(spec: TaskSpec) -> TaskSpec:
    """The T5 text-to-text version of a classification or regression task (Raffel et al. 2020,
    appendix D): same data and name, head "seq2seq"; the input is written
    "<task> <field>: <text> ..." and the target is the class name, or for a regression task
    the score rounded to the nearest 0.2 ("3.8"). Metrics stay the task's own: predictions are
    mapped back to a class index (or a number) before scoring."""
    if spec.head == "seq2seq":
        return spec
    if spec.head == "classification":
        return dataclasses.replace(spec, head="seq2seq")
    if spec.head == "regression":
        return dataclasses.replace(spec, head="seq2seq", target="score")
    raise ValueError(f"task {spec.name!r}: only classification and regression tasks have a "
                     f"text-to-text form here, not {spec.head!r}")


# ----------------------------------------------------------------------------- registry

class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Adds `spec` to the registry; re-registering a name needs overwrite=True."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task expects a TaskSpec, got {type(spec).__name__}")
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered with a different spec; "
                         f"pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`; UnknownTaskError listing the known names otherwise."""
    if isinstance(name, TaskSpec):
        return name
    if name not in _REGISTRY:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_tasks() -> tuple:
    return tuple(sorted(_REGISTRY))


# ----------------------------------------------------------------------------- user tasks

_CONFIG_KEYS = {
    "name": "task name", "head": "head kind", "format": "tsv | csv | jsonl | squad (span tasks)",
    "files": "{split: path}", "columns": "{field: column name or index} (not for squad)",
    "labels": "class names (classification / multilabel)", "raw_labels": "labels as written",
    "metrics": "metric names", "text_fields": "text fields in order (default: from columns)",
    "header": "files have a header row (default true)", "max_length": "tokens per row",
    "truncation": "pair truncation", "label_separator": "multilabel separator",
    "choices": "multiple-choice fields",
    "choice_list": "multiple choice: one field holding the candidates as a (JSON) list",
    "max_choices": "with choice_list: the rows an example takes",
    "min_choices": "multiple choice: fewest filled choice fields (trailing ones may be empty; "
                   "default: all)",
    "train_split": "split to train on",
    "eval_splits": "splits to evaluate on", "description": "free text", "root": "base folder",
    "labelled": "{split: false} for splits without labels",
    "stride": "span: token overlap of a long context's windows (default min(128, max_length // 3))",
    "null_answers": "span: unanswerable questions (SQuAD 2.0; default false)",
    "null_score_threshold": "span: no-answer score threshold (default 0.0)",
}
_SPAN_ONLY_KEYS = ("stride", "null_answers", "null_score_threshold")
_DEFAULT_METRICS = {"classification": ("accuracy",), "regression": ("pearson", "spearman"),
                    "multilabel": ("multilabel_micro_f1",), "multiple_choice": ("accuracy",)}


def task_from_config(config: Union[Mapping[str, Any], str, Path]) -> TaskSpec:
    """A TaskSpec from a mapping (or a JSON file) describing a TSV/CSV/JSONL task, or an
    extractive QA task in SQuAD-format JSON, no code needed.

    Example::

        {"name": "reviews", "head": "classification", "format": "csv",
         "files": {"train": "/data/reviews/train.csv", "dev": "/data/reviews/dev.csv"},
         "columns": {"text": "review_body", "label": "stars"},
         "labels": ["1", "2", "3", "4", "5"], "metrics": ["accuracy"]}

        {"name": "support_qa", "head": "span", "format": "squad", "null_answers": true,
         "files": {"train": "qa/train.json", "dev": "qa/dev.json"}, "max_length": 384}

    A "squad" task reads SQuAD v1.1/2.0 JSON (question + context, answers with answer_start;
    is_impossible questions need null_answers), truncates the context into windows
    ("only_second", `stride` tokens of overlap) and is scored with SQuAD's metric (v2.0's with
    null_answers).

    Relative file paths resolve against the `root` key, else the JSON file's folder, else the
    data root given to `load_split`.
    """
    origin = "task config"
    root = ""
    if isinstance(config, (str, Path)):
        origin = str(config)
        try:
            text = Path(config).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read task config {origin}: {e}") from None
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{origin}:{e.lineno}: invalid JSON in task config: {e.msg}") from None
        root = str(Path(origin).resolve().parent)
    config = dict(config)
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{origin}: unknown task config key(s) {unknown}; known keys: "
                         + ", ".join(f"{k} ({v})" for k, v in _CONFIG_KEYS.items()))
    for key in ("name", "head", "format", "files"):
        if key not in config:
            raise ValueError(f"{origin}: task config needs key {key!r} ({_CONFIG_KEYS[key]})")
    name, head, fmt = config["name"], config["head"], config["format"]
    if fmt not in ("tsv", "csv", "jsonl", "squad"):
        raise ValueError(f"{origin}: task {name!r}: format must be tsv, csv, jsonl or squad, got {fmt!r}")
    if (fmt == "squad") != (head == "span"):
        raise ValueError(f"{origin}: task {name!r}: span tasks (extractive QA) read SQuAD-format "
                         f"JSON and that format is for span tasks: head 'span' needs format "
                         f"'squad', got head {head!r} with format {fmt!r}")
    if fmt == "squad":
        return _span_task_from_config(config, origin, root)
    extra = [k for k in _SPAN_ONLY_KEYS if k in config]
    if extra:
        raise ValueError(f"{origin}: task {name!r}: key(s) {extra} are for span tasks (format squad)")
    if "columns" not in config:
        raise ValueError(f"{origin}: task config needs key 'columns' ({_CONFIG_KEYS['columns']})")
    columns = dict(config["columns"])
    if head != "multiple_choice" and "label" not in columns:
        raise ValueError(f"{origin}: task {name!r}: columns needs a 'label' entry (the label column)")
    choices = tuple(config.get("choices", ()))
    choice_list = str(config.get("choice_list", "") or "")
    listed = choices + ((choice_list,) if choice_list else ())
    text_fields = tuple(config.get("text_fields") or
                        [f for f in columns if f not in ("label", "id") and f not in listed])
    missing = [f for f in text_fields + listed if f not in columns]
    if missing:
        raise ValueError(f"{origin}: task {name!r}: fields {missing} have no entry in columns")
    labelled = dict(config.get("labelled", {}))
    files = tuple(SplitFile(split, str(path), header=bool(config.get("header", True)),
                            labelled=bool(labelled.get(split, True)))
                  for split, path in dict(config["files"]).items())
    source = Source(
        format=fmt, root=str(config.get("root", root)), files=files,
        columns=tuple(columns.items()), raw_labels=tuple(str(x) for x in config.get("raw_labels", ())),
        choices=choices, min_choices=config.get("min_choices", 0), choice_list=choice_list,
        max_choices=config.get("max_choices", 0),
        label_separator=config.get("label_separator", ","), reference=origin)
    spec = TaskSpec(
        name=name, head=head, source=source,
        labels=tuple(str(x) for x in config.get("labels", ())),
        metrics=tuple(config.get("metrics", _DEFAULT_METRICS.get(head, ()))),
        text_fields=text_fields, max_length=int(config.get("max_length", 128)),
        truncation=config.get("truncation", "longest_first"),
        **_split_keys(config, files))
    check_metrics(spec)
    return spec


def _split_keys(config: dict, files) -> dict:
    """train_split (default 'train', else the first file's), eval_splits (default dev /
    validation, else the last file's) and description of a task config."""
    splits = [f.split for f in files]
    return dict(
        train_split=config.get("train_split", "train" if "train" in splits else splits[0]),
        eval_splits=tuple(config.get("eval_splits", [s for s in splits if s in ("dev", "validation")]
                                     or splits[-1:])),
        description=str(config.get("description", "")))


def _span_task_from_config(config: dict, origin: str, root: str) -> TaskSpec:
    name = config["name"]
    bad = [k for k in ("columns", "labels", "raw_labels", "choices", "min_choices", "choice_list",
                       "max_choices", "label_separator", "header", "text_fields") if k in config]
    if bad:
        raise ValueError(f"{origin}: task {name!r}: key(s) {bad} do not apply to SQuAD-format "
                         f"JSON (question + context, answers in the file)")
    null_answers = config.get("null_answers", False)
    if not isinstance(null_answers, bool):
        raise ValueError(f"{origin}: task {name!r}: null_answers must be true or false, got {null_answers!r}")
    labelled = dict(config.get("labelled", {}))
    files = tuple(SplitFile(split, str(path), labelled=bool(labelled.get(split, True)))
                  for split, path in dict(config["files"]).items())
    source = Source(format="squad", root=str(config.get("root", root)), files=files,
                    reference=origin)
    max_length = int(config.get("max_length", 384))
    try:
        threshold = float(config.get("null_score_threshold", 0.0))
    except (TypeError, ValueError):
        raise ValueError(f"{origin}: task {name!r}: null_score_threshold must be a number, got "
                         f"{config['null_score_threshold']!r}") from None
    spec = TaskSpec(
        name=name, head="span", source=source,
        metrics=tuple(config.get("metrics", ("squad_v2",) if null_answers else ("squad",))),
        text_fields=("question", "context"), max_length=max_length,
        truncation=config.get("truncation", "only_second"),
        stride=int(config.get("stride", min(128, max_length // 3))),
        null_answers=null_answers, null_score_threshold=threshold,
        **_split_keys(config, files))
    check_metrics(spec)
    return spec


def check_metrics(spec: TaskSpec) -> None:
    """Every metric name of `spec` must be registered in mtlx.metrics."""
    try:
        from mtlx.metrics.registry import METRICS
    except ImportError:  # metrics stage not installed: nothing to check against
        return
    unknown = [m for m in spec.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"task {spec.name!r}: unknown metric(s) {unknown}; known: {sorted(METRICS)}")


# ----------------------------------------------------------------------------- built-in tasks

_GLUE_REF = "Wang et al. 2019, GLUE (ICLR); official TSV release (download_glue_data.py layout)"


def _glue(name, folder, columns, labels=(), raw=("0", "1"), metrics=("accuracy",),
          head="classification", test_columns=None, splits=None, tfds_fields=(),
          eval_splits=("dev",), header=True, tfds_splits=()):
    """A GLUE task: train/dev labelled, test without labels (its own column layout)."""
    text_fields = tuple(f for f, _ in columns if f != "label")
    splits = splits or (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
    files = []
    for split, fname in splits:
        is_test = split.startswith("test")
        files.append(SplitFile(
            split, f"{folder}/{fname}", header=True if is_test else header,
            columns=tuple(test_columns or [(f, c) for f, c in columns if f != "label"]) if is_test else (),
            labelled=not is_test))
    tfds_splits = tfds_splits or (("dev", "validation"),)
    return TaskSpec(
        name=name, head=head, labels=tuple(labels), metrics=tuple(metrics),
        text_fields=text_fields, eval_splits=tuple(eval_splits),
        source=Source(format="tsv", root="glue", files=tuple(files), columns=tuple(columns),
                      raw_labels=tuple(raw) if labels else (),
                      tfds=TfdsSource(f"glue/{name}", fields=tuple(tfds_fields),
                                      splits=tuple(tfds_splits)),
                      reference=_GLUE_REF))


GLUE_TASKS = (
    # CoLA train/dev have no header: source, label, original mark, sentence.
    _glue("cola", "CoLA", (("sentence", 3), ("label", 1)), ("unacceptable", "acceptable"),
          metrics=("mcc",), header=False, test_columns=(("sentence", "sentence"),)),
    _glue("sst2", "SST-2", (("sentence", "sentence"), ("label", "label")), ("negative", "positive")),
    # MRPC's header starts with a UTF-8 BOM ("\ufeffQuality"); the reader strips it.
    _glue("mrpc", "MRPC", (("sentence1", "#1 String"), ("sentence2", "#2 String"), ("label", "Quality")),
          ("not_equivalent", "equivalent"), metrics=("accuracy", "f1")),
    _glue("stsb", "STS-B", (("sentence1", "sentence1"), ("sentence2", "sentence2"), ("label", "score")),
          head="regression", metrics=("pearson", "spearman")),
    _glue("qqp", "QQP", (("question1", "question1"), ("question2", "question2"), ("label", "is_duplicate")),
          ("not_duplicate", "duplicate"), metrics=("accuracy", "f1")),
    _glue("mnli", "MNLI", (("premise", "sentence1"), ("hypothesis", "sentence2"), ("label", "gold_label")),
          ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
          splits=(("train", "train.tsv"), ("dev_matched", "dev_matched.tsv"),
                  ("dev_mismatched", "dev_mismatched.tsv"), ("test_matched", "test_matched.tsv"),
                  ("test_mismatched", "test_mismatched.tsv")),
          eval_splits=("dev_matched", "dev_mismatched"),
          tfds_splits=(("dev_matched", "validation_matched"), ("dev_mismatched", "validation_mismatched"),
                       ("test_matched", "test_matched"), ("test_mismatched", "test_mismatched"))),
    _glue("qnli", "QNLI", (("question", "question"), ("sentence", "sentence"), ("label", "label")),
          ("entailment", "not_entailment"), ("entailment", "not_entailment")),
    _glue("rte", "RTE", (("sentence1", "sentence1"), ("sentence2", "sentence2"), ("label", "label")),
          ("entailment", "not_entailment"), ("entailment", "not_entailment")),
    _glue("wnli", "WNLI", (("sentence1", "sentence1"), ("sentence2", "sentence2"), ("label", "label")),
          ("not_entailment", "entailment")),
)

UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
             "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X")

UD_EWT_POS = TaskSpec(
    name="ud_pos", head="token_classification", labels=UPOS_TAGS, metrics=("token_accuracy",),
    text_fields=("tokens",),
    source=Source(format="conllu", root="ud_english_ewt", tag_column="upos", files=(
        SplitFile("train", "en_ewt-ud-train.conllu"), SplitFile("dev", "en_ewt-ud-dev.conllu"),
        SplitFile("test", "en_ewt-ud-test.conllu")),
        reference="Silveira et al. 2014; Universal Dependencies English-EWT (CoNLL-U)"),
    description="Universal POS tags (17) of UD English-EWT, one label per word")

# Hugging Face `conll2003` label order; the original files use IOB1, which this set covers.
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

CONLL2003_NER = TaskSpec(
    name="conll2003_ner", head="token_classification", labels=CONLL2003_TAGS,
    metrics=("entity_f1",), text_fields=("tokens",),
    source=Source(format="conll2003", root="conll2003", files=(
        SplitFile("train", "train.txt"), SplitFile("dev", "valid.txt"), SplitFile("test", "test.txt")),
        reference="Tjong Kim Sang & De Meulder 2003 (word POS chunk NER per line)"))

SQUAD_V1 = TaskSpec(
    name="squad", head="span", metrics=("squad",), text_fields=("question", "context"),
    max_length=384, stride=128, truncation="only_second",
    source=Source(format="squad", root="squad", files=(
        SplitFile("train", "train-v1.1.json"), SplitFile("dev", "dev-v1.1.json")),
        reference="Rajpurkar et al. 2016, SQuAD v1.1 JSON"))

# SQuAD 2.0: the v1.1 questions plus unanswerable ones ("is_impossible": true, no answers),
# trained to point at [CLS] and answered "" when the null score wins (run_qa.py's
# --version_2_with_negative).
SQUAD_V2 = dataclasses.replace(
    SQUAD_V1, name="squad_v2", metrics=("squad_v2",), null_answers=True,
    source=Source(format="squad", root="squad_v2", files=(
        SplitFile("train", "train-v2.0.json"), SplitFile("dev", "dev-v2.0.json")),
        reference="Rajpurkar, Jia & Liang 2018, SQuAD 2.0 JSON"))

_SUPERGLUE_REF = "Wang et al. 2019, SuperGLUE (NeurIPS); official JSONL release"


def _superglue(name, folder, head, columns, labels=(), raw=(), choices=(), preprocess="",
               metrics=("accuracy",), text_fields=None, tfds_fields=()):
    return TaskSpec(
        name=name, head=head, labels=tuple(labels), metrics=metrics,
        text_fields=tuple(text_fields or [f for f, _ in columns if f not in ("label", "id") + choices]),
        source=Source(format="jsonl", root="superglue", columns=tuple(columns), choices=choices,
                      raw_labels=tuple(raw), preprocess=preprocess, files=(
                          SplitFile("train", f"{folder}/train.jsonl"),
                          SplitFile("dev", f"{folder}/val.jsonl"),
                          SplitFile("test", f"{folder}/test.jsonl", labelled=False)),
                      tfds=TfdsSource(f"super_glue/{name}", fields=tuple(tfds_fields),
                                      splits=(("dev", "validation"),)),
                      reference=_SUPERGLUE_REF))


SUPERGLUE_TASKS = (
    _superglue("boolq", "BoolQ", "classification",
               (("question", "question"), ("passage", "passage"), ("label", "label"), ("id", "idx")),
               labels=("False", "True"), raw=("false", "true")),
    # CB is scored by accuracy and macro-F1 in SuperGLUE; mtlx.metrics has no multi-class macro-F1 yet.
    _superglue("cb", "CB", "classification",
               (("premise", "premise"), ("hypothesis", "hypothesis"), ("label", "label"), ("id", "idx")),
               labels=("entailment", "contradiction", "neutral")),
    # COPA: one row per (premise + "because"/"so", choice); see readers.PREPROCESSORS["copa"].
    _superglue("copa", "COPA", "multiple_choice",
               (("premise", "premise"), ("question", "question"), ("choice1", "choice1"),
                ("choice2", "choice2"), ("label", "label"), ("id", "idx")),
               choices=("choice1", "choice2"), preprocess="copa", text_fields=("premise",)),
)

for _spec in GLUE_TASKS + (UD_EWT_POS, CONLL2003_NER, SQUAD_V1, SQUAD_V2) + SUPERGLUE_TASKS:
    register_task(_spec)
