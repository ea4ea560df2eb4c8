"""The train state's many small leaves as a few stacked arrays at the jit boundary.

A jitted call pays host work for every array it takes and returns: on the dev CPU (jax
0.10.2) about 10 us per leaf of the train step, so the 3,519 leaves of the tiny adapters'
64-task state (64 tasks' adapters and heads, their AdamW moments) cost ~35 ms of dispatch a
step, more than the step's own ops grew by (BUILD_NOTES.md, "Task scaling: the state's
leaves"); on 2 cores that host work takes a core from the step's ops. Stacking every group of
same-shaped, same-dtype, same-sharding small leaves into one array ([k, *shape]) before the
call and taking them apart inside it (static slices that XLA fuses into their consumers)
makes the call handle a few dozen arrays instead.

Inside the step the state is the ordinary name-keyed pytree (`StackPlan.unpack`) for the
model and its gradients; the optimizer's update runs on the stacks again
(`mtlx.train.optim.make_optimizer(..., stacked=True)`: AdamW and SGD by `stacked_transform`,
one elementwise program a group of same-shaped leaves with the same masks; Adafactor, which
factors each leaf's moments by its shape, by `vmapped_transform`, its rule vmapped over each
group's stack), its state kept in the per-leaf form, and the updates are added to the parameters there too
(`StackedTransformation.update_and_apply`). The per-leaf values between them are rows of
stacks; stacked again (for the update, at the boundary's output) they fold back into their
stacks, since XLA merges adjacent slices of one array, so a many-task step's program does not
grow a kernel per leaf (tiny adapters, 64 tasks: 876 top-level ops against 698 for one task;
3,227 when the updates were added per leaf). Values equal the unstacked step's up to float32
rounding (the clipping norm sums in another order, XLA fuses differently: an ulp or two after
a few AdamW steps, tests/test_stacking.py). Outside the step the loop keeps a `Stacked` state and unstacks it for
evaluation and checkpoints, so checkpoints stay keyed by name (adding, removing or reordering
tasks keeps them loadable).

Which leaves stack: those of at most `max_leaf_size` elements (2^16), grouped by (shape,
dtype, sharding), groups of two or more; larger leaves (the backbone's kernels) and singletons
pass as they are. A stack's sharding is its leaves' with a leading unsharded axis.

Compile time: with the boundary stacked but the update per leaf, each per-leaf update read
its own rows of a stack and XLA:CPU stopped sharing one compiled kernel among identical
per-leaf fusions (4,595 kernel modules against 1,711): the tiny adapters' 64-task step
compiled in 61 s against 27 s. With the update on the stacks it compiles in 21 s against 23 s
unstacked (LoRA, 64 tasks: 14.1 against 14.8 s; BERT-base adapters, 8 tasks: 19.0 against
12.3 s), and with the updates added on the stacks too in 7.5 s (BERT-base: 14.2 s). Measured
(dev CPU, `scripts/ab_features.py stack_state off on`, float32): tiny adapters, 64 tasks,
1.35x faster; tiny LoRA, 64 tasks, 1.14x; BERT-base adapters, 8 tasks, 1.00x. 'auto' stacks
states of at least `AUTO_MIN_LEAVES` (1,024) leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MAX_LEAF_SIZE = 1 << 16
AUTO_MIN_LEAVES = 1024
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


_APART = object()  # a leaf's extra key that keeps it out of every group


def _group(leaves, extra_keys, max_leaf_size: int):
    """(groups, rest): the indices of the small (<= max_leaf_size elements, not PRNG-key) leaves
    grouped by (shape, dtype, extra key), groups of two or more in leaf order, and the indices
    of every other leaf."""
    by_key = {}
    for i, (x, extra) in enumerate(zip(leaves, extra_keys)):
        if (extra is _APART or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                or int(np.prod(np.shape(x), dtype=np.int64)) > max_leaf_size):
            continue
        by_key.setdefault((tuple(np.shape(x)), np.dtype(x.dtype).str, extra), []).append(i)
    groups = tuple(tuple(idx) for idx in by_key.values() if len(idx) > 1)
    grouped = {i for g in groups for i in g}
    return groups, tuple(i for i in range(len(leaves)) if i not in grouped)


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
        # only NamedShardings get a stacked sharding
        keys = [s if s is None or isinstance(s, NamedSharding) else _APART for s in sh]
        return cls(treedef, *_group(leaves, keys, max_leaf_size))

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


def put(tree: Any, plan: StackPlan, shardings: Any, donate: bool = False) -> Stacked:
    """The tree placed on its shardings (`sharding.tree_shardings`) and stacked, the stacks on
    `plan.shardings(shardings)`: the state a stacked `jit_train_step` takes."""
    return pack_fn(plan, plan.shardings(shardings), donate)(jax.device_put(tree, shardings))


def unpack_fn(plan: StackPlan) -> Callable:
    """Stacked -> tree for evaluation and checkpoints: the stacks' rows in one jitted program,
    the other leaves passed as they are (no copy of the backbone)."""
    rows = jax.jit(lambda stacks: [[arr[j] for j in range(len(g))]
                                   for g, arr in zip(plan.groups, stacks)])

    def unpack(stacked: Stacked) -> Any:
        return plan.assemble(rows(stacked.stacks), stacked.rest)
    return unpack


# ----------------------------------------------------------------------------- the update

_DUMMY = 1 << 30  # dummy leaf lengths that tell which state leaf shadows which parameter


def _shadows(tx, leaves, treedef, base: int):
    """Each leaf of tx.init's state, as (parameter index, its k-th shadow) or None (a state
    leaf of its own, e.g. Adam's count), found from an abstract init over dummy parameters
    of distinct lengths; and the state's treedef."""
    import jax.numpy as jnp
    dummy = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct((base + i,), jnp.dtype(x.dtype)) for i, x in enumerate(leaves)])
    state = jax.eval_shape(tx.init, dummy)
    seen, out = {}, []
    for x in jax.tree_util.tree_leaves(state):
        n = x.shape[0] - base if len(x.shape) == 1 and x.shape[0] >= base else -1
        if 0 <= n < len(leaves):
            k = seen.get(n, 0)
            seen[n] = k + 1
            out.append((n, k))
        else:
            out.append(None)
    return out, jax.tree_util.tree_structure(state)


