"""Loss weighting with one backward in total ("1x"): static, EW, UW, DWA, RLW, GLS, FAMO.

Each strategy's `loss` returns ``(total, aux)``; ``aux['weights']`` [T] is d total / d L_i, the
weight each present task's loss gradient actually receives (0 for absent tasks). See
`mtlx.weighting.base` for the calling convention and how absent tasks are handled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from mtlx.weighting.base import (LossWeighting, WeightingState, check_inputs, check_num_tasks,
                                 masked, masked_mean, masked_softmax, num_present, require,
                                 safe_div)

Array = Any


def _weighted_sum(weights: Array, losses: Array, present: Array) -> Array:
    return jnp.sum(masked(weights * losses, present))


@dataclasses.dataclass(frozen=True)
class StaticWeights(LossWeighting):
    """Fixed weights: sum_i w_i L_i (LibMTL's EW with user-chosen weights).

    `weights` has one non-negative entry per task, in the model's task order.
    """
    weights: Tuple[float, ...] = ()
    name: ClassVar[str] = "static"

    def validate(self):
        require(isinstance(self.weights, (tuple, list)) and len(self.weights) > 0, self.name,
                "weights", f"must be a non-empty sequence of floats, got {self.weights!r}")
        try:
            values = [float(w) for w in self.weights]
        except (TypeError, ValueError):
            values = None
        require(values is not None and all(v >= 0 and math.isfinite(v) for v in values),
                self.name, "weights", f"must be finite numbers >= 0, got {tuple(self.weights)}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        require(len(self.weights) == num_tasks, self.name, "weights",
                f"has {len(self.weights)} entries but the model has {num_tasks} tasks")
        return WeightingState()

    def loss(self, losses, present, state, rng, step):
        losses, present = check_inputs(self.name, losses, present, num_tasks=len(self.weights))
        w = masked(jnp.asarray(self.weights, losses.dtype), present)
        return _weighted_sum(w, losses, present), {"weights": w}


@dataclasses.dataclass(frozen=True)
class EqualWeighting(LossWeighting):
    """EW: sum_i L_i, every weight 1 (LibMTL `EW`; its docstring says 1/T but the code uses 1)."""
    name: ClassVar[str] = "ew"

    def loss(self, losses, present, state, rng, step):
        losses, present = check_inputs(self.name, losses, present)
        w = present.astype(losses.dtype)
        return _weighted_sum(w, losses, present), {"weights": w}


@dataclasses.dataclass(frozen=True)
class UncertaintyWeighting(LossWeighting):
    """UW, Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018.

    total = sum_i L_i / (2 exp(s_i)) + s_i / 2 with learnable s_i = log sigma_i^2, initialised to
    `init_log_var` = -0.5 (LibMTL). s lives in ``state.params['log_var']``: differentiate the
    total jointly w.r.t. the model and ``state.params`` and let the engine's optimizer train it.
    At the optimum exp(s_i) = L_i, so a noisier regression task gets a larger s_i.
    Absent tasks contribute no term, so their s_i gets zero gradient.
    """
    init_log_var: float = -0.5
    name: ClassVar[str] = "uw"

    def validate(self):
        require(math.isfinite(self.init_log_var), self.name, "init_log_var", "must be finite")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        return WeightingState(params={"log_var": jnp.full((num_tasks,), self.init_log_var,
                                                          jnp.float32)})

    def loss(self, losses, present, state, rng, step):
        s = state.params["log_var"]
        losses, present = check_inputs(self.name, losses, present, num_tasks=s.shape[0])
        w = masked(0.5 * jnp.exp(-s), present)
        total = jnp.sum(masked(w * losses + 0.5 * s, present))
        return total, {"weights": w, "log_var": s}


@dataclasses.dataclass(frozen=True)
class DynamicWeightAverage(LossWeighting):
    """DWA, Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.

    w = T softmax(r / temperature), r_i = Lbar_i(e-1) / Lbar_i(e-2), the ratio of task i's mean
    training loss over the last two complete epochs; w = 1 during the first two epochs (LibMTL).

    mtlx differences, because steps rather than epochs drive a compiled loop: an "epoch" is a
    window of `steps_per_epoch` steps (required), and `update` accumulates each task's losses
    over the steps where it is present. With absent tasks the softmax runs over present tasks
    and is scaled by their number (not T), so present weights still average 1 as in EW; a task
    with no example in one of the two windows gets r_i = 1 (no evidence of change).
    """
    steps_per_epoch: Optional[int] = None
    temperature: float = 2.0
    name: ClassVar[str] = "dwa"

    def validate(self):
        require(isinstance(self.steps_per_epoch, int) and self.steps_per_epoch > 0, self.name,
                "steps_per_epoch", f"must be a positive int (the window over which loss means "
                f"are taken), got {self.steps_per_epoch!r}")
        require(self.temperature > 0, self.name, "temperature",
                f"must be > 0, got {self.temperature!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        return WeightingState(stats={
            "loss_sum": zeros, "loss_count": zeros, "mean_last": zeros, "mean_before": zeros,
            "seen_last": zeros, "seen_before": zeros, "epochs_done": jnp.zeros((), jnp.int32)})

    def loss(self, losses, present, state, rng, step):
        st = state.stats
        losses, present = check_inputs(self.name, losses, present,
                                       num_tasks=st["loss_sum"].shape[0])
        known = (st["seen_last"] > 0) & (st["seen_before"] > 0) & (st["mean_before"] != 0)
        ratio = jnp.where(known, safe_div(st["mean_last"], st["mean_before"], known), 1.0)
        dynamic = num_present(present) * masked_softmax(ratio / self.temperature, present)
        w = jnp.where(st["epochs_done"] >= 2, dynamic, present.astype(losses.dtype))
        w = jax.lax.stop_gradient(w)
        return _weighted_sum(w, losses, present), {"weights": w}

    def update(self, state, losses, present, step, *, next_losses=None):
        st = state.stats
        losses, present = check_inputs(self.name, losses, present,
                                       num_tasks=st["loss_sum"].shape[0])
        loss_sum = st["loss_sum"] + masked(jax.lax.stop_gradient(losses), present)
        loss_count = st["loss_count"] + present.astype(jnp.float32)
        closing = (jnp.asarray(step) + 1) % self.steps_per_epoch == 0
        seen = (loss_count > 0).astype(jnp.float32)
        mean = safe_div(loss_sum, loss_count, loss_count > 0)
        new = {
            "loss_sum": jnp.where(closing, 0.0, loss_sum),
            "loss_count": jnp.where(closing, 0.0, loss_count),
            "mean_last": jnp.where(closing, mean, st["mean_last"]),
            "mean_before": jnp.where(closing, st["mean_last"], st["mean_before"]),
            "seen_last": jnp.where(closing, seen, st["seen_last"]),
            "seen_before": jnp.where(closing, st["seen_last"], st["seen_before"]),
            "epochs_done": st["epochs_done"] + closing.astype(jnp.int32),
        }
        return state.replace(stats=new)


@dataclasses.dataclass(frozen=True)
class RandomLossWeighting(LossWeighting):
    """RLW, Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022 (arXiv:2111.10603).

    w = softmax(z) with z drawn afresh every step from `dist` (LibMTL default 'normal': z ~ N(0,
    I); 'uniform': U(0, 1); 'dirichlet': Dir(1) -- LibMTL also applies the softmax to those).
    Weights sum to 1 over the present tasks (LibMTL), not to T. The draw uses `rng` only, so a
    step's weights are reproducible from its key.
    """
    dist: str = "normal"
    name: ClassVar[str] = "rlw"
    DISTS: ClassVar[Tuple[str, ...]] = ("normal", "uniform", "dirichlet")

    def validate(self):
        require(self.dist in self.DISTS, self.name, "dist",
                f"must be one of {self.DISTS}, got {self.dist!r}")

    def sample_logits(self, rng: Array, num_tasks: int) -> Array:
        if self.dist == "normal":
            return jax.random.normal(rng, (num_tasks,), jnp.float32)
        if self.dist == "uniform":
            return jax.random.uniform(rng, (num_tasks,), jnp.float32)
        return jax.random.dirichlet(rng, jnp.ones((num_tasks,), jnp.float32))

    def loss(self, losses, present, state, rng, step):
        losses, present = check_inputs(self.name, losses, present)
        w = masked_softmax(self.sample_logits(rng, losses.shape[0]), present).astype(losses.dtype)
        return _weighted_sum(w, losses, present), {"weights": w}


@dataclasses.dataclass(frozen=True)
class GeometricLossStrategy(LossWeighting):
    """GLS, Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning", CVPR Workshops 2019.

    total = (prod_i L_i)^(1/n) over the n present tasks, computed as exp(mean_i log L_i) so many
    tasks neither underflow nor overflow. Losses are clamped at `min_loss` (LibMTL: a zero loss
    gives a NaN gradient). ``aux['weights']`` is the true gradient weight total / (n L_i);
    LibMTL logs L_i / (T prod L) instead, which is not what the gradient uses.
    """
    min_loss: float = 1e-8
    name: ClassVar[str] = "gls"

    def validate(self):
        require(self.min_loss > 0, self.name, "min_loss", f"must be > 0, got {self.min_loss!r}")

    def loss(self, losses, present, state, rng, step):
        losses, present = check_inputs(self.name, losses, present)
        logs = masked(jnp.log(jnp.maximum(masked(losses, present, 1.0), self.min_loss)), present)
        total = jnp.where(num_present(present) > 0, jnp.exp(masked_mean(logs, present)), 0.0)
        n = jnp.maximum(num_present(present), 1.0)
        clamped = jnp.maximum(masked(losses, present, 1.0), self.min_loss)
        w = masked(jax.lax.stop_gradient(total) / (n * clamped), present)
        w = jnp.where(losses >= self.min_loss, w, 0.0)
        return total, {"weights": jax.lax.stop_gradient(w)}


@dataclasses.dataclass(frozen=True)
class FAMO(LossWeighting):
    """FAMO, Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    total = sum_i z_i log(L_i - Lmin_i + 1e-8) / c, z = softmax(w), c = sum_i z_i / (L_i -
    Lmin_i + 1e-8) held constant (LibMTL, from the official code; Lmin = 0 as there). After the
    optimizer step, `update` needs ``next_losses``: the losses of the SAME batch re-evaluated with
    the updated model (LibMTL's trainer does this forward pass under no_grad). Then
    delta = log(L_i + 1e-8) - log(L_i' + 1e-8), and w takes one Adam step (lr `w_lr`, L2 weight
    decay `w_gamma` added to the gradient as torch's Adam does) on the gradient J_softmax(w)^T
    delta. w and the Adam moments live in ``state.stats`` (not trained by the engine).

    mtlx difference: with absent tasks, z is a softmax over present tasks, and only present
    coordinates of w (and their Adam moments and step counts) are updated, each with its own
    bias-correction count, so an absent task's w does not drift by weight decay.

    `after` says where the loss after the step comes from:
      'next_batch' (mtlx's DEFAULT, one forward per step): delta_i = log L_i(batch t-1,
          theta_{t-1}) - log L_i(batch t, theta_t), i.e. the losses the next step computes
          anyway. `update` at step t applies the w step for the pair (t-1, t) (the weights lag
          one step more than with 'same_batch'), for the tasks present in both batches. The
          delta then also carries the difference between the two batches (zero-mean sampling
          noise, which Adam's moments average), so it is a cheaper, noisier estimate of the same
          log-loss decrease.
      'same_batch' (the paper's Algorithm 1 as its official code and LibMTL run it): the same
          batch re-evaluated with the updated parameters, passed as ``next_losses``.
    Why mtlx differs by default: 'same_batch' is a second forward pass every step (1.17x EW's
    step time and 1.34x its FLOPs in scripts/bench_weighting.py, see BUILD_NOTES), while FAMO's
    point is O(1) overhead and mtlx's budget for one-backward strategies is 1.05x EW;
    'next_batch' runs at EW's cost. Set ``after='same_batch'`` to reproduce LibMTL exactly.
    """
    w_lr: float = 0.025
    w_gamma: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    after: str = "next_batch"
    name: ClassVar[str] = "famo"
    AFTER: ClassVar[Tuple[str, ...]] = ("same_batch", "next_batch")

    @property
    def needs_next_losses(self) -> bool:
        """True when `update` needs the same batch's losses after the optimizer step."""
        return self.after == "same_batch"

    def validate(self):
        require(self.w_lr > 0, self.name, "w_lr", f"must be > 0, got {self.w_lr!r}")
        require(self.w_gamma >= 0, self.name, "w_gamma", f"must be >= 0, got {self.w_gamma!r}")
        require(0 <= self.beta1 < 1, self.name, "beta1", f"must be in [0, 1), got {self.beta1!r}")
        require(0 <= self.beta2 < 1, self.name, "beta2", f"must be in [0, 1), got {self.beta2!r}")
        require(self.eps > 0, self.name, "eps", f"must be > 0, got {self.eps!r}")
        require(self.after in self.AFTER, self.name, "after",
                f"must be one of {list(self.AFTER)}, got {self.after!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        stats = {"w": zeros, "adam_mu": zeros, "adam_nu": zeros,
                 "adam_count": jnp.zeros((num_tasks,), jnp.int32)}
        if self.after == "next_batch":   # the previous step's losses and which tasks had data
            stats.update(prev_losses=zeros, prev_present=jnp.zeros((num_tasks,), jnp.bool_))
        return WeightingState(stats=stats)

    def loss(self, losses, present, state, rng, step):
        w = state.stats["w"]
        losses, present = check_inputs(self.name, losses, present, num_tasks=w.shape[0])
        z = masked_softmax(jax.lax.stop_gradient(w), present)
        d = masked(losses, present, 1.0) + 1e-8
        c = jax.lax.stop_gradient(jnp.sum(masked(z / d, present)))
        c = jnp.where(c > 0, c, 1.0)
        total = jnp.sum(masked(z * jnp.log(d), present)) / c
        weights = jax.lax.stop_gradient(masked(z / (c * d), present))
        return total, {"weights": weights, "z": z}

    def update(self, state, losses, present, step, *, next_losses=None):
        st = state.stats
        losses, present = check_inputs(self.name, losses, present, num_tasks=st["w"].shape[0])
        if self.after == "next_batch":
            if next_losses is not None:
                raise ValueError("weighting strategy 'famo' with after='next_batch' takes the "
                                 "next step's losses itself: update() must not get next_losses")
            losses = jax.lax.stop_gradient(losses)
            both = present & st["prev_present"]
            new = self._step_w(st, st["prev_losses"], losses, both)
            new.update(prev_losses=jnp.where(present, losses, 0.0), prev_present=present)
            return state.replace(stats=new)
        if next_losses is None:
            raise ValueError(
                "weighting strategy 'famo': update() needs next_losses, the losses of the same "
                "batch re-evaluated after the optimizer step (see the FAMO docstring)")
        next_losses, _ = check_inputs(self.name, next_losses, present, num_tasks=st["w"].shape[0])
        return state.replace(stats=self._step_w(st, losses, next_losses, present))

    def _step_w(self, st, losses, next_losses, present):
        """One Adam step of w on J_softmax(w)^T (log L - log L'), over `present` tasks."""
        before = jnp.log(masked(jax.lax.stop_gradient(losses), present, 1.0) + 1e-8)
        after = jnp.log(masked(jax.lax.stop_gradient(next_losses), present, 1.0) + 1e-8)
        delta = masked(before - after, present)
        _, pullback = jax.vjp(lambda w: masked_softmax(w, present), st["w"])
        (grad,) = pullback(delta)
        grad = grad + self.w_gamma * st["w"]
        count = st["adam_count"] + present.astype(jnp.int32)
        mu = self.beta1 * st["adam_mu"] + (1 - self.beta1) * grad
        nu = self.beta2 * st["adam_nu"] + (1 - self.beta2) * grad * grad
        t = jnp.maximum(count, 1).astype(jnp.float32)
        mu_hat = mu / (1 - self.beta1 ** t)
        nu_hat = nu / (1 - self.beta2 ** t)
        w = st["w"] - self.w_lr * mu_hat / (jnp.sqrt(nu_hat) + self.eps)
        return {**st,
                "w": jnp.where(present, w, st["w"]),
                "adam_mu": jnp.where(present, mu, st["adam_mu"]),
                "adam_nu": jnp.where(present, nu, st["adam_nu"]),
                "adam_count": count}


