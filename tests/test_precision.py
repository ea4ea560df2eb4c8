"""mtlx.models.precision: bf16 products that accumulate in float32 (forward and backward).

References: numpy float64 products of the same bf16-rounded operands (the exact result a
float32-accumulating bf16 GEMM approximates), and XLA's own bf16 products (policy 'native').
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models import bert, precision
from mtlx.models.attention import attend

BF = jnp.bfloat16


def _rand(seed, shape, dtype=BF, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dots(closed):
    """(operand dtypes, preferred_element_type) of every dot_general, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((tuple(str(v.aval.dtype) for v in eqn.invars),
                              str(eqn.params.get("preferred_element_type"))))
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(closed.jaxpr)
    return found


def _fwd_bwd_jaxpr(f, *args):
    def both(*a):
        y, vjp = jax.vjp(f, *a)
        return y, vjp(jnp.ones_like(y))
    return jax.make_jaxpr(both)(*args)


def _rel(a, b):
    a, b = _f64(a), _f64(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(autouse=True)
def _auto_policy():
    before = precision.set_policy("auto")
    yield
    precision.set_policy(before)


# ----------------------------------------------------------------------------- dot

def test_bf16_dot_forward_and_backward_products_take_bf16_and_accumulate_in_f32():
    x, w = _rand(0, (3, 5, 16)), _rand(1, (16, 8))
    dots = _dots(_fwd_bwd_jaxpr(precision.dot, x, w))
    assert len(dots) == 3                                    # y, dx, dw
    assert all(ops == ("bfloat16", "bfloat16") and pref == "float32" for ops, pref in dots), dots
    # without the custom VJP, autodiff of the f32-accumulating product gives f32 x bf16 ones
    plain = _dots(_fwd_bwd_jaxpr(
        lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(BF), x, w))
    assert any("float32" in ops for ops, _ in plain)


def test_bf16_dot_values_and_gradients_match_float64_products():
    x, w, g = _rand(0, (4, 7, 64)), _rand(1, (64, 24)), _rand(2, (4, 7, 24))
    y, vjp = jax.vjp(jax.jit(precision.dot), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == BF
    xe, we, ge = _f64(x), _f64(w), _f64(g)
    # each result is a float64 product of the bf16 operands, rounded once to bf16 (<= 2^-8)
    np.testing.assert_allclose(_f64(y), xe @ we, rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(_f64(dx), ge @ we.T, rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(_f64(dw), np.einsum("blk,bln->kn", xe, ge), rtol=2 ** -7, atol=1e-6)
    with precision.policy("native"):
        yn, vjpn = jax.vjp(jax.jit(precision.dot), x, w)
        dxn, dwn = vjpn(g)
    for a, b in ((y, yn), (dx, dxn), (dw, dwn)):
        assert _rel(a, b) < 5e-3


def _compiled_dot_operands(f, *args):
    """Operand dtypes of every dot in the program XLA compiled for f (fusions included)."""
    import re
    text = jax.jit(f).lower(*args).compile().as_text()
    found = []
    for block in text.split("\n\n"):
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", block))
        for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", block):
            found.append((types.get(a), types.get(b)))
    return found


@pytest.mark.parametrize("spec,shapes", [
    ("mk,kn->mn", [(256, 96), (96, 64)]),               # a projection: dw = x^T g
    ("bqhd,bkhd->bhqk", [(2, 64, 4, 32), (2, 64, 4, 32)]),  # attention scores
    ("bhqk,bkhd->bqhd", [(2, 4, 64, 64), (2, 64, 4, 32)]),  # attention output
])
def test_compiled_backward_products_stay_bf16_on_cpu(spec, shapes):
    """What XLA:CPU compiles, not only what JAX traces: the products whose left operand must
    be transposed (weight gradients, attention's backward) keep bf16 operands. XLA widens a
    product whose left operand it holds column-major (a transpose's free layout, even behind
    an optimization barrier) to float32 before its layout assignment; precision materializes
    the transposed operand row-major instead."""
    if jax.default_backend() != "cpu":
        pytest.skip("a rule of XLA:CPU's bf16 products")
    a, b = _rand(0, shapes[0]), _rand(1, shapes[1])

    def fwd_bwd(a, b):
        y, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b), a, b)
        return y, vjp(jnp.ones_like(y))
    dots = _compiled_dot_operands(fwd_bwd, a, b)
    assert len(dots) == 3 and all(ops == ("bf16", "bf16") for ops in dots), dots


def test_float32_dot_is_the_plain_product():
    x, w = _rand(0, (4, 16), jnp.float32), _rand(1, (16, 8), jnp.float32)
    assert str(jax.make_jaxpr(precision.dot)(x, w)) == str(jax.make_jaxpr(jnp.dot)(x, w))
    # the compute dtype casts both operands, as Projection did with jnp.dot
    y = precision.dot(x, w, BF)
    assert y.dtype == BF and all(p == "float32" for _, p in _dots(jax.make_jaxpr(
        lambda a, b: precision.dot(a, b, BF))(x, w)))


def test_policies():
    x, w = _rand(0, (4, 16)), _rand(1, (16, 8))
    with precision.policy("native"):
        assert not precision.f32_accumulate(x, w)
        assert all(p != "float32" for _, p in _dots(_fwd_bwd_jaxpr(precision.dot, x, w)))
    assert precision.get_policy() == "auto"
    # 'auto' takes the float32-accumulating path on a CPU backend only
    assert precision.f32_accumulate(x, w) == (jax.default_backend() == "cpu")
    with precision.policy("f32_accumulate"):
        assert precision.f32_accumulate(x, w)
        assert not precision.f32_accumulate(x.astype(jnp.float32), w.astype(jnp.float32))
        assert not precision.f32_accumulate(x, w.astype(jnp.float32))     # mixed: plain
    with pytest.raises(ValueError, match="policy must be one of"):
        precision.set_policy("fast")
    with pytest.raises(RuntimeError):
        with precision.policy("native"):
            raise RuntimeError
    assert precision.get_policy() == "auto"


# ----------------------------------------------------------------------------- einsum

@pytest.mark.parametrize("spec,shapes", [
    ("bqhd,bkhd->bhqk", [(2, 5, 3, 8), (2, 6, 3, 8)]),
    ("bhqk,bkhd->bqhd", [(2, 3, 5, 6), (2, 6, 3, 8)]),
    ("ij,jk->ik", [(5, 7), (7, 3)]),
    ("bij,jk->bki", [(2, 5, 7), (7, 3)]),
    ("ab,cb->ca", [(4, 6), (5, 6)]),          # both contracted on their last axis
    ("bxy,byz->bzx", [(3, 4, 5), (3, 5, 2)]),  # output transposed
])
def test_einsum_values_gradients_and_products(spec, shapes):
    a, b = _rand(0, shapes[0]), _rand(1, shapes[1])
    f = jax.jit(lambda a, b: precision.einsum(spec, a, b))
    y, vjp = jax.vjp(f, a, b)
    g = _rand(2, y.shape)
    da, db = vjp(g)
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    ref_y = np.einsum(spec, _f64(a), _f64(b))
    np.testing.assert_allclose(_f64(y), ref_y, rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(_f64(da), np.einsum(f"{out},{sb}->{sa}", _f64(g), _f64(b)),
                               rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(_f64(db), np.einsum(f"{sa},{out}->{sb}", _f64(a), _f64(g)),
                               rtol=2 ** -7, atol=1e-6)
    dots = _dots(_fwd_bwd_jaxpr(lambda a, b: precision.einsum(spec, a, b), a, b))
    assert len(dots) == 3 and all(ops == ("bfloat16", "bfloat16") and p == "float32"
                                  for ops, p in dots), dots


def test_einsum_float32_output_is_the_accumulator():
    a, b = _rand(0, (2, 5, 3, 8)), _rand(1, (2, 6, 3, 8))
    y = precision.einsum("bqhd,bkhd->bhqk", a, b, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(_f64(y), np.einsum("bqhd,bkhd->bhqk", _f64(a), _f64(b)),
                               rtol=1e-5, atol=1e-5)
    # its cotangent reaches the backward products in bf16
    dots = _dots(_fwd_bwd_jaxpr(
        lambda a, b: precision.einsum("bqhd,bkhd->bhqk", a, b, out_dtype=jnp.float32), a, b))
    assert all(ops == ("bfloat16", "bfloat16") for ops, _ in dots)
    # float32 operands: the plain einsum, out_dtype honoured
    a32 = a.astype(jnp.float32)
    assert precision.einsum("bqhd,bkhd->bhqk", a32, b.astype(jnp.float32), out_dtype=BF).dtype == BF


@pytest.mark.parametrize("spec,match", [
    ("...d,dk->...k", "no ellipsis"),
    ("ij,jk", "explicit"),
    ("iij,jk->ik", "repeated index"),
    ("ijk,jl->il", "sums index 'k' within one operand"),
])
def test_einsum_rejects_specs_it_cannot_transpose(spec, match):
    a, b = _rand(0, (2, 2, 2)), _rand(1, (2, 2))
    with pytest.raises(ValueError, match=match):
        precision.einsum(spec, a, b)


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_path_equals_xla_attention(causal):
    q, k, v = _rand(0, (3, 6, 2, 8)), _rand(1, (3, 6, 2, 8)), _rand(2, (3, 6, 2, 8))
    lengths = np.array([6, 3, 0])                     # the last row has no key at all
    keys = np.arange(6)[None, :] < lengths[:, None]
    mask = jnp.asarray(keys[:, None, None, :])
    bias = _rand(3, (1, 2, 6, 6), jnp.float32, 0.5)

    def loss(q, k, v):
        out = attend(q, k, v, mask=mask, bias=bias, is_causal=causal)
        return jnp.sum(out.astype(jnp.float32) * jnp.arange(8.0)), out

    (l1, o1), g1 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with precision.policy("native"):
        (l0, o0), g0 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(_f64(o1)).all()
    # the keyless row attends uniformly, like jax.nn.dot_product_attention
    np.testing.assert_allclose(_f64(o1[2]), _f64(o0[2]), rtol=2e-2, atol=2e-2)
    assert _rel(o1, o0) < 1e-2
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 2e-2


def test_tiny_bert_bf16_training_gradients_run_compiled_and_match_native_products():
    """The whole encoder (attention-probability dropout on) compiles and runs with the
    float32-accumulating products (XLA:CPU's fallback dot cannot run bf16 x bf16 -> f32, so a
    product in a layout its fast kernels refuse fails at run time), and its loss and gradients
    stay within bf16 noise of XLA's own bf16 products."""
    cfg = bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                          intermediate_size=64, max_position_embeddings=32, dtype="bfloat16")
    model = bert.module(cfg)
    ids = jax.random.randint(jax.random.key(0), (3, 16), 1, 64)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [9], [4]]), jnp.int32)
    params = model.init(jax.random.key(1), ids, mask)["params"]

    def loss(p):
        out = model.apply({"params": p}, ids, mask, deterministic=False,
                          rngs={"dropout": jax.random.key(2)})
        return jnp.mean(jnp.square(out.last_hidden_state.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss))
    l1, g1 = step(params)
    assert any(p == "float32" and ops == ("bfloat16", "bfloat16")
               for ops, p in _dots(jax.make_jaxpr(jax.grad(loss))(params)))
    with precision.policy("native"):
        l0, g0 = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(l1)) and abs(float(l1) - float(l0)) < 2e-2 * abs(float(l0))
    flat1 = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g1)])
    flat0 = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g0)])
    assert _rel(flat1, flat0) < 5e-2


