"""Parameter report: total, shared, task-specific and trainable counts, overall and per task.

A parameter is *task-specific* to task t when its path has a component equal to t's name
(heads, per-task adapters, task embeddings are all keyed by task name); everything else is
*shared*. "Trainable per task" follows HyperFormer (Karimi Mahabadi et al. 2021, Table 1): the
task's own trainable parameters plus an equal share (1/T) of the shared trainable ones, as a
percentage of the backbone's parameter count.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.traverse_util as tu
import numpy as np


def _size(x) -> int:
    return int(np.prod(x.shape if hasattr(x, "shape") else np.shape(x), dtype=np.int64))


def parameter_report(params: Any, task_names: Sequence[str], trainable: Optional[Any] = None,
                     backbone_key: str = "backbone", extension_names: Sequence[str] = ()) -> dict:
    """Counts parameters. `trainable` is a pytree of bools like `params` (None: all trainable).

    "backbone" counts the pretrained encoder's own parameters: those under `backbone_key` that
    belong to no task and to no extension (PEFT weights live inside the backbone's layers, under
    a scope named after the extension, e.g. ``.../query/lora/...``: pass the extensions' names).
    Works on arrays or `jax.ShapeDtypeStruct`s (shapes only, no weights needed).
    """
    ext_names = set(extension_names)
    flat = tu.flatten_dict(params)
    flat_train = tu.flatten_dict(trainable) if trainable is not None else {k: True for k in flat}
    names = set(task_names)
    total = shared = backbone = 0
    shared_trainable = 0
    per_task = {t: {"task_specific": 0, "trainable": 0} for t in task_names}
    for path, leaf in flat.items():
        n = _size(leaf)
        total += n
        owners = [p for p in path if p in names]
        if path and path[0] == backbone_key and not owners and not ext_names.intersection(path):
            backbone += n
        is_train = bool(flat_train.get(path, False))
        if owners:
            t = owners[0]
            per_task[t]["task_specific"] += n
            per_task[t]["trainable"] += n if is_train else 0
        else:
            shared += n
            shared_trainable += n if is_train else 0
    trainable_total = sum(_size(v) for k, v in flat.items() if flat_train.get(k, False))
    t_count = max(len(task_names), 1)
    for t, row in per_task.items():
        row["trainable_amortised"] = row["trainable"] + shared_trainable / t_count
        row["trainable_pct_of_backbone"] = (100.0 * row["trainable_amortised"] / backbone
                                            if backbone else float("nan"))
    return {"total": total, "backbone": backbone, "shared": shared,
            "task_specific": total - shared, "trainable": trainable_total,
            "shared_trainable": shared_trainable, "per_task": per_task}


def format_report(report: dict) -> str:
    lines = [
        f"total parameters        {report['total']:>14,}",
        f"  backbone              {report['backbone']:>14,}",
        f"  shared                {report['shared']:>14,}",
        f"  task-specific         {report['task_specific']:>14,}",
        f"trainable               {report['trainable']:>14,}",
        "",
        f"{'task':<20}{'task-specific':>15}{'trainable':>12}{'trainable/task*':>17}{'% backbone':>12}",
    ]
    for t, row in report["per_task"].items():
        lines.append(f"{t:<20}{row['task_specific']:>15,}{row['trainable']:>12,}"
                     f"{row['trainable_amortised']:>17,.0f}{row['trainable_pct_of_backbone']:>11.3f}%")
    lines.append("* own trainable parameters + 1/T of the shared trainable ones (HyperFormer's count)")
    return "\n".join(lines)
