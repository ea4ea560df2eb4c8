"""Streaming evaluation: feed batches as they leave the compiled forward pass, score at the end.

The accumulator keeps the valid rows of each batch on the host and computes every metric once,
on the concatenation, so the result is exactly the one-shot value (no running averages: Spearman
needs all ranks, F1 and MCC are not means of per-batch values). An eval set is small next to
host memory: GLUE's largest dev set (QQP) is 40k labels.

    acc = MetricAccumulator(["acc_and_f1"])
    for batch in eval_batches:
        preds = predict(params, batch)               # jitted; argmax already taken
        rows = (batch.task_ids == task_index) & (batch.example_mask > 0)
        acc.update(preds, batch.labels, mask=rows)
    acc.compute()   # {"accuracy": ..., "f1": ..., "acc_and_f1": ...}

Arrays may live on a device; they are copied with `np.asarray`, which needs every shard to be
addressable by this process (on several hosts, gather first, e.g. with
`jax.experimental.multihost_utils.process_allgather`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from mtlx.batch import IGNORE_INDEX
from mtlx.metrics.registry import Metric, get_metric


class MetricAccumulator:
    """Collects (predictions, references) over batches; `compute()` runs the metrics once.

    metrics: registered names or `Metric`s, all reading the same kind of input.
    options: keyword options for the metrics that accept them (e.g. label_names=... for
    entity_f1); an option no metric accepts is an error.
    """

    def __init__(self, metrics: Sequence[Union[str, Metric]], **options: Any):
        if isinstance(metrics, (str, Metric)):
            metrics = [metrics]
        if not metrics:
            raise ValueError("mtlx.metrics.MetricAccumulator: no metrics given")
        self.metrics = tuple(m if isinstance(m, Metric) else get_metric(m) for m in metrics)
        kinds = {m.inputs for m in self.metrics}
        if len(kinds) > 1:
            raise ValueError(
                "mtlx.metrics.MetricAccumulator: the metrics read different inputs "
                f"({ {m.name: m.inputs for m in self.metrics} }); use one accumulator per kind")
        self.inputs = kinds.pop()
        accepted = {o for m in self.metrics for o in m.options}
        unknown = set(options) - accepted
        if unknown:
            raise ValueError(
                f"mtlx.metrics.MetricAccumulator: option(s) {sorted(unknown)} are accepted by none "
                f"of {[m.name for m in self.metrics]} (they accept {sorted(accepted) or 'none'})")
        seen: dict[str, str] = {}
        for m in self.metrics:
            for key in m.keys:
                if key in seen:
                    raise ValueError(
                        f"mtlx.metrics.MetricAccumulator: metrics {seen[key]!r} and {m.name!r} both "
                        f"report {key!r}; keep one of them")
                seen[key] = m.name
        self.options = dict(options)
        self.reset()

    def reset(self) -> None:
        self._predictions: list[Any] = []
        self._references: list[Any] = []
        self._count = 0

    @property
    def num_examples(self) -> int:
        return self._count

    def update(self, predictions: Any, references: Any, mask: Optional[Any] = None) -> None:
        """Adds one batch; rows where `mask` is 0/False (padding, other tasks) are dropped."""
        where = "mtlx.metrics.MetricAccumulator.update"
        text = self.inputs == "text"
        p = list(predictions) if text else np.asarray(predictions)
        r = list(references) if text else np.asarray(references)
        if len(p) != len(r):
            raise ValueError(f"{where}: {len(p)} prediction rows but {len(r)} reference rows")
        if mask is not None:
            keep = np.asarray(mask)
            if keep.shape != (len(p),):
                raise ValueError(
                    f"{where}: mask has shape {keep.shape}, expected ({len(p)},), one entry per row")
            keep = keep != 0
            if text:
                p = [x for x, k in zip(p, keep) if k]
                r = [x for x, k in zip(r, keep) if k]
            else:
                p, r = p[keep], r[keep]
        if len(p) == 0:
            return
        self._predictions.append(p)
        self._references.append(r)
        self._count += len(p)

    def concatenated(self) -> tuple[Any, Any]:
        """All kept rows, in order: what the metrics see."""
        if self._count == 0:
            names = [m.name for m in self.metrics]
            raise ValueError(f"mtlx.metrics.MetricAccumulator: no examples were added for {names}")
        if self.inputs == "text":
            return ([x for b in self._predictions for x in b],
                    [x for b in self._references for x in b])
        return self._concat("predictions", self._predictions), self._concat("references", self._references)

    def _concat(self, what: str, parts: list) -> np.ndarray:
        widths = {a.shape[1:] for a in parts}
        if len(widths) > 1:
            # Batches padded to different lengths: re-pad token rows with IGNORE_INDEX. Token
            # metrics skip positions whose reference is ignored, so the result is unchanged.
            ok = (self.inputs == "token_labels" and all(a.ndim == 2 for a in parts)
                  and all(np.issubdtype(a.dtype, np.integer) for a in parts))
            if not ok:
                raise ValueError(
                    f"mtlx.metrics.MetricAccumulator: {what} batches disagree in shape beyond "
                    f"the first axis: {sorted(widths)}")
            length = max(a.shape[1] for a in parts)
            pad = self.options.get("ignore_index", IGNORE_INDEX)
            parts = [np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=pad) for a in parts]
        return np.concatenate(parts, axis=0)

    def compute(self) -> dict[str, float]:
        predictions, references = self.concatenated()
        out: dict[str, float] = {}
        for m in self.metrics:
            opts = {k: v for k, v in self.options.items() if k in m.options}
            out.update(m(predictions, references, **opts))
        return out
