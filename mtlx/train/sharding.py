"""Device mesh (data, fsdp, tensor), logical axis rules, and shardings for state and batch.

Parameters get LOGICAL axis names from their path (rules below, MaxText-style), and logical
names map to mesh axes by `LOGICAL_TO_MESH`:

    batch -> (data, fsdp)     examples are split over both data-parallel axes
    embed -> fsdp             FSDP/ZeRO-3: weights sharded along the model dimension
    mlp, heads, vocab -> tensor   Megatron-style tensor parallelism of the wide dimension

`jax.jit(step, in_shardings=..., out_shardings=...)` is pjit (jax.experimental.pjit is
deprecated); the mesh is a plain `Mesh` (Auto axis types) so XLA propagates activations'
shardings and inserts the collectives. A dimension that the mesh axes do not divide stays
replicated (tiny test models, odd head counts), never an error.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtlx.models.policy import TracePolicy
from mtlx.train.optim import path_str

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_TO_MESH = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
}

# (regex on the '/'-joined path, logical axes of the leaf). First match wins; the regexes
# are anchored at the END so they also match optimizer-state leaves (.../mu/<param path>).
PARAM_RULES = (
    (r"(query|key|value)/kernel$", ("embed", "heads")),
    (r"(query|key|value)/bias$", ("heads",)),
    (r"(ffn/input|ffn/gate)/kernel$", ("embed", "mlp")),
    (r"(ffn/input|ffn/gate)/bias$", ("mlp",)),
    (r"attention/output/kernel$", ("heads", "embed")),
    (r"ffn/output/kernel$", ("mlp", "embed")),
    (r"(word_embeddings|shared|embed_tokens)/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(position_embeddings|token_type_embeddings)/embedding$", (None, "embed")),
)


def make_mesh(shape: Optional[Mapping[str, int]] = None, devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). One axis may be -1 (all remaining devices).

    `shape` like {'data': -1, 'fsdp': 1, 'tensor': 1} (the default: pure data parallelism).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh: unknown axis {sorted(unknown)}; axes are {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {shape}: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, {len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def _mesh_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(mesh: Mesh, logical: Sequence[Optional[str]], shape: Sequence[int]) -> P:
    """PartitionSpec for a leaf; dims the mesh axes do not divide stay replicated."""
    spec = []
    for name, dim in zip(logical, shape):
        axes = LOGICAL_TO_MESH.get(name) if name else None
        if axes is None or _mesh_size(mesh, axes) == 1 or dim % _mesh_size(mesh, axes):
            spec.append(None)
        else:
            spec.append(axes)
    return P(*spec)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer or train state)."""
    def one(path, x):
        shape = np.shape(x)
        return NamedSharding(mesh, spec_for(mesh, logical_axes(path_str(path), len(shape)), shape))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, batch: Any) -> Any:
    """Every batch leaf split along its leading (example) axis over (data, fsdp)."""
    def one(x):
        ndim = len(np.shape(x))
        return NamedSharding(mesh, P(LOGICAL_TO_MESH["batch"], *([None] * (ndim - 1))))
    return jax.tree_util.tree_map(one, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def in_mesh(fn, mesh: Mesh):
    """fn traced with `mesh` as the abstract mesh of the context, where the model reads it
    (`mtlx.models.embed.lookup`: the embedding's gradient under FSDP)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


# Whether `constrain` pins (the A/B of scripts/collectives.py --grad-constraint, tests).
GRAD_CONSTRAINTS = ("on", "off")
_GRAD_CONSTRAINT = TracePolicy("mtlx.train.sharding", GRAD_CONSTRAINTS, "on")
grad_constraint_policy = _GRAD_CONSTRAINT.scope   # ``with grad_constraint_policy('off'): ...``


def constrain(tree: Any) -> Any:
    """The tree (params, their gradients) constrained to the shardings the rules give its
    paths, under the abstract mesh of the tracing context (`in_mesh`); without one (or with
    the policy 'off') unchanged. The train step pins the gradients so, before the optimizer:
    XLA otherwise may compute a replicated parameter's update sharded and all-gather the
    parameter and both moments."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or _GRAD_CONSTRAINT.get() == "off":
        return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, tree_shardings(mesh, tree))


def jit_train_step(step_fn, mesh: Mesh, abstract_state: Any, abstract_batch: Any, donate: bool = True,
                   stack=None):
    """`jax.jit` with shardings (= pjit): state sharded by rules, batch over (data, fsdp),
    metrics replicated, the old state's buffers donated to the new one.

    stack: a `mtlx.train.stacking.StackPlan` of the state (made with these shardings): the
    jitted step then takes and returns the state in its `Stacked` form, and the shardings
    returned are that form's."""
    state_sh = tree_shardings(mesh, abstract_state)
    step_fn = in_mesh(step_fn, mesh)
    if stack is not None:
        from mtlx.train import stacking
        step_fn, state_sh = stacking.stacked_step(step_fn, stack), stack.shardings(state_sh)
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(mesh, abstract_batch)),
                   out_shardings=(state_sh, replicated(mesh)),
                   donate_argnums=(0,) if donate else ()), state_sh