def stacked_transform(build: Callable, params: Any, trainable: Optional[Any], decay_mask: Any,
                      max_leaf_size: int = MAX_LEAF_SIZE):
    """An optax transformation equal to ``build(trainable, decay_mask)`` whose update runs on
    the small leaves stacked per group of (shape, dtype, trainable, decayed): one elementwise
    program a group instead of one a leaf, which is what a many-task state costs in kernels
    (XLA:CPU compiles each distinct per-leaf fusion; the host launches each one).

    build(trainable, decay_mask) -> the per-leaf transformation (the same rule on any tree with
    these masks); it must be elementwise per leaf (AdamW, SGD; Adafactor, which factors by
    shape, takes `vmapped_transform`). The state is the per-leaf one (``init`` is build's own), so checkpoints stay keyed
    by name; inside ``update`` it is stacked, updated and taken apart again. Values equal the
    per-leaf update's up to float32 rounding (the clipping norm sums in another order)."""
    import jax.numpy as jnp
    import optax
    leaves, treedef = jax.tree_util.tree_flatten(params)
    train = [True] * len(leaves) if trainable is None else treedef.flatten_up_to(trainable)
    decay = treedef.flatten_up_to(decay_mask)
    # The stacked tree is the params' Stacked form (its groups' stacks, then the other leaves),
    # grouped so that each stack takes one rule.
    inner = StackPlan(treedef, *_group(leaves, [(bool(t), bool(d)) for t, d in zip(train, decay)],
                                       max_leaf_size))
    elems = list(inner.groups) + [(i,) for i in inner.rest]
    is_stack = [g < len(inner.groups) for g in range(len(elems))]

    def masks(flags):
        return Stacked(tuple(bool(flags[g[0]]) for g in inner.groups),
                       tuple(bool(flags[i]) for i in inner.rest))
    per_leaf = build(trainable, decay_mask)
    stacked = build(None if trainable is None else masks(train), masks(decay))
    s_leaves, s_def = jax.tree_util.tree_flatten(jax.eval_shape(inner.pack, params))
    leaf_map, leaf_def = _shadows(per_leaf, leaves, treedef, _DUMMY)
    elem_map, elem_def = _shadows(stacked, s_leaves, s_def, _DUMMY)
    own_leaf = [j for j, m in enumerate(leaf_map) if m is None]
    own_elem = [j for j, m in enumerate(elem_map) if m is None]
    if len(own_leaf) != len(own_elem):
        raise ValueError("mtlx.train.stacking.stacked_transform: the per-leaf and stacked "
                         "states differ in their own leaves; is the rule elementwise?")
    where = {m: j for j, m in enumerate(leaf_map) if m is not None}
    where_e = {m: j for j, m in enumerate(elem_map) if m is not None}
    row = {i: (g, r) for g, e in enumerate(elems) for r, i in enumerate(e)}

    def to_stacked(state):
        xs = jax.tree_util.tree_leaves(state)
        out = [None] * len(elem_map)
        for j, m in enumerate(elem_map):
            if m is None:
                continue
            e, k = elems[m[0]], m[1]
            parts = [xs[where[(i, k)]] for i in e]
            out[j] = jnp.stack(parts) if is_stack[m[0]] else parts[0]
        for a, b in zip(own_elem, own_leaf):
            out[a] = xs[b]
        return jax.tree_util.tree_unflatten(elem_def, out)

    def to_per_leaf(state_s):
        xs = jax.tree_util.tree_leaves(state_s)
        out = [None] * len(leaf_map)
        for j, m in enumerate(leaf_map):
            if m is None:
                continue
            g, r = row[m[0]]
            x = xs[where_e[(g, m[1])]]
            out[j] = x[r] if is_stack[g] else x
        for a, b in zip(own_leaf, own_elem):
            out[a] = xs[b]
        return jax.tree_util.tree_unflatten(leaf_def, out)

    def on_stacks(updates, state, params):
        """(stacked params or None, stacked updates, the per-leaf new state)."""
        s_params = None if params is None else inner.pack(params)
        new, s_state = stacked.update(inner.pack(updates), to_stacked(state), s_params)
        return s_params, new, to_per_leaf(s_state)

    def update(updates, state, params=None):
        _, new, state = on_stacks(updates, state, params)
        return inner.unpack(new), state

    def update_and_apply(grads, state, params):
        # The parameters move on the stacks too: adding per leaf would be one program a leaf
        # (1,076 in the tiny adapters' 64-task step), while rows taken from a stack and stacked
        # again at the jit boundary fold back into that stack (XLA merges adjacent slices).
        s_params, new, state = on_stacks(grads, state, params)
        return inner.unpack(optax.apply_updates(s_params, new)), state

    return StackedTransformation(per_leaf.init, update, update_and_apply)


