"""mtlx.metrics against references no one here wrote: sklearn.metrics, scipy.stats, seqeval,
the official SQuAD v1.1 script's semantics (hand-worked cases) and LibMTL's Delta_p example."""

import io
import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from mtlx.batch import IGNORE_INDEX
from mtlx.metrics import (
    METRICS, GLUE_TASK_METRICS, MetricAccumulator, accuracy, binary_f1, delta_p, entity_counts,
    entity_f1, extract_entities, format_metrics_table, get_metric, glue_average, glue_score,
    matthews_corrcoef, multilabel_f1, normalize_answer, pearson, print_metrics_table, rankdata,
    spearman, squad, squad_v2, token_accuracy)

SEEDS = range(40)


def _labels(rng, n, k):
    return rng.integers(0, k, size=n)


# ---------------------------------------------------------------- classification vs sklearn

@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_f1_mcc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    r, p = _labels(rng, n, 2), _labels(rng, n, 2)
    if seed % 5 == 0:
        p = np.full(n, seed % 2)  # constant prediction
    if seed % 7 == 0:
        r = np.zeros(n, int)      # no positive reference
    assert accuracy(p, r) == pytest.approx(skm.accuracy_score(r, p), abs=1e-15)
    assert binary_f1(p, r) == pytest.approx(skm.f1_score(r, p, zero_division=0.0), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = skm.matthews_corrcoef(r, p)
    assert matthews_corrcoef(p, r) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_mcc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 80)), int(rng.integers(2, 6))
    r, p = _labels(rng, n, k), _labels(rng, n, k)
    if seed % 4 == 0:
        p = np.where(rng.random(n) < 0.7, r, p)  # correlated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = skm.matthews_corrcoef(r, p)
    assert matthews_corrcoef(p, r) == pytest.approx(want, abs=1e-12)


def test_degenerate_classification_values():
    # sklearn: MCC with a constant prediction is 0.0; F1 with no positive anywhere is 0.0.
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    assert matthews_corrcoef([0, 0], [0, 0]) == 0.0
    assert matthews_corrcoef([1, 0], [1, 0]) == 1.0
    assert matthews_corrcoef([0, 1], [1, 0]) == -1.0
    assert binary_f1([0, 0], [0, 0]) == 0.0
    assert binary_f1([0, 0], [0, 0], zero_division=1.0) == 1.0
    assert accuracy(jnp.array([1, 2, 3]), np.array([1, 2, 0])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(20))
def test_multilabel_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    # c >= 2: sklearn reads an [n, 1] indicator matrix as binary labels, not multi-label.
    n, c = int(rng.integers(1, 30)), int(rng.integers(2, 8))
    r = (rng.random((n, c)) < 0.3).astype(int)
    p = (rng.random((n, c)) < 0.3).astype(int)
    if seed % 3 == 0:
        r[:, 0] = 0
        p[:, 0] = 0  # a label never present: its F1 is undefined and counts as 0 in macro
    for avg in ("micro", "macro"):
        want = skm.f1_score(r, p, average=avg, zero_division=0.0)
        assert multilabel_f1(p, r, average=avg) == pytest.approx(want, abs=1e-12), avg
    # One label column: both averages are the binary F1 of that label.
    for avg in ("micro", "macro"):
        assert multilabel_f1(p[:, 1:2], r[:, 1:2], average=avg) == pytest.approx(
            skm.f1_score(r[:, 1], p[:, 1], zero_division=0.0), abs=1e-12)


# ------------------------------------------------------------------ correlation vs scipy

@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_spearman_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 70))
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    if seed % 2 == 0:  # STS-B gold scores are in steps of 0.2: many ties
        x, y = np.round(x * 2) / 2, np.round(y)
    if seed % 9 == 0:
        x = x + 1e8  # large offset: catastrophic cancellation if done naively
    if (x == x[0]).all() or (y == y[0]).all():
        return  # constant inputs: covered by test_constant_input_correlation_is_nan
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_rankdata_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, size=int(rng.integers(1, 40))).astype(float)
    np.testing.assert_array_equal(rankdata(a), stats.rankdata(a, method="average"))


def test_constant_input_correlation_is_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.pearsonr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).statistic)
        assert math.isnan(stats.spearmanr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).statistic)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    assert pearson([1.0, 2.0], [3.0, 1.0]) == -1.0
    assert spearman([1.0, 2.0], [3.0, 1.0]) == pytest.approx(-1.0)


# -------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn,name", [
    (accuracy, "accuracy"), (binary_f1, "f1"), (matthews_corrcoef, "mcc"),
    (pearson, "pearson"), (spearman, "spearman")])
