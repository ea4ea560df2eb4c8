"""Multiple choice with a varying number of candidates (Source.min_choices; ARC has 3 to 5):
reading (trailing empty choice fields only, at least min_choices, labels among the present
ones), rows (one per choice field; absent ones empty, labelled ABSENT_CHOICE), batches (absent
rows are padding: no task, no group, no tokens, no weight) and what the model makes of them:
the loss is the softmax over the present candidates only, and an absent candidate is never
predicted (references: a numpy softmax cross-entropy and argmax over each question's rows)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.data import (BatchLayout, DataError, Uniform, eval_batches, load_split, load_tokenizer,
                       make_iterator, mixture_for, sample_root, task_from_config, tokenize_split)
from mtlx.data.tokenize import ABSENT_CHOICE

CHOICES = ["A", "B", "C", "D", "E"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")


def _questions(n=12):
    """Questions with 3, 4 or 5 candidates; the answer is any present one."""
    out = []
    for i in range(n):
        k = 3 + i % 3
        row = {"q": f"question number {i} about science", "label": str(i % k), "id": f"q{i}"}
        for c in range(5):
            row[CHOICES[c]] = f"answer {c} to {i}" if c < k else ""
        out.append(row)
    return out


def _task(tmp_path, rows, name="arc", **extra):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {"name": name, "head": "multiple_choice", "format": "jsonl",
              "files": {"train": str(path)}, "choices": CHOICES, "min_choices": 3,
              "columns": {"q": "q", "label": "label", "id": "id", **{c: c for c in CHOICES}}}
    config.update(extra)
    return task_from_config(config)


def test_reading_keeps_each_questions_candidates(tmp_path):
    spec = _task(tmp_path, _questions())
    split = load_split(spec, "train")
    assert [len(ex.choices) for ex in split.examples] == [3, 4, 5] * 4
    assert [ex.label for ex in split.examples] == [i % (3 + i % 3) for i in range(12)]


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(B=""), r"choice field\(s\) \['B'\] are empty \(only trailing"),
    (lambda r: r.update(C="", D="", E=""), "2 of the choice fields .* fewer than min_choices=3"),
    (lambda r: r.update(E="", label="4"), r"not a choice index in 0\.\.3"),
])
def test_bad_rows_name_the_line(tmp_path, change, message):
    rows = _questions(4)
    rows[2] = dict(rows[2], D="answer 3", E="answer 4")
    change(rows[2])
    spec = _task(tmp_path, rows)
    with pytest.raises(DataError, match=message) as info:
        load_split(spec, "train")
    assert "arc.jsonl:3:" in str(info.value) and "task 'arc'" in str(info.value)


def test_without_min_choices_every_field_is_required(tmp_path):
    rows = _questions(4)
    spec = _task(tmp_path, rows, min_choices=0)
    with pytest.raises(DataError, match=r"choice field\(s\) \['D', 'E'\] are empty"):
        load_split(spec, "train")


@pytest.mark.parametrize("value", [1, 6, "3", True])
def test_min_choices_is_checked(tmp_path, value):
    with pytest.raises(ValueError, match="min_choices must be 0 or an integer in 2..5"):
        _task(tmp_path, _questions(3), min_choices=value)
    with pytest.raises(ValueError, match="on a multiple-choice task"):
        task_from_config({"name": "c", "head": "classification", "format": "jsonl",
                          "files": {"train": "x.jsonl"}, "columns": {"t": "t", "label": "l"},
                          "labels": ["a", "b"], "min_choices": 2})


def test_rows_one_per_choice_field_absent_ones_empty(tmp_path, tok):
    data = tokenize_split(load_split(_task(tmp_path, _questions(3)), "train"), tok)
    assert data.rows_per_unit == 5 and data.num_units == 3
    labels = data.labels.reshape(3, 5)
    a = ABSENT_CHOICE
    assert labels.tolist() == [[1, 0, 0, a, a], [0, 1, 0, 0, a], [0, 0, 1, 0, 0]]
    lengths = data.row_lengths.reshape(3, 5)
    assert (lengths[labels == a] == 0).all() and (lengths[labels != a] > 0).all()
    assert tok.decode(data.row_tokens(2)) == ("[CLS] question number 0 about science [SEP] "
                                              "answer 2 to 0 [SEP]")


def test_absent_candidates_are_padding_rows_in_training_batches(tmp_path, tok):
    arc = tokenize_split(load_split(_task(tmp_path, _questions()), "train"), tok)
    cola = tokenize_split(load_split("cola", "train"), tok)
    mixed = {"cola": cola, "arc": arc}
    it = make_iterator(mixed, mixture_for(mixed, Uniform()), batch_size=12, seed=1)
    questions = 0
    for _ in range(30):
        units = it.units_at(it.step, it.counts)
        b = next(it)
        row = 0
        for t, u in units:
            if t == 0:
                row += 1
                continue
            k = 3 + int(arc.unit_example[u]) % 3
            present, absent = slice(row, row + k), slice(row + k, row + 5)
            assert (b.group_ids[present] == row).all() and (b.task_ids[present] == 1).all()
            assert (b.example_mask[present] == 1).all() and b.labels[present].sum() == 1
            assert (b.group_ids[absent] == -1).all() and (b.task_ids[absent] == -1).all()
            assert (b.example_mask[absent] == 0).all() and (b.attention_mask[absent] == 0).all()
            questions += 1
            row += 5
    assert questions > 20


def test_loss_and_predictions_see_only_present_candidates(tmp_path, tok):
    """A tiny model scores the rows; the absent rows get the highest scores on purpose (they
    are padding rows the model also scores), yet the loss is each question's softmax over its
    present candidates and the prediction is one of them."""
    from mtlx.models.bert import BertConfig
    from mtlx.models.heads import TaskHead
    from mtlx.models.multitask import MultiTaskModel, init_params
    from mtlx.train.evaluate import task_inputs
    from mtlx.train.step import make_eval_step

    spec = _task(tmp_path, _questions(6))
    arc = tokenize_split(load_split(spec, "train"), tok)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = MultiTaskModel(cfg, (TaskHead("arc", "multiple_choice"),))
    batches = list(eval_batches(arc, 0, batch_size=15, layout=BatchLayout(groups=True)))
    assert len(batches) == 2
    params = init_params(model, jax.random.key(0), batches[0].batch)
    eval_step = jax.jit(make_eval_step(model))
    for eb in batches:
        b = eb.batch
        preds, losses, counts = eval_step(params, b)
        scores = np.asarray(preds["multiple_choice"], np.float64)
        groups, labels = np.asarray(b.group_ids), np.asarray(b.labels)
        nll = []
        for g in np.unique(groups[groups >= 0]):
            rows = np.flatnonzero(groups == g)
            s = scores[rows]
            nll.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[labels[rows] == 1][0])
        assert len(nll) == 3 and float(counts[0]) == 3
        np.testing.assert_allclose(float(losses[0]), np.mean(nll), rtol=1e-5)
        # the absent rows (padding) outscore every candidate: still never predicted
        absent = (np.asarray(b.task_ids) < 0) & (np.arange(15) < 15)
        assert absent.sum() == 15 - sum(3 + int(e) % 3 for e in set(eb.example_index[eb.example_index >= 0]))
        boosted = dict(preds, multiple_choice=jnp.where(absent, 1e6, preds["multiple_choice"]))
        rows = np.flatnonzero(np.asarray(eb.example_index) >= 0)
        predicted, refs = task_inputs(spec, boosted, b, rows)
        truth = [int(e) % (3 + int(e) % 3) for e in sorted(set(eb.example_index[rows]))]
        assert refs.tolist() == truth
        sizes = [3 + int(e) % 3 for e in sorted(set(eb.example_index[rows]))]
        assert all(0 <= p < k for p, k in zip(predicted.tolist(), sizes))
        np.testing.assert_array_equal(
            predicted, [int(np.argmax(scores[np.flatnonzero(groups == g)])) for g in np.unique(groups[groups >= 0])])


def test_training_run_and_predict_script_with_a_varying_choice_task(tmp_path):
    """config.tasks takes the task as a dict; the run trains on mixed batches and scores it,
    and scripts/predict.py answers requests of it (and of a multilabel task) with the index of
    a present candidate, agreeing with the run's own evaluation."""
    import subprocess
    import sys
    from mtlx.train.config import load_config
    from mtlx.train.loop import train_and_evaluate
    from tests.test_train_loop import DEMO, ROOT

    rows = _questions(30)
    path = tmp_path / "arc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    topics = tmp_path / "topics.jsonl"
    topics.write_text("\n".join(json.dumps({"body": f"text number {i}", "tags": t})
                                for i, t in enumerate(["a|c", "b", "a|b|c", "c"] * 5)) + "\n")
    arc = {"name": "arc", "head": "multiple_choice", "format": "jsonl",
           "files": {"train": str(path), "dev": str(path)}, "choices": CHOICES, "min_choices": 3,
           "columns": {"q": "q", "label": "label", **{c: c for c in CHOICES}}}
    tags = {"name": "topics", "head": "multilabel", "format": "jsonl", "label_separator": "|",
            "files": {"train": str(topics), "dev": str(topics)}, "labels": ["a", "b", "c"],
            "columns": {"body": "body", "label": "tags"}}
    config = tmp_path / "config.py"
    config.write_text(f"from mtlx.train.config import load_config\n\n"
                      f"def get_config(arg=None):\n"
                      f"    c = load_config({DEMO + ':local'!r})\n"
                      f"    c.tasks = ('cola', {arc!r}, {tags!r})\n"
                      f"    return c\n")
    cfg = load_config(str(config))
    # gradient accumulation would split a question's candidates across microbatches
    from mtlx.train.config import apply_overrides
    with pytest.raises(ValueError, match=r"accum_steps=2 with multiple-choice task\(s\) \['arc'\] "
                                         r"is not supported"):
        train_and_evaluate(apply_overrides(load_config(str(config)), ["--config.optim.accum_steps=2"]),
                           tmp_path / "refused", progress=False)
    results = train_and_evaluate(cfg, tmp_path / "run", progress=False)
    assert set(results["arc"]) == {"accuracy", "loss"}
    assert 0.0 <= results["arc"]["accuracy"] <= 1.0 and np.isfinite(results["arc"]["loss"])
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(l["kind"] == "eval" and "eval/arc/accuracy" in l for l in lines)

    requests = [dict({k: v for k, v in r.items() if k not in ("label", "id") and v}, task="arc")
                for r in rows]
    requests += [{"task": "topics", "body": "text number 7"}]
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    pred = tmp_path / "pred.jsonl"
    common = ["--config", str(config), "--workdir", str(tmp_path / "run")]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common,
                        "--input", str(req), "--output", str(pred)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(out) == 31
    chosen = [o["prediction"] for o in out[:30]]
    assert all(isinstance(c, int) and 0 <= c < 3 + i % 3 for i, c in enumerate(chosen))
    right = np.mean([c == i % (3 + i % 3) for i, c in enumerate(chosen)])
    # the run evaluated sharded over host devices, the script on one: at most a near-tie apart
    assert abs(right - results["arc"]["accuracy"]) <= 1 / 30 + 1e-9
    assert set(out[30]["prediction"]) <= {"a", "b", "c"}
    # a request with a gap among its candidates names its line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(requests[5], B="")) + "\n")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import predict   # in this process: the script's check, without a second start-up
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: choice field\(s\) \['B'\] are empty"):
        predict.main([*common, "--input", str(bad), "--output", str(pred)])


