"""Metrics by name, so a task declares its metrics as strings (`metrics=("accuracy", "f1")`).

Every registered metric returns a dict of floats (a composite metric returns its parts too);
`Metric.inputs` says which kind of predictions/references it reads, so an evaluator knows which
head output and which `Batch` field to feed it:

  labels        [N] class ids (Batch.labels)
  values        [N] regression values (Batch.label_values)
  token_labels  [N, L] token class ids, IGNORE_INDEX where ignored (Batch.token_labels)
  multi_labels  [N, C] multi-hot 0/1 (Batch.multi_labels), predictions thresholded
  text          answer strings vs. lists of gold strings (SQuAD; SQuAD 2.0: "" / [] = no answer)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mtlx.metrics import classification, correlation, qa, sequence

INPUT_KINDS = ("labels", "values", "token_labels", "multi_labels", "text")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A named metric: `metric(predictions, references, **options) -> {key: value}`."""
    name: str
    fn: Callable[..., dict[str, float]]
    keys: tuple[str, ...]          # keys of the returned dict
    inputs: str                    # one of INPUT_KINDS
    higher_is_better: bool = True  # for every key (what delta_p and model selection need)
    options: tuple[str, ...] = ()  # keyword options fn accepts
    reference: str = ""            # where the definition comes from
    # Keys reported beside the metric's score but not part of it: a task's headline number
    # (mtlx.train.evaluate.headline) leaves them out (entity precision and recall next to
    # entity F1, CoNLL's one score; a composite's parts, e.g. MRPC's accuracy and F1, do count).
    supporting: tuple[str, ...] = ()

    def __call__(self, predictions: Any, references: Any, **options: Any) -> dict[str, float]:
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(
                f"mtlx.metrics.{self.name}: unknown option(s) {sorted(unknown)}; this metric "
                f"accepts {list(self.options) or 'none'}")
        return self.fn(predictions, references, **options)


def _acc_and_f1(p, r):
    acc, f1 = classification.accuracy(p, r), classification.binary_f1(p, r)
    return {"accuracy": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}


def _pearson_and_spearman(p, r):
    pr, sr = correlation.pearson(p, r), correlation.spearman(p, r)
    return {"pearson": pr, "spearman": sr, "pearson_and_spearman": (pr + sr) / 2}


def _entity_f1(p, r, **options):
    out = sequence.entity_f1(p, r, **options)
    return {f"entity_{k}": v for k, v in out.items()}


_GLUE = "Wang et al. 2018, GLUE, Table 1"
_ENTITY_OPTIONS = ("label_names", "mode", "scheme", "ignore_index")

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", lambda p, r: {"accuracy": classification.accuracy(p, r)},
           ("accuracy",), "labels", reference=f"{_GLUE}; sklearn accuracy_score"),
    Metric("f1", lambda p, r: {"f1": classification.binary_f1(p, r)},
           ("f1",), "labels", reference=f"{_GLUE} (MRPC, QQP); sklearn f1_score binary, pos_label=1"),
    Metric("mcc", lambda p, r: {"mcc": classification.matthews_corrcoef(p, r)},
           ("mcc",), "labels", reference=f"{_GLUE} (CoLA); Matthews 1975; sklearn matthews_corrcoef"),
    Metric("acc_and_f1", _acc_and_f1, ("accuracy", "f1", "acc_and_f1"), "labels",
           reference=f"{_GLUE}, section 4: mean of a task's metrics (MRPC, QQP)"),
    Metric("pearson", lambda p, r: {"pearson": correlation.pearson(p, r)},
           ("pearson",), "values", reference=f"{_GLUE} (STS-B); scipy.stats.pearsonr"),
    Metric("spearman", lambda p, r: {"spearman": correlation.spearman(p, r)},
           ("spearman",), "values", reference=f"{_GLUE} (STS-B); scipy.stats.spearmanr"),
    Metric("pearson_and_spearman", _pearson_and_spearman,
           ("pearson", "spearman", "pearson_and_spearman"), "values",
           reference=f"{_GLUE}, section 4: mean of a task's metrics (STS-B)"),
    Metric("token_accuracy",
           lambda p, r, **o: {"token_accuracy": sequence.token_accuracy(p, r, **o)},
           ("token_accuracy",), "token_labels", options=("ignore_index",),
           reference="fraction of non-ignored tokens predicted correctly"),
    Metric("entity_f1", _entity_f1, ("entity_precision", "entity_recall", "entity_f1"),
           "token_labels", options=_ENTITY_OPTIONS,
           reference="CoNLL-2003 conlleval.pl; seqeval (micro average)",
           supporting=("entity_precision", "entity_recall")),
    Metric("squad", qa.squad, ("exact_match", "f1"), "text",
           reference="Rajpurkar et al. 2016; official evaluate-v1.1.py"),
    # Over all questions; qa.squad_v2 itself also gives the answerable / unanswerable breakdown
    # and, with no-answer scores, the best thresholds (what span evaluation reports).
    Metric("squad_v2",
           lambda p, r: {k: v for k, v in qa.squad_v2(p, r).items() if k in ("exact_match", "f1")},
           ("exact_match", "f1"), "text",
           reference="Rajpurkar, Jia & Liang 2018; official evaluate-v2.0.py (empty = no answer)"),
    Metric("multilabel_micro_f1",
           lambda p, r: {"micro_f1": classification.multilabel_f1(p, r, average="micro")},
           ("micro_f1",), "multi_labels", reference="sklearn f1_score(average='micro')"),
    Metric("multilabel_macro_f1",
           lambda p, r: {"macro_f1": classification.multilabel_f1(p, r, average="macro")},
           ("macro_f1",), "multi_labels", reference="sklearn f1_score(average='macro')"),
)}

# Every key some metric reports only beside its score (Metric.supporting).
SUPPORTING_KEYS = frozenset(k for m in METRICS.values() for k in m.supporting)


def get_metric(name: str) -> Metric:
    """The registered metric called `name`; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in METRICS:
        raise ValueError(f"mtlx.metrics: unknown metric {name!r}; known metrics: {sorted(METRICS)}")
    return METRICS[name]
