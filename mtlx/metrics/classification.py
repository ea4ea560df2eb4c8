"""Classification metrics on label arrays: accuracy, binary F1, Matthews correlation, and
micro/macro F1 over multi-hot matrices.

Definitions follow the GLUE paper (Wang et al., 2018, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding", Table 1: CoLA Matthews corr., MRPC/QQP acc. and
F1) and scikit-learn's implementations, which the tests use as the reference:
`sklearn.metrics.accuracy_score`, `f1_score`, `matthews_corrcoef`. Every function takes
`(predictions, references)`, the order of Hugging Face `evaluate` (sklearn's is the reverse).
Results are fractions in [0, 1] (GLUE papers print them x100).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtlx.metrics._checks import check_binary, check_no_nan, check_pair


def accuracy(predictions: Any, references: Any) -> float:
    """Fraction of examples whose prediction equals the reference (sklearn `accuracy_score`)."""
    p, r = check_pair("accuracy", predictions, references, ndim=1)
    check_no_nan("accuracy", p, r)
    return float(np.mean(p == r))


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, zero_division: float):
    # F1 = 2tp / (2tp + fp + fn): the harmonic mean of precision and recall written without
    # the two intermediate ratios, so tp = 0 with fp + fn > 0 gives 0, as sklearn. With no
    # positive in either array (tp = fp = fn = 0) F1 is undefined; sklearn's default
    # (zero_division="warn") reports 0.0, and so do we unless told otherwise.
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), zero_division)
    return f1


def binary_f1(predictions: Any, references: Any, *, zero_division: float = 0.0) -> float:
    """F1 of the positive class 1 (GLUE MRPC and QQP; sklearn `f1_score(average='binary')`).

    Labels must be 0/1. When neither array holds a 1 the score is undefined and
    `zero_division` (default 0.0, sklearn's default) is returned.
    """
    p, r = check_pair("f1", predictions, references, ndim=1)
    check_binary("f1", "predictions", p)
    check_binary("f1", "references", r)
    p, r = p == 1, r == 1
    tp = np.sum(p & r)
    fp = np.sum(p & ~r)
    fn = np.sum(~p & r)
    return float(_f1_from_counts(tp, fp, fn, zero_division))


def matthews_corrcoef(predictions: Any, references: Any) -> float:
    """Matthews correlation coefficient (Matthews 1975; K-class form of Gorodkin 2004).

    From the confusion matrix C over the labels seen in either array, with t = row sums (true
    counts), p = column sums (predicted counts), c = trace, s = total:
    MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)). For two classes this is
    (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), the GLUE CoLA metric. When a
    factor under the root is 0 (a constant prediction or constant reference) the value is
    undefined; like sklearn we return 0.0, the score of an uninformative predictor.
    """
    p, r = check_pair("mcc", predictions, references, ndim=1)
    check_no_nan("mcc", p, r)
    labels, idx = np.unique(np.concatenate([r, p]), return_inverse=True)
    k = len(labels)
    r_idx, p_idx = idx[: len(r)], idx[len(r):]
    confusion = np.bincount(r_idx * k + p_idx, minlength=k * k).reshape(k, k).astype(np.float64)
    t_sum = confusion.sum(axis=1)
    p_sum = confusion.sum(axis=0)
    n_correct = np.trace(confusion)
    n = confusion.sum()
    cov_tp = n_correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def multilabel_f1(predictions: Any, references: Any, *, average: str = "micro",
                  zero_division: float = 0.0) -> float:
    """F1 over a multi-hot [N, C] matrix (sklearn `f1_score` on multilabel indicators).

    average="micro": one F1 from the true/false positive and false negative counts summed over
    every (example, label) cell. average="macro": the unweighted mean of the C per-label F1s; a
    label with no positive in either matrix has an undefined F1 and counts as `zero_division`
    (default 0.0, sklearn's default), so it lowers the macro mean.
    Predictions must already be thresholded to 0/1.
    """
    metric = f"multilabel_{average}_f1"
    if average not in ("micro", "macro"):
        raise ValueError(f"mtlx.metrics.multilabel_f1: average must be 'micro' or 'macro', got {average!r}")
    p, r = check_pair(metric, predictions, references, ndim=2)
    check_binary(metric, "predictions", p)
    check_binary(metric, "references", r)
    p, r = p == 1, r == 1
    tp = np.sum(p & r, axis=0)
    fp = np.sum(p & ~r, axis=0)
    fn = np.sum(~p & r, axis=0)
    if average == "micro":
        return float(_f1_from_counts(tp.sum(), fp.sum(), fn.sum(), zero_division))
    return float(np.mean(_f1_from_counts(tp, fp, fn, zero_division)))