# ----------------------------------------------------------------- one field holding a list

def _list_task(tmp_path, rows, name="swag", fmt="jsonl", **extra):
    """The same questions with their candidates in ONE field (source.choice_list)."""
    if fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path = tmp_path / f"{name}.tsv"
        lines = ["q\tendings\tlabel\tid"] + [
            f"{r['q']}\t{r['endings'] if isinstance(r['endings'], str) else json.dumps(r['endings'])}"
            f"\t{r['label']}\t{r['id']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    config = {"name": name, "head": "multiple_choice", "format": fmt,
              "files": {"train": str(path)}, "choice_list": "endings", "max_choices": 5,
              "min_choices": 3, "columns": {"q": "q", "endings": "endings", "label": "label", "id": "id"}}
    config.update(extra)
    return task_from_config(config)


def _as_lists(rows):
    return [{"q": r["q"], "label": r["label"], "id": r["id"],
             "endings": [r[c] for c in CHOICES if r[c]]} for r in rows]


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_a_list_field_reads_and_tokenizes_like_choice_fields(tmp_path, tok, fmt):
    rows = _questions()
    fields = load_split(_task(tmp_path, rows), "train")
    listed_spec = _list_task(tmp_path, _as_lists(rows), fmt=fmt)
    assert listed_spec.text_fields == ("q",) and listed_spec.source.num_choices == 5
    listed = load_split(listed_spec, "train")
    assert [ex.choices for ex in listed.examples] == [ex.choices for ex in fields.examples]
    assert [ex.label for ex in listed.examples] == [ex.label for ex in fields.examples]
    a = tokenize_split(fields, tok, max_length=64)
    b = tokenize_split(listed, tok, max_length=64)
    for key in ("input_ids", "type_ids", "row_starts", "labels", "unit_starts", "unit_example"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


@pytest.mark.parametrize("endings,message", [
    ("not json", "choice list field 'endings' is not a JSON array"),
    ('{"a": 1}', "must be a list of texts"),
    (["one", " ", "three"], r"candidate\(s\) \[1\] of choice list field 'endings' are empty"),
    (["one", "two"], "holds 2 candidates; the task takes between min_choices=3 and max_choices=5"),
    (["a", "b", "c", "d", "e", "f"], "holds 6 candidates"),
])
def test_bad_lists_name_the_line(tmp_path, endings, message):
    rows = _as_lists(_questions(4))
    rows[2] = dict(rows[2], endings=endings, label="0")
    spec = _list_task(tmp_path, rows)
    with pytest.raises(DataError, match=message) as info:
        load_split(spec, "train")
    assert "swag.jsonl:3:" in str(info.value) and "task 'swag'" in str(info.value)


def test_a_list_field_without_min_choices_takes_exactly_max_choices(tmp_path):
    rows = _as_lists(_questions(3))  # 3, 4 and 5 candidates
    spec = _list_task(tmp_path, rows, min_choices=0)
    with pytest.raises(DataError, match=r"holds 3 candidates; the task takes max_choices=5 \(set min_choices"):
        load_split(spec, "train")
    skipped = load_split(spec, "train", on_error="skip")
    assert [len(ex.choices) for ex in skipped.examples] == [5]


@pytest.mark.parametrize("extra,message", [
    ({"max_choices": 0}, "choice_list .* goes with max_choices >= 2"),
    ({"max_choices": 1}, "choice_list .* goes with max_choices >= 2"),
    ({"choices": ["A", "B"], "columns": {"q": "q", "endings": "endings", "label": "label",
                                         "A": "A", "B": "B"}}, "instead of choice fields"),
    ({"min_choices": 6}, r"min_choices must be 0 or an integer in 2..5 \(the number of choice "
                         r"fields, or max_choices\)"),
])
def test_list_field_settings_are_checked(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _list_task(tmp_path, _as_lists(_questions(3)), **extra)
