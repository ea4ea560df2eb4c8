"""Span answers as text (mtlx.train.spans): the n-best pairing of run_qa.py's
postprocess_qa_predictions against a brute force over every pair, and SQuAD EM/F1 from the
real tokenizer's windows (stride) through mtlx.models.heads.predictions and evaluate_tasks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.data import eval_batches, load_tokenizer, sample_root
from mtlx.data.errors import ReadReport
from mtlx.data.readers import Example, SplitData
from mtlx.data.tasks import get_task
from mtlx.data.tokenize import tokenize_split
from mtlx.metrics import squad
from mtlx.models import heads as H
from mtlx.train import evaluate as E
from mtlx.train.spans import MAX_ANSWER_TOKENS, SpanDecoder, SpanReferences, best_span


def _brute_force(start_logits, end_logits, offsets, max_tokens):
    best = None
    for s in range(len(offsets)):
        for e in range(s, min(len(offsets), s + max_tokens)):
            if offsets[s][0] < 0 or offsets[e][0] < 0:
                continue
            score = start_logits[s] + end_logits[e]
            if best is None or score > best[0]:
                best = (score, s, e)
    return best


def test_best_span_rules_by_hand():
    offsets = np.array([[-1, -1], [-1, -1], [0, 3], [4, 7], [8, 12], [-1, -1]])  # [CLS] q ctx ctx ctx [SEP]
    # The best start (token 1) is in the question, the best end (token 2) comes before the best
    # valid start: the answer is the best valid pair, (3, 4).
    sl = np.array([9.0, 8.0, 0.0, 5.0, 1.0, 7.0])
    el = np.array([9.0, 0.0, 6.0, 1.0, 4.0, 7.0])
    order = lambda x: np.argsort(-x)
    got = best_span(order(sl), sl[order(sl)], order(el), el[order(el)], offsets)
    assert got == (9.0, 3, 4)
    assert got == _brute_force(sl, el, offsets, MAX_ANSWER_TOKENS)
    # Spans longer than the limit are not answers.
    assert best_span(np.array([2]), np.array([1.0]), np.array([4]), np.array([1.0]), offsets, 2) is None
    assert best_span(np.array([2]), np.array([1.0]), np.array([4]), np.array([1.0]), offsets, 3)[1:] == (2, 4)


def test_best_span_equals_brute_force_when_every_token_is_a_candidate():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(3, 40))
        offsets = np.stack([np.arange(n), np.arange(n) + 1], 1)
        offsets[rng.random(n) < 0.3] = -1
        sl, el = rng.normal(size=n), rng.normal(size=n)
        k = int(rng.integers(1, 6))
        got = best_span(np.argsort(-sl), np.sort(sl)[::-1], np.argsort(-el), np.sort(el)[::-1],
                        offsets, k)
        assert got == _brute_force(sl, el, offsets, k)


@pytest.fixture(scope="module")
def windows():
    """Three questions over contexts longer than one 48-token window (stride 16)."""
    tok = load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    filler = ("The Normans were the people who in the 10th and 11th centuries gave their name to "
              "Normandy, a region in France. ")
    items = [(filler * 3 + "The answer is Rollo of Normandy here.", "Rollo of Normandy"),
             ("Paris is the capital. " + filler * 2, "Paris"),
             (filler + "Its duke, William the Conqueror, won in 1066. " + filler, "1066")]
    examples = [Example(texts=("what is it?", c), answers=((a, c.index(a)), (a.lower(), c.index(a))),
                        uid=f"q{i}") for i, (c, a) in enumerate(items)]
    spec = dataclasses.replace(get_task("squad"), max_length=48, stride=16)
    split = SplitData(spec, "dev", examples, ReadReport(), "<memory>", True)
    data = tokenize_split(split, tok)
    assert data.num_rows > 6  # several windows per question
    return spec, split, data


def _eval_fn(shift_end: int = 0):
    """An eval step whose logits peak at each window's gold tokens (windows without the answer
    peak at [CLS], which is no answer), through the real heads.predictions."""
    tasks = (H.TaskHead("squad", "span", 0),)

    def fn(params, batch):
        b, l = batch.input_ids.shape
        rng = np.random.default_rng(0)
        start = rng.normal(0, 0.1, (b, l)).astype(np.float32)
        end = rng.normal(0, 0.1, (b, l)).astype(np.float32)
        rows = np.arange(b)
        sp = np.clip(np.asarray(batch.start_positions), 0, None)
        ep = np.clip(np.asarray(batch.end_positions) + shift_end * (sp > 0), 0, l - 1)
        start[rows, sp] += 10.0
        end[rows, ep] += 10.0
        preds = H.predictions({"span_start": jnp.asarray(start), "span_end": jnp.asarray(end)},
                              batch, tasks)
        return preds, jnp.zeros(1), jnp.ones(1)
    return fn


def test_squad_scores_from_windows(windows):
    spec, split, data = windows
    refs = SpanReferences.from_split(split)
    make = lambda name, tid: eval_batches(data, tid, batch_size=4)
    res = E.evaluate_tasks(_eval_fn(), None, [spec], {"squad": data}, make, references={"squad": refs})
    assert res["squad"]["exact_match"] == 1.0 and res["squad"]["f1"] == 1.0
    # The answers are the context's own characters (case kept), from the right window.
    dec = SpanDecoder(data, refs)
    for eb in make("squad", 0):
        preds, _, _ = _eval_fn()(None, eb.batch)
        dec.add(preds, eb.example_index, eb.row_index, np.flatnonzero(eb.example_index >= 0))
    assert dec.answers() == {0: "Rollo of Normandy", 1: "Paris", 2: "1066"}
    # One token too far: the metric of those texts (mtlx.metrics.squad, the official formula).
    res = E.evaluate_tasks(_eval_fn(shift_end=1), None, [spec], {"squad": data}, make,
                           references={"squad": refs})
    dec = SpanDecoder(data, refs)
    for eb in make("squad", 0):
        preds, _, _ = _eval_fn(shift_end=1)(None, eb.batch)
        dec.add(preds, eb.example_index, eb.row_index, np.flatnonzero(eb.example_index >= 0))
    texts = dec.answers()
    assert texts == {0: "Rollo of Normandy here", 1: "Paris is", 2: "1066."}
    want = squad([texts[i] for i in range(3)], refs.answers)
    assert want["exact_match"] == pytest.approx(1 / 3)  # "1066." normalises to "1066"
    assert res["squad"]["exact_match"] == pytest.approx(want["exact_match"])
    assert res["squad"]["f1"] == pytest.approx(want["f1"]) and 0.5 < want["f1"] < 1.0
    # Without references: the token-level exact span match.
    res = E.evaluate_tasks(_eval_fn(), None, [spec], {"squad": data}, make)
    assert set(res["squad"]) == {"accuracy", "loss"}


def test_span_decoding_needs_char_offsets(windows):
    _, split, data = windows
    with pytest.raises(ValueError, match="character offsets"):
        SpanDecoder(dataclasses.replace(data, char_offsets=None), SpanReferences.from_split(split))
