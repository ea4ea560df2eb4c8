"""Embedding lookup whose communication stays per device under FSDP.

With the table sharded along its model dimension (FSDP: `mtlx.train.sharding`'s 'embed' ->
'fsdp') and the tokens along the batch (('data', 'fsdp')), XLA's partitioner (jax 0.10.2)
cannot move the lookup's cotangent from the one sharding to the other ("[SPMD] Involuntary full
rematerialization"): it all-gathers the whole global [B, L, D] cotangent onto every device to
scatter-add it into the table's gradient, the global batch's activations on each device, each
step (BUILD_NOTES.md, "Training engine"; `scripts/collectives.py` shows it). `lookup` writes
both directions with `shard_map` (the 'fsdp' route): forward, each device takes its D-slice for
its 'data' group's tokens and an all-to-all over 'fsdp' hands every device its own rows of
every slice; backward, that all-to-all reversed, a scatter-add into the device's [V, D / fsdp]
slice of the gradient and a sum over 'data': about B·L·D / (data·fsdp) + V·D / fsdp elements a
device instead of B·L·D. The route is taken when it moves fewer, read from static shapes and
the abstract mesh the step is traced under (`mtlx.train.sharding.jit_train_step` sets it).

Otherwise (no mesh, no FSDP, a table whose rows tensor parallelism shards too, a batch the mesh
does not divide) `lookup` is `jnp.take(table, ids, axis=0)`; tensor parallelism's
vocabulary-sharded lookup is XLA's (a masked local gather and a sum: measured at 13% fewer
collective bytes with a hand-written route on a one-layer step, not kept). Values: the forward
is a copy (bit-equal to `jnp.take`), the gradient equal up to the order of its sums.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtlx.models.policy import TracePolicy
from mtlx.train.sharding import LOGICAL_TO_MESH, _mesh_size

BATCH_AXES = LOGICAL_TO_MESH["batch"]   # ('data', 'fsdp')
EMBED_AXIS = LOGICAL_TO_MESH["embed"]   # 'fsdp'
VOCAB_AXIS = LOGICAL_TO_MESH["vocab"]   # 'tensor'
DATA_AXIS = "data"                      # the batch axis that does not shard the table
# 'auto' (the route where it moves less) or 'off' (always jnp.take): the A/B
# (scripts/collectives.py --embed-route, tests).
ROUTES = ("auto", "off")
_ROUTE = TracePolicy("mtlx.models.embed", ROUTES, "auto")
route_policy = _ROUTE.scope              # ``with route_policy('off'): ...``
get_route_policy = _ROUTE.get


def route_plan(mesh, table_shape, ids_shape, vocab_sharded: bool = False,
               route_vocab: Optional[int] = None) -> Optional[str]:
    """'fsdp' (the route) or None (`jnp.take`) for a lookup of ids_shape (batch first) in a
    table of table_shape under `mesh` (an abstract mesh; None or empty: no mesh).
    vocab_sharded: the table's rows are sharded by 'vocab' (-> 'tensor'; the word embeddings);
    route_vocab: the vocabulary size of the table whose plan decides (`lookup`)."""
    if mesh is None or mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    data, fsdp = _mesh_size(mesh, DATA_AXIS), _mesh_size(mesh, EMBED_AXIS)
    tensor = _mesh_size(mesh, VOCAB_AXIS) if VOCAB_AXIS in mesh.axis_names else 1
    vocab, dim = table_shape
    if not ids_shape or ids_shape[0] % (data * fsdp):
        return None
    tokens = 1
    for n in ids_shape:
        tokens *= int(n)
    vocab = route_vocab or vocab    # the deciding table's
    if (vocab_sharded and tensor > 1 and vocab % tensor == 0) or fsdp == 1 or dim % fsdp:
        return None                 # rows sharded by 'tensor' too, or D not sharded: XLA's
    gathered = tokens * dim                                              # XLA's all-gather
    routed = tokens * dim // (data * fsdp) + (vocab * dim // fsdp if data > 1 else 0)
    return "fsdp" if routed < gathered else None


def lookup(table: jax.Array, ids: jax.Array, vocab_sharded: bool = False,
           route_vocab: Optional[int] = None) -> jax.Array:
    """table[ids] (ids of any shape, batch first), routed under FSDP (the module docstring).

    vocab_sharded, route_vocab: the table whose plan decides, by default this one: whether its
    rows are sharded by 'vocab' (`mtlx.train.sharding.PARAM_RULES`: the word embeddings, T5's
    shared table) and its vocabulary size. Lookups summed into one activation (BERT's word,
    position and token type embeddings) share one cotangent: when XLA gathers it for one of
    them the others read it for free, so they all follow the word table's plan."""
    mesh = jax.sharding.get_abstract_mesh()
    plan = None if _ROUTE.get() == "off" else route_plan(mesh, table.shape, ids.shape,
                                                          vocab_sharded, route_vocab)
    if plan == "fsdp":
        return _fsdp_routed(table, ids, mesh, table.shape[0])
    return jnp.take(table, ids, axis=0)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fsdp_routed(table, ids, mesh, vocab):
    return _fsdp_fwd(table, ids, mesh, vocab)[0]


def _gather_ids(ids_l):
    """A device's ids [b / (data·fsdp), ...] -> its 'data' group's [b / data, T] (tokens flat)."""
    return jax.lax.all_gather(ids_l.reshape(ids_l.shape[0], -1), EMBED_AXIS, axis=0, tiled=True)


def _fsdp_fwd(table, ids, mesh, vocab):
    dim = table.shape[1]

    def local(table_l, ids_l):
        # every token of the 'data' group for this device's slice of D, then each device's own
        # rows of every slice: [b / data, T, D / fsdp] -> [b / (data·fsdp), T, D]
        out = jnp.take(table_l, _gather_ids(ids_l), axis=0)
        out = jax.lax.all_to_all(out, EMBED_AXIS, split_axis=0, concat_axis=2, tiled=True)
        return out.reshape(ids_l.shape + (dim,))

    out = jax.shard_map(local, mesh=mesh, in_specs=(P(None, EMBED_AXIS), P(BATCH_AXES)),
                        out_specs=P(BATCH_AXES))(table, ids)
    return out, ids


def _fsdp_bwd(mesh, vocab, ids, cot):
    dim = cot.shape[-1]

    def local(ids_l, cot_l):
        # the forward's exchange backwards: [b / (data·fsdp), T, D] -> [b / data, T, D / fsdp],
        # scatter-added into this device's slice of the gradient, summed over 'data'
        cot_l = cot_l.reshape(ids_l.shape[0], -1, dim)
        cot_l = jax.lax.all_to_all(cot_l, EMBED_AXIS, split_axis=2, concat_axis=0, tiled=True)
        grad = jnp.zeros((vocab, cot_l.shape[-1]), cot_l.dtype).at[_gather_ids(ids_l)].add(cot_l)
        return jax.lax.psum(grad, DATA_AXIS)

    grad = jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=P(None, EMBED_AXIS))(ids, cot)
    return grad, None


_fsdp_routed.defvjp(_fsdp_fwd, _fsdp_bwd)


class Embed(nn.Embed):
    """flax's nn.Embed (same parameter, same `attend`) whose lookup is `lookup`;
    vocab_sharded, route_vocab: as `lookup`'s."""
    vocab_sharded: bool = False
    route_vocab: Optional[int] = None

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        if self.num_embeddings == 1:
            return jnp.broadcast_to(embedding, inputs.shape + (self.features,))
        return lookup(embedding, inputs, self.vocab_sharded, self.route_vocab)
