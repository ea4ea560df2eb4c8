"""What the GLUE benchmark reports per task, and its overall score.

Wang et al., 2018, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding" (Table 1 metrics; section 4): CoLA Matthews corr.; SST-2, QNLI, RTE, WNLI
accuracy; MRPC and QQP accuracy and F1 (positive class 1 = paraphrase / duplicate); STS-B
Pearson and Spearman corr.; MNLI accuracy on the matched and mismatched sets. "For tasks with
multiple metrics, we use an unweighted average of the metrics as the score for the task when
computing the overall macro-average": the task's headline number ("score" below) is the mean
of its metrics, e.g. (acc + F1) / 2 for MRPC (Hugging Face's `acc_and_f1`), (Pearson +
Spearman) / 2 for STS-B; the GLUE score is the mean of the task scores. MNLI is one task whose
two metrics are the matched and mismatched accuracies.

Values are fractions in [0, 1]; papers and the leaderboard print them x100.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import numpy as np

from mtlx.metrics.classification import accuracy, binary_f1, matthews_corrcoef
from mtlx.metrics.correlation import pearson, spearman

# Task -> the metrics GLUE reports for it, in the leaderboard's column order.
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy_matched", "accuracy_mismatched"),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

_METRIC_FNS = {"mcc": matthews_corrcoef, "accuracy": accuracy, "f1": binary_f1,
               "pearson": pearson, "spearman": spearman}

# Spellings in use elsewhere (GLUE site, HF datasets) -> the names above.
_ALIASES = {"sst_2": "sst2", "sts_b": "stsb", "mnli_m": "mnli_matched",
            "mnli_mm": "mnli_mismatched"}


def normalize_glue_task(task_name: str) -> str:
    """'SST-2' -> 'sst2', 'MNLI-mm' -> 'mnli_mismatched'; ValueError for a non-GLUE name."""
    key = task_name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASK_METRICS:
        raise ValueError(
            f"mtlx.metrics.glue: unknown GLUE task {task_name!r}; known: {sorted(GLUE_TASK_METRICS)}")
    return key


def glue_score(task_name: str, predictions: Any, references: Any) -> dict[str, float]:
    """The metrics GLUE reports for `task_name`, plus "score", their mean (the headline).

    predictions/references: class ids (regression values for STS-B). For task "mnli", pass
    mappings {"matched": ..., "mismatched": ...} for both; "mnli_matched"/"mnli_mismatched"
    take one split each.
    """
    task = normalize_glue_task(task_name)
    if task == "mnli":
        out = {}
        for split in ("matched", "mismatched"):
            if not (isinstance(predictions, Mapping) and isinstance(references, Mapping)
                    and split in predictions and split in references):
                raise ValueError(
                    "mtlx.metrics.glue: task 'mnli' takes predictions and references as "
                    "{'matched': ..., 'mismatched': ...}; use 'mnli_matched' or "
                    "'mnli_mismatched' to score one split")
            out[f"accuracy_{split}"] = accuracy(predictions[split], references[split])
    else:
        try:
            out = {m: _METRIC_FNS[m](predictions, references) for m in GLUE_TASK_METRICS[task]}
        except ValueError as e:  # say which task's data was bad, not only which metric
            raise ValueError(f"mtlx.metrics.glue_score({task_name!r}): {e}") from e
    out["score"] = float(np.mean([out[m] for m in GLUE_TASK_METRICS[task]]))
    return out


def glue_average(per_task_scores: Mapping[str, Union[float, Mapping[str, float]]]) -> float:
    """The GLUE score: the unweighted mean of the task scores.

    per_task_scores: task -> its headline score, or the dict `glue_score` returned (its
    "score" is used). "mnli_matched" and "mnli_mismatched" given together are one task, MNLI,
    scored by their mean; either one alone counts as that task. The mean is over the tasks
    given (the GLUE leaderboard has all nine; HyperFormer and most adapter papers leave out
    WNLI), so say which tasks a reported number covers.
    """
    if not per_task_scores:
        raise ValueError("mtlx.metrics.glue_average: no task scores given")
    scores: dict[str, float] = {}
    for name, value in per_task_scores.items():
        task = normalize_glue_task(name)
        if task in scores:
            raise ValueError(f"mtlx.metrics.glue_average: task {name!r} given twice (as {task!r})")
        if isinstance(value, Mapping):
            if "score" not in value:
                raise ValueError(
                    f"mtlx.metrics.glue_average: task {name!r}: the dict has no 'score' key "
                    f"(keys: {sorted(value)}); pass glue_score()'s output or a number")
            value = value["score"]
        scores[task] = float(value)
    halves = {"mnli_matched", "mnli_mismatched"}
    if "mnli" in scores and halves & scores.keys():
        raise ValueError(
            "mtlx.metrics.glue_average: 'mnli' already holds matched and mismatched; do not "
            f"also pass {sorted(halves & scores.keys())}")
    if halves <= scores.keys():
        scores["mnli"] = (scores.pop("mnli_matched") + scores.pop("mnli_mismatched")) / 2
    return float(np.mean(list(scores.values())))
