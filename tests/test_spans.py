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


# ----------------------------------------------------------------------- SQuAD 2.0 (no answer)

def _hf_v2_reference(windows_logits, n_best, max_tokens, threshold):
    """run_qa.py's postprocess_qa_predictions with version_2_with_negative, restated over full
    logits: per window the n_best starts x n_best ends (valid: in the context, end >= start,
    at most max_tokens), null score = [CLS] start + end, the question's null score the minimum
    over windows; answer "" when null - best span > threshold. -> (span (row, s, e) or None,
    score diff)."""
    best, null = None, np.inf
    for row, sl, el, offsets in windows_logits:
        null = min(null, sl[0] + el[0])
        starts = np.argsort(sl)[-1: -n_best - 1: -1]
        ends = np.argsort(el)[-1: -n_best - 1: -1]
        for s in starts:
            for e in ends:
                if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_tokens:
                    continue
                if best is None or sl[s] + el[e] > best[0]:
                    best = (sl[s] + el[e], row, int(s), int(e))
    diff = null - best[0] if best is not None else np.inf
    return best, diff


@pytest.fixture(scope="module")
def windows_v2(windows):
    """The three answerable questions plus two unanswerable ones, as a squad_v2 task."""
    _, split, _ = windows
    tok = load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    extra = [Example(texts=("who won in 1200?", split.examples[2].texts[1]), answers=(), uid="n0"),
             Example(texts=("what is blue?", split.examples[1].texts[1]), answers=(), uid="n1")]
    spec = dataclasses.replace(get_task("squad_v2"), max_length=48, stride=16)
    split2 = SplitData(spec, "dev", list(split.examples) + extra, ReadReport(), "<memory>", True)
    return spec, split2, tokenize_split(split2, tok)


def test_null_answers_decode_as_run_qa_on_random_logits(windows_v2):
    """SpanDecoder with null answers (from the compiled predictions' top-k and null score) gives
    run_qa.py's answers and score differences, restated over the full logits."""
    spec, split, data = windows_v2
    refs = SpanReferences.from_split(split)
    tasks = (H.TaskHead("squad_v2", "span", 0),)
    rng = np.random.default_rng(1)
    for trial, threshold in enumerate((0.0, 0.0, -1.5, 100.0)):
        dec = SpanDecoder.for_task(dataclasses.replace(spec, null_score_threshold=threshold), data, refs)
        per_example = {}
        for eb in eval_batches(data, 0, batch_size=4):
            b, l = eb.batch.input_ids.shape
            start = rng.normal(0, 1.0, (b, l)).astype(np.float32)
            end = rng.normal(0, 1.0, (b, l)).astype(np.float32)
            start[:, 0] += trial  # more "no answer" as the trials go on
            preds = H.predictions({"span_start": jnp.asarray(start), "span_end": jnp.asarray(end)},
                                  eb.batch, tasks)
            rows = np.flatnonzero(eb.example_index >= 0)
            dec.add(preds, eb.example_index, eb.row_index, rows)
            mask = np.asarray(eb.batch.attention_mask).astype(bool)
            for j in rows:
                r = int(eb.row_index[j])
                offsets = data.char_offsets[data.row_starts[r]: data.row_starts[r + 1]]
                n = len(offsets)
                sl = np.where(mask[j], start[j], -np.inf)[:n]
                el = np.where(mask[j], end[j], -np.inf)[:n]
                per_example.setdefault(int(eb.example_index[j]), []).append((r, sl, el, offsets))
        answers, diffs = dec.answers(), dec.no_answer_scores()
        assert sorted(answers) == sorted(per_example) == list(range(5))
        for ex, wins in per_example.items():
            best, diff = _hf_v2_reference(wins, H.SPAN_N_BEST, MAX_ANSWER_TOKENS, threshold)
            assert diffs[ex] == pytest.approx(diff, abs=1e-5)
            if diff > threshold:
                assert answers[ex] == ""
            else:
                _, r, s, e = best
                offsets = data.char_offsets[data.row_starts[r]: data.row_starts[r + 1]]
                assert answers[ex] == refs.contexts[ex][offsets[s][0]: offsets[e][1]] != ""
        if trial == 3:  # a high threshold answers every question (each has a valid span)
            assert all(answers.values())


def test_null_answers_scored_with_squad_v2(windows_v2):
    """Logits peaking at the gold tokens of each window ([CLS] where the answer is absent or
    there is none): every question right, the unanswerable ones with "" through evaluate_tasks;
    the breakdowns are reported and left out of the headline."""
    spec, split, data = windows_v2
    refs = SpanReferences.from_split(split)
    assert refs.answers[3] == [] and refs.answers[4] == []
    make = lambda name, tid: eval_batches(data, tid, batch_size=4)
    tasks = (H.TaskHead("squad_v2", "span", 0),)

    def fn(params, batch):
        b, l = batch.input_ids.shape
        start = np.random.default_rng(0).normal(0, 0.1, (b, l)).astype(np.float32)
        end = start[:, ::-1].copy()
        rows = np.arange(b)
        start[rows, np.asarray(batch.start_positions).clip(0)] += 10.0
        end[rows, np.asarray(batch.end_positions).clip(0)] += 10.0
        preds = H.predictions({"span_start": jnp.asarray(start), "span_end": jnp.asarray(end)},
                              batch, tasks)
        return preds, jnp.zeros(1), jnp.ones(1)

    res = E.evaluate_tasks(fn, None, [spec], {"squad_v2": data}, make, references={"squad_v2": refs})
    got = res["squad_v2"]
    assert got["exact_match"] == got["f1"] == 1.0
    assert got["has_answer.exact_match"] == got["no_answer.exact_match"] == 1.0
    assert {"best.exact_match", "best.exact_match_threshold", "best.f1", "best.f1_threshold"} <= set(got)
    assert E.headline(got) == 1.0 and E.headline(dict(got, **{"no_answer.f1": 0.0})) == 1.0
    dec = SpanDecoder.for_task(spec, data, refs)
    for eb in make("squad_v2", 0):
        dec.add(fn(None, eb.batch)[0], eb.example_index, eb.row_index,
                np.flatnonzero(eb.example_index >= 0))
    assert dec.answers() == {0: "Rollo of Normandy", 1: "Paris", 2: "1066", 3: "", 4: ""}
    # The same logits decoded as v1.1 answer every question with a span.
    v1 = SpanDecoder(data, refs)
    for eb in make("squad_v2", 0):
        v1.add(fn(None, eb.batch)[0], eb.example_index, eb.row_index,
               np.flatnonzero(eb.example_index >= 0))
    assert all(v1.answers().values())
    with pytest.raises(ValueError, match="no-answer scores need null_answers=True"):
        v1.no_answer_scores()
