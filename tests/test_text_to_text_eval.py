"""Text-to-text (T5) tasks scored on generated text: T5's postprocessing of a generated string
(a label name -> its class, anything else -> -1; a score -> its number, unparsable -> -1.0,
t5.data.postprocessors), F1 counting an invalid text as wrong (t5.evaluation.metrics.
f1_score_with_invalid), the task's own metrics on the gold labels and unrounded scores, and a
training run with config.text_to_text=True that evaluates by greedy generation."""

import dataclasses

import jax
import numpy as np
import pytest

from mtlx.data import (eval_batches, get_task, load_split, load_tokenizer, text_to_text,
                       tokenize_split)
from mtlx.data.pipeline import BatchLayout
from mtlx.train.evaluate import evaluate_tasks, text_prediction


def test_text_prediction_follows_t5s_postprocessors():
    rte = text_to_text(get_task("rte"))
    assert text_prediction(rte, "entailment") == 0 and text_prediction(rte, " not_entailment ") == 1
    assert text_prediction(rte, "maybe") == -1 and text_prediction(rte, "") == -1
    stsb = text_to_text(get_task("stsb"))
    assert text_prediction(stsb, "3.8") == 3.8 and text_prediction(stsb, "three") == -1.0
    assert text_prediction(stsb, "nan") == -1.0


def _scored(spec, tok, answer):
    """evaluate_tasks on the dev split of `spec` with a stand-in for generation: answer(i, gold
    text) gives the text "generated" for example i."""
    data = tokenize_split(load_split(spec, "dev"), tok)
    layout = BatchLayout(target_length=16)
    batches = list(eval_batches(data, 0, batch_size=16, layout=layout))
    texts = {}
    for eb in batches:
        for j, ex in enumerate(eb.example_index):
            if ex >= 0:
                gold = np.asarray(eb.batch.target_ids)[j]
                texts[(id(eb.batch), j)] = answer(int(ex), tok.decode([int(t) for t in gold if t >= 0],
                                                                     skip_special_tokens=True))

    def generate(params, batch):
        rows = []
        for j in range(batch.batch_size):
            text = texts.get((id(batch), j), "")
            rows.append((tok(text)["input_ids"] + [0] * 16)[:16])
        return np.asarray(rows, np.int32)

    def eval_fn(params, batch):
        return {}, np.zeros(1, np.float32), np.ones(1, np.float32)

    return evaluate_tasks(eval_fn, None, [spec], {spec.name: data}, lambda name, tid: iter(batches),
                          generate=generate,
                          decode=lambda ids: tok.decode(ids, skip_special_tokens=True))[spec.name]


def test_metrics_on_generated_text(t5_tok_dir):
    from mtlx.metrics.classification import binary_f1, matthews_corrcoef
    from mtlx.metrics.correlation import pearson
    tok = load_tokenizer(t5_tok_dir)
    mrpc = text_to_text(get_task("mrpc"))
    gold = np.asarray([ex.label for ex in load_split(mrpc, "dev").examples])
    n = len(gold)
    # every third example answered with a wrong label, every fifth with no label at all
    def answer(i, text):
        if i % 5 == 0:
            return "no idea"
        return mrpc.labels[1 - gold[i]] if i % 3 == 0 else text
    res = _scored(mrpc, tok, answer)
    pred = np.where(np.arange(n) % 3 == 0, 1 - gold, gold)
    pred = np.where(np.arange(n) % 5 == 0, 1 - gold, pred)   # invalid: counted wrong
    assert res["accuracy"] == pytest.approx(np.mean(pred == gold))
    assert res["f1"] == pytest.approx(binary_f1(pred, gold))
    # CoLA's MCC keeps an invalid text as its own class (-1), as sklearn's MCC in T5 does
    cola = text_to_text(get_task("cola"))
    cgold = np.asarray([ex.label for ex in load_split(cola, "dev").examples])
    res = _scored(cola, tok, lambda i, text: "???" if i % 4 == 0 else text)
    cpred = np.where(np.arange(len(cgold)) % 4 == 0, -1, cgold)
    assert res["mcc"] == pytest.approx(matthews_corrcoef(cpred, cgold))
    # STS-B: generated scores against the UNROUNDED gold scores
    stsb = text_to_text(get_task("stsb"))
    sgold = np.asarray([ex.label for ex in load_split(stsb, "dev").examples], np.float64)
    res = _scored(stsb, tok, lambda i, text: "oops" if i % 7 == 0 else text)
    spred = np.where(np.arange(len(sgold)) % 7 == 0, -1.0, np.round(sgold * 5) / 5)
    assert res["pearson"] == pytest.approx(pearson(spred, sgold), rel=1e-6)  # float32 golds
    assert res["pearson"] < 1.0


def test_training_run_with_text_to_text_tasks(t5_tok_dir, tmp_path):
    """config.text_to_text=True on a T5: the run trains on target text and scores greedily
    generated text with the tasks' own metrics; predict.py answers with generated text."""
    import json
    import subprocess
    import sys
    from mtlx.train.config import load_config
    from mtlx.train.loop import train_and_evaluate
    from tests.conftest import write_t5_text_to_text_config
    from tests.test_train_loop import DEMO, ROOT
    config = write_t5_text_to_text_config(tmp_path / "config.py", t5_tok_dir)
    results = train_and_evaluate(load_config(str(config)), tmp_path / "run", progress=False)
    assert set(results["rte"]) == {"accuracy", "loss"} and 0 <= results["rte"]["accuracy"] <= 1
    assert {"pearson", "spearman", "loss"} == set(results["stsb"])
    assert np.isfinite(results["rte"]["loss"]) and np.isfinite(results["stsb"]["loss"])
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"task": "rte", "sentence1": "A man sleeps.",
                               "sentence2": "Someone rests."}) + "\n"
                   + json.dumps({"task": "stsb", "sentence1": "A dog runs.",
                                 "sentence2": "A dog is running."}) + "\n")
    pred = tmp_path / "pred.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--config",
                        str(config), "--workdir", str(tmp_path / "run"), "--input", str(req),
                        "--output", str(pred)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(out) == 2 and all(isinstance(o["prediction"], str) for o in out)
    bert = load_config(DEMO + ":local")
    bert.text_to_text = True
    from mtlx.train import loop as LP
    with pytest.raises(ValueError, match="config.text_to_text=True needs a T5 backbone"):
        LP.setup(bert)
