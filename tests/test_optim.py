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
