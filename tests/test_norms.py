"""mtlx.models.norms: the residual LayerNorm whose gradient keeps only its inputs, against
PyTorch (float64 autograd of torch.nn.functional.layer_norm over x + s) and flax's LayerNorm,
the residuals it keeps, the policy, and BERT's gradients unchanged up to rounding. The custom
VJP is the default policy; the fixture says so for every test."""

import flax.linen as nn
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals

from mtlx.models import norms as N

torch = pytest.importorskip("torch")

EPS = 1e-12


@pytest.fixture(autouse=True)
def _saved_inputs():
    with N.policy("saved_inputs"):
        yield


def _inputs(dtype, shape=(3, 5, 24), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)     # rows with a non-zero mean
    s = jnp.asarray(rng.normal(0.0, 1.0, shape), dtype)
    scale = jnp.asarray(1.0 + 0.3 * rng.normal(size=shape[-1]), jnp.float32)
    bias = jnp.asarray(0.3 * rng.normal(size=shape[-1]), jnp.float32)
    ct = rng.normal(size=shape)
    return x, s, scale, bias, ct


def _torch(x, s, scale, bias, ct):
    t = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, s, scale, bias)]
    y = torch.nn.functional.layer_norm(t[0] + t[1], (t[0].shape[-1],), t[2], t[3], eps=EPS)
    (y * torch.tensor(ct)).sum().backward()
    return y.detach().numpy(), [a.grad.numpy() for a in t]


def _ours(x, s, scale, bias, ct, out_dtype):
    def loss(*a):
        return jnp.sum(N.residual_layer_norm(*a, EPS, out_dtype).astype(jnp.float32) * ct)
    y = jax.jit(lambda *a: N.residual_layer_norm(*a, EPS, out_dtype))(x, s, scale, bias)
    return y, jax.jit(jax.grad(loss, (0, 1, 2, 3)))(x, s, scale, bias)


def test_float32_values_and_gradients_match_torch_float64():
    x, s, scale, bias, ct = _inputs(jnp.float32)
    y, grads = _ours(x, s, scale, bias, ct, jnp.float32)
    ref_y, ref_grads = _torch(x, s, scale, bias, ct)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=2e-6, rtol=0)
    for name, g, r in zip(("x", "s", "scale", "bias"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=2e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(grads[0]), np.asarray(grads[1]))   # one dh


def test_bfloat16_inputs_give_bfloat16_gradients_of_the_float32_computation():
    """bf16 x and s: the sum and statistics in float32 (torch float64 over the same bf16
    numbers is the reference); the output and the inputs' gradients rounded once to bf16."""
    x, s, scale, bias, ct = _inputs(jnp.bfloat16)
    y, grads = _ours(x, s, scale, bias, ct, jnp.bfloat16)
    # the output's cotangent reaches the norm as bf16 (the transpose of the cast to float32)
    ref_y, ref_grads = _torch(x, s, scale, bias, np.asarray(jnp.asarray(ct, jnp.bfloat16), np.float64))
    assert y.dtype == jnp.bfloat16 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
    assert grads[2].dtype == grads[3].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=0, rtol=2.0 ** -8)
    for name, g, r in zip(("x", "s"), grads[:2], ref_grads[:2]):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2.0 ** -8,
                                   atol=1e-6 * np.abs(r).max(), err_msg=name)
    for name, g, r in zip(("scale", "bias"), grads[2:], ref_grads[2:]):
        np.testing.assert_allclose(np.asarray(g), r, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_both_policies_equal_flax_layer_norm_over_the_float32_sum(dtype):
    """Forward values bit-equal to flax.linen.LayerNorm (two-pass variance) over x + s in
    float32, cast to dtype; gradients equal up to float32 rounding."""
    x, s, scale, bias, ct = _inputs(dtype, seed=1)

    def flax_ln(x, s, scale, bias):
        h = x.astype(jnp.float32) + s.astype(jnp.float32)
        y = nn.LayerNorm(epsilon=EPS, dtype=jnp.float32, use_fast_variance=False).apply(
            {"params": {"scale": scale, "bias": bias}}, h)
        return y.astype(dtype)

    ref = jax.jit(flax_ln)(x, s, scale, bias)
    ref_g = jax.jit(jax.grad(lambda *a: jnp.sum(flax_ln(*a).astype(jnp.float32) * ct),
                             (0, 1, 2, 3)))(x, s, scale, bias)
    for pol in ("saved_inputs", "autodiff"):
        with N.policy(pol):
            y, grads = _ours(x, s, scale, bias, ct, dtype)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
        for g, r in zip(grads, ref_g):
            assert g.dtype == r.dtype
            tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -8 * float(jnp.abs(r.astype(jnp.float32)).max())
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                       atol=max(tol, 1e-6), rtol=0)


def test_only_the_inputs_and_row_statistics_are_saved():
    x, s, scale, bias, _ = _inputs(jnp.bfloat16, shape=(4, 8, 32))

    def saved(policy):
        with N.policy(policy):
            res = saved_residuals(
                lambda a, b: N.residual_layer_norm(a, b, scale, bias, EPS, jnp.bfloat16)
                .astype(jnp.float32).sum(), x, s)
        return [(r[0].shape, str(r[0].dtype)) for r in res]

    big = [r for r in saved("saved_inputs") if r[0] == x.shape]
    assert big == [(x.shape, "bfloat16")] * 2, saved("saved_inputs")   # x and s, nothing else
    assert all(shape in (x.shape, (4, 8, 1), (32,)) for shape, _ in saved("saved_inputs"))
    # autodiff keeps float32 tensors of the full shape
    assert any(shape == x.shape and dtype == "float32" for shape, dtype in saved("autodiff"))


def test_policy_is_checked_and_restored():
    with pytest.raises(ValueError, match="mtlx.models.norms: policy must be one of"):
        N.set_policy("fused")
    assert N._POLICY.value == "saved_inputs" and N.saves_inputs_only()   # the default
    with N.policy("autodiff"):
        assert not N.saves_inputs_only()
    assert N.saves_inputs_only()


def test_module_parameters_are_flax_layer_norm_s():
    x, s, *_ = _inputs(jnp.float32)
    params = N.ResidualLayerNorm(epsilon=EPS).init(jax.random.key(0), x, s)["params"]
    ref = nn.LayerNorm().init(jax.random.key(0), x)["params"]
    assert jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), params) == \
        jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), ref)
    np.testing.assert_array_equal(params["scale"], ref["scale"])
    np.testing.assert_array_equal(params["bias"], ref["bias"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bert_gradients_equal_under_both_policies(dtype):
    from mtlx.models.bert import BertConfig, BertEncoder
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0,
                     attention_dropout=0.0, dtype=jnp.dtype(dtype))
    model = BertEncoder(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids, mask)

    def loss(p):
        return jnp.sum(model.apply(p, ids, mask).last_hidden_state.astype(jnp.float32) ** 2)

    out_new = model.apply(params, ids, mask).last_hidden_state
    g_new = jax.jit(jax.grad(loss))(params)
    with N.policy("autodiff"):
        out_old = model.apply(params, ids, mask).last_hidden_state
        g_old = jax.jit(jax.grad(loss))(params)
    np.testing.assert_array_equal(np.asarray(out_new, np.float32), np.asarray(out_old, np.float32))
    scale = np.sqrt(sum(float(np.sum(np.asarray(b, np.float64) ** 2))
                        for b in jax.tree_util.tree_leaves(g_old)))
    rel = 1e-5 if dtype == "float32" else 2e-2   # bf16: the same rounding steps, reordered
    for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= rel * scale
