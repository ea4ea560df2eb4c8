"""Optimizers, schedules and what trains: optax all the way down.

`trainable_mask(params, patterns)` picks the parameters that train by regular expressions over
their '/'-joined paths (e.g. heads + adapters + layer norms); frozen parameters get
`optax.set_to_zero()` through `optax.multi_transform`, so they stay bit-identical, receive no
weight decay and hold no optimizer state.

The global gradient norm (clipping and the 'grad_norm' metric) is `global_norm`: the small leaves
of a shape and dtype stacked in chunks, one sum of squares (float32) a chunk, instead of optax's
one reduction a leaf. A multi-task model has many small per-task leaves (BERT-base adapters, 8
tasks: 768), and on the H100 the compiled 8-task step ran ~600 more reduction kernels than the
shared encoder's, each too small to hide its launch (BUILD_NOTES.md). Stacked, not raveled and
concatenated: the per-task gradients of one site are the rows of one array (the gradient of
the model's stack of the tasks' weights), and XLA folds a stack of adjacent rows back into
that array, where a concatenation of raveled rows costs a copy kernel a leaf (1,215 of them in
the tiny adapters' 64-task step, twelfth session). The choice is a trace-time policy,
`grad_norm_policy('per_leaf')` for optax's formula (the benchmark's A/B,
mtlx.bench.workload.Features.grad_norm).

`update_params(tx, grads, opt_state, params)` is the step's update and apply: a transformation
with its own `update_and_apply` (the stacked one, `mtlx.train.stacking.stacked_transform`) adds
the updates to the parameters on its stacks.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import optax

from mtlx.models.policy import TracePolicy

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
GRAD_NORMS = ("grouped", "per_leaf")
_GRAD_NORM = TracePolicy("mtlx.train.optim", GRAD_NORMS, "grouped")
set_grad_norm_policy = _GRAD_NORM.set      # (name) -> the previous policy
grad_norm_policy = _GRAD_NORM.scope        # ``with grad_norm_policy('per_leaf'): ...``
# Leaves a concatenation: bounded so that a fused reduction's operands stay few (a GPU kernel's
# parameters are limited; XLA splits larger fusions).
NORM_CHUNK = 64
# Only leaves this small are concatenated: a large leaf's reduction is a large kernel anyway,
# and concatenating leaves sharded differently would make XLA gather them first (FSDP / tensor
# parallelism); small leaves (biases, norms, adapters, LoRA, heads) are few bytes to move.
NORM_SMALL_LEAF = 1 << 16


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all the tree's leaves together (float32). 'grouped' (the default): the
    small leaves (at most NORM_SMALL_LEAF elements) of each shape and dtype, in leaf order,
    stacked NORM_CHUNK at a time, each stack squared and summed in float32, larger leaves one
    sum each; 'per_leaf': optax.tree.norm (a sum per leaf, in the leaf's dtype)."""
    if _GRAD_NORM.value == "per_leaf":
        return optax.tree.norm(tree).astype(jnp.float32)
    groups: dict = {}
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree_util.tree_leaves(tree):
        if x.size > NORM_SMALL_LEAF:
            total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
        else:
            groups.setdefault((tuple(x.shape), jnp.dtype(x.dtype)), []).append(x)
    for xs in groups.values():
        for i in range(0, len(xs), NORM_CHUNK):
            part = xs[i:i + NORM_CHUNK]
            block = part[0] if len(part) == 1 else jnp.stack(part)
            total = total + jnp.sum(jnp.square(block.astype(jnp.float32)))
    return jnp.sqrt(total)