def test_peak_measurement_uses_the_models_product():
    from mtlx.bench.peaks import measure_matmul_peak
    peak = measure_matmul_peak(n=128, repeats=1, dtype="bfloat16")
    expected = "accumulating in float32" if jax.default_backend() == "cpu" else "plain jnp.dot"
    assert expected in peak.source and peak.flops_per_s > 0


@pytest.mark.parametrize("groups", [1, 3])
def test_routed_matmul_bf16_gather_accumulates_in_f32(groups):
    """The adapters' and LoRA's per-example products (mtlx.peft.routing, 'gather'): each
    example times its own task's matrix, forward and backward in bf16 x bf16 -> f32."""
    from mtlx.peft import routing as R
    x, w = _rand(0, (5, 7, 16)), _rand(1, (groups, 16, 6))
    group = jnp.asarray([0, 2, 1, 2, 0]) % groups
    f = lambda x, w: R.routed_matmul(x, w, group, "gather")
    y, vjp = jax.vjp(f, x, w)
    g = _rand(2, y.shape)
    dx, dw = vjp(g)
    xe, we, ge, gi = _f64(x), _f64(w), _f64(g), np.asarray(group)
    np.testing.assert_allclose(_f64(y), np.einsum("blk,bkn->bln", xe, we[gi]), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(_f64(dx), np.einsum("bln,bkn->blk", ge, we[gi]), rtol=2 ** -7, atol=1e-6)
    ref_dw = np.zeros_like(we)
    np.add.at(ref_dw, gi, np.einsum("blk,bln->bkn", xe, ge))
    # per-example products rounded to bf16, then summed over a task's examples in bf16 (the
    # gather's scatter-add, as with XLA's own products): close in norm, not elementwise
    assert _rel(dw, ref_dw) < 1e-2
    dots = _dots(_fwd_bwd_jaxpr(f, x, w))
    assert dots and all(ops == ("bfloat16", "bfloat16") and p == "float32" for ops, p in dots), dots


# ----------------------------------------------------------------------------- whole steps

SMOKE = {
    "adapter": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4}],
    "lora": [{"method": "lora", "rank": 2}],
    "prefix+ia3": [{"method": "prefix", "length": 2}, {"method": "ia3"}],
    "prompt": [{"method": "prompt", "length": 2}],
    "compacter": [{"method": "compacter", "reduction_factor": 4, "phm_dim": 2}],
    "fusion": [{"method": "fusion", "reduction_factor": 4}],
    "hyperformer++": [{"method": "hyperformer++", "reduction_factor": 4}],
    "hyper_lora": [{"method": "hyper_lora", "rank": 2}],
}


