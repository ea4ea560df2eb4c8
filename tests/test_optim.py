"""Optimizers and schedules from config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtlx.train import optim


def cfg(**kw):
    c = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1.0, warmup_steps=10,
                                       num_train_steps=110, schedule="linear", weight_decay=0.0))
    c.update(kw)
    return c


@pytest.mark.parametrize("kind,expect", [
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
    ("cosine", {0: 0.0, 10: 1.0, 60: 0.5, 110: 0.0}),
])
def test_warmup_then_decay(kind, expect):
    sched = optim.make_schedule(cfg(schedule=kind))
    for step, value in expect.items():
        np.testing.assert_allclose(float(sched(step)), value, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_optimizers_minimise_a_quadratic(name):
    params = {"w": jnp.ones((4, 4)) * 3.0, "b": jnp.ones((4,))}
    tx = optim.make_optimizer(cfg(optimizer=name, learning_rate=0.1, warmup_steps=0,
                                  schedule="constant", grad_clip_norm=1.0), params)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
    first = float(loss(params))
    for _ in range(50):
        g = jax.grad(loss)(params)
        upd, state = tx.update(g, state, params)
        params = jax.tree_util.tree_map(jnp.add, params, upd)
    assert float(loss(params)) < 0.5 * first


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros((3,))}
    tx = optim.make_optimizer(cfg(optimizer="sgd", learning_rate=1.0, warmup_steps=0,
                                  schedule="constant", grad_clip_norm=0.5), params)
    upd, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
    np.testing.assert_allclose(float(jnp.linalg.norm(upd["w"])), 0.5, rtol=1e-6)


def test_weight_decay_skips_biases_and_norms():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "layer_norm": {"scale": jnp.ones((2,))}}
    tx = optim.make_optimizer(cfg(learning_rate=1.0, warmup_steps=0, schedule="constant",
                                  weight_decay=0.1), params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(upd["dense"]["kernel"]).max()) > 0  # decayed
    assert float(jnp.abs(upd["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(upd["layer_norm"]["scale"]).max()) == 0


def _many_leaves(seed=0):
    """More leaves than one concatenation takes, two float dtypes, a scalar and odd shapes."""
    rng = np.random.default_rng(seed)
    tree = {"task%02d" % i: {"kernel": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
            for i in range(optim.NORM_CHUNK)}
    tree["bf16"] = [jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16) for _ in range(3)]
    tree["scalar"] = jnp.asarray(rng.normal(), jnp.float32)
    tree["large"] = jnp.asarray(rng.normal(size=(optim.NORM_SMALL_LEAF + 1,)), jnp.float32)
    return tree


def _norm64(tree):
    return np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                       for x in jax.tree_util.tree_leaves(tree)))


def test_global_norm_is_the_norm_of_every_leaf_in_float32():
    tree = _many_leaves()
    assert len(jax.tree_util.tree_leaves(tree)) > 2 * optim.NORM_CHUNK
    got = jax.jit(optim.global_norm)(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _norm64(tree), rtol=1e-6)
    with optim.grad_norm_policy("per_leaf"):      # optax's formula (bf16 leaves summed in bf16)
        np.testing.assert_allclose(float(optim.global_norm(tree)), _norm64(tree), rtol=1e-2)
    assert float(optim.global_norm({})) == 0.0
    with pytest.raises(ValueError, match="mtlx.train.optim: policy must be one of"):
        optim.set_grad_norm_policy("fast")


def test_grouped_norm_reduces_per_chunk_not_per_leaf():
    tree = {k: v for k, v in _many_leaves().items() if k.startswith("task") or k == "large"}

    def reductions(policy):
        import jax.extend
        count = 0

        def walk(jaxpr):
            nonlocal count
            for e in jaxpr.eqns:
                count += str(e.primitive) == "reduce_sum"
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    walk(sub)
        with optim.grad_norm_policy(policy):
            # (a new function each time: a traced function is cached without the policy)
            walk(jax.make_jaxpr(lambda t: optim.global_norm(t))(tree).jaxpr)
        return count
    # 128 small float32 leaves: two chunks of NORM_CHUNK; the large leaf alone
    assert reductions("grouped") == 3
    assert reductions("per_leaf") == 2 * optim.NORM_CHUNK + 1   # one a leaf


@pytest.mark.parametrize("scale", [0.01, 100.0])   # below and above the clipping threshold
def test_clip_by_global_norm_equals_optax(scale):
    import optax
    tree = jax.tree_util.tree_map(lambda x: x * scale,
                                  {k: v for k, v in _many_leaves(1).items() if k != "bf16"})
    ours, _ = optim.clip_by_global_norm(1.0).update(tree, optim.clip_by_global_norm(1.0).init(tree))
    ref, _ = optax.clip_by_global_norm(1.0).update(tree, optax.clip_by_global_norm(1.0).init(tree))
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9)
    clipped = _norm64(ours)
    np.testing.assert_allclose(clipped, min(1.0, _norm64(tree)), rtol=1e-5)
