"""SQuAD v1.1 exact match and F1 (Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for
Machine Comprehension of Text"), with the answer normalisation of the official
evaluate-v1.1.py script.

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
from typing import Any, Sequence

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
