"""Span (extractive QA) answers as text: from the start/end logits of each context window to
one answer string per question, scored with SQuAD's exact match and F1.

The decoding is Hugging Face's `postprocess_qa_predictions` (transformers
examples/pytorch/question-answering/utils_qa.py, the run_qa.py script): for every window the
n_best highest start logits and the n_best highest end logits (n_best =
mtlx.models.heads.SPAN_N_BEST = 20, run_qa.py's n_best_size) are paired; a pair is kept when
both tokens lie in the context (their character offsets are known), end >= start and the span
has at most `max_answer_tokens` tokens (30, run_qa.py's max_answer_length); its score is start
logit + end logit. The answer of a question is the best-scoring pair over all of its windows,
cut from the context by the tokens' character offsets. The top-k logits come out of the
compiled eval step (`mtlx.models.heads.predictions`: span_*_top / span_*_top_logits); the
pairing runs on the host over at most n_best^2 pairs a window.

Unanswerable questions (SQuAD 2.0, a task with `TaskSpec.null_answers`; run_qa.py's
--version_2_with_negative): a window's null score is its [CLS] start + end logit
(span_null_score), a question's null score the LOWEST over its windows, and its no-answer
score that null score minus its best span's score. The question is answered "" (no answer)
when the no-answer score exceeds `TaskSpec.null_score_threshold` (run_qa.py's
--null_score_diff_threshold, 0.0), and it is scored with SQuAD 2.0's metric
(`mtlx.metrics.squad_v2`, with the no-answer scores for its best-threshold search). Without
null answers, a question with no valid pair in any window gets "" (v1.1 semantics).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_ANSWER_TOKENS = 30   # run_qa.py's max_answer_length


@dataclasses.dataclass
class SpanReferences:
    """What text answers are cut from and scored against, by example index of the split:
    contexts[i] the context string; answers[i] the gold answer strings (empty: none)."""
    contexts: List[str]
    answers: List[List[str]]

    @staticmethod
    def from_split(split) -> "SpanReferences":
        """From a mtlx.data SplitData of a span task (examples with texts (question, context))."""
        return SpanReferences([ex.texts[1] for ex in split.examples],
                              [[a for a, _ in ex.answers] for ex in split.examples])


def best_span(starts: np.ndarray, start_logits: np.ndarray, ends: np.ndarray,
              end_logits: np.ndarray, offsets: np.ndarray,
              max_answer_tokens: int = MAX_ANSWER_TOKENS) -> Optional[Tuple[float, int, int]]:
    """(score, first token, last token) of the best valid pair of one window, or None.

    starts/ends: candidate token positions (top-k), with their logits; offsets [L, 2]: the
    window's character offsets, (-1, -1) outside the context (and past its end)."""
    best = None
    n = len(offsets)
    for s, ls in zip(starts.tolist(), start_logits.tolist()):
        if s >= n or offsets[s][0] < 0:
            continue
        for e, le in zip(ends.tolist(), end_logits.tolist()):
            if e >= n or offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_tokens:
                continue
            score = ls + le
            if best is None or score > best[0]:
                best = (score, s, e)
    return best


class SpanDecoder:
    """Collects windows' candidates batch by batch (`add`), then gives one answer per example
    (`answers`) and SQuAD's scores (`scores`). With `null_answers` (SQuAD 2.0), a question may
    be answered "" (see the module docstring)."""

    def __init__(self, data, refs: SpanReferences, max_answer_tokens: int = MAX_ANSWER_TOKENS,
                 null_answers: bool = False, null_score_threshold: float = 0.0):
        if data.char_offsets is None:
            raise ValueError(f"task {data.task!r}: span decoding needs the tokenizer's character "
                             f"offsets (TokenizedSplit.char_offsets)")
        self.data, self.refs, self.max_answer_tokens = data, refs, max_answer_tokens
        self.null_answers, self.null_score_threshold = null_answers, float(null_score_threshold)
        self.best: Dict[int, Tuple[float, int, int, int]] = {}   # example -> (score, row, s, e)
        self.null: Dict[int, float] = {}                         # example -> lowest null score
        self.seen = set()

    @classmethod
    def for_task(cls, spec, data, refs: SpanReferences, **kwargs) -> "SpanDecoder":
        """The decoder of a span task: its null-answer settings from the TaskSpec."""
        return cls(data, refs, null_answers=spec.null_answers,
                   null_score_threshold=spec.null_score_threshold, **kwargs)

    def add(self, preds, example_index: np.ndarray, row_index: np.ndarray, rows: np.ndarray) -> None:
        d = self.data
        st, stl = np.asarray(preds["span_start_top"]), np.asarray(preds["span_start_top_logits"])
        en, enl = np.asarray(preds["span_end_top"]), np.asarray(preds["span_end_top_logits"])
        null = np.asarray(preds["span_null_score"]) if self.null_answers else None
        for j in rows.tolist():
            ex, r = int(example_index[j]), int(row_index[j])
            self.seen.add(ex)
            if null is not None:
                self.null[ex] = min(self.null.get(ex, np.inf), float(null[j]))
            offsets = d.char_offsets[d.row_starts[r]: d.row_starts[r + 1]]
            got = best_span(st[j], stl[j], en[j], enl[j], offsets, self.max_answer_tokens)
            if got is not None and (ex not in self.best or got[0] > self.best[ex][0]):
                self.best[ex] = (got[0], r, got[1], got[2])

    def _span_texts(self) -> Dict[int, str]:
        """Each example's best span as text ("" when no window has a valid pair)."""
        d, out = self.data, {}
        for ex in sorted(self.seen):
            if ex not in self.best:
                out[ex] = ""
                continue
            _, r, s, e = self.best[ex]
            offsets = d.char_offsets[d.row_starts[r]: d.row_starts[r + 1]]
            out[ex] = self.refs.contexts[ex][int(offsets[s][0]): int(offsets[e][1])]
        return out

    def no_answer_scores(self) -> Dict[int, float]:
        """(null_answers) Per example: lowest null score - best span score, +inf when no window
        has a valid span; "no answer" when above the task's null_score_threshold."""
        if not self.null_answers:
            raise ValueError(f"task {self.data.task!r}: no-answer scores need null_answers=True")
        return {ex: (self.null[ex] - self.best[ex][0]) if ex in self.best else float("inf")
                for ex in sorted(self.seen)}

    def answers(self) -> Dict[int, str]:
        spans = self._span_texts()
        if not self.null_answers:
            return spans
        diff = self.no_answer_scores()
        return {ex: "" if diff[ex] > self.null_score_threshold else text
                for ex, text in spans.items()}

    def scores(self) -> dict:
        """v1.1: {'exact_match', 'f1'} (fractions) over the examples seen that have gold
        answers. null_answers: SQuAD 2.0's scores over every example seen, with the
        answerable / unanswerable breakdown and the best no-answer thresholds
        (mtlx.metrics.squad_v2)."""
        from mtlx.metrics import squad, squad_v2
        if self.null_answers:
            spans, diff = self._span_texts(), self.no_answer_scores()
            keep = sorted(spans)
            if not keep:
                return {}
            return squad_v2([spans[ex] for ex in keep], [self.refs.answers[ex] for ex in keep],
                            [diff[ex] for ex in keep], self.null_score_threshold)
        answers = self.answers()
        keep = [ex for ex in answers if self.refs.answers[ex]]
        if not keep:
            return {}
        return squad([answers[ex] for ex in keep], [self.refs.answers[ex] for ex in keep])