# compared with float32 and with XLA's own bf16 products; the other cases must run and be finite
NUMERICS = ("adapter", "hyperformer++", "prefix+ia3")


def _step_losses(model, params, batch, weighting=None, trainable=None, probe=False):
    """Loss after two train steps, the eval step's per-task losses and counts, and
    (probe=True) the affinity probe's figures."""
    import ml_collections
    from mtlx.train import optim
    from mtlx.train.step import (create_state, init_weighting, make_affinity_probe,
                                 make_eval_step, make_train_step, strategy_from_config)
    cfg = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-2, warmup_steps=0,
                                         num_train_steps=10, schedule="constant",
                                         weight_decay=0.0, grad_clip_norm=1.0))
    tx = optim.make_optimizer(cfg, params, trainable)
    strategy = None if weighting is None else strategy_from_config(
        ml_collections.ConfigDict(dict(name=weighting, learning_rate=1e-2)))
    state = create_state(params, tx, jax.random.key(0),
                         None if strategy is None else init_weighting(strategy, model, params, trainable))
    step = jax.jit(make_train_step(model, tx, weighting=strategy, trainable=trainable))
    for _ in range(2):
        state, metrics = step(state, batch)
    out = [float(metrics["loss"])]
    _, losses, counts = jax.jit(make_eval_step(model))(state.params, batch)   # per-task
    out += np.asarray(losses, np.float64).tolist() + np.asarray(counts, np.float64).tolist()
    if probe:
        p = jax.jit(make_affinity_probe(model, lookahead_lr=1e-3, trainable=trainable))(state.params, batch)
        out += [float(jnp.sum(jnp.abs(x))) for x in jax.tree_util.tree_leaves(p)
                if jnp.issubdtype(x.dtype, jnp.floating)]
    return np.asarray(out)


