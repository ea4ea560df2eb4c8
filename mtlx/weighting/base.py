"""The interface every task-balancing strategy implements, and the masked arithmetic they share.

Two families (LibMTL semantics, /work/shared/docs/REFERENCE.md section 3):

* `LossWeighting` ("1x": one backward in total). The compiled step calls
  ``total, aux = strategy.loss(losses, present, state, rng, step)`` inside the function it
  differentiates. Gradients of `total` w.r.t. the model give the update. Gradients w.r.t. the
  strategy's trainable parameters are taken from the SAME backward: differentiate jointly w.r.t.
  ``(model_params, state.params)`` and let the engine's optimizer update ``state.params`` like any
  other parameter (LibMTL registers them as parameters of the model, so its optimizer trains
  them). After the step, ``state = strategy.update(state, losses, present, step,
  next_losses=...)`` advances the non-trainable state (DWA's loss history, FAMO's weights).

* `GradientBalancing` ("Tx": needs one gradient per task). The step computes the task-gradient
  matrix G [T, D] (flattened shared-parameter gradients, or gradients w.r.t. a shared
  representation: see `mtlx.weighting.grads`) and calls
  ``out, state, aux = strategy.combine(G, losses, present, state, rng, step)``.
  ``strategy.output`` says what `out` is:
    - 'weights' [T]: the shared update is ``out @ G`` (`grads.apply_weights`). Weights are what
      makes the shared-representation option possible (LibMTL `rep_grad`): the engine then
      back-propagates ``sum_i out_i * dL_i/drep`` through the encoder.
      ``strategy.supports_rep_grad`` follows LibMTL, which refuses rep_grad for PCGrad, CAGrad,
      Nash-MTL and DB-MTL because their result is defined on parameter gradients.
    - 'direction' [D]: the shared update itself (DB-MTL, whose direction mixes past gradients).
  ``aux['param_grads']`` holds gradients for ``state.params`` (GradNorm's loss scales; empty
  dict when there are none): the engine's optimizer applies them, as in the 1x family.
  ``aux['head_weights']`` [T] is the factor with which task i's own loss gradient reaches task
  i's task-specific parameters (heads), again as LibMTL does: per-task backward passes leave
  each head the gradient of its own, unweighted loss, except Nash-MTL (one backward of
  sum_i alpha_i L_i) and DB-MTL (its per-task backward is of log L_i).

Every strategy puts the per-task weights it actually used in ``aux['weights']`` [T] for logging.

Absent tasks (``present[i]`` False: no example of task i in the batch; its loss and gradient
are 0) get weight 0 and are left out of every normalisation (softmax over present tasks only,
Frank-Wolfe over present gradients only, ...), and their state is not advanced, so they neither
produce NaN nor bias the others. Every function here is pure, jit-able with static shapes, and
never branches in Python on data: `present` is data, so changing it does not retrace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

Array = Any


@flax.struct.dataclass
class WeightingState:
    """A strategy's state, a pytree of arrays (checkpointable with the rest of the train state).

    params: trainable parameters (UW's log-variances, GradNorm's loss scales), a dict of arrays.
            The engine's optimizer updates them from gradients taken through `loss` (1x) or from
            ``aux['param_grads']`` (Tx).
    stats:  non-trainable state advanced by the strategy itself (loss history, EMA buffers,
            FAMO's weights and their Adam moments), a dict of arrays.
    """
    params: Dict[str, Array] = flax.struct.field(default_factory=dict)
    stats: Dict[str, Array] = flax.struct.field(default_factory=dict)


def _hparam_error(strategy: str, key: str, message: str) -> ValueError:
    return ValueError(f"weighting strategy {strategy!r}: hyperparameter {key!r} {message}")


def require(condition: bool, strategy: str, key: str, message: str) -> None:
    """Raises ValueError naming the strategy and hyperparameter unless `condition` holds."""
    if not condition:
        raise _hparam_error(strategy, key, message)


class _Strategy:
    """Common behaviour; concrete strategies are frozen dataclasses (hashable, so they can be
    closed over by, or passed as static arguments to, a jitted step)."""
    name: ClassVar[str]
    needs_task_grads: ClassVar[bool]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the out-of-range hyperparameter."""

    def init(self, num_tasks: int, *, grad_dim: Optional[int] = None) -> WeightingState:
        check_num_tasks(self.name, num_tasks)
        return WeightingState()

    @property
    def hparams(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class LossWeighting(_Strategy):
    """One backward in total: `loss` builds the scalar to differentiate.

    needs_next_losses: whether `update` needs ``next_losses``, the same batch's losses after the
    optimizer step (one more forward, which the engine then runs): FAMO with after='same_batch'.
    """
    needs_task_grads: ClassVar[bool] = False
    needs_next_losses: ClassVar[bool] = False

    def loss(self, losses: Array, present: Array, state: WeightingState, rng: Array,
             step: Array) -> Tuple[Array, Dict[str, Array]]:
        raise NotImplementedError

    def update(self, state: WeightingState, losses: Array, present: Array, step: Array, *,
               next_losses: Optional[Array] = None) -> WeightingState:
        """Advances non-trainable state after the optimizer step (default: nothing to do)."""
        return state


class GradientBalancing(_Strategy):
    """One gradient per task: `combine` turns G [T, D] into weights [T] or a direction [D]."""
    needs_task_grads: ClassVar[bool] = True
    output: ClassVar[str] = "weights"
    supports_rep_grad: ClassVar[bool] = True

    def combine(self, grads: Array, losses: Array, present: Array, state: WeightingState,
                rng: Array, step: Array) -> Tuple[Array, WeightingState, Dict[str, Array]]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Input checks (trace time: shapes are static, so these never depend on data).

def check_num_tasks(strategy: str, num_tasks: Any) -> None:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"weighting strategy {strategy!r}: num_tasks must be a positive int, "
                         f"got {num_tasks!r}")


def check_inputs(strategy: str, losses: Array, present: Array, grads: Optional[Array] = None,
                 num_tasks: Optional[int] = None) -> Tuple[Array, Array]:
    """Validates shapes and returns (losses as float, present as bool)."""
    losses = jnp.asarray(losses)
    present = jnp.asarray(present)
    if losses.ndim != 1:
        raise ValueError(f"weighting strategy {strategy!r}: losses must have shape [T], "
                         f"got {losses.shape}")
    t = losses.shape[0]
    if present.shape != (t,):
        raise ValueError(f"weighting strategy {strategy!r}: present must have shape ({t},) like "
                         f"losses, got {present.shape}")
    if grads is not None and (jnp.ndim(grads) != 2 or jnp.shape(grads)[0] != t):
        raise ValueError(f"weighting strategy {strategy!r}: grads must have shape [T={t}, D], "
                         f"got {jnp.shape(grads)}")
    if num_tasks is not None and t != num_tasks:
        raise ValueError(f"weighting strategy {strategy!r}: got {t} task losses but the state "
                         f"was initialised for {num_tasks} tasks")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        losses = losses.astype(jnp.float32)
    return losses, present.astype(bool)


# ---------------------------------------------------------------------------------------------
# Masked arithmetic. Masked-out entries are replaced BEFORE any op that could overflow or divide
# by zero ("double where"), so neither values nor gradients pick up NaN from absent tasks.

def num_present(present: Array) -> Array:
    return jnp.sum(present.astype(jnp.float32))


def masked(x: Array, present: Array, fill: float = 0.0) -> Array:
    return jnp.where(present, x, jnp.asarray(fill, dtype=jnp.result_type(x)))


def masked_softmax(logits: Array, present: Array) -> Array:
    """Softmax over the present entries; 0 for absent ones; all zeros if none is present."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(present, logits, -jnp.inf)))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # -inf when nothing is present
    x = jnp.where(present, logits, m)       # absent entries: exp(0), never overflows
    e = masked(jnp.exp(x - m), present)
    total = jnp.sum(e)
    return e / jnp.where(total > 0, total, 1.0)


def masked_mean(x: Array, present: Array) -> Array:
    n = num_present(present)
    return jnp.sum(masked(x, present)) / jnp.maximum(n, 1.0)


def safe_div(num: Array, den: Array, ok: Array) -> Array:
    """num / den where `ok`, 0 elsewhere, without NaN in values or gradients."""
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def mask_gram(gram: Array, present: Array) -> Array:
    """Zeroes the rows and columns of absent tasks."""
    both = present[:, None] & present[None, :]
    return jnp.where(both, gram, 0.0)


def grad_norms(gram: Array) -> Array:
    """Per-task gradient norms from the Gram matrix (clipped at 0 against rounding)."""
    return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
