"""Per-example routing of task-specific weights inside one forward pass.

A mixed-task batch holds examples of several tasks; each example must use ITS task's weights.
Weights of G tasks are stacked along a leading axis ([G, ...]) and every example carries a
group index (its task's row in that stack). Three ways to multiply, all exact:

  'gather'  every example gathers its own weight matrix (``w[group]``, [B, k, n]) and one
            batched matmul runs over the batch. Cost and memory grow with B, not with G: the
            right choice when the per-example matrices are small (adapters, LoRA), which is
            the case this library serves (S-LoRA/Punica's "gather" kernel, in XLA).
  'ragged'  examples are sorted by group, the rows of each group form one contiguous block,
            `jax.lax.ragged_dot` multiplies each block by its group's matrix (a grouped GEMM,
            as MegaBlocks / Punica's SGMV), and the result is unsorted.
  'onehot'  one dense GEMM over ALL groups' matrices side by side, each example keeping only
            its own group's part: with k <= n the input is spread into its group's slot
            ([B, ..., G, k], zeros elsewhere) and contracted with w as one [G k, n] matrix;
            with k > n every group's output is computed ([B, ..., G, n]) and the example's own
            is selected. G times the FLOPs of the routed product, but one large tensor-core
            GEMM instead of B small ones and no scatter-add of per-example weight gradients:
            meant for accelerators with few tasks (adapters, LoRA: G k or G n of a few
            hundred). The other groups contribute zeros (gather's result up to rounding).

With a single group (one task) all fall back to one plain matmul, so a one-task model pays
no routing cost. `scripts/bench_routing.py` measures them on the machine at hand; the
measured choice is the default (`DEFAULT_IMPL`).

Per-token routing. Packed rows that mix tasks (`mtlx.data.packing`, ``mix_tasks``) give each
TOKEN its task: `group` is then [B, L] instead of [B], and x [B, L, ..., k]. Every function
here takes either. 'gather' has no per-token form (a weight matrix per token would be
B L k n numbers), so per-token routing runs 'gather' as 'onehot' for up to
`PER_TOKEN_ONEHOT_MAX_GROUPS` groups (G x the FLOPs) and as 'ragged' beyond (a sort, no
G-fold work); 'ragged' and 'onehot' stay what they are.

Gathered rows' gradients. The gradient of a gather (``w[group]``) sums each example's row back
into its group's row. Autodiff writes that as a scatter-add, which on a GPU is atomic adds with
B/G examples contending for every address: on an H100 the 48 scatter-adds of the BERT-base
adapters' 8-task step (B=128) took 4.3 ms of its 37 ms (BUILD_NOTES.md). `take_rows` gathers
the same rows with that sum written as a contraction with the examples' one-hot group matrix
([G, B] x [B, k n]: 2 B G k n FLOPs, one small GEMM, float32 accumulation, exact: each sum's
terms are the same numbers, only their order differs). Which one is traced is a trace-time
policy (`gather_grad`): 'auto' (the contraction on accelerators, the scatter-add on a CPU, where
XLA adds rows in a loop without atomics and G x the FLOPs would cost more), 'onehot', 'scatter'.

The functions here are plain functions of arrays: the hypernetworks (mtlx.peft.hyper) call
them with weights they generate, the extension modules with weights they own.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mtlx.models import precision as mp
from mtlx.models.policy import TracePolicy

IMPLEMENTATIONS = ("gather", "ragged", "onehot")
# Chosen by scripts/bench_routing.py on CPU (its docstring has the numbers): with 'gather' 8
# routed tasks cost the same as 1 task within noise (ratio 0.89-1.04), 'ragged' 1.2-1.6x.
DEFAULT_IMPL = "gather"
# Per-token routing (rows mixing tasks) has no gather form: 'gather' runs as 'onehot' up to this
# many groups and as 'ragged' beyond. On the BERT-base adapters step 'onehot' at 6 tasks cost
# ~7% a step (BUILD_NOTES.md); at 64 tasks it would multiply the adapters' FLOPs by 64.
PER_TOKEN_ONEHOT_MAX_GROUPS = 16


GATHER_GRADS = ("auto", "onehot", "scatter")
_GATHER_GRAD = TracePolicy("mtlx.peft.routing", GATHER_GRADS, "auto")
set_gather_grad = _GATHER_GRAD.set      # (name) -> the previous policy
gather_grad = _GATHER_GRAD.scope        # ``with gather_grad('scatter'): ...``


def gathers_by_onehot() -> bool:
    """Whether `take_rows` traced now sums gathered rows' gradients by a one-hot contraction."""
    return _GATHER_GRAD.chosen("onehot")


