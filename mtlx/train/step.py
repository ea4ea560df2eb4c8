"""The train state and the ONE pure train step for every task of a mixed batch.

    state = create_state(model, params, tx, rng)
    step_fn = make_train_step(model, tx, task_weights=...)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)

No Python branching on the task inside the step: task membership is data (`batch.task_ids`),
so the step compiles once per static batch shape whatever the task mix.

Gradient accumulation splits the batch into `accum_steps` microbatches inside the step
(`lax.scan`) and gives exactly the full-batch objective: per-task means are taken over the
whole batch (each microbatch's loss sums are divided by the FULL batch's per-task counts),
not averaged across microbatches. The rows of one multiple-choice question must lie in one
microbatch (the data pipeline keeps a question's rows contiguous and aligned).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlx.batch import Batch
from mtlx.models import heads as H


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array         # raw uint32 key data (checkpoint-friendly)
    weighting: Any = None  # the loss-weighting strategy's state (mtlx.weighting), if any


def create_state(params, tx: optax.GradientTransformation, rng, weighting_state=None) -> TrainState:
    key = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key, weighting=weighting_state)


def _zero_outputs(batch: Batch, tasks: Sequence[H.TaskHead]) -> dict:
    """Outputs of the right shapes for computing label-derived weights without a forward."""
    b, l = batch.input_ids.shape
    out = {}
    for kind in {t.kind for t in tasks}:
        w = max(H.kind_routing(tasks, kind).width, 1)
        if kind in ("classification", "multilabel"):
            out[kind] = jnp.zeros((b, w))
        elif kind in ("regression", "multiple_choice"):
            out[kind] = jnp.zeros((b,))
        elif kind == "token_classification":
            out[kind] = jnp.zeros((b, l, w))
        elif kind == "span":
            out["span_start"] = out["span_end"] = jnp.zeros((b, l))
        elif kind == "seq2seq":
            out[kind] = jnp.zeros(batch.target_ids.shape + (1,))
    return out


def task_counts(batch: Batch, tasks: Sequence[H.TaskHead]) -> jax.Array:
    """Per-task weights (examples or labelled tokens) of a batch, from its labels alone."""
    return H.task_losses(_zero_outputs(batch, tasks), batch, tasks)[1]


def _split(batch: Batch, n: int) -> Batch:
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
    return jax.tree_util.tree_map(f, batch)


def make_train_step(model, tx: optax.GradientTransformation, *,
                    task_weights: Optional[Sequence[float]] = None, accum_steps: int = 1,
                    schedule: Optional[Callable] = None) -> Callable:
    """Returns step(state, batch) -> (state, metrics).

    Objective: sum over tasks PRESENT in the batch of w_t * L_t, L_t the task's mean loss
    (static weights w, default 1 = LibMTL's EW). metrics: 'loss', 'task_loss' [T],
    'task_count' [T], 'grad_norm', 'learning_rate' (if a schedule is given).
    """
    tasks = model.tasks
    t = len(tasks)
    weights = jnp.ones((t,), jnp.float32) if task_weights is None else jnp.asarray(task_weights, jnp.float32)
    if weights.shape != (t,):
        raise ValueError(f"config.task_weights has {weights.shape[0]} entries, the model has {t} tasks")
    if accum_steps < 1:
        raise ValueError(f"config.accum_steps must be >= 1, got {accum_steps}")

    def summed_loss(params, batch, rng, scale):
        out = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        loss_sum, weight = H.example_losses(out, batch, tasks)
        seg = jnp.clip(batch.task_ids, 0, t - 1)
        valid = (batch.task_ids >= 0) & (weight > 0)
        sums = jax.ops.segment_sum(jnp.where(valid, loss_sum, 0.0), seg, num_segments=t)
        return jnp.sum(scale * sums), sums

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def step(state: TrainState, batch: Batch):
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        counts = task_counts(batch, tasks)
        present = counts > 0
        scale = jnp.where(present, weights / jnp.maximum(counts, 1e-9), 0.0)
        if accum_steps == 1:
            grads, sums = grad_fn(state.params, batch, step_rng, scale)
        else:
            micro = _split(batch, accum_steps)

            def body(carry, xs):
                g_acc, s_acc = carry
                i, mb = xs
                g, s = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i), scale)
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), s_acc + s), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (grads, sums), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((t,), jnp.float32)), (jnp.arange(accum_steps), micro))
        losses = jnp.where(present, sums / jnp.maximum(counts, 1e-9), 0.0)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.sum(weights * losses), "task_loss": losses, "task_count": counts,
                   "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        return new_state, metrics

    return step


def make_eval_step(model) -> Callable:
    """eval(params, batch) -> (predictions per kind, per-task losses, per-task counts)."""
    tasks = model.tasks

    def evaluate(params, batch):
        out = model.apply({"params": params}, batch, deterministic=True)
        losses, counts = H.task_losses(out, batch, tasks)
        return H.predictions(out, batch, tasks), losses, counts

    return evaluate


def count_compilations(fn) -> int:
    """Number of distinct compiled executables held by a jitted function's cache."""
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else -1


def finite_or_raise(metrics: dict, step: int, task_names: Sequence[str]) -> None:
    """Host-side NaN/Inf check after a step: names the step and the task(s) at fault."""
    loss = np.asarray(metrics["task_loss"])
    bad = [task_names[i] for i in np.flatnonzero(~np.isfinite(loss))]
    if bad or not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(
            f"non-finite loss at step {step}: tasks {bad or 'unknown'} "
            f"(task losses {dict(zip(task_names, loss.tolist()))}); the last good checkpoint is kept")