def _bf16_vs_native(build):
    """build(dtype) -> figures. The float32-accumulating bf16 run must be finite and no
    further from the float32 run than XLA's own bf16 products are (twice that, plus 1%)."""
    ref = build("float32")
    ours = build("bfloat16")
    with precision.policy("native"):
        native = build("bfloat16")
    assert np.isfinite(ours).all()
    err, err_native = np.linalg.norm(ours - ref), np.linalg.norm(native - ref)
    assert err <= 2 * err_native + 1e-2 * np.linalg.norm(ref), (ours, native, ref)


@pytest.mark.parametrize("case", sorted(SMOKE))
def test_bf16_peft_steps_run_on_this_backend(case):
    """Every PEFT method's bf16 train and eval steps compile AND run (XLA:CPU's fallback dot
    cannot run a bf16 x bf16 -> f32 product the fast kernels refuse: that fails only at run
    time); for NUMERICS, as close to float32 as XLA's own bf16 products are."""
    from mtlx.models.multitask import MultiTaskModel
    from mtlx.peft import registry
    from mtlx.train import optim
    from tests.peft_common import NAMES, TASKS, batch_for, random_params, tiny_bert
    batch = batch_for([0, 1, 2, 3, 0, 1, 2, 3])

    def build(dtype):
        cfg = registry.attach(tiny_bert(dtype=dtype), SMOKE[case], NAMES)
        model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
        params = random_params(model, batch, scale=0.1)
        mask = optim.trainable_mask(params, registry.trainable_patterns(cfg))
        return _step_losses(model, params, batch, trainable=mask)
    if case in NUMERICS:
        _bf16_vs_native(build)
    else:   # that it runs at all is what this case checks (CI time)
        assert np.isfinite(build("bfloat16")).all()


