"""mtlx.models.embed: embedding lookups routed through shard_map under FSDP (the 'fsdp' route)
and tensor parallelism (the 'vocab' route), against jnp.take and flax's nn.Embed, and the
collectives of the sharded train step they change."""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlx.models import embed as E
from mtlx.train import sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _mesh(shape):
    return sharding.make_mesh(shape)


def _grad_fn(mesh, lookup, table_spec):
    """jit(value_and_grad) of a loss over lookup(table, ids) under `mesh` (as the train step)."""
    def loss(table, ids, w):
        out = lookup(table, ids)
        return jnp.sum(jnp.tanh(out) * w), out
    f = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(sharding.in_mesh(f, mesh),
                   in_shardings=(NamedSharding(mesh, table_spec),
                                 NamedSharding(mesh, P(("data", "fsdp"))),
                                 NamedSharding(mesh, P(("data", "fsdp")))),
                   out_shardings=((NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))),
                                  NamedSharding(mesh, table_spec)))


@pytest.mark.parametrize("ids_shape", [(16, 9), (8, 3, 5)])
def test_routed_lookup_equals_take_with_its_gradient(ids_shape):
    mesh, table_spec, vocab_sharded = _mesh({"data": 2, "fsdp": 4}), P(None, "fsdp"), False
    rng = np.random.default_rng(0)
    vocab, dim = 48, 16
    table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, size=ids_shape), jnp.int32)
    ids = ids.at[0].set(7).at[1].set(vocab - 1)  # repeated ids add up; the last row
    w = jnp.asarray(rng.normal(size=ids_shape + (dim,)), jnp.float32)
    assert E.route_plan(mesh.abstract_mesh, table.shape, ids.shape, vocab_sharded) == "fsdp"
    (l_r, out_r), g_r = _grad_fn(mesh, lambda t, i: E.lookup(t, i, vocab_sharded),
                                 table_spec)(table, ids, w)
    # the reference: jnp.take on one device
    (l_t, out_t), g_t = jax.jit(jax.value_and_grad(
        lambda t, i, w: (jnp.sum(jnp.tanh(jnp.take(t, i, axis=0)) * w),
                         jnp.take(t, i, axis=0)), has_aux=True))(table, ids, w)
    np.testing.assert_array_equal(np.asarray(out_r), np.asarray(out_t))  # a copy: exact
    np.testing.assert_allclose(float(l_r), float(l_t), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_r), np.asarray(g_t), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(g_t[7]).sum()) > 0 and float(jnp.abs(g_t[vocab - 1]).sum()) > 0


def _step_hlo(mesh_shape, hidden=64, vocab=1000, batch=32, length=32):
    """The compiled train step of a one-layer shared encoder (two tasks) on the mesh."""
    from collectives import compiled_step
    from mtlx.bench import workload as W
    cell = W.Cell("shared", "tiny", length, 2, batch, W.Features(hidden_dropout=0.0,
                                                                  attention_dropout=0.0))
    return compiled_step(cell, mesh_shape, num_layers=1, hidden_size=hidden,
                         intermediate_size=2 * hidden, vocab_size=vocab, num_heads=2)[0]


def _moved(text):  # bytes out of every collective
    from hlo_traffic import collectives
    return sum(c[1] for c in collectives(text))


def _gathers_of(text, shape):
    from hlo_traffic import collectives
    return [c for c in collectives(text) if c[0] == "all-gather" and c[2].startswith(shape)]


def test_fsdp_step_does_not_gather_the_global_batch():
    """Under FSDP, XLA's own partitioning of the embeddings' gradient all-gathers the global
    [B, T, D] cotangent onto every device ("[SPMD] Involuntary full rematerialization"); the
    'fsdp' route moves each device's rows by all-to-all and sums the table's slice over 'data':
    no global-batch gather, and fewer bytes through collectives in all."""
    mesh = {"data": 2, "fsdp": 4}
    routed = _step_hlo(mesh)
    with E.route_policy("off"):
        plain = _step_hlo(mesh)
    assert _gathers_of(plain, "f32[32,32,64]")  # what the route avoids (jax 0.10.2)
    assert not _gathers_of(routed, "f32[32,32,64]") and "shard_map/all_to_all" in routed
    assert _moved(routed) < _moved(plain)