def take_rows(values, group):
    """values [G, ...] -> values[group] ([*group.shape, ...]); its gradient with respect to
    `values` per the `gather_grad` policy (module doc). `group` must lie in [0, G)."""
    if not gathers_by_onehot():
        return jnp.take(values, group, axis=0)
    g, dtype, lead = values.shape[0], values.dtype, group.ndim

    @jax.custom_vjp
    def take(v, grp):
        return jnp.take(v, grp, axis=0)

    def fwd(v, grp):
        return jnp.take(v, grp, axis=0), grp

    def bwd(grp, ct):
        if ct.dtype != jnp.float32 and jax.default_backend() == "cpu":
            ct = ct.astype(jnp.float32)  # XLA:CPU has no bf16 x bf16 -> f32 product
        onehot = jax.nn.one_hot(grp, g, dtype=ct.dtype)            # [*group, G]
        # 0/1 times ct is exact in ct's dtype; the sums accumulate in float32 (HIGHEST keeps a
        # float32 ct out of a GPU's TF32 products).
        dv = jax.lax.dot_general(
            onehot, ct, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
            precision=jax.lax.Precision.HIGHEST if ct.dtype == jnp.float32 else None,
            preferred_element_type=jnp.float32)
        return dv.astype(dtype), None

    take.defvjp(fwd, bwd)
    return take(values, group)


def check_impl(impl: str, key: str = "impl") -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"{key}: unknown routing implementation {impl!r}; known: {list(IMPLEMENTATIONS)}")