@pytest.mark.parametrize("weighting", ["pcgrad"])
def test_bf16_per_task_gradients_and_affinity_probe_run(weighting):
    """Per-task gradients (vmapped backward passes) and the affinity probe in bf16: under vmap
    XLA folds transposes into batched products unless they are kept apart."""
    from mtlx.models.multitask import MultiTaskModel
    from tests.peft_common import TASKS, batch_for, random_params, tiny_bert
    batch = batch_for([0, 1, 2, 3, 0, 1, 2, 3])

    def build(dtype):
        model = MultiTaskModel(tiny_bert(dtype=dtype, attention_dropout=0.1), TASKS, head_dropout=0.0)
        params = random_params(model, batch, scale=0.1)
        return _step_losses(model, params, batch, weighting=weighting, probe=True)
    _bf16_vs_native(build)


def test_bf16_t5_steps_run():
    from mtlx.models.multitask import MultiTaskModel
    from mtlx.peft import registry
    from tests.peft_common import T5_NAMES, T5_TASKS, batch_for, random_params, tiny_t5
    batch = batch_for([0, 1, 2, 3, 4, 0, 1, 4], t5=True)

    def build(dtype):
        cfg = registry.attach(tiny_t5(dtype=dtype), [{"method": "lora", "rank": 2}], T5_NAMES)
        model = MultiTaskModel(cfg, T5_TASKS, head_dropout=0.0)
        params = random_params(model, batch, scale=0.1)
        return _step_losses(model, params, batch)
    _bf16_vs_native(build)
