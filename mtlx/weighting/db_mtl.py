"""DB-MTL: dual balancing of loss scales (log) and gradient magnitudes (EMA-normalised)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtlx.weighting.balancing import make_aux
from mtlx.weighting.base import (GradientBalancing, WeightingState, check_inputs,
                                 check_num_tasks, masked, require)


@dataclasses.dataclass(frozen=True)
class DBMTL(GradientBalancing):
    """DB-MTL, Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029 (2023).

    Per-task gradients of log(L_i + 1e-8), i.e. g_i / (L_i + 1e-8) (chain rule, so `combine`
    takes the usual G of the raw losses), go into an EMA
    ghat_i <- g_i + beta / t^beta_sigma (ghat_i - g_i), ghat = 0 initially (LibMTL);
    alpha_i = max_j ||ghat_j|| / (||ghat_i|| + 1e-8); the update is sum_i alpha_i ghat_i.

    Returns a DIRECTION [D], not weights: the EMA mixes past gradients, so the update is not a
    combination of the current G. Hence no rep_grad (as LibMTL), and `init` needs `grad_dim`:
    the state holds the [T, D] fp32 EMA (another T x D floats next to G). ``aux['weights']`` is
    alpha (the weights on the EMA rows); ``aux['head_weights']`` is 1 / (L_i + 1e-8), since
    LibMTL's per-task backward of log L_i is what reaches the heads.

    mtlx difference: an absent task's EMA is frozen (LibMTL would decay it toward its zero
    gradient) and t counts the steps where the task was present (LibMTL: all steps; equal when
    every task is in every batch, and irrelevant for the default beta_sigma = 0).
    """
    beta: float = 0.9
    beta_sigma: float = 0.0
    name: ClassVar[str] = "db_mtl"
    output: ClassVar[str] = "direction"
    supports_rep_grad: ClassVar[bool] = False

    def validate(self):
        require(0 <= self.beta < 1, self.name, "beta", f"must be in [0, 1), got {self.beta!r}")
        require(self.beta_sigma >= 0, self.name, "beta_sigma",
                f"must be >= 0, got {self.beta_sigma!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        if not isinstance(grad_dim, int) or isinstance(grad_dim, bool) or grad_dim < 1:
            raise ValueError(f"weighting strategy 'db_mtl': init() needs grad_dim, the length D "
                             f"of the flattened task gradients (its EMA is [T, D]); got "
                             f"{grad_dim!r}")
        return WeightingState(stats={"grad_ema": jnp.zeros((num_tasks, grad_dim), jnp.float32),
                                     "count": jnp.zeros((num_tasks,), jnp.int32)})

    def combine(self, grads, losses, present, state, rng, step):
        ema = state.stats["grad_ema"]
        losses, present = check_inputs(self.name, losses, present, grads,
                                       num_tasks=ema.shape[0])
        if grads.shape[1] != ema.shape[1]:
            raise ValueError(f"weighting strategy 'db_mtl': grads have D={grads.shape[1]} but "
                             f"the state was initialised with grad_dim={ema.shape[1]}")
        losses = jax.lax.stop_gradient(losses)
        grads = jax.lax.stop_gradient(grads).astype(jnp.float32)
        inv = masked(1.0 / (masked(losses, present, 1.0) + 1e-8), present)
        log_grads = grads * inv[:, None]
        count = state.stats["count"] + present.astype(jnp.int32)
        rate = self.beta / jnp.maximum(count, 1).astype(jnp.float32) ** self.beta_sigma
        ema = jnp.where(present[:, None], log_grads + rate[:, None] * (ema - log_grads), ema)
        norms = jnp.sqrt(jnp.sum(ema * ema, axis=1))
        biggest = jnp.max(masked(norms, present))
        alpha = masked(biggest / (norms + 1e-8), present)
        direction = jnp.einsum("t,td->d", alpha, ema, precision=jax.lax.Precision.HIGHEST)
        new_state = state.replace(stats={"grad_ema": ema, "count": count})
        return direction, new_state, make_aux(alpha, present, head_weights=inv)