class StackedTransformation(NamedTuple):
    """An optax transformation (init, update) with `update_and_apply(grads, state, params) ->
    (params, state)`, which `mtlx.train.optim.update_params` prefers: the updates are added to
    the parameters on the stacks."""
    init: Callable
    update: Callable
    update_and_apply: Callable


def vmapped_transform(build: Callable, params: Any, trainable: Optional[Any], decay_mask: Any,
                      clip: Optional[Any] = None, max_leaf_size: int = MAX_LEAF_SIZE):
    """An optax transformation equal to ``chain(clip on the trainable leaves, build(trainable,
    decay_mask))`` for a per-leaf rule that is not elementwise (Adafactor: it factors a leaf's
    second moment by the leaf's shape and scales by its block RMS): each group of same-shaped
    small leaves (same dtype and masks) is one stack, and the rule runs on it under `jax.vmap`
    over the stack's leading axis, so a leaf's update sees its own shape; the other leaves
    together take the rule once, as the per-leaf update would.

    build(trainable, decay_mask) -> the per-leaf rule on any tree with these masks (a bare
    bool for a single array); it must not reduce across leaves (a global norm clip goes in
    `clip`: a stateless transformation run on the trainable leaves before the rule; build puts
    a stateless identity where the clip was, so the state's structure is the full rule's). The
    state is the per-leaf one (``init`` is build's own), so checkpoints stay keyed by name.
    Which state leaf belongs to which parameter is read from the state's key paths: a leaf of
    the rule's state on a bare array sits at a path P, its per-leaf counterparts at P followed
    by each parameter's path (a leaf of the rule's own, such as a step count, at P itself; every
    stacked row holds a copy, equal by construction)."""
    import jax.numpy as jnp
    import optax
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    train = [True] * len(leaves) if trainable is None else treedef.flatten_up_to(trainable)
    decay = treedef.flatten_up_to(decay_mask)
    inner = StackPlan(treedef, *_group(leaves, [(bool(t), bool(d)) for t, d in zip(train, decay)],
                                       max_leaf_size))
    # the elements: each stack (a bare array, vmapped) and the other leaves as one tuple, i.e.
    # the plan's Stacked form as a list
    elems = [(g, True) for g in inner.groups] + ([(inner.rest, False)] if inner.rest else [])

    def as_list(stacked: Stacked) -> list:
        return list(stacked.stacks) + ([stacked.rest] if inner.rest else [])

    def as_stacked(values: list) -> Stacked:
        return Stacked(tuple(values[:len(inner.groups)]),
                       tuple(values[-1]) if inner.rest else ())
    # the trainable leaves of the Stacked form (whole stacks, the other leaves one by one)
    train_mask = jax.tree_util.tree_leaves(Stacked(
        tuple(bool(train[g[0]]) for g in inner.groups), tuple(bool(train[i]) for i in inner.rest)))

    def flags(values, g, is_stack):
        return bool(values[g[0]]) if is_stack else tuple(bool(values[i]) for i in g)
    rules = [build(None if trainable is None else flags(train, g, s), flags(decay, g, s))
             for g, s in elems]
    full_rule = build(trainable, decay_mask)
    full_abs = jax.eval_shape(full_rule.init, params)
    full_leaves, full_def = jax.tree_util.tree_flatten_with_path(full_abs)
    at = {tuple(p): j for j, (p, _) in enumerate(full_leaves)}

    # per element: its state's treedef, and for each of its state leaves ('shadow', the full
    # state's index for each of the element's leaves) or ('own', the full state's index)
    layout, covered = [], set()
    for (g, is_stack), rule in zip(elems, rules):
        # a stack's rule runs on one row (vmapped), the other leaves' on their tuple
        e_abs = jax.eval_shape(rule.init, leaves[g[0]] if is_stack
                               else tuple(leaves[i] for i in g))
        kinds = []
        for p, _ in jax.tree_util.tree_flatten_with_path(e_abs)[0]:
            p = tuple(p)
            if is_stack:
                where = [at.get(p + paths[i]) for i in g]
            elif p and isinstance(p[-1], jax.tree_util.SequenceKey):
                where = [at.get(p[:-1] + paths[g[p[-1].idx]])]
            else:
                where = [None]
            if None not in where:
                kinds.append(("shadow", where))
                covered.update(where)
            elif p in at:
                kinds.append(("own", at[p]))
                covered.add(at[p])
            else:
                raise ValueError(f"mtlx.train.stacking.vmapped_transform: the state leaf "
                                 f"{jax.tree_util.keystr(p)} of a group's rule has no per-leaf "
                                 f"counterpart; is the rule per leaf?")
        layout.append((jax.tree_util.tree_structure(e_abs), kinds))
    if len(covered) != len(full_leaves):
        raise ValueError("mtlx.train.stacking.vmapped_transform: the per-leaf state has leaves "
                         "that no group's state holds; is the rule per leaf?")

    def to_elements(state):
        xs = jax.tree_util.tree_leaves(state)
        out = []
        for (g, is_stack), (e_def, kinds) in zip(elems, layout):
            parts = []
            for kind, j in kinds:
                if kind == "own":
                    x = xs[j]
                    parts.append(jnp.broadcast_to(x, (len(g),) + x.shape) if is_stack else x)
                else:
                    parts.append(jnp.stack([xs[i] for i in j]) if is_stack else xs[j[0]])
            out.append(jax.tree_util.tree_unflatten(e_def, parts))
        return out

    def to_per_leaf(states):
        out = [None] * len(full_leaves)
        for (g, is_stack), (_, kinds), st in zip(elems, layout, states):
            for (kind, j), x in zip(kinds, jax.tree_util.tree_leaves(st)):
                if kind == "own":
                    if out[j] is None:  # every row and element holds the same value
                        out[j] = x[0] if is_stack else x
                elif is_stack:
                    for r, i in enumerate(j):
                        out[i] = x[r]
                else:
                    out[j[0]] = x
        return jax.tree_util.tree_unflatten(full_def, out)

    def on_elements(grads, state, params):
        """(the elements' params or None, their updates, the per-leaf new state)."""
        g_s = inner.pack(grads)
        if clip is not None:
            # the trainable leaves' gradients clipped together, as the per-leaf chain clips them
            flat, s_def = jax.tree_util.tree_flatten(g_s)
            picked = [x for x, t in zip(flat, train_mask) if t]
            clipped = iter(clip.update(picked, clip.init(picked))[0])
            g_s = jax.tree_util.tree_unflatten(
                s_def, [next(clipped) if t else x for x, t in zip(flat, train_mask)])
        gs = as_list(g_s)
        ps = None if params is None else as_list(inner.pack(params))
        new, states = [], []
        for j, ((g, is_stack), rule, st) in enumerate(zip(elems, rules, to_elements(state))):
            p = None if ps is None else ps[j]
            if is_stack:
                u, s = jax.vmap(rule.update, in_axes=(0, 0, None if p is None else 0))(gs[j], st, p)
            else:
                u, s = rule.update(gs[j], st, p)
            new.append(u)
            states.append(s)
        return ps, new, to_per_leaf(states)

    def update(updates, state, params=None):
        _, new, state = on_elements(updates, state, params)
        return inner.unpack(as_stacked(new)), state

    def update_and_apply(grads, state, params):
        ps, new, state = on_elements(grads, state, params)
        return inner.unpack(as_stacked(optax.apply_updates(ps, new))), state

    return StackedTransformation(full_rule.init, update, update_and_apply)
