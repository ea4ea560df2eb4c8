"""Per-task gradients and the small linear algebra the gradient-balancing strategies share.

Memory. The task-gradient matrix G holds T x D floats: for BERT-base (D ~ 110M shared
parameters) and T = 8 tasks that is ~3.5 GB in fp32, on top of the model, its optimizer state
and the activations. `task_gradients` also runs the T backward passes either batched (vmap:
fastest, T times the activation-cotangent memory of one backward) or one after the other
(``sequential=True``: `lax.map`, peak memory of one backward plus G). The cheap alternative is
LibMTL's ``rep_grad``: gradients w.r.t. a shared representation (e.g. the encoder output),
[T, B*L*H] instead of [T, D]; see `rep_gradient_matrix`.

Every Gram-matrix strategy (all but DB-MTL) only needs G G^T [T, T]; `gram_matrix` computes it in
fp32 at the highest matmul precision whatever the dtype of G.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def flatten_grads(tree: Any, batch_dims: int = 0) -> Array:
    """Concatenates the leaves of a gradient pytree into one vector [D].

    With ``batch_dims=1`` every leaf has a leading axis (e.g. tasks) that is kept: [T, D].
    Leaves are taken in `jax.tree_util` order, which `unflatten_grads` inverts. Mixed dtypes are
    promoted to their common dtype.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("flatten_grads: the gradient tree has no leaves")
    lead = jnp.shape(leaves[0])[:batch_dims]
    for leaf in leaves:
        if jnp.shape(leaf)[:batch_dims] != lead:
            raise ValueError(f"flatten_grads: leaves disagree in their leading {batch_dims} "
                             f"axes: {jnp.shape(leaf)[:batch_dims]} vs {lead}")
    return jnp.concatenate([jnp.reshape(leaf, lead + (-1,)) for leaf in leaves], axis=-1)


def unflatten_grads(flat: Array, like: Any) -> Any:
    """Inverse of `flatten_grads`: splits `flat` [D] into a pytree shaped and typed like `like`."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(jnp.shape(leaf))) for leaf in leaves]
    if jnp.shape(flat) != (sum(sizes),):
        raise ValueError(f"unflatten_grads: vector of shape {jnp.shape(flat)} does not match the "
                         f"{sum(sizes)} elements of the target tree")
    out, start = [], 0
    for leaf, size in zip(leaves, sizes):
        piece = flat[start:start + size]
        out.append(jnp.reshape(piece, jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def task_gradients(loss_fn_per_task: Callable[..., Any], params: Any, *args: Any,
                   has_aux: bool = False, sequential: bool = False, **kwargs: Any):
    """Gradients of each task's loss w.r.t. `params`, flattened: returns (G [T, D], losses [T]).

    ``loss_fn_per_task(params, *args, **kwargs)`` returns the vector of task losses [T] (each
    task's loss masked to its own examples; 0 for a task absent from the batch) -- or
    ``(losses, aux)`` with ``has_aux=True``, in which case ``(G, losses, aux)`` is returned.
    Pass the SHARED parameters as `params` and close over the task-specific ones.

    The forward pass runs once (`jax.vjp`); its pullback is applied to the T one-hot cotangents,
    which is `jax.vmap(jax.grad(...))` over task-masked losses without T forward passes.
    ``sequential=True`` applies them one at a time (`lax.map`) to bound peak memory.
    """
    def f(p):
        return loss_fn_per_task(p, *args, **kwargs)

    if has_aux:
        losses, pullback, aux = jax.vjp(f, params, has_aux=True)
    else:
        losses, pullback = jax.vjp(f, params)
    if jnp.ndim(losses) != 1:
        raise ValueError(f"task_gradients: loss_fn_per_task must return losses of shape [T], "
                         f"got {jnp.shape(losses)}")
    eye = jnp.eye(jnp.shape(losses)[0], dtype=jnp.result_type(losses))

    def one_task(cotangent):
        (g,) = pullback(cotangent)
        return flatten_grads(g)

    grads = jax.lax.map(one_task, eye) if sequential else jax.vmap(one_task)(eye)
    return (grads, losses, aux) if has_aux else (grads, losses)


def rep_gradient_matrix(per_task_rep_grads: Array) -> Array:
    """[T, B, ...] gradients w.r.t. a shared representation -> [T, F] summed over the batch axis.

    This is LibMTL's ``rep_grad`` reduction (`AbsWeighting._get_grads`): per-example
    representation gradients are summed over the batch so that every task's vector lives in the
    same feature space. (In a mixed batch each task only has gradient on its own rows; without
    the sum the task vectors would be orthogonal by construction.) Strategies then return
    weights, and ``apply_weights(weights, per_task_rep_grads)`` is the cotangent to
    back-propagate through the encoder.
    """
    t = jnp.shape(per_task_rep_grads)[0]
    b = jnp.shape(per_task_rep_grads)[1]
    return jnp.sum(jnp.reshape(per_task_rep_grads, (t, b, -1)), axis=1)


def apply_weights(weights: Array, grads: Array) -> Array:
    """sum_i weights[i] * grads[i] for grads [T, ...] (LibMTL `_backward_new_grads`)."""
    return jnp.einsum("t,t...->...", weights.astype(grads.dtype), grads,
                      precision=jax.lax.Precision.HIGHEST)


def gram_matrix(grads: Array) -> Array:
    """G G^T [T, T] in fp32 at the highest matmul precision."""
    g = grads.astype(jnp.float32)
    return jnp.matmul(g, g.T, precision=jax.lax.Precision.HIGHEST)


def pairwise_cosine(grads: Array) -> Array:
    """Cosine similarity between task gradients [T, T] (for logging); 0 where a gradient is 0."""
    return cosine_from_gram(gram_matrix(grads))


def cosine_from_gram(gram: Array) -> Array:
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    outer = norms[:, None] * norms[None, :]
    ok = outer > 0
    return jnp.where(ok, gram / jnp.where(ok, outer, 1.0), 0.0)
