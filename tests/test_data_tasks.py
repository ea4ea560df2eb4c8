"""Task registry and TaskSpec: built-in tasks, user tasks from a config file, and their errors."""

import dataclasses
import json

import pytest

from mtlx.data import (DataError, UnknownTaskError, get_task, list_tasks, load_split,
                       register_task, task_from_config)
from mtlx.data.tasks import HEAD_KINDS, Source, SplitFile, TaskSpec


def test_builtin_tasks_are_registered():
    expected = {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ud_pos",
                "conll2003_ner", "squad", "squad_v2", "boolq", "cb", "copa"}
    assert expected <= set(list_tasks())
    mnli = get_task("mnli")
    assert mnli.eval_splits == ("dev_matched", "dev_mismatched")
    assert mnli.source.tfds.split_name("dev_mismatched") == "validation_mismatched"
    assert get_task("stsb").head == "regression" and get_task("stsb").labels == ()
    assert len(get_task("ud_pos").labels) == 17
    assert not get_task("squad").null_answers and get_task("squad_v2").null_answers
    assert get_task("squad_v2").metrics == ("squad_v2",)


def test_specs_are_frozen_and_hashable():
    spec = get_task("cola")
    assert hash(spec) == hash(get_task("cola"))
    assert {spec: 1}[get_task("cola")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"


def test_builtin_metrics_exist_in_mtlx_metrics():
    from mtlx.metrics.registry import METRICS
    for name in list_tasks():
        spec = get_task(name)
        assert spec.metrics and set(spec.metrics) <= set(METRICS), (name, spec.metrics)
        assert spec.head in HEAD_KINDS


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("colaa")
    assert "unknown task 'colaa'; known tasks: [" in str(err.value)
    assert "'cola'" in str(err.value) and "'ud_pos'" in str(err.value)
    with pytest.raises(KeyError):
        load_split("no_such_task", "train")


def test_spec_validation_errors():
    src = Source(format="tsv", files=(SplitFile("train", "x.tsv"),), columns=(("sentence", 0),))
    with pytest.raises(ValueError, match="unknown head kind 'classify'"):
        TaskSpec("t", "classify", src, labels=("a",))
    with pytest.raises(ValueError, match="needs a label list"):
        TaskSpec("t", "classification", src)
    with pytest.raises(ValueError, match="takes no label list"):
        TaskSpec("t", "regression", src, labels=("a",))
    with pytest.raises(ValueError, match="repeated labels"):
        TaskSpec("t", "classification", src, labels=("a", "a"))
    with pytest.raises(ValueError, match="unknown source format 'xml'"):
        TaskSpec("t", "regression", dataclasses.replace(src, format="xml"))
    with pytest.raises(ValueError, match="truncation must be one of"):
        TaskSpec("t", "regression", src, truncation="middle")
    with pytest.raises(ValueError, match="raw_labels"):
        TaskSpec("t", "classification", dataclasses.replace(src, raw_labels=("0",)), labels=("a", "b"))
    with pytest.raises(ValueError, match="task 't': null_answers .* is for span tasks, not head 'regression'"):
        TaskSpec("t", "regression", src, null_answers=True)
    with pytest.raises(ValueError, match="null_score_threshold must be a finite number, got inf"):
        dataclasses.replace(get_task("squad_v2"), null_score_threshold=float("inf"))


def test_register_conflict():
    spec = get_task("cola")
    register_task(spec)  # the same spec again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_task(dataclasses.replace(spec, max_length=64))


def test_user_task_from_csv_config(tmp_path):
    (tmp_path / "train.csv").write_text(
        'review,stars,extra\n"Great, really great",5,x\n"Bad.\nVery bad.",1,y\nok,3,z\n')
    (tmp_path / "dev.csv").write_text("review,stars,extra\nfine,4,x\n")
    config = {"name": "reviews", "head": "classification", "format": "csv",
              "files": {"train": "train.csv", "dev": "dev.csv"},
              "columns": {"text": "review", "label": "stars"},
              "labels": ["1", "2", "3", "4", "5"], "metrics": ["accuracy"]}
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps(config))
    spec = task_from_config(path)
    register_task(spec, overwrite=True)
    assert spec.text_fields == ("text",) and spec.eval_splits == ("dev",)
    data = load_split("reviews", "train")
    assert [(e.texts[0], e.label, e.line) for e in data.examples] == [
        ("Great, really great", 4, 2), ("Bad.\nVery bad.", 0, 3), ("ok", 2, 5)]
    (tmp_path / "train.csv").write_text('review,stars,extra\n"Great",5,x\nmeh,6,y\n')
    with pytest.raises(DataError, match=r"train.csv:3: label '6' is not in the label set"):
        load_split("reviews", "train")


