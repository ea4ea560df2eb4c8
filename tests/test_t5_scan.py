"""T5Config.scan_layers: layers 1.. of the encoder and of the decoder run as one jax.lax.scan
(layer 0, which owns the relative position bias table, stays unrolled), with the unrolled
model's parameter tree, outputs and gradients; extensions that are not the same at every
scanned layer are a clear error. Reference: the same model unrolled (itself checked against
Hugging Face's T5 in tests/test_t5.py)."""

import dataclasses

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models import t5
from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry

from tests.peft_common import T5_MIXED, T5_NAMES, T5_TASKS, batch_for, random_params, tiny_t5


def _cfg(**kw):
    return tiny_t5(**dict(dict(num_layers=4, num_decoder_layers=3), **kw))


def _scan(cfg):
    return dataclasses.replace(cfg, scan_layers=True)


def _inputs(seed=0, b=3, ls=9, lt=5):
    rng = np.random.default_rng(seed)
    mask = (np.arange(ls)[None] < np.array([ls, ls - 3, 4])[:b, None]).astype(np.int32)
    ids = (rng.integers(2, 50, (b, ls)) * mask).astype(np.int32)
    dmask = (np.arange(lt)[None] < np.array([lt, 3, 2])[:b, None]).astype(np.int32)
    dids = (rng.integers(2, 50, (b, lt)) * dmask).astype(np.int32)
    return tuple(jnp.asarray(x) for x in (ids, mask, dids, dmask))


def _perturbed(params, scale=0.3):
    flat = tu.flatten_dict(params, sep="/")
    rng = np.random.default_rng(0)
    return tu.unflatten_dict({k: v + scale * jnp.asarray(rng.normal(size=v.shape), v.dtype)
                              for k, v in sorted(flat.items())}, sep="/")


def _close(got, ref, atol=1e-5):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    fg, fr = tu.flatten_dict(got, sep="/"), tu.flatten_dict(ref, sep="/")
    for k in fr:
        np.testing.assert_allclose(np.asarray(fg[k]), np.asarray(fr[k]), atol=atol, rtol=1e-5,
                                   err_msg=k)


def _fns(cfg):
    model = t5.module(cfg)

    def forward(p, *inputs):
        return model.apply({"params": p}, *inputs)

    def loss(p, *inputs):
        return jnp.sum(jnp.sin(3.0 * forward(p, *inputs)))

    return jax.jit(forward), jax.jit(jax.grad(loss)), model


@pytest.mark.parametrize("ffn", ["relu", pytest.param("gated-gelu", marks=pytest.mark.heavy)])
def test_outputs_and_gradients_equal_the_unrolled_model(ffn):
    cfg = _cfg(feed_forward_proj=ffn, tie_word_embeddings=ffn == "relu")
    inputs = _inputs()
    plain_fwd, plain_grad, plain = _fns(cfg)
    scan_fwd, scan_grad, scanned = _fns(_scan(cfg))
    p0 = plain.init(jax.random.key(0), *inputs)["params"]
    s0 = scanned.init(jax.random.key(0), *inputs)["params"]
    # init unrolls: the same tree and values; HF I/O and checkpoints are unchanged
    assert jax.tree_util.tree_structure(p0) == jax.tree_util.tree_structure(s0)
    _close(s0, p0, atol=0)
    assert "layer_3" in p0["encoder"] and "layer_2" in p0["decoder"]
    params = _perturbed(p0)
    np.testing.assert_allclose(np.asarray(scan_fwd(params, *inputs)),
                               np.asarray(plain_fwd(params, *inputs)), atol=1e-5, rtol=1e-5)
    _close(scan_grad(params, *inputs), plain_grad(params, *inputs), atol=1e-4)


def test_the_scanned_stacks_trace_one_block_each():
    cfg = _cfg(num_layers=6, num_decoder_layers=5)
    inputs = _inputs()
    params = t5.module(cfg).init(jax.random.key(0), *inputs)["params"]

    def jaxpr(c):
        return jax.make_jaxpr(lambda p: t5.module(c).apply({"params": p}, *inputs))(params)

    def count(jx, name):
        n = 0
        for eqn in jx.jaxpr.eqns:
            n += eqn.primitive.name == name
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        n += count(jax.core.ClosedJaxpr(inner, ()) if not hasattr(sub, "consts")
                                   else sub, name)
        return n

    plain, scanned = jaxpr(cfg), jaxpr(_scan(cfg))
    assert count(plain, "scan") == 0 and count(scanned, "scan") == 2
    # layer 0 and one body per stack are traced: far fewer products than 6 + 5 layers
    assert count(scanned, "dot_general") < count(plain, "dot_general") / 2