def test_gradients_pinned_to_the_parameters_shardings():
    """Tensor parallelism with a vocabulary 'tensor' does not divide (1,002 rows over 4: the
    word table replicated, as BERT's 30,522 are): left alone, XLA computes the table's AdamW
    update sharded along D and all-gathers the table and both moments each step;
    `sharding.constrain` pins the gradients to the parameters' shardings first."""
    tree = {"kernel": jnp.ones((2, 2))}
    assert sharding.constrain(tree) is tree  # no mesh in the context: unchanged
    mesh = {"data": 2, "tensor": 4}
    pinned = _step_hlo(mesh, vocab=1002)
    with sharding.grad_constraint_policy("off"):
        free = _step_hlo(mesh, vocab=1002)
    assert len(_gathers_of(free, "f32[1002,64]")) >= 2 and not _gathers_of(pinned, "f32[1002,64]")
    assert _moved(pinned) < _moved(free)


def test_plan_takes_a_route_only_where_it_moves_less():
    abstract = lambda shape: _mesh(shape).abstract_mesh  # noqa: E731
    fsdp = abstract({"data": 2, "fsdp": 4})
    plan = E.route_plan
    assert plan(None, (48, 16), (16, 9)) is None
    assert plan(jax.sharding.get_abstract_mesh(), (48, 16), (16, 9)) is None  # no mesh
    assert plan(abstract({"data": 8}), (48, 16), (16, 9), True) is None        # nothing sharded
    assert plan(fsdp, (48, 18), (16, 9)) is None    # D does not divide
    assert plan(fsdp, (48, 16), (12, 9)) is None    # nor the batch
    assert plan(fsdp, (48, 16), (1, 9)) is None     # broadcast position ids
    assert plan(abstract({"data": 2, "tensor": 4}), (48, 16), (16, 9), True) is None  # no FSDP
    fsdp_tp = abstract({"fsdp": 2, "tensor": 4})
    assert plan(fsdp_tp, (48, 16), (16, 9), True) is None   # rows sharded by 'tensor' too
    assert plan(fsdp_tp, (50, 16), (16, 9), True) == "fsdp"  # (rows that do not divide: not)
    assert plan(fsdp_tp, (48, 16), (16, 9)) == "fsdp"        # a table 'tensor' leaves whole
    # BERT-base's word embeddings under FSDP: 4,096 tokens move less gathered, 16,384 routed
    assert plan(fsdp, (30522, 768), (32, 128)) is None
    assert plan(fsdp, (30522, 768), (128, 128)) == "fsdp"
    assert plan(abstract({"fsdp": 8}), (30522, 768), (32, 128)) == "fsdp"
    # the position table follows the word table's plan (route_vocab)
    assert plan(fsdp, (512, 768), (32, 128)) == "fsdp"
    assert plan(fsdp, (512, 768), (32, 128), route_vocab=30522) is None
    # ... also where 'tensor' would shard its own 512 rows but not the word table's 30,522
    assert plan(fsdp_tp, (512, 768), (32, 128), True) is None
    assert plan(fsdp_tp, (512, 768), (32, 128), True, route_vocab=30522) == "fsdp"


def test_embed_module_is_flax_embed_with_the_same_parameter():
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 20, size=(4, 6)), jnp.int32)
    ours, theirs = E.Embed(20, 8), nn.Embed(20, 8)
    p_ours = ours.init(jax.random.key(0), ids)
    p_theirs = theirs.init(jax.random.key(0), ids)
    assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_theirs)
    np.testing.assert_array_equal(np.asarray(ours.apply(p_theirs, ids)),
                                  np.asarray(theirs.apply(p_theirs, ids)))
    q = jnp.ones((2, 8))
    np.testing.assert_array_equal(np.asarray(ours.apply(p_theirs, q, method="attend")),
                                  np.asarray(theirs.apply(p_theirs, q, method="attend")))
    with pytest.raises(ValueError, match="integer"):
        ours.apply(p_theirs, q)


def test_collectives_script_sums_a_sharded_step(capsys):
    import collectives
    # 16,384 tokens: the word embeddings' plan routes them (tests above)
    on = collectives.main(["--cell", "shared/tiny/128/2/128", "--layers", "1", "--top", "3"])
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}, embed route auto" in out and "largest 3" in out
    assert on["all-gather"] > 0 and on["all-to-all"] > 0  # the embeddings' route
    off = collectives.main(["--cell", "shared/tiny/128/2/128", "--layers", "1", "--embed-route", "off"])
    assert sum(off.values()) > sum(on.values())
    assert E.get_route_policy() == "auto"  # 'off' undone
    with pytest.raises(SystemExit, match="must be axis=size"):
        collectives.main(["--mesh", "data2"])