def test_user_task_from_tsv_and_jsonl_config(tmp_path):
    (tmp_path / "t.tsv").write_text("0.5\tA cat.\tA dog.\n1.5\tA car.\tA bus.\n")
    spec = task_from_config({"name": "sim", "head": "regression", "format": "tsv", "header": False,
                             "files": {"train": str(tmp_path / "t.tsv")},
                             "columns": {"a": 1, "b": 2, "label": 0}})
    data = load_split(spec, "train")
    assert [(e.texts, e.label) for e in data.examples] == [(("A cat.", "A dog."), 0.5),
                                                          (("A car.", "A bus."), 1.5)]
    assert spec.metrics == ("pearson", "spearman")
    (tmp_path / "t.jsonl").write_text('{"body": "x y", "tags": "a|c"}\n{"body": "z", "tags": "b"}\n')
    spec = task_from_config({"name": "topics", "head": "multilabel", "format": "jsonl",
                             "files": {"train": str(tmp_path / "t.jsonl")}, "label_separator": "|",
                             "columns": {"body": "body", "label": "tags"}, "labels": ["a", "b", "c"]})
    assert [e.label for e in load_split(spec, "train").examples] == [(0, 2), (1,)]


def test_user_task_config_errors(tmp_path):
    base = {"name": "x", "head": "classification", "format": "csv", "files": {"train": "a.csv"},
            "columns": {"text": "t", "label": "l"}, "labels": ["0", "1"]}
    with pytest.raises(ValueError, match=r"unknown task config key\(s\) \['colums'\]"):
        task_from_config(dict(base, colums={}))
    with pytest.raises(ValueError, match="needs key 'files'"):
        task_from_config({k: v for k, v in base.items() if k != "files"})
    with pytest.raises(ValueError, match="needs a 'label' entry"):
        task_from_config(dict(base, columns={"text": "t"}))
    with pytest.raises(ValueError, match="format must be tsv, csv, jsonl or squad"):
        task_from_config(dict(base, format="parquet"))
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['acc'\]"):
        task_from_config(dict(base, metrics=["acc"]))
    # a tag per word: only the CoNLL formats carry one (the row was read as one untagged word,
    # then tokenizing it raised a bare IndexError)
    with pytest.raises(ValueError, match=r"token classification reads a tag per word.*head "
                                         r"'token_classification' with source format 'csv'"):
        task_from_config(dict(base, head="token_classification", labels=["O", "B-X"]))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",\n "head": }')
    with pytest.raises(ValueError, match=r"bad.json:2: invalid JSON"):
        task_from_config(bad)
    with pytest.raises(ValueError, match="header"):
        (tmp_path / "a.csv").write_text("t,l\nhello,1\n")
        spec = task_from_config(dict(base, header=False, root=str(tmp_path)))
        load_split(spec, "train")


def test_user_span_task_from_squad_config(tmp_path):
    """An extractive QA task declared in a config file: SQuAD-format JSON, windows, SQuAD 2.0
    null answers and its metric; keys that do not apply are errors naming them."""
    context = "Normandy is a region in France. The Normans gave their name to it."
    doc = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "Where is Normandy?",
         "answers": [{"text": "France", "answer_start": context.index("France")}]},
        {"id": "b", "question": "Who rules it in 2100?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "qa").mkdir()
    (tmp_path / "qa" / "train.json").write_text(json.dumps(doc))
    cfg = {"name": "support_qa", "head": "span", "format": "squad", "null_answers": True,
           "files": {"train": "qa/train.json", "dev": "qa/train.json"}}
    path = tmp_path / "support_qa.json"
    path.write_text(json.dumps(cfg))
    spec = task_from_config(path)
    assert (spec.head, spec.null_answers, spec.metrics, spec.text_fields) == (
        "span", True, ("squad_v2",), ("question", "context"))
    assert (spec.max_length, spec.stride, spec.truncation, spec.eval_splits) == (384, 128, "only_second", ("dev",))
    data = load_split(spec, "train")
    assert [(e.uid, e.answers) for e in data.examples] == [("a", (("France", 24),)), ("b", ())]
    v1 = task_from_config(dict(cfg, null_answers=False, max_length=64, root=str(tmp_path)))
    assert (v1.metrics, v1.stride) == (("squad",), 21)
    with pytest.raises(DataError, match="is_impossible .* task 'support_qa' answers every question"):
        load_split(v1, "train")
    with pytest.raises(ValueError, match=r"head 'span' needs format 'squad', got head 'span' with format 'jsonl'"):
        task_from_config(dict(cfg, format="jsonl"))
    with pytest.raises(ValueError, match=r"got head 'classification' with format 'squad'"):
        task_from_config(dict(cfg, head="classification"))
    with pytest.raises(ValueError, match=r"key\(s\) \['columns'\] do not apply to SQuAD-format JSON"):
        task_from_config(dict(cfg, columns={"question": "q"}))
    with pytest.raises(ValueError, match="null_answers must be true or false, got 'yes'"):
        task_from_config(dict(cfg, null_answers="yes"))
    with pytest.raises(ValueError, match="null_score_threshold must be a number"):
        task_from_config(dict(cfg, null_score_threshold="high"))
    with pytest.raises(ValueError, match="stride must be in"):
        task_from_config(dict(cfg, stride=300))
    csv = {"name": "x", "head": "classification", "format": "csv", "files": {"train": "a.csv"},
           "columns": {"text": "t", "label": "l"}, "labels": ["0", "1"]}
    with pytest.raises(ValueError, match=r"key\(s\) \['stride'\] are for span tasks"):
        task_from_config(dict(csv, stride=8))
    with pytest.raises(ValueError, match="needs key 'columns'"):
        task_from_config({k: v for k, v in csv.items() if k != "columns"})