def test_packed_encoder_rows_and_remat():
    """Packed rows (segment_ids, position_ids: the bias per row, built by layer 0 and read by
    the scanned layers) and remat inside the scan give the unrolled model's outputs."""
    segs = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
    pos = np.zeros_like(segs)
    for r in range(2):
        for s in (1, 2):
            pos[r, segs[r] == s] = np.arange((segs[r] == s).sum())
    ids = (np.random.default_rng(3).integers(2, 50, segs.shape) * (segs > 0)).astype(np.int32)
    routing = t5.Routing(task_ids=jnp.zeros((2,), jnp.int32))
    cfg = _cfg()
    enc = t5.T5Encoder(cfg)
    emb = jax.random.normal(jax.random.key(1), ids.shape + (cfg.d_model,))
    mask = jnp.asarray((segs > 0).astype(np.int32))
    params = _perturbed(enc.init(jax.random.key(0), emb, mask, routing)["params"])

    def run(c):
        out, _ = jax.jit(lambda p: t5.T5Encoder(c).apply(
            {"params": p}, emb, mask, routing, True, jnp.asarray(pos), jnp.asarray(segs)))(params)
        return np.asarray(out)

    ref = run(cfg)
    np.testing.assert_allclose(run(_scan(cfg)), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run(_scan(dataclasses.replace(cfg, remat="full"))), ref,
                               atol=1e-5, rtol=1e-5)


def test_dropout_gives_each_scanned_layer_its_own_key():
    cfg = _cfg(dropout_rate=0.3)
    inputs = _inputs()
    model = t5.module(_scan(cfg))
    params = model.init(jax.random.key(0), *inputs)["params"]
    run = jax.jit(lambda p, k: model.apply({"params": p}, *inputs, deterministic=False,
                                           rngs={"dropout": k}))
    a, b = np.asarray(run(params, jax.random.key(1))), np.asarray(run(params, jax.random.key(2)))
    det = np.asarray(model.apply({"params": params}, *inputs))
    assert np.isfinite(a).all() and not np.allclose(a, b) and not np.allclose(a, det)
    np.testing.assert_array_equal(a, np.asarray(run(params, jax.random.key(1))))


def test_greedy_decode_of_a_scanned_config_equals_the_unrolled_one():
    cfg = _cfg(eos_token_id=1)
    ids, mask, _, _ = _inputs()
    params = _perturbed(t5.module(cfg).init(jax.random.key(0), *_inputs())["params"])
    a = t5.greedy_decode(params, cfg, ids, mask, max_length=6)
    b = t5.greedy_decode(params, _scan(cfg), ids, mask, max_length=6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layer_uniform_extensions_scan_and_hypernetworks_are_refused():
    batch = batch_for(T5_MIXED, t5=True)
    cfg = registry.attach(_cfg(), [{"method": "adapter", "variant": "houlsby",
                                    "reduction_factor": 4}], T5_NAMES)
    plain = MultiTaskModel(cfg, T5_TASKS, head_dropout=0.0)
    scanned = MultiTaskModel(_scan(cfg), T5_TASKS, head_dropout=0.0)
    params = random_params(plain, batch)
    out_p = jax.jit(lambda p: plain.apply({"params": p}, batch))(params)
    out_s = jax.jit(lambda p: scanned.apply({"params": p}, batch))(params)
    for k in out_p:
        np.testing.assert_allclose(np.asarray(out_s[k]), np.asarray(out_p[k]), atol=1e-5,
                                   rtol=1e-5, err_msg=k)
    hyper = registry.attach(_cfg(), [{"method": "hyperformer++", "reduction_factor": 4}], T5_NAMES)
    with pytest.raises(ValueError, match=r"T5Config.scan_layers=True cannot run extension "
                                         r".*layer_uniform"):
        t5.check_scan_layers(_scan(hyper))
    t5.check_scan_layers(hyper)  # unrolled: fine
    # a layer subset attaches to some scanned layers only
    subset = registry.attach(_cfg(), [{"method": "lora", "rank": 2,
                                       "targets": ["encoder.layer2.attention.query"]}], T5_NAMES)
    with pytest.raises(ValueError, match=r"T5Config.scan_layers=True needs every extension to "
                                         r"attach identically.*encoder\.layer2\.attention"):
        t5.check_scan_layers(_scan(subset))
    # the subset on layer 0 only, which stays unrolled, is fine
    t5.check_scan_layers(_scan(registry.attach(_cfg(), [
        {"method": "lora", "rank": 2, "targets": ["encoder.layer0.attention.query"]}], T5_NAMES)))


def test_config_and_run_switch():
    with pytest.raises(ValueError, match="T5Config.scan_layers must be a bool"):
        _cfg(scan_layers="yes")
    from ml_collections import ConfigDict
    from mtlx.train.loop import with_execution_switches
    assert with_execution_switches(_cfg(), ConfigDict({"scan_layers": True})).scan_layers
