"""SQuAD v1.1 exact match and F1 (Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for
Machine Comprehension of Text"), with the answer normalisation of the official
evaluate-v1.1.py script; SQuAD 2.0's scores with unanswerable questions (`squad_v2`, the
official evaluate-v2.0.py).

Per question: normalise prediction and each gold answer (lowercase; drop every character of
`string.punctuation`; replace the whole words a/an/the with a space; collapse whitespace),
score against every gold answer and keep the maximum. Exact match is string equality after
normalisation; F1 is over bags of whitespace tokens (multiset overlap), and is 0 when nothing
overlaps, including when both normalise to the empty string (v1.1 behaviour; v2.0 changed
that case to 1). The dataset scores are means over questions, as fractions in [0, 1] (the
official script prints them x100).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Optional, Sequence

from mtlx.metrics._checks import check_lengths

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    overlap = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_lists(references: Sequence[Any]) -> list[list[str]]:
    golds = []
    for i, ref in enumerate(references):
        answers = [ref] if isinstance(ref, str) else list(ref)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(
                f"mtlx.metrics.squad: reference {i} must be a gold answer string or a non-empty "
                f"list of them, got {ref!r}")
        golds.append(answers)
    return golds


def squad(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """{"exact_match", "f1"}: means over questions of the max over gold answers.

    predictions: one answer string per question. references: per question, a list of gold
    answer strings (a single string is read as a one-answer list).
    """
    check_lengths("squad", predictions, references)
    golds = _gold_lists(references)
    em = f1 = 0.0
    for i, (pred, answers) in enumerate(zip(predictions, golds)):
        if not isinstance(pred, str):
            raise ValueError(f"mtlx.metrics.squad: prediction {i} must be a string, got {pred!r}")
        em += max(exact_match_score(pred, a) for a in answers)
        f1 += max(f1_score(pred, a) for a in answers)
    n = len(golds)
    return {"exact_match": em / n, "f1": f1 / n}


# ----------------------------------------------------------------------------- SQuAD 2.0

def _v2_golds(references: Sequence[Any]) -> tuple[list[list[str]], list[bool]]:
    """Per question, the gold answers that normalise to something, [""] when none does (the
    only right answer is then the empty one); and whether it has any gold answer at all (an
    answer like "The" counts, as in evaluate-v2.0.py's make_qid_to_has_ans)."""
    golds, has_answer = [], []
    for i, ref in enumerate(references):
        answers = [ref] if isinstance(ref, str) else list(ref)
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"mtlx.metrics.squad_v2: reference {i} must be a list of gold "
                             f"answer strings (empty: no answer), got {ref!r}")
        golds.append([a for a in answers if normalize_answer(a)] or [""])
        has_answer.append(bool(answers))
    return golds, has_answer


def f1_score_v2(prediction: str, gold: str) -> float:
    """SQuAD 2.0's F1: as v1.1, except that when either side is empty after normalisation the
    score is 1 if both are, else 0."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return f1_score(prediction, gold)


def _best_threshold(raw, answers, has_answer, no_answer_scores):
    """evaluate-v2.0.py's find_best_thresh: start with every question answered "no answer",
    then, in increasing order of no-answer score, let each question keep its answer; the best
    running total and the score where it was reached."""
    total = sum(1 for h in has_answer if not h)
    best, best_t = total, 0.0
    for i in sorted(range(len(raw)), key=lambda i: no_answer_scores[i]):
        if has_answer[i]:
            total += raw[i]
        elif answers[i]:
            total -= 1
        if total > best:
            best, best_t = total, float(no_answer_scores[i])
    return best / len(raw), best_t


def squad_v2(predictions: Sequence[str], references: Sequence[Any],
             no_answer_scores: Optional[Sequence[float]] = None,
             no_answer_threshold: float = 0.0) -> dict[str, float]:
    """SQuAD 2.0 scores (Rajpurkar, Jia & Liang 2018, "Know What You Don't Know"), as the
    official evaluate-v2.0.py computes them, as fractions in [0, 1] (it prints x100).

    predictions: one answer string per question ("" = no answer). references: per question the
    list of gold answer strings, empty for an unanswerable question. A question's exact match
    and F1 are the max over its gold answers (v2.0 F1: 1 when both prediction and gold are
    empty). no_answer_scores (optional, the script's na_prob file): per question a score that
    is higher the likelier "no answer" is; a question whose score is above
    `no_answer_threshold` is then answered "no answer" (the script's --na-prob-thresh), and
    the best thresholds are searched as the script does.

    Returns 'exact_match' and 'f1' over all questions; 'has_answer.exact_match',
    'has_answer.f1', 'no_answer.exact_match', 'no_answer.f1' over the answerable and the
    unanswerable questions (when there are any); with no_answer_scores also 'best.exact_match',
    'best.exact_match_threshold', 'best.f1', 'best.f1_threshold'. The dotted keys are
    breakdowns (mtlx.train.evaluate.headline does not average them).
    """
    check_lengths("squad_v2", predictions, references)
    golds, has_answer = _v2_golds(references)
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise ValueError(f"mtlx.metrics.squad_v2: prediction {i} must be a string, got {pred!r}")
    exact = [max(exact_match_score(p, a) for a in g) for p, g in zip(predictions, golds)]
    f1 = [max(f1_score_v2(p, a) for a in g) for p, g in zip(predictions, golds)]
    if no_answer_scores is not None:
        check_lengths("squad_v2", predictions, no_answer_scores)
        scores = [float(s) for s in no_answer_scores]
        if any(s != s for s in scores):
            raise ValueError("mtlx.metrics.squad_v2: no_answer_scores holds NaN")
        null = [s > no_answer_threshold for s in scores]
        exact_t = [float(not h) if n else e for e, h, n in zip(exact, has_answer, null)]
        f1_t = [float(not h) if n else f for f, h, n in zip(f1, has_answer, null)]
    else:
        exact_t, f1_t = exact, f1
    n = len(golds)
    out = {"exact_match": sum(exact_t) / n, "f1": sum(f1_t) / n}
    for name, keep in (("has_answer", True), ("no_answer", False)):
        idx = [i for i in range(n) if has_answer[i] == keep]
        if idx:
            out[f"{name}.exact_match"] = sum(exact_t[i] for i in idx) / len(idx)
            out[f"{name}.f1"] = sum(f1_t[i] for i in idx) / len(idx)
    if no_answer_scores is not None:
        for name, raw in (("exact_match", exact), ("f1", f1)):
            best, t = _best_threshold(raw, predictions, has_answer, scores)
            out[f"best.{name}"], out[f"best.{name}_threshold"] = best, t
    return out
