"""Embedding lookup whose gradient stays sharded under FSDP.

With the table sharded along its model dimension (FSDP: `mtlx.train.sharding`'s 'embed' ->
'fsdp') and the tokens along the batch (('data', 'fsdp')), XLA's partitioner cannot move the
lookup's cotangent from the batch sharding to the table's ("[SPMD] Involuntary full
rematerialization"): it all-gathers the whole global [B, L, D] cotangent onto every device
to scatter-add it into the table's gradient. That is the global batch's activations on every
device, each step (jax 0.10.2, dev CPU with 8 host devices; BUILD_NOTES.md, "Training
engine"). `lookup` writes that gradient with `shard_map` instead: each device's cotangent rows
are exchanged over 'fsdp' (all-to-all: its batch shard of every token for its slice of the
model dimension), scatter-added into its [V, D / fsdp] slice of the gradient, and summed over
'data' (all-reduce), so a device moves about B·L·D / (data·fsdp) + V·D / fsdp elements, not
B·L·D; the lookup picks whichever of the two moves fewer elements, from the static shapes.

Without a mesh in the tracing context (`jax.sharding.use_abstract_mesh`, which
`mtlx.train.sharding.jit_train_step` sets), or when the mesh does not shard the table's model
dimension, it is `jnp.take(table, ids, axis=0)`.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mtlx.train.sharding.LOGICAL_TO_MESH['batch']
EMBED_AXIS = "fsdp"            # ... ['embed']
VOCAB_AXIS = "tensor"          # ... ['vocab']


def _axis(mesh, name: str) -> int:
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1))


def sharded_gradient_plan(mesh, table_shape, ids_shape):
    """(data, fsdp) sizes when the lookup's gradient should take the all-to-all route, else
    None: the mesh shards the table's model dimension over 'fsdp' (and not its vocabulary),
    the batch divides over ('data', 'fsdp'), and the route moves fewer elements than the
    all-gather of the global cotangent that XLA does."""
    if mesh is None or mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    data, fsdp = _axis(mesh, "data"), _axis(mesh, "fsdp")
    vocab, dim = table_shape
    if (fsdp == 1 or dim % fsdp or (_axis(mesh, VOCAB_AXIS) > 1 and vocab % _axis(mesh, VOCAB_AXIS) == 0)
            or not ids_shape or ids_shape[0] % (data * fsdp)):
        return None
    tokens = 1
    for n in ids_shape:
        tokens *= int(n)
    gathered = tokens * dim                                              # XLA's all-gather
    routed = tokens * dim // (data * fsdp) + (vocab * dim // fsdp if data > 1 else 0)
    return (data, fsdp) if routed < gathered else None


def lookup(table: jax.Array, ids: jax.Array, route_vocab: Optional[int] = None) -> jax.Array:
    """table[ids] (ids of any shape, batch first); under an FSDP mesh routed as above.

    route_vocab: the vocabulary size whose plan decides (default: the table's own). Lookups
    summed into one activation (BERT's word, position and token type embeddings) share one
    cotangent: when XLA gathers it for one of them the others read it for free, so they all
    follow the largest table's choice."""
    mesh = jax.sharding.get_abstract_mesh()
    plan = sharded_gradient_plan(mesh, (route_vocab or table.shape[0], table.shape[1]), ids.shape)
    if plan is None:
        return jnp.take(table, ids, axis=0)
    return _routed(table, ids, mesh, table.shape[0])


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _routed(table, ids, mesh, vocab):
    return _routed_fwd(table, ids, mesh, vocab)[0]


def _gather_ids(ids_l):
    """A device's ids [b / (data·fsdp), ...] -> its 'data' group's [b / data, T] (tokens flat)."""
    return jax.lax.all_gather(ids_l.reshape(ids_l.shape[0], -1), EMBED_AXIS, axis=0, tiled=True)


def _routed_fwd(table, ids, mesh, vocab):
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


def _routed_bwd(mesh, vocab, ids, cot):
    dim = cot.shape[-1]

    def local(ids_l, cot_l):
        # the forward's exchange backwards: [b / (data·fsdp), T, D] -> [b / data, T, D / fsdp],
        # scatter-added into this device's slice of the gradient, summed over 'data'
        cot_l = cot_l.reshape(ids_l.shape[0], -1, dim)
        cot_l = jax.lax.all_to_all(cot_l, EMBED_AXIS, split_axis=2, concat_axis=0, tiled=True)
        grad = jnp.zeros((vocab, cot_l.shape[-1]), cot_l.dtype).at[_gather_ids(ids_l)].add(cot_l)
        return jax.lax.psum(grad, "data")

    grad = jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=P(None, EMBED_AXIS))(ids, cot)
    return grad, None


_routed.defvjp(_routed_fwd, _routed_bwd)


class Embed(nn.Embed):
    """flax's nn.Embed (same parameter, same `attend`) whose lookup is `lookup`; route_vocab:
    as `lookup`'s."""
    route_vocab: Optional[int] = None

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        if self.num_embeddings == 1:
            return jnp.broadcast_to(embedding, inputs.shape + (self.features,))
        return lookup(embedding, inputs, self.route_vocab)
