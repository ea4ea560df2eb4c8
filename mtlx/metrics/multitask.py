"""Multi-task summary of a run against single-task baselines."""

from __future__ import annotations

from typing import Mapping, Union

HigherIsBetter = Union[Mapping[str, Mapping[str, bool]], Mapping[str, bool]]


def delta_p(results: Mapping[str, Mapping[str, float]],
            baselines: Mapping[str, Mapping[str, float]],
            higher_is_better: HigherIsBetter) -> float:
    """Average relative improvement over the baselines, in percent (LibMTL's Delta_p).

    Delta_p = 100% * (1/T) sum_t (1/M_t) sum_m (-1)^{w_tm} (B_tm - N_tm) / B_tm
    (Maninis et al. 2019; Lin & Zhang 2023, LibMTL `count_improvement`), with B the
    single-task baseline, N the multi-task result and w_tm = 1 when higher is better, so a
    gain counts positive either way. Each task weighs the same whatever its number of metrics.
    LibMTL's function returns the fraction; this returns the percentage (x100).
    One departure: the change is relative to |B_tm|, not B_tm. The two agree for every
    positive baseline (accuracy, F1, a loss); LibMTL's signed division would count a gain as a
    loss over a negative baseline (a Matthews correlation or a Pearson r below 0 can be one).

    The metrics of each task are those of `baselines[task]`; extra metrics in `results` (e.g. a
    GLUE "score") are ignored. `higher_is_better` is {task: {metric: bool}} or one
    {metric: bool} for all tasks. The tasks of `results` and `baselines` must match.
    """
    if not baselines:
        raise ValueError("mtlx.metrics.delta_p: no baseline tasks given")
    if set(results) != set(baselines):
        raise ValueError(
            f"mtlx.metrics.delta_p: results cover tasks {sorted(results)} but baselines cover "
            f"{sorted(baselines)}")
    total = 0.0
    for task, base in baselines.items():
        if not base:
            raise ValueError(f"mtlx.metrics.delta_p: task {task!r}: baseline has no metrics")
        task_sum = 0.0
        for metric, b in base.items():
            if metric not in results[task]:
                raise ValueError(
                    f"mtlx.metrics.delta_p: task {task!r}: metric {metric!r} is in the baseline "
                    f"but not in the results (results have {sorted(results[task])})")
            higher = _lookup(higher_is_better, task, metric)
            if b == 0:
                raise ValueError(
                    f"mtlx.metrics.delta_p: task {task!r}: baseline {metric!r} is 0, the relative "
                    f"change is undefined")
            sign = -1.0 if higher else 1.0
            task_sum += sign * (b - results[task][metric]) / abs(b)
        total += task_sum / len(base)
    return 100.0 * total / len(baselines)


def _lookup(higher_is_better: HigherIsBetter, task: str, metric: str) -> bool:
    per_task = higher_is_better.get(task)
    if isinstance(per_task, Mapping):
        table, where = per_task, f"higher_is_better[{task!r}]"
    else:
        table, where = higher_is_better, "higher_is_better"
    if metric not in table or isinstance(table[metric], Mapping):
        raise ValueError(
            f"mtlx.metrics.delta_p: task {task!r}: {where} says nothing about metric {metric!r}")
    return bool(table[metric])
