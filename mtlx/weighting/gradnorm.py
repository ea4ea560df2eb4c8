"""GradNorm: learnable loss scales trained to equalise the tasks' training rates."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtlx.weighting.balancing import GramBalancing, make_aux
from mtlx.weighting.base import (WeightingState, check_inputs, check_num_tasks, grad_norms,
                                 masked, masked_mean, masked_softmax, num_present, require,
                                 safe_div)


@dataclasses.dataclass(frozen=True)
class GradNorm(GramBalancing):
    """GradNorm, Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", ICML 2018.

    Weights w = n softmax(s) over the n present tasks, s learnable (``state.params
    ['loss_scale']``, init 1.0 as LibMTL). The update uses the current w (constant) on G; s is
    trained on L_grad = sum_i | w_i ||g_i|| - stopgrad(Gbar r_i^alpha) |, Gbar = mean_i w_i ||g_i||,
    r_i = Ltilde_i / mean_j Ltilde_j the relative inverse training rate, Ltilde_i = L_i / L_i(0).
    ``aux['param_grads']`` = dL_grad/ds; the engine's optimizer applies it (LibMTL trains s with
    the model's optimizer). ``aux['inverse_rates']`` is r (for logging and tests).

    L_i(0): LibMTL spends the first epoch on EW and uses each task's mean epoch-0 loss. mtlx:
    during the first `warmup_steps` steps weights are 1 (EW), s gets zero gradient, and L_i(0)
    is the mean of task i's losses over those steps; with `warmup_steps` = 0 (the paper), or for
    a task absent throughout the warm-up, L_i(0) is its loss the first step it is present.
    Set `warmup_steps` to the steps of one epoch to match LibMTL. The paper renormalises w to
    sum to T after each step; the T-softmax parametrisation (LibMTL) makes that implicit.
    """
    alpha: float = 1.5
    warmup_steps: int = 0
    name: ClassVar[str] = "gradnorm"

    def validate(self):
        require(self.alpha >= 0, self.name, "alpha", f"must be >= 0, got {self.alpha!r}")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, self.name,
                "warmup_steps", f"must be an int >= 0, got {self.warmup_steps!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        return WeightingState(params={"loss_scale": jnp.ones((num_tasks,), jnp.float32)},
                              stats={"initial_loss_sum": zeros, "initial_loss_count": zeros})

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        s = state.params["loss_scale"]
        st = state.stats
        losses, present = check_inputs(self.name, losses, present, num_tasks=s.shape[0])
        warm = jnp.asarray(step) < self.warmup_steps
        record = present & (warm | (st["initial_loss_count"] == 0))
        sums = st["initial_loss_sum"] + masked(losses, record)
        counts = st["initial_loss_count"] + record.astype(jnp.float32)
        initial = safe_div(sums, counts, counts > 0)

        ratio = safe_div(losses, initial, present & (initial > 0))
        mean_ratio = masked_mean(ratio, present)
        rates = safe_div(ratio, mean_ratio, present & (mean_ratio > 0))
        norms = grad_norms(gram)
        n = num_present(present)

        def grad_loss(scales):
            w = n * masked_softmax(scales, present)
            gw = w * norms
            target = jax.lax.stop_gradient(masked_mean(gw, present) * rates ** self.alpha)
            return jnp.sum(masked(jnp.abs(gw - target), present)), w

        (value, w), ds = jax.value_and_grad(grad_loss, has_aux=True)(s)
        weights = jnp.where(warm, present.astype(jnp.float32), w)
        param_grads = {"loss_scale": jnp.where(warm, 0.0, ds)}
        new_state = state.replace(stats={"initial_loss_sum": sums, "initial_loss_count": counts})
        return weights, new_state, make_aux(weights, present, param_grads=param_grads,
                                            inverse_rates=rates, gradnorm_loss=value)
