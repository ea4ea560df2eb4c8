"""The train state's many small leaves as a few stacked arrays at the jit boundary.

A jitted call pays host work for every array it takes and returns: on the dev CPU (jax
0.10.2) about 10 us per leaf of the train step, so the 3,519 leaves of the tiny adapters'
64-task state (64 tasks' adapters and heads, their AdamW moments) cost ~35 ms of dispatch a
step, more than the step's own ops grew by (BUILD_NOTES.md, "Task scaling: the state's
leaves"); on 2 cores that host work takes a core from the step's ops. Stacking every group of
same-shaped, same-dtype, same-sharding small leaves into one array ([k, *shape]) before the
call and taking them apart inside it (static slices that XLA fuses into their consumers)
makes the call handle a few dozen arrays instead.

Only the jit boundary changes. Inside the step the state is the ordinary name-keyed pytree
(`StackPlan.unpack`), the step's code, its gradients and the optimizer are untouched; the
values equal the unstacked step's up to float32 rounding (XLA fuses the two programs
differently: an ulp or two after a few AdamW steps, tests/test_stacking.py). Outside it the loop
keeps a `Stacked` state and unstacks it for evaluation and checkpoints, so checkpoints stay keyed
by name (adding, removing or reordering tasks keeps them loadable).

Which leaves stack: those of at most `max_leaf_size` elements (2^16), grouped by (shape,
dtype, sharding), groups of two or more; larger leaves (the backbone's kernels) and singletons
pass as they are. A stack's sharding is its leaves' with a leading unsharded axis.

Cost: compile time. Each per-leaf update then reads its own rows of a stack, so XLA:CPU no
longer shares one compiled kernel among the many identical per-leaf updates (4,595 kernels
against 1,711 for the tiny adapters' 64-task step): that step compiled in 61 s stacked against
27 s unstacked, the BERT-base adapters' 8-task step (2,661 leaves) in 50 s against 14 s (dev
CPU). Optimization barriers, dynamic row indices and in-place row updates did not bring it
down (39-78 s). So 'auto' stacks only states of at least `AUTO_MIN_LEAVES` (3,072) leaves,
where the host's ~10 us a leaf (~30 ms a step) pays back the compile in a few thousand steps.
Measured (dev CPU, `scripts/ab_features.py stack_state off auto`): the tiny adapters' 64-task
step (3,519 leaves) 1.25x faster; BERT-base adapters, 8 tasks, 'on': 1.08x (within noise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MAX_LEAF_SIZE = 1 << 16
AUTO_MIN_LEAVES = 3072
SETTINGS = ("auto", "on", "off")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Stacked:
    """A pytree's leaves at the jit boundary: `stacks` (each [k, *shape], k leaves of one group)
    and `rest` (the leaves that do not stack, in the tree's leaf order)."""
    stacks: Tuple[Any, ...]
    rest: Tuple[Any, ...]

    def tree_flatten(self):
        return (self.stacks, self.rest), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(tuple(children[0]), tuple(children[1]))


def _eligible(x, max_leaf_size: int) -> bool:
    dtype = np.dtype(x.dtype) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else None
    return dtype is not None and int(np.prod(np.shape(x), dtype=np.int64)) <= max_leaf_size


@dataclasses.dataclass(frozen=True)
class StackPlan:
    """Which leaves of a pytree (of one tree structure) travel stacked: a static plan, made once
    from the tree's shapes (arrays or ShapeDtypeStructs) and, when sharded, its shardings."""
    treedef: Any
    groups: Tuple[Tuple[int, ...], ...]   # leaf indices of each stack, in leaf order
    rest: Tuple[int, ...]                 # leaf indices passed as they are

    @classmethod
    def for_tree(cls, tree: Any, shardings: Any = None,
                 max_leaf_size: int = MAX_LEAF_SIZE) -> "StackPlan":
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if shardings is None:
            sh = [None] * len(leaves)
        else:
            sh = treedef.flatten_up_to(shardings)
        by_key = {}
        for i, (x, s) in enumerate(zip(leaves, sh)):
            if not _eligible(x, max_leaf_size):
                continue
            if s is not None and not isinstance(s, NamedSharding):
                continue  # only NamedShardings get a stacked sharding
            key = (tuple(np.shape(x)), np.dtype(x.dtype).str, s)
            by_key.setdefault(key, []).append(i)
        groups = tuple(tuple(idx) for idx in by_key.values() if len(idx) > 1)
        stacked = {i for g in groups for i in g}
        rest = tuple(i for i in range(len(leaves)) if i not in stacked)
        return cls(treedef, groups, rest)

    @property
    def num_leaves(self) -> int:
        return self.treedef.num_leaves

    @property
    def num_arrays(self) -> int:
        """Arrays a call takes for the tree when stacked."""
        return len(self.groups) + len(self.rest)

    def _leaves(self, tree) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"mtlx.train.stacking: the tree's structure differs from the plan's "
                             f"({treedef.num_leaves} leaves against {self.num_leaves})")
        return leaves

    def pack(self, tree: Any) -> Stacked:
        """The tree as stacks + rest (jnp.stack: inside jit a fused copy; outside, eager ops)."""
        import jax.numpy as jnp
        leaves = self._leaves(tree)
        return Stacked(tuple(jnp.stack([leaves[i] for i in g]) for g in self.groups),
                       tuple(leaves[i] for i in self.rest))

    def unpack(self, stacked: Stacked) -> Any:
        """The name-keyed tree back (row j of a stack is its group's j-th leaf)."""
        if len(stacked.stacks) != len(self.groups) or len(stacked.rest) != len(self.rest):
            raise ValueError(f"mtlx.train.stacking: {len(stacked.stacks)} stacks and "
                             f"{len(stacked.rest)} other leaves, the plan has {len(self.groups)} "
                             f"and {len(self.rest)}")
        return self.assemble([[arr[j] for j in range(len(g))]
                              for g, arr in zip(self.groups, stacked.stacks)], stacked.rest)

    def assemble(self, rows: Sequence[Sequence[Any]], rest: Sequence[Any]) -> Any:
        """The tree from each stack's rows (in its group's order) and the other leaves."""
        out = [None] * self.num_leaves
        for g, parts in zip(self.groups, rows):
            for i, x in zip(g, parts):
                out[i] = x
        for i, x in zip(self.rest, rest):
            out[i] = x
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def shardings(self, shardings: Any) -> Stacked:
        """The Stacked form's shardings from the tree's: a stack gets its leaves' NamedSharding
        with an unsharded leading axis."""
        sh = self.treedef.flatten_up_to(shardings)

        def stacked(s):
            return NamedSharding(s.mesh, P(None, *s.spec))
        return Stacked(tuple(stacked(sh[g[0]]) for g in self.groups),
                       tuple(sh[i] for i in self.rest))

    def abstract(self, tree: Any) -> Stacked:
        """ShapeDtypeStructs of the Stacked form (no arrays made)."""
        return jax.eval_shape(self.pack, tree)