def group_tables(task_names: Sequence[str], active: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Static tables from a model task id to (row in the stack of `active` tasks, has weights).

    Tasks without weights map to row 0 and are marked non-members: their outputs must be
    left unchanged by the caller (`keep_members`).
    """
    index = np.zeros(len(task_names), np.int32)
    member = np.zeros(len(task_names), bool)
    for i, t in enumerate(task_names):
        if t in active:
            index[i], member[i] = list(active).index(t), True
    return index, member


def route(task_ids, task_names: Sequence[str], active: Sequence[str]):
    """task_ids [B] or per token [B, L] (model task ids, -1 = padding) -> (group, member) of
    the same shape (int32, bool).

    Padding rows (-1) are clipped to task 0 (their outputs are ignored downstream) and marked
    members when task 0 has weights, so that a model whose tasks all have weights never needs
    a mask.
    """
    index, member = group_tables(task_names, active)
    safe = jnp.clip(jnp.asarray(task_ids, jnp.int32), 0, len(task_names) - 1)
    return jnp.asarray(index)[safe], jnp.asarray(member)[safe]


def per_example(values, group):
    """values [G, ...] -> [*group.shape, ...] (each example's or token's own row); no gather
    when G == 1."""
    if values.shape[0] == 1:
        return jnp.broadcast_to(values, tuple(group.shape) + values.shape[1:])
    return take_rows(values, group)


def broadcast_rows(v, like):
    """Per-example v [B, n] (per token [B, L, n]) reshaped to broadcast against like
    [B, ..., n]."""
    return v.reshape(v.shape[:-1] + (1,) * (like.ndim - v.ndim) + v.shape[-1:])


def add_bias(y, bias, group):
    """y [B, ..., n] + bias[group] with bias [G, n]."""
    if bias.shape[0] == 1:
        return y + bias[0].astype(y.dtype)
    return y + broadcast_rows(per_example(bias, group), y).astype(y.dtype)


def scale_rows(y, scale, group):
    """y [B, ..., n] * scale[group] with scale [G, n] ((IA)^3-style rescaling)."""
    if scale.shape[0] == 1:
        return y * scale[0].astype(y.dtype)
    return y * broadcast_rows(per_example(scale, group), y).astype(y.dtype)


def routed_matmul(x, w, group, impl: str = DEFAULT_IMPL, precision=None):
    """x [B, ..., k] times each example's own w[group[b]] ([G, k, n]) -> [B, ..., n].

    Per token: group [B, L] and x [B, L, ..., k]; 'gather' then runs as 'onehot' (at most
    PER_TOKEN_ONEHOT_MAX_GROUPS groups) or 'ragged'. The compute dtype is x's (w is cast).
    `group` must lie in [0, G).
    """
    w = w.astype(x.dtype)
    # bf16 on a CPU: products accumulating in float32 (mtlx.models.precision), unless the
    # caller asks for a lax precision
    fast = precision is None and mp.f32_accumulate(x, w)
    if w.shape[0] == 1:
        if fast:
            return mp.dot(x, w[0])
        return jnp.einsum("...k,kn->...n", x, w[0], precision=precision)
    check_impl(impl)
    if impl == "gather" and group.ndim > 1:
        impl = "onehot" if w.shape[0] <= PER_TOKEN_ONEHOT_MAX_GROUPS else "ragged"
    if impl == "gather":
        wb = take_rows(w, group)  # [B, k, n]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if fast:
            y = mp.einsum("bik,bkn->bin", flat, wb)
        else:
            y = jnp.einsum("bik,bkn->bin", flat, wb, precision=precision)
        return y.reshape(x.shape[:-1] + (w.shape[-1],))
    if impl == "ragged":
        return _ragged_matmul(x, w, group, precision)
    return _onehot_matmul(x, w, group, precision)


def _onehot_matmul(x, w, group, precision):
    g, k, n = w.shape
    onehot = jax.nn.one_hot(group, g, dtype=x.dtype)                     # [*group, G]
    onehot = onehot.reshape(group.shape + (1,) * (x.ndim - 1 - group.ndim) + (g,))  # [B, 1.., G]
    if k <= n:
        spread = x[..., None, :] * onehot[..., None]                     # [B, ..., G, k]
        return jnp.einsum("...gk,gkn->...n", spread, w, precision=precision)
    every = jnp.einsum("...k,gkn->...gn", x, w, precision=precision)     # [B, ..., G, n]
    return jnp.sum(every * onehot[..., None], axis=-2)


def _ragged_matmul(x, w, group, precision):
    lead, k = tuple(group.shape), x.shape[-1]
    b = int(np.prod(lead, dtype=np.int64))  # examples (or tokens) routed
    inner_shape = x.shape[len(lead):-1]
    inner = int(np.prod(inner_shape, dtype=np.int64))
    group = group.reshape(b)
    order = jnp.argsort(group, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(b, dtype=order.dtype))
    rows = jnp.take(x.reshape((b,) + inner_shape + (k,)), order, axis=0).reshape(b * inner, k)
    sizes = (jnp.bincount(group, length=w.shape[0]) * inner).astype(jnp.int32)
    y = jax.lax.ragged_dot(rows, w, sizes, precision=precision)
    y = jnp.take(y.reshape((b,) + inner_shape + (w.shape[-1],)), inverse, axis=0)
    return y.reshape(lead + inner_shape + (w.shape[-1],))


def keep_members(member, new, old):
    """new where the example's (token's) task has weights, old (the identity) elsewhere;
    member [B] or [B, L]."""
    return jnp.where(member.reshape(member.shape + (1,) * (new.ndim - member.ndim)), new, old)


def task_layer_norm(x, scale, bias, group, eps: float = 1e-5):
    """Task-conditional LayerNorm: each example normalised with ITS task's gamma/beta.

    x [B, ..., d]; scale, bias [G, d]. Statistics in float32, output in x's dtype. HyperFormer
    (Karimi Mahabadi et al. 2021, sec. 2.3) generates gamma/beta from the task embedding; here
    they may be owned per task or generated.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    out = add_bias(scale_rows(normed, scale.astype(jnp.float32), group), bias.astype(jnp.float32), group)
    return out.astype(x.dtype)


def stack_tasks(per_task: Sequence, tasks: Optional[Sequence[str]] = None):
    """[{...} per task] -> {... [G, ...]}: the per-task pytrees stacked along a new axis 0."""
    if not per_task:
        raise ValueError(f"no task parameters to stack (tasks: {list(tasks or [])})")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_task)