def test_bad_input_names_the_metric(fn, name):
    with pytest.raises(ValueError, match=rf"mtlx\.metrics\.{name}: length mismatch: 3 predictions but 2"):
        fn([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=rf"mtlx\.metrics\.{name}: empty input"):
        fn([], [])
    with pytest.raises(ValueError, match=rf"mtlx\.metrics\.{name}: .*must be arrays"):
        fn(1, 1)


def test_bad_input_other_cases():
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.f1: predictions must hold only 0 and 1"):
        binary_f1([0, 2], [0, 1])
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.accuracy: expected 1-D"):
        accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.accuracy: shape mismatch"):
        accuracy(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.pearson: needs at least 2 examples"):
        pearson([1.0], [2.0])
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.spearman: needs at least 2 examples"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match=r"multilabel_micro_f1: expected 2-D"):
        multilabel_f1([1, 0], [1, 0])
    with pytest.raises(ValueError, match=r"multilabel_macro_f1: references must hold only 0 and 1"):
        multilabel_f1([[1, 0]], [[1, 5]], average="macro")
    with pytest.raises(ValueError, match=r"average must be 'micro' or 'macro'"):
        multilabel_f1([[1, 0]], [[1, 0]], average="weighted")


# ------------------------------------------------------------------- token-level metrics

def test_token_accuracy_ignores_ignore_index():
    refs = np.array([[1, 2, IGNORE_INDEX, 0], [IGNORE_INDEX, 3, 3, IGNORE_INDEX]])
    preds = np.array([[1, 0, 7, 0], [5, 3, 1, 9]])
    assert token_accuracy(preds, refs) == pytest.approx(3 / 5)
    ragged = token_accuracy([[1, 0, 7, 0], [3, 1]], [[1, 2, IGNORE_INDEX, 0], [3, 3]])
    assert ragged == pytest.approx(3 / 5)
    rng = np.random.default_rng(0)
    r = rng.integers(0, 4, size=(6, 9))
    r[rng.random(r.shape) < 0.3] = IGNORE_INDEX
    p = rng.integers(0, 4, size=(6, 9))
    keep = r != IGNORE_INDEX
    assert token_accuracy(p, r) == pytest.approx(skm.accuracy_score(r[keep], p[keep]))
    with pytest.raises(ValueError, match=r"token_accuracy: empty input: every reference position"):
        token_accuracy([[1, 2]], [[IGNORE_INDEX, IGNORE_INDEX]])
    with pytest.raises(ValueError, match=r"token_accuracy: sentence 1: prediction shape"):
        token_accuracy([[1], [1, 2]], [[1], [1]])
    with pytest.raises(ValueError, match=r"token_accuracy: length mismatch"):
        token_accuracy(np.zeros((2, 3), int), np.zeros((3, 3), int))


def test_entity_f1_hand_worked():
    # seqeval's docstring example: one MISC with a wrong start boundary, one PER right.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_counts(pred, gold) == (1, 2, 2)
    assert entity_f1(pred, gold) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # Right span, wrong type; and right type, short end boundary: neither counts.
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-ORG"]]
    assert entity_counts(pred, gold) == (0, 2, 2)
    assert entity_f1(pred, gold) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # 2 of 3 predicted right, 2 of 4 gold found: P 2/3, R 1/2, F1 4/7.
    gold = [["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "O", "B-LOC", "I-LOC"], ["O", "O", "B-LOC"]]
    out = entity_f1(pred, gold)
    assert out == pytest.approx({"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7})
    # No entities anywhere: every ratio is 0 (seqeval's zero_division default).
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_chunk_rules():
    ents = extract_entities
    # conlleval reads IOB1, IOB2 and IOBES alike.
    assert ents(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]                 # IOB1 / ill-formed BIO
    assert ents(["I-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]  # IOB1 B splits
    assert ents(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]      # type change
    assert ents(["B-PER", "E-PER", "S-LOC", "E-LOC"]) == [
        ("PER", 0, 1), ("LOC", 2, 2), ("LOC", 3, 3)]
    assert ents(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    # strict: only well-formed chunks.
    assert ents(["I-PER", "I-PER", "O", "B-LOC", "I-LOC"], mode="strict", scheme="IOB2") == [
        ("LOC", 3, 4)]
    assert ents(["B-PER", "I-PER", "O", "S-LOC", "B-ORG", "E-ORG"], mode="strict",
                scheme="IOBES") == [("LOC", 3, 3), ("ORG", 4, 5)]
    # sentences never merge: a chunk ending one sentence and I- starting the next are two.
    assert entity_counts([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]]) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"entity_f1: tag 'X-PER' is not O"):
        ents(["X-PER"])
    with pytest.raises(ValueError, match=r"entity_f1: tag 'S-PER' is not valid in scheme IOB2"):
        ents(["S-PER"], mode="strict", scheme="IOB2")
    with pytest.raises(ValueError, match=r"mode='strict' needs scheme"):
        ents(["O"], mode="strict")
    with pytest.raises(ValueError, match=r"scheme is only used with mode='strict'"):
        ents(["O"], scheme="IOB2")
    with pytest.raises(ValueError, match=r"mode must be 'conlleval' or 'strict'"):
        ents(["O"], mode="lenient")


def _random_tags(rng, n_sent, prefixes, types=("PER", "LOC", "ORG")):
    out = []
    for _ in range(n_sent):
        length = int(rng.integers(0, 12))
        sent = []
        for _ in range(length):
            pre = prefixes[int(rng.integers(0, len(prefixes)))]
            sent.append("O" if pre == "O" else f"{pre}-{types[int(rng.integers(0, len(types)))]}")
        out.append(sent)
    return out


@pytest.mark.parametrize("seed", range(25))
def test_entity_f1_matches_seqeval(seed):
    seqeval = pytest.importorskip("seqeval.metrics", reason="test dependency: pip install seqeval")
    from seqeval.scheme import IOB2, IOBES
    rng = np.random.default_rng(seed)
    cases = [(("B", "I", "O", "O"), {}, {}),
             (("B", "I", "E", "S", "O"), {}, {}),
             (("B", "I", "O"), {"mode": "strict", "scheme": "IOB2"}, {"mode": "strict", "scheme": IOB2}),
             (("B", "I", "E", "S", "O"), {"mode": "strict", "scheme": "IOBES"},
              {"mode": "strict", "scheme": IOBES})]
    scores = []
    for prefixes, ours_kw, theirs_kw in cases:
        gold = _random_tags(rng, 8, prefixes)
        # Predictions: gold with some tags replaced, so there is partial agreement.
        pred = []
        for s in gold:
            noisy = _random_tags(rng, 1, prefixes)[0] + ["O"] * len(s)
            pred.append([t if rng.random() < 0.7 else noisy[i] for i, t in enumerate(s)])
        got = entity_f1(pred, gold, **ours_kw)
        for key, fn in (("precision", seqeval.precision_score), ("recall", seqeval.recall_score),
                        ("f1", seqeval.f1_score)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = fn(gold, pred, zero_division=0, **theirs_kw)
            assert got[key] == pytest.approx(want, abs=1e-12), (prefixes, ours_kw, key)
        scores.append(got["f1"])
    # The random cases are not all trivial (no entity, or everything right).
    assert any(0.0 < f < 1.0 for f in scores), scores


def test_entity_f1_from_label_ids_drops_ignored_positions():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rng = np.random.default_rng(3)
    refs = rng.integers(0, len(names), size=(5, 10))
    preds = np.where(rng.random(refs.shape) < 0.7, refs, rng.integers(0, len(names), size=refs.shape))
    refs[rng.random(refs.shape) < 0.3] = IGNORE_INDEX  # non-first subwords, padding
    gold_tags = [[names[k] for k in row if k != IGNORE_INDEX] for row in refs]
    pred_tags = [[names[k] for k, g in zip(prow, row) if g != IGNORE_INDEX]
                 for prow, row in zip(preds, refs)]
    assert entity_f1(preds, refs, label_names=names) == entity_f1(pred_tags, gold_tags)
    assert entity_f1(jnp.asarray(preds), jnp.asarray(refs), label_names=names) == entity_f1(
        pred_tags, gold_tags)
    # A prediction under an ignored reference position may be anything, even out of range.
    preds2 = preds.copy()
    preds2[refs == IGNORE_INDEX] = 99
    assert entity_f1(preds2, refs, label_names=names) == entity_f1(pred_tags, gold_tags)
    bad = preds.copy()
    bad[refs != IGNORE_INDEX] = 99
    with pytest.raises(ValueError, match=r"entity_f1: sentence 0: prediction label id 99 is outside"):
        entity_f1(bad, refs, label_names=names)
    with pytest.raises(ValueError, match=r"entity_f1: empty input"):
        entity_f1([[1]], [[IGNORE_INDEX]], label_names=names)
    with pytest.raises(ValueError, match=r"entity_f1: sentence 0 holds non-string tags"):
        entity_f1([[1]], [[1]])
    with pytest.raises(ValueError, match=r"entity_f1: sentence 1: 1 predicted tags but 2"):
        entity_f1([["O"], ["O"]], [["O"], ["O", "O"]])
    with pytest.raises(ValueError, match=r"entity_f1: length mismatch: 1 predictions but 2"):
        entity_f1([["O"]], [["O"], ["O"]])


# --------------------------------------------------------------------------------- SQuAD

def test_squad_normalisation_as_evaluate_v11():
    # Order: lowercase, strip ASCII punctuation, drop whole-word articles, collapse spaces.
    assert normalize_answer("The  Quick, Brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theater another banana") == "theater another banana"
    assert normalize_answer("U.S. don't") == "us dont"
    # Punctuation goes first, so "the-end" becomes the single word "theend", not an article.
    assert normalize_answer("the-end") == "theend"
    assert normalize_answer("the (a) end") == "end"
    # Only string.punctuation (ASCII) is removed; typographic quotes stay.
    assert normalize_answer("\u201cquoted\u201d") == "\u201cquoted\u201d"
    assert normalize_answer("tab\tand\nnewline") == "tab and newline"


def test_squad_scores_hand_worked():
    # EM and F1 take the max over gold answers.
    out = squad(["Denver Broncos"], [["Denver Broncos", "The Denver Broncos", "Broncos"]])
    assert out == {"exact_match": 1.0, "f1": 1.0}
    # "cat sat on mat" vs "cat on mat": overlap 3, P 3/4, R 1 -> F1 6/7.
    out = squad(["the cat sat on the mat"], [["a cat on a mat"]])
    assert out["exact_match"] == 0.0 and out["f1"] == pytest.approx(6 / 7)
    # Bag-of-tokens overlap counts multiplicity: "x x x" vs "x" -> P 1/3, R 1 -> 1/2.
    assert squad(["x x x"], [["x"]])["f1"] == pytest.approx(0.5)
    # Both normalise to "": exact match, but v1.1 F1 is 0 (no overlapping token).
    assert squad(["The"], [["a"]]) == {"exact_match": 1.0, "f1": 0.0}
    # Means over questions; a bare string is a one-answer list.
    out = squad(["Paris", "blue whale", "nothing"], ["paris.", ["the Blue Whale"], ["x"]])
    assert out == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3})
    # Max over golds picks the best F1 from different golds: 2/3 vs 1/2.
    out = squad(["new york city"], [["new york", "york"]])
    assert out["f1"] == pytest.approx(max(2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * (1 / 3) * 1 / (1 / 3 + 1)))


def _hf_squad_metrics():
    """The official SQuAD 2.0 scoring as Hugging Face shipped it (transformers 4.46.3,
    transformers/data/metrics/squad_metrics.py, removed in transformers 5): read from the wheel
    scripts/setup.sh downloads, its two package-relative imports (used only by its prediction
    helpers) replaced by stand-ins, and run unchanged."""
    import sys
    import types
    import zipfile
    from pathlib import Path
    wheel = Path(sys.prefix) / "reference" / "transformers-4.46.3-py3-none-any.whl"
    if not wheel.exists():
        pytest.fail(f"{wheel} is missing: run scripts/setup.sh (it downloads the reference)")
    src = zipfile.ZipFile(wheel).read("transformers/data/metrics/squad_metrics.py").decode()
    for line in ("from ...models.bert import BasicTokenizer", "from ...utils import logging"):
        assert line in src
        src = src.replace(line, "")
    ns = {"__name__": "hf_squad_metrics", "BasicTokenizer": None,
          "logging": types.SimpleNamespace(get_logger=lambda name: None)}
    exec(compile(src, "squad_metrics.py", "exec"), ns)
    return ns


def test_squad_v2_equals_the_official_scoring_on_random_questions():
    from types import SimpleNamespace
    ref = _hf_squad_metrics()
    rng = np.random.default_rng(0)
    words = ["the", "a", "cat", "Cat.", "dog", "sat", "on", "mat", "new", "york", ""]

    def text():
        return " ".join(rng.choice(words, size=int(rng.integers(0, 4))))

    for trial in range(60):
        n = int(rng.integers(1, 12))
        # Unanswerable questions ([]), golds that normalise to "" ("the"), several golds.
        refs = [[text() or "cat" for _ in range(int(rng.integers(0, 3)))] for _ in range(n)]
        if trial % 3 == 0:
            refs = [r + ["The"] if r and rng.random() < 0.3 else r for r in refs]
        preds = [text() if rng.random() < 0.7 else "" for _ in range(n)]
        scores = [float(s) for s in rng.normal(size=n).round(1)]  # ties on purpose
        thresh = float(rng.choice([-0.5, 0.0, 0.7]))
        examples = [SimpleNamespace(qas_id=f"q{i}", answers=[{"text": a} for a in r])
                    for i, r in enumerate(refs)]
        want = ref["squad_evaluate"](examples, {f"q{i}": p for i, p in enumerate(preds)},
                                     {f"q{i}": s for i, s in enumerate(scores)}, thresh)
        got = squad_v2(preds, refs, scores, thresh)
        for key, theirs in (("exact", "exact_match"), ("f1", "f1"), ("HasAns_exact", "has_answer.exact_match"),
                            ("HasAns_f1", "has_answer.f1"), ("NoAns_exact", "no_answer.exact_match"),
                            ("NoAns_f1", "no_answer.f1"), ("best_exact", "best.exact_match"),
                            ("best_f1", "best.f1")):
            if key in want:
                assert got[theirs] == pytest.approx(want[key] / 100), (trial, key)
            else:
                assert theirs not in got, (trial, key)
        assert got["best.exact_match_threshold"] == want["best_exact_thresh"]
        assert got["best.f1_threshold"] == want["best_f1_thresh"]
        # Without no-answer scores: the predictions as given ("" = no answer).
        want = ref["squad_evaluate"](examples, {f"q{i}": p for i, p in enumerate(preds)})
        got = squad_v2(preds, refs)
        assert got["exact_match"] == pytest.approx(want["exact"] / 100)
        assert got["f1"] == pytest.approx(want["f1"] / 100)


def test_squad_v2_hand_worked():
    # An unanswerable question is right only when answered "" (EM and F1 1), and a non-empty
    # answer to it scores 0; v2.0's F1 of "" vs "" is 1 where v1.1's is 0.
    out = squad_v2(["", "Paris", "", "the cat"], [[], [], ["Paris"], ["a cat", "dog"]])
    assert out == pytest.approx({"exact_match": 2 / 4, "f1": 2 / 4,
                                 "has_answer.exact_match": 1 / 2, "has_answer.f1": 1 / 2,
                                 "no_answer.exact_match": 1 / 2, "no_answer.f1": 1 / 2})
    # A gold that normalises to "" counts as no gold text, but the question is answerable.
    assert squad_v2([""], [["The"]]) == {"exact_match": 1.0, "f1": 1.0,
                                         "has_answer.exact_match": 1.0, "has_answer.f1": 1.0}
    # No-answer scores above the threshold turn answers into "no answer"; the best threshold
    # keeps the answer of q0 (score 0.5, right) and not of q1 (score 1.0, an unanswerable one).
    out = squad_v2(["Paris", "x"], [["Paris"], []], [0.5, 1.0], no_answer_threshold=0.0)
    assert out["exact_match"] == 0.5 and out["has_answer.exact_match"] == 0.0
    assert out["best.exact_match"] == 1.0 and out["best.exact_match_threshold"] == 0.5
    with pytest.raises(ValueError, match=r"squad_v2: reference 0 must be a list of gold answer"):
        squad_v2(["a"], [[1]])
    with pytest.raises(ValueError, match=r"squad_v2: no_answer_scores holds NaN"):
        squad_v2(["a"], [["a"]], [float("nan")])


def test_squad_bad_input():
    with pytest.raises(ValueError, match=r"squad: length mismatch: 1 predictions but 2"):
        squad(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"squad: empty input"):
        squad([], [])
    with pytest.raises(ValueError, match=r"squad: reference 0 must be a gold answer string"):
        squad(["a"], [[]])
    with pytest.raises(ValueError, match=r"squad: prediction 0 must be a string"):
        squad([3], [["a"]])


# ---------------------------------------------------------------------------------- GLUE

def test_glue_score_per_task():
    rng = np.random.default_rng(0)
    r, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    acc, f1 = skm.accuracy_score(r, p), skm.f1_score(r, p)
    for task in ("mrpc", "QQP"):
        out = glue_score(task, p, r)
        assert set(out) == {"accuracy", "f1", "score"}
        assert out["accuracy"] == pytest.approx(acc) and out["f1"] == pytest.approx(f1)
        assert out["score"] == pytest.approx((acc + f1) / 2)
    out = glue_score("cola", p, r)
    assert out == pytest.approx({"mcc": skm.matthews_corrcoef(r, p),
                                 "score": skm.matthews_corrcoef(r, p)})
    for task in ("SST-2", "sst2", "qnli", "rte", "wnli", "mnli_matched", "MNLI-mm"):
        assert glue_score(task, p, r) == pytest.approx({"accuracy": acc, "score": acc})
    x, y = rng.normal(size=30), rng.normal(size=30)
    pr, sr = stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic
    out = glue_score("STS-B", x, y)
    assert out == pytest.approx({"pearson": pr, "spearman": sr, "score": (pr + sr) / 2})
    m, mm = rng.integers(0, 3, 20), rng.integers(0, 3, 20)
    out = glue_score("mnli", {"matched": m, "mismatched": mm},
                     {"matched": np.zeros(20, int), "mismatched": np.ones(20, int)})
    want_m, want_mm = np.mean(m == 0), np.mean(mm == 1)
    assert out == pytest.approx({"accuracy_matched": want_m, "accuracy_mismatched": want_mm,
                                 "score": (want_m + want_mm) / 2})
    with pytest.raises(ValueError, match=r"task 'mnli' takes predictions and references as"):
        glue_score("mnli", m, m)
    with pytest.raises(ValueError, match=r"unknown GLUE task 'squad'; known: \["):
        glue_score("squad", p, r)
    with pytest.raises(ValueError, match=r"glue_score\('mrpc'\): mtlx\.metrics\.accuracy: length mismatch"):
        glue_score("mrpc", p, r[:10])
    assert set(GLUE_TASK_METRICS) >= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def test_glue_average():
    scores = {"cola": 0.5, "sst2": {"accuracy": 0.9, "score": 0.9}, "mnli_matched": 0.8,
              "mnli_mismatched": 0.7, "stsb": {"pearson": 0.8, "spearman": 0.9, "score": 0.85}}
    # MNLI halves are one task scored 0.75: mean of (0.5, 0.9, 0.75, 0.85) = 0.75.
    assert glue_average(scores) == pytest.approx(0.75)
    assert glue_average({"rte": 0.6}) == pytest.approx(0.6)
    assert glue_average({"mnli_matched": 0.8, "rte": 0.6}) == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"task 'SST-2' given twice"):
        glue_average({"sst2": 0.9, "SST-2": 0.9})
    with pytest.raises(ValueError, match=r"'mnli' already holds matched and mismatched"):
        glue_average({"mnli": 0.8, "mnli_matched": 0.8})
    with pytest.raises(ValueError, match=r"task 'cola': the dict has no 'score' key"):
        glue_average({"cola": {"mcc": 0.5}})
    with pytest.raises(ValueError, match=r"no task scores given"):
        glue_average({})
    with pytest.raises(ValueError, match=r"unknown GLUE task 'conll'"):
        glue_average({"conll": 0.9})


# ------------------------------------------------------------------------------ registry

def _tiny_inputs(kind):
    if kind == "labels":
        return np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    if kind == "values":
        return np.array([0.1, 0.5, 0.3, 0.9]), np.array([0.0, 0.6, 0.2, 1.0])
    if kind == "token_labels":
        return (np.array([[1, 2, 0, 0], [3, 0, 0, 1]]),
                np.array([[1, 2, 0, IGNORE_INDEX], [3, 4, 0, 1]]))
    if kind == "multi_labels":
        return np.array([[1, 0], [1, 1]]), np.array([[1, 0], [0, 1]])
    return ["a b", "c"], [["a b"], ["d", "c"]]


def test_registry_entries_return_their_declared_keys():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for name, m in METRICS.items():
        assert get_metric(name) is m
        p, r = _tiny_inputs(m.inputs)
        opts = {"label_names": names} if "label_names" in m.options else {}
        out = m(p, r, **opts)
        assert tuple(out) == m.keys, name
        assert all(isinstance(v, float) and not math.isnan(v) for v in out.values()), name
    assert get_metric("acc_and_f1")(*_tiny_inputs("labels")) == pytest.approx(
        {"accuracy": 0.75, "f1": 0.8, "acc_and_f1": 0.775})


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; known metrics: \['acc_and_f1', "):
        get_metric("bleu")
    with pytest.raises(ValueError, match=r"mtlx\.metrics\.accuracy: unknown option\(s\) \['beta'\]"):
        get_metric("accuracy")([1], [1], beta=2)


# --------------------------------------------------------------------------- accumulator

def _batches(rng, kind, n_batches=5):
    for b in range(n_batches):
        rows = int(rng.integers(1, 9))
        mask = rng.random(rows) < 0.7
        if kind == "labels":
            p, r = rng.integers(0, 2, rows), rng.integers(0, 2, rows)
        elif kind == "values":
            p, r = rng.normal(size=rows), rng.normal(size=rows)
        elif kind == "token_labels":
            length = int(rng.integers(3, 8))  # batches padded to different lengths
            r = rng.integers(0, 5, size=(rows, length))
            r[rng.random(r.shape) < 0.3] = IGNORE_INDEX
            p = rng.integers(0, 5, size=(rows, length))
        elif kind == "multi_labels":
            p, r = (rng.random((rows, 3)) < 0.4).astype(int), (rng.random((rows, 3)) < 0.4).astype(int)
        else:
            words = ["a", "the", "cat", "dog", "sat"]
            p = [" ".join(rng.choice(words, 2)) for _ in range(rows)]
            r = [[" ".join(rng.choice(words, 2)), "cat"] for _ in range(rows)]
        yield p, r, mask


@pytest.mark.parametrize("metrics,kind,opts", [
    (["acc_and_f1", "mcc"], "labels", {}),
    (["pearson_and_spearman"], "values", {}),
    (["token_accuracy", "entity_f1"], "token_labels",
     {"label_names": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}),
    (["multilabel_micro_f1", "multilabel_macro_f1"], "multi_labels", {}),
    (["squad"], "text", {}),
])
def test_accumulator_equals_one_shot(metrics, kind, opts):
    rng = np.random.default_rng(7)
    acc = MetricAccumulator(metrics, **opts)
    batches = list(_batches(rng, kind))
    kept_p, kept_r = [], []
    for i, (p, r, mask) in enumerate(batches):
        if kind == "text":
            acc.update(p, r, mask=mask)
            kept_p += [x for x, k in zip(p, mask) if k]
            kept_r += [x for x, k in zip(r, mask) if k]
        else:
            # Device arrays and float masks (Batch.example_mask) are accepted. JAX stores
            # float32: the one-shot reference below sees the same values.
            p, r = np.asarray(jnp.asarray(p)), np.asarray(jnp.asarray(r))
            acc.update(jnp.asarray(p), jnp.asarray(r), mask=jnp.asarray(mask, jnp.float32))
            kept_p += list(p[mask])
            kept_r += list(r[mask])
    assert acc.num_examples == len(kept_r)
    got = acc.compute()
    want = {}
    for name in metrics:
        if kind == "token_labels":  # one-shot on the original rows, ragged
            want.update(get_metric(name)([np.asarray(x) for x in kept_p],
                                         [np.asarray(x) for x in kept_r], **(
                                             opts if "label_names" in get_metric(name).options else {})))
        else:
            data_p = kept_p if kind == "text" else np.array(kept_p)
            data_r = kept_r if kind == "text" else np.array(kept_r)
            want.update(get_metric(name)(data_p, data_r))
    assert got == want  # exactly equal, not approximately


def test_accumulator_errors():
    acc = MetricAccumulator("accuracy")
    with pytest.raises(ValueError, match=r"no examples were added for \['accuracy'\]"):
        acc.compute()
    acc.update([1, 0], [1, 1], mask=[0, 0])  # every row masked: nothing kept
    assert acc.num_examples == 0
    with pytest.raises(ValueError, match=r"update: mask has shape \(3,\), expected \(2,\)"):
        acc.update([1, 0], [1, 1], mask=[1, 1, 1])
    with pytest.raises(ValueError, match=r"update: 2 prediction rows but 1 reference rows"):
        acc.update([1, 0], [1])
    acc.update([1, 0], [1, 1])
    assert acc.compute() == {"accuracy": 0.5}
    acc.reset()
    assert acc.num_examples == 0
    with pytest.raises(ValueError, match=r"the metrics read different inputs"):
        MetricAccumulator(["accuracy", "pearson"])
    with pytest.raises(ValueError, match=r"metrics 'acc_and_f1' and 'f1' both report 'f1'"):
        MetricAccumulator(["acc_and_f1", "f1"])
    with pytest.raises(ValueError, match=r"option\(s\) \['label_names'\] are accepted by none"):
        MetricAccumulator(["accuracy"], label_names=["O"])
    with pytest.raises(ValueError, match=r"unknown metric 'acc'"):
        MetricAccumulator(["acc"])
    with pytest.raises(ValueError, match=r"no metrics given"):
        MetricAccumulator([])
    mlc = MetricAccumulator("multilabel_micro_f1")
    mlc.update(np.zeros((1, 2), int), np.zeros((1, 2), int))
    mlc.update(np.zeros((1, 3), int), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match=r"predictions batches disagree in shape"):
        mlc.compute()


# ------------------------------------------------------------------------------- delta_p

def test_delta_p_libmtl_example():
    # LibMTL count_improvement docstring example, by hand (w = 1: higher is better):
    # A: -(96-93)/96 = -0.03125 and +(98-99)/98 (lower better) -> mean -0.020727...
    # B: -(0.2-0.5)/0.2 = 1.5. Delta_p = 100 * (1.5 - 0.0207270408) / 2.
    base = {"A": {"acc": 96.0, "err": 98.0}, "B": {"acc": 0.2}}
    new = {"A": {"acc": 93.0, "err": 99.0, "score": 1.0}, "B": {"acc": 0.5}}
    hib = {"A": {"acc": True, "err": False}, "B": {"acc": True}}
    want = 100 * ((-3 / 96 - 1 / 98) / 2 + 1.5) / 2
    assert delta_p(new, base, hib) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(73.96364796, abs=1e-6)
    assert delta_p(new, base, {"acc": True, "err": False}) == pytest.approx(want, abs=1e-12)
    assert delta_p(base, base, hib) == 0.0


def test_delta_p_errors():
    base = {"A": {"acc": 0.5}}
    with pytest.raises(ValueError, match=r"results cover tasks \['B'\] but baselines cover \['A'\]"):
        delta_p({"B": {"acc": 0.5}}, base, {"acc": True})
    with pytest.raises(ValueError, match=r"task 'A': metric 'acc' is in the baseline but not"):
        delta_p({"A": {"f1": 0.5}}, base, {"acc": True})
    with pytest.raises(ValueError, match=r"task 'A': baseline 'acc' is 0"):
        delta_p({"A": {"acc": 0.5}}, {"A": {"acc": 0.0}}, {"acc": True})
    with pytest.raises(ValueError, match=r"task 'A': higher_is_better\['A'\] says nothing about"):
        delta_p({"A": {"acc": 0.5}}, base, {"A": {"f1": True}})
    with pytest.raises(ValueError, match=r"no baseline tasks given"):
        delta_p({}, {}, {})


# -------------------------------------------------------------------------------- report

def test_metrics_table():
    results = {"mrpc": {"accuracy": 0.875, "f1": 0.9, "score": 0.8875},
               "stsb_long_name": {"pearson": 0.8, "spearman": float("nan")}}
    table = format_metrics_table(results, digits=2, scale=100)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "accuracy", "f1", "score", "pearson", "spearman"]
    assert lines[2].split() == ["mrpc", "87.50", "90.00", "88.75", "-", "-"]
    assert lines[3].split() == ["stsb_long_name", "-", "-", "-", "80.00", "nan"]
    # Aligned: every column ends at the same offset on every line.
    ends = [[m.end() for m in __import__("re").finditer(r"\S+", ln)] for ln in (lines[0], lines[2], lines[3])]
    assert ends[0][1:] == ends[1][1:] == ends[2][1:]
    buf = io.StringIO()
    assert print_metrics_table(results, file=buf, title="eval") == buf.getvalue().rstrip("\n")
    assert buf.getvalue().startswith("eval\ntask")
    with pytest.raises(ValueError, match=r"results\['a'\]\['f1'\] = 'x' is not a number"):
        format_metrics_table({"a": {"f1": "x"}})
    with pytest.raises(ValueError, match=r"results\['a'\] must be a \{metric: value\} mapping"):
        format_metrics_table({"a": 0.5})
    with pytest.raises(ValueError, match=r"no task results"):
        format_metrics_table({})


def test_delta_p_over_a_negative_baseline_counts_a_gain_as_a_gain():
    # A Matthews correlation from -0.1 to +0.2 is a gain: +300% of |B| (LibMTL's signed
    # division would give -300%); over a positive baseline nothing changes.
    hib = {"mcc": True, "loss": False}
    assert delta_p({"cola": {"mcc": 0.2}}, {"cola": {"mcc": -0.1}}, hib) == pytest.approx(300.0)
    assert delta_p({"cola": {"mcc": -0.2}}, {"cola": {"mcc": -0.1}}, hib) == pytest.approx(-100.0)
    assert delta_p({"t": {"loss": -2.0}}, {"t": {"loss": -1.0}}, hib) == pytest.approx(100.0)
    assert delta_p({"cola": {"mcc": 0.3}}, {"cola": {"mcc": 0.2}}, hib) == pytest.approx(50.0)


@pytest.mark.parametrize("metric", [accuracy, matthews_corrcoef])
def test_label_metrics_refuse_nan(metric):
    # sklearn refuses NaN labels; counted as a label, NaN matched itself in the MCC's
    # confusion matrix (1.0 below) while accuracy counted it wrong (0.5).
    y = np.array([np.nan, np.nan, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"references contain NaN \(at index 0\)"):
        metric(np.array([0.0, 1.0, 1.0, 0.0]), y)
    with pytest.raises(ValueError, match=r"predictions contain NaN \(at index 0\)"):
        metric(y, np.array([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError):
        skm.matthews_corrcoef(y, y)


# ------------------------------------------------------- a task's headline and model selection

def test_headline_of_entity_f1_is_the_f1_alone():
    # 10 gold entities, 1 predicted and right: P 1, R 0.1, F1 2/11 (CoNLL's one score); the
    # mean of the three (0.427) would favour high-precision, low-recall checkpoints.
    from mtlx.train import evaluate as E
    gold = [["B-PER", "O"] * 10]
    pred = [["B-PER", "O"] + ["O", "O"] * 9]
    res = get_metric("entity_f1")(pred, gold)
    assert res == pytest.approx({"entity_precision": 1.0, "entity_recall": 0.1,
                                 "entity_f1": 2 / 11})
    assert E.headline(dict(res, loss=0.3)) == pytest.approx(2 / 11)
    # a composite's parts do count: MRPC's mean of accuracy and F1 (GLUE)
    assert E.headline({"accuracy": 0.8, "f1": 0.6, "acc_and_f1": 0.7, "loss": 1.0}) == \
        pytest.approx(0.7)


def test_an_undefined_task_score_makes_the_average_undefined():
    # STS-B's head collapsed to a constant: its correlations are NaN. Averaging CoLA alone
    # (0.5) would rank this model above one whose STS-B is merely weak (0.38).
    from mtlx.train import evaluate as E
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 50)
    stsb = get_metric("pearson_and_spearman")
    collapsed = {"cola": {"mcc": 0.5, "loss": 0.6},
                 "stsb": dict(stsb(np.full(50, 2.5), gold), loss=2.0)}
    weak = {"cola": {"mcc": 0.5, "loss": 0.6},
            "stsb": dict(stsb(gold + rng.normal(0, 4, 50), gold), loss=1.5)}
    assert math.isnan(E.headline(collapsed["stsb"])) and math.isnan(E.summary_score(collapsed))
    assert E.undefined_scores(collapsed) == ["stsb/pearson", "stsb/spearman",
                                            "stsb/pearson_and_spearman"]
    assert E.selection_metrics(collapsed, "avg") is None          # not ranked for 'best'
    assert E.selection_metrics(collapsed, "cola/mcc")["cola/mcc"] == 0.5
    assert np.isfinite(E.summary_score(weak)) and E.undefined_scores(weak) == []
    assert E.selection_metrics(weak, "avg")["avg"] == pytest.approx(
        (0.5 + E.headline(weak["stsb"])) / 2)
