"""Pearson and Spearman correlation (GLUE STS-B), in numpy, matching `scipy.stats`.

Pearson (1895): r = sum((x - mean x)(y - mean y)) / (||x - mean x|| ||y - mean y||).
Spearman (1904): the Pearson correlation of the ranks, ties given their average rank
(scipy `rankdata(method='average')`, which `spearmanr` uses).

Degenerate inputs, as scipy 1.17 does, and why:
- a constant array (all values equal) has zero variance and the correlation is undefined:
  scipy returns NaN with a ConstantInputWarning; we return NaN (no warning). A GLUE STS-B
  score built from it is NaN too, which is what should alert the reader.
- any NaN in either array gives NaN (scipy's default nan_policy='propagate').
- fewer than 2 examples: scipy `pearsonr` raises; we raise ValueError for both metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtlx.metrics._checks import check_pair


def rankdata(a: Any) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing the mean of their ranks."""
    a = np.asarray(a)
    n = a.size
    order = np.argsort(a, kind="mergesort")
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.arange(n)
    a_sorted = a[order]
    new_value = np.r_[True, a_sorted[1:] != a_sorted[:-1]]
    dense = np.cumsum(new_value)[inverse]           # 1-based id of each value's tie group
    group_start = np.r_[np.nonzero(new_value)[0], n]  # first sorted position of each group
    # Positions group_start[g-1] .. group_start[g]-1 hold group g: the mean 1-based rank is
    # the mean of the first and last rank.
    return 0.5 * (group_start[dense] + group_start[dense - 1] + 1)


def _pearson(metric: str, x: np.ndarray, y: np.ndarray) -> float:
    if x.shape[0] < 2:
        raise ValueError(f"mtlx.metrics.{metric}: needs at least 2 examples, got {x.shape[0]}")
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    if (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    xm = x - x.mean()
    ym = y - y.mean()
    # Norms taken on the deviations scaled by their largest one, so squares cannot overflow;
    # the same steps as scipy, so results agree to the last bits.
    x_max, y_max = np.abs(xm).max(), np.abs(ym).max()
    norm_x = x_max * np.linalg.norm(xm / x_max)
    norm_y = y_max * np.linalg.norm(ym / y_max)
    r = float(np.clip(np.dot(xm / norm_x, ym / norm_y), -1.0, 1.0))
    # Two distinct points always lie on a line: exactly +-1 (scipy rounds this case too).
    return float(round(r)) if x.shape[0] == 2 else r


def pearson(predictions: Any, references: Any) -> float:
    """Pearson correlation coefficient (scipy.stats.pearsonr statistic)."""
    p, r = check_pair("pearson", predictions, references, ndim=1)
    return _pearson("pearson", p, r)


def spearman(predictions: Any, references: Any) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr statistic)."""
    p, r = check_pair("spearman", predictions, references, ndim=1)
    if p.shape[0] >= 2 and (np.isnan(p.astype(np.float64)).any()
                            or np.isnan(r.astype(np.float64)).any()):
        return float("nan")
    return _pearson("spearman", rankdata(p), rankdata(r))
