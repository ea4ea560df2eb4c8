"""Input checks shared by the metric functions: every error names the metric at fault."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def as_array(metric: str, what: str, x: Any) -> np.ndarray:
    """`x` as a host numpy array (JAX arrays are copied from the device here)."""
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        raise ValueError(f"mtlx.metrics.{metric}: {what} could not be read as an array: {e}") from e


def check_pair(metric: str, predictions: Any, references: Any, *,
               ndim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as numpy arrays of one shape with at least one row, else ValueError."""
    p = as_array(metric, "predictions", predictions)
    r = as_array(metric, "references", references)
    if p.ndim == 0 or r.ndim == 0:
        raise ValueError(
            f"mtlx.metrics.{metric}: predictions and references must be arrays with one entry per "
            f"example, got shapes {p.shape} and {r.shape}")
    if p.shape[0] != r.shape[0]:
        raise ValueError(
            f"mtlx.metrics.{metric}: length mismatch: {p.shape[0]} predictions but "
            f"{r.shape[0]} references")
    if p.shape != r.shape:
        raise ValueError(
            f"mtlx.metrics.{metric}: shape mismatch: predictions {p.shape}, references {r.shape}")
    if p.shape[0] == 0:
        raise ValueError(f"mtlx.metrics.{metric}: empty input (0 examples): the metric is undefined")
    if ndim is not None and p.ndim != ndim:
        raise ValueError(
            f"mtlx.metrics.{metric}: expected {ndim}-D inputs, got shape {p.shape}")
    return p, r


def check_lengths(metric: str, predictions: Any, references: Any) -> None:
    """Length check for Python sequences (strings, ragged rows) that are not arrays."""
    n_p, n_r = len(predictions), len(references)
    if n_p != n_r:
        raise ValueError(
            f"mtlx.metrics.{metric}: length mismatch: {n_p} predictions but {n_r} references")
    if n_p == 0:
        raise ValueError(f"mtlx.metrics.{metric}: empty input (0 examples): the metric is undefined")


def check_binary(metric: str, what: str, x: np.ndarray) -> None:
    """Values must be 0 or 1 (binary F1 and multi-hot matrices)."""
    bad = x[(x != 0) & (x != 1)]
    if bad.size:
        raise ValueError(
            f"mtlx.metrics.{metric}: {what} must hold only 0 and 1 (positive class 1), "
            f"found {bad.flat[0]!r}")


def check_no_nan(metric: str, p: np.ndarray, r: np.ndarray) -> None:
    """Label arrays must not hold NaN (sklearn refuses them too): NaN equals nothing, not even
    itself, so counting it as a label would score it inconsistently from metric to metric."""
    for what, x in (("predictions", p), ("references", r)):
        if x.dtype.kind in "fc" and np.isnan(x).any():
            raise ValueError(f"mtlx.metrics.{metric}: {what} contain NaN "
                             f"(at index {int(np.flatnonzero(np.isnan(x).ravel())[0])})")
