"""Loss weighting and gradient balancing strategies, chosen by name.

    strategy = get_strategy("pcgrad")                 # or get_strategy("dwa", steps_per_epoch=500)
    state = strategy.init(num_tasks)                  # a pytree: checkpoint it with the model

One backward ("1x", ``strategy.needs_task_grads`` False): static, ew, uw, dwa, rlw, gls, famo.
    total, aux = strategy.loss(losses, present, state, rng, step)   # differentiate this
    state = strategy.update(state, losses, present, step, next_losses=...)
Per-task gradients ("Tx", True): gradnorm, mgda, pcgrad, cagrad, nash_mtl, imtl_g, aligned_mtl,
db_mtl.
    G, losses = task_gradients(per_task_loss_fn, shared_params, ...)     # [T, D]
    out, state, aux = strategy.combine(G, losses, present, state, rng, step)
    update = apply_weights(out, G) if strategy.output == "weights" else out

`mtlx.weighting.base` documents the contract (absent tasks, trainable strategy parameters,
what reaches the task heads); REFERENCE.md section 3 (LibMTL) is the definition of correct.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple, Type

from mtlx.weighting.balancing import (CAGrad, IMTLG, MGDA, AlignedMTL, NashMTL, PCGrad,
                                      imtl_g_weights, pcgrad_coefficients, pcgrad_permutations)
from mtlx.weighting.base import GradientBalancing, LossWeighting, WeightingState
from mtlx.weighting.db_mtl import DBMTL
from mtlx.weighting.gradnorm import GradNorm
from mtlx.weighting.grads import (apply_weights, cosine_from_gram, flatten_grads, gram_matrix,
                                  pairwise_cosine, rep_gradient_matrix, task_gradients,
                                  unflatten_grads)
from mtlx.weighting.loss_weighting import (FAMO, DynamicWeightAverage, EqualWeighting,
                                           GeometricLossStrategy, RandomLossWeighting,
                                           StaticWeights, UncertaintyWeighting)

_CLASSES: Tuple[Type, ...] = (
    StaticWeights, EqualWeighting, UncertaintyWeighting, DynamicWeightAverage,
    RandomLossWeighting, GeometricLossStrategy, FAMO,
    GradNorm, MGDA, PCGrad, CAGrad, NashMTL, IMTLG, AlignedMTL, DBMTL,
)
STRATEGIES: Dict[str, Type] = {cls.name: cls for cls in _CLASSES}


def get_strategy(name: str, **hparams: Any):
    """The strategy registered as `name` (case and '-' vs '_' ignored) with its hyperparameters.

    Raises ValueError listing the known names for an unknown one, the accepted keys for an
    unknown hyperparameter, and naming the key for a value out of range.
    """
    if not isinstance(name, str):
        raise ValueError(f"weighting strategy name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown weighting strategy {name!r}; known: {sorted(STRATEGIES)}")
    cls = STRATEGIES[key]
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(f"weighting strategy {key!r}: unknown hyperparameter(s) {unknown}; "
                         f"accepted: {accepted}")
    return cls(**hparams)


__all__ = [
    "STRATEGIES", "get_strategy", "WeightingState", "LossWeighting", "GradientBalancing",
    "StaticWeights", "EqualWeighting", "UncertaintyWeighting", "DynamicWeightAverage",
    "RandomLossWeighting", "GeometricLossStrategy", "FAMO", "GradNorm", "MGDA", "PCGrad",
    "CAGrad", "NashMTL", "IMTLG", "AlignedMTL", "DBMTL",
    "flatten_grads", "unflatten_grads", "task_gradients", "rep_gradient_matrix",
    "apply_weights", "gram_matrix", "pairwise_cosine", "cosine_from_gram",
    "pcgrad_coefficients", "pcgrad_permutations", "imtl_g_weights",
]