def update_params(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                  params: Any):
    """(new params, new optimizer state): ``tx.update`` then ``optax.apply_updates``, or the
    transformation's own `update_and_apply` when it has one (the stacked update adds the
    updates on its stacks: one program a group instead of one a leaf)."""
    fused = getattr(tx, "update_and_apply", None)
    if fused is not None:
        return fused(grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with the norm of `global_norm` (same rule: updates scaled by
    max_norm / norm when the norm is at least max_norm)."""
    def update_fn(updates, state, params=None):
        del params
        g_norm = global_norm(updates)
        trigger = g_norm < max_norm

        def clip_fn(t):
            return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
        return jax.tree_util.tree_map(clip_fn, updates), state
    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any, patterns: Optional[Sequence[str]]) -> Any:
    """Bool pytree: True where the '/'-joined path matches any pattern (None or () = all train).

    A pattern that matches no parameter is an error naming it (a typo would otherwise freeze
    everything silently).
    """
    if not patterns:
        return jax.tree_util.tree_map(lambda _: True, params)
    compiled = [(p, re.compile(p)) for p in patterns]
    flat = tu.flatten_dict(params, sep="/")
    used = {p: False for p in patterns}
    mask = {}
    for k in flat:
        hit = False
        for p, rx in compiled:
            if rx.search(k):
                used[p] = hit = True
        mask[k] = hit
    unused = [p for p, u in used.items() if not u]
    if unused:
        raise ValueError(f"config.trainable: pattern(s) {unused} match no parameter; "
                         f"example paths: {list(flat)[:5]}")
    return tu.unflatten_dict(mask, sep="/")


FROZEN_DTYPES = ("bfloat16", "float16")


def cast_frozen_kernels(params: Any, trainable: Optional[Any], dtype: Optional[str],
                        compute_dtype: Any = None, key: str = "config.model.frozen_dtype") -> Any:
    """Frozen matrix weights (leaves named 'kernel') stored in the compute dtype `dtype`.

    A bf16 model casts every kernel to bf16 in every step (a frozen BERT-base backbone: 85 M
    weights read as float32 and written as bf16 per step); stored in bf16, the cast is gone and
    the frozen backbone takes half the memory. The step computes the same values: those kernels
    were rounded to the compute dtype before every product anyway (round-to-nearest-even both
    ways). Biases, layer norms and embedding tables stay as they are (they are used in float32
    or are small), and trainable leaves keep their float32 master copies. `dtype` None: no-op.
    """
    if dtype is None:
        return params
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"{key}={dtype!r}: must be None or one of {list(FROZEN_DTYPES)}")
    import jax.numpy as jnp
    if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.dtype(dtype):
        raise ValueError(f"{key}={dtype!r} stores frozen kernels in the compute dtype, but the "
                         f"model computes in {jnp.dtype(compute_dtype).name} (config.model.dtype): "
                         f"rounding its weights would change what it computes")
    if trainable is None:
        return params
    target = jnp.dtype(dtype)

    def cast(path, x, t):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if t or name != "kernel" or getattr(x, "ndim", 0) < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(target)
    return jax.tree_util.tree_map_with_path(cast, params, trainable)


def make_schedule(cfg) -> optax.Schedule:
    """Warmup (linear from 0) then constant / linear decay to 0 / cosine decay to 0."""
    lr, warmup, total = float(cfg.learning_rate), int(cfg.warmup_steps), int(cfg.num_train_steps)
    kind = cfg.get("schedule", "linear")
    if kind not in SCHEDULES:
        raise ValueError(f"config.schedule: unknown schedule {kind!r}; known: {list(SCHEDULES)}")
    if warmup < 0 or total <= 0:
        raise ValueError(f"config.warmup_steps ({warmup}) must be >= 0 and config.num_train_steps ({total}) > 0")
    decay_steps = max(total - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps)}[kind]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    # No weight decay on biases, layer norms and embeddings' scales (BERT's recipe).
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.ndim > 1 and "norm" not in path_str(p).lower(), params)


def make_optimizer(cfg, params: Any, trainable: Optional[Any] = None,
                   stacked: bool = False) -> optax.GradientTransformation:
    """The full update rule: clip -> optimizer(schedule) on trainable params, zero elsewhere.

    stacked: the update runs on the small same-shaped leaves stacked per group (the state stays
    the per-leaf, name-keyed one): AdamW and SGD on the stacks as they are
    (`mtlx.train.stacking.stacked_transform`: a few large elementwise programs instead of one
    per leaf), Adafactor vmapped over each stack (`stacking.vmapped_transform`: it factors a
    leaf's moments by the leaf's shape)."""
    name = cfg.get("optimizer", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer: unknown optimizer {name!r}; known: {list(OPTIMIZERS)}")
    if stacked:
        from mtlx.train import stacking
        if name == "adafactor":
            clip = cfg.get("grad_clip_norm", None)
            return stacking.vmapped_transform(
                lambda tr, dm: _build(cfg, tr, dm, clip=False), params, trainable,
                _decay_mask(params), clip=clip_by_global_norm(float(clip)) if clip else None)
        return stacking.stacked_transform(lambda tr, dm: _build(cfg, tr, dm), params, trainable,
                                          _decay_mask(params))
    return _build(cfg, trainable, _decay_mask)


def _build(cfg, trainable: Optional[Any], decay_mask,
           clip: bool = True) -> optax.GradientTransformation:
    """The rule; clip=False: a stateless identity where the global-norm clip goes (the caller
    clips; the state's structure stays the same)."""
    name = cfg.get("optimizer", "adamw")
    sched = make_schedule(cfg)
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adamw":
        opt = optax.adamw(sched, b1=cfg.get("adam_b1", 0.9), b2=cfg.get("adam_b2", 0.999),
                          eps=cfg.get("adam_eps", 1e-8), weight_decay=wd, mask=decay_mask)
    elif name == "adafactor":
        opt = optax.adafactor(sched, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    else:
        opt = optax.sgd(sched, momentum=cfg.get("momentum", None))
    chain = []
    max_norm = cfg.get("grad_clip_norm", None)
    if max_norm:
        chain.append(clip_by_global_norm(float(max_norm)) if clip else optax.identity())
    chain.append(opt)
    tx = optax.chain(*chain)
    if trainable is None:
        return tx
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
