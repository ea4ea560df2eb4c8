"""mtlx.models.activations: the saved-input GELU VJPs' values and gradients against PyTorch
(float64, autograd), the residuals they keep, the policy, and BERT's gradients unchanged up to
rounding. The custom VJPs are traced under policy('saved_input') ('auto' takes them too)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals

from mtlx.models import activations as A

torch = pytest.importorskip("torch")

CASES = [(A.gelu, "none"), (A.gelu_tanh, "tanh")]


@pytest.fixture(autouse=True)
def _saved_input():
    with A.policy("saved_input"):
        yield


def _points(n=4001, seed=0):
    rng = np.random.default_rng(seed)
    # Wide range: the tails (erf saturates, tanh saturates) and the bulk around 0.
    return np.concatenate([np.linspace(-12.0, 12.0, n), rng.normal(0.0, 3.0, n)]).astype(np.float32)


def _torch_reference(x, approximate):
    t = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    y = torch.nn.functional.gelu(t, approximate=approximate)
    g = torch.linspace(-2.0, 2.0, t.numel(), dtype=torch.float64)
    (y * g).sum().backward()
    return y.detach().numpy(), t.grad.numpy(), g.numpy()


@pytest.mark.parametrize("fn,approximate", CASES)
def test_float32_values_and_gradients_match_torch_float64(fn, approximate):
    x = _points()
    ref_y, ref_dx, g = _torch_reference(x, approximate)
    y, vjp = jax.vjp(fn, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g, jnp.float32))
    assert y.dtype == jnp.float32 and dx.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("fn,approximate", CASES)
def test_bfloat16_rounds_the_float32_result(fn, approximate):
    # Computed in float32, returned in bf16: within one bf16 rounding of the float64 value (as
    # torch's bf16 kernels compute in float32), gradients too.
    x = _points(1001, seed=1)
    xb = jnp.asarray(x, jnp.bfloat16)
    xr = np.asarray(xb.astype(jnp.float32))   # the values the bf16 input holds
    ref_y, _, g = _torch_reference(xr, approximate)
    gb = jnp.asarray(g, jnp.bfloat16)
    y, vjp = jax.vjp(fn, xb)
    (dx,) = vjp(gb)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    # g was rounded to bf16 too: the reference's gradient with the rounded g.
    t = torch.tensor(xr.astype(np.float64), requires_grad=True)
    (torch.nn.functional.gelu(t, approximate=approximate)
     * torch.tensor(np.asarray(gb.astype(jnp.float32), np.float64))).sum().backward()
    ulp = 2.0 ** -8
    for got, want in ((y, ref_y), (dx, t.grad.numpy())):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, want, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("fn,approximate", CASES)
def test_second_derivative_matches_torch(fn, approximate):
    # The custom VJP defines the first derivative only; jax.grad of the gradient differentiates
    # the backward formula, which must agree with torch's double backward.
    x = jnp.linspace(-4.0, 4.0, 33, dtype=jnp.float32)
    d2 = jax.vmap(jax.grad(jax.grad(fn)))(x)
    t = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    (d1,) = torch.autograd.grad(torch.nn.functional.gelu(t, approximate=approximate).sum(), t,
                                create_graph=True)
    (ref,) = torch.autograd.grad(d1.sum(), t)
    np.testing.assert_allclose(np.asarray(d2), ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn,plain", [(A.gelu, lambda x: jax.nn.gelu(x, approximate=False)),
                                      (A.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True))])
def test_only_the_input_is_saved_for_the_backward(fn, plain):
    x = jnp.ones((16, 32), jnp.bfloat16)

    def big(f):
        res = saved_residuals(lambda v: f(v).astype(jnp.float32).sum(), x)
        return [r for r in res if r[0].shape == x.shape]

    saved = big(fn)
    assert len(saved) == 1 and "argument" in saved[0][1], saved
    assert len(big(plain)) >= 3      # what autodiff of the formula keeps
    with A.policy("autodiff"):       # the benchmark's A/B switch traces the plain version
        assert len(big(fn)) == len(big(plain))
    with A.policy("auto"):           # the default, on every platform: the input only
        assert len(big(fn)) == 1


def test_policy_is_checked_and_restored():
    with pytest.raises(ValueError, match="policy must be one of"):
        A.set_policy("fast")
    assert A.saves_input_only()
    with A.policy("autodiff"):
        assert not A.saves_input_only()
    assert A.saves_input_only()


def test_bert_gradients_equal_the_autodiff_activation():
    from mtlx.models.bert import BertConfig, BertEncoder
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0,
                     attention_dropout=0.0)
    model = BertEncoder(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids, mask)

    def loss(p):
        return jnp.sum(model.apply(p, ids, mask).last_hidden_state ** 2)

    g_new = jax.grad(loss)(params)
    with A.policy("autodiff"):
        g_old = jax.grad(loss)(params)
    scale = np.sqrt(sum(float(np.sum(np.asarray(b, np.float64) ** 2))
                        for b in jax.tree_util.tree_leaves(g_old)))
    for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # float32 both ways, the formula arranged differently: rounding-level differences
        # (against the whole gradient's norm: the key bias's gradient is zero up to rounding).
        assert np.linalg.norm(a - b) <= 1e-5 * scale