def wants_stacking(setting: Any, tree: Any, key: str = "config.stack_state") -> bool:
    """'on' / True, 'off' / False, or 'auto': stacking when the tree has at least
    AUTO_MIN_LEAVES leaves."""
    if setting is True or setting is False:
        return bool(setting)
    if setting not in SETTINGS:
        raise ValueError(f"{key}: {setting!r} is not one of {list(SETTINGS)}")
    if setting == "auto":
        return len(jax.tree_util.tree_leaves(tree)) >= AUTO_MIN_LEAVES
    return setting == "on"


def stacked_step(step_fn: Callable, plan: StackPlan) -> Callable:
    """step(state, batch) -> (state, metrics) as step(Stacked, batch) -> (Stacked, metrics)."""
    def step(stacked_state, batch):
        state, metrics = step_fn(plan.unpack(stacked_state), batch)
        return plan.pack(state), metrics
    return step


def pack_fn(plan: StackPlan, shardings: Optional[Stacked] = None, donate: bool = False) -> Callable:
    """A jitted tree -> Stacked (one program instead of an eager op per leaf); donate: the
    tree's buffers are given up (its large leaves pass without a copy)."""
    packed = jax.jit(plan.pack, out_shardings=shardings, donate_argnums=(0,) if donate else ())
    if not donate:
        return packed

    def pack(tree):
        import warnings
        with warnings.catch_warnings():
            # The stacked leaves' buffers cannot become the stacks (other shapes): expected.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return packed(tree)
    return pack


def unpack_fn(plan: StackPlan) -> Callable:
    """Stacked -> tree for evaluation and checkpoints: the stacks' rows in one jitted program,
    the other leaves passed as they are (no copy of the backbone)."""
    rows = jax.jit(lambda stacks: [[arr[j] for j in range(len(g))]
                                   for g, arr in zip(plan.groups, stacks)])

    def unpack(stacked: Stacked) -> Any:
        return plan.assemble(rows(stacked.stacks), stacked.rest)
    return unpack
