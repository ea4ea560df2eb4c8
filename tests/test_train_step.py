"""The one compiled train step: compiles once, accumulation is exact, frozen params stay put."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtlx.models import heads as H
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.train import optim
from mtlx.train.step import count_compilations, create_state, finite_or_raise, make_train_step, task_counts

from tests.test_multitask import TASKS, mixed_batch, tiny_bert


def opt_cfg(**kw):
    c = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-3, warmup_steps=2,
                                       num_train_steps=20, schedule="linear", weight_decay=0.01,
                                       grad_clip_norm=1.0))
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def setup():
    model = MultiTaskModel(tiny_bert(hidden_dropout=0.0, attention_dropout=0.0), TASKS, head_dropout=0.0)
    params = init_params(model, jax.random.key(0), mixed_batch())
    return model, params


def test_compiles_once_for_any_task_mix(setup):
    model, params = setup
    tx = optim.make_optimizer(opt_cfg(), params)
    state = create_state(params, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, tx))
    rng = np.random.default_rng(0)
    for i in range(4):
        ids = rng.integers(0, len(TASKS), size=14)  # a different task mix every step
        if i == 3:
            ids[:] = 2  # a single-task batch: still the same executable
        b = mixed_batch(seed=i, task_ids=ids)
        state, metrics = step(state, b)
        assert np.all(np.isfinite(metrics["task_loss"]))
        absent = np.setdiff1d(np.arange(len(TASKS)), ids)
        assert np.all(np.asarray(metrics["task_loss"])[absent] == 0)
    assert count_compilations(step) == 1
    assert int(state.step) == 4


def test_loss_is_weighted_sum_of_present_task_means(setup):
    model, params = setup
    tx = optim.make_optimizer(opt_cfg(), params)
    w = np.arange(1, len(TASKS) + 1, dtype=np.float32)
    step = jax.jit(make_train_step(model, tx, task_weights=w))
    b = mixed_batch()
    _, metrics = step(create_state(params, tx, jax.random.key(1)), b)
    out = model.apply({"params": params}, b)
    losses, counts = H.task_losses(out, b, TASKS)
    np.testing.assert_allclose(metrics["task_loss"], losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.sum(w * np.asarray(losses)), rtol=1e-5)
    np.testing.assert_array_equal(task_counts(b, TASKS), counts)


def test_gradient_accumulation_equals_full_batch(setup):
    model, params = setup
    cfg = opt_cfg(optimizer="sgd", weight_decay=0.0, grad_clip_norm=None, warmup_steps=0, schedule="constant")
    tx = optim.make_optimizer(cfg, params)
    # 14 rows, 2 microbatches of 7; a multiple-choice question must not straddle microbatches,
    # so order the rows to keep question rows 5-7 and 12-13 together.
    b = mixed_batch().select(np.array([0, 1, 2, 5, 6, 7, 3, 4, 8, 9, 10, 11, 12, 13]))
    # group ids as the pipeline gives them: the question's first row in the WHOLE batch, so the
    # second microbatch's question has id 12 in a microbatch of 7 rows (its loss was -inf and
    # the parameters NaN when the loss took the id as its segment)
    g = np.asarray(b.group_ids).copy()
    g[[3, 4, 5]], g[[12, 13]] = 3, 12
    b = b.replace(group_ids=jnp.asarray(g))
    full = jax.jit(make_train_step(model, tx))(create_state(params, tx, jax.random.key(1)), b)
    acc = jax.jit(make_train_step(model, tx, accum_steps=2))(create_state(params, tx, jax.random.key(1)), b)
    np.testing.assert_allclose(full[1]["task_loss"], acc[1]["task_loss"], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(full[0].params), jax.tree_util.tree_leaves(acc[0].params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_stay_bit_identical(setup):
    model, params = setup
    mask = optim.trainable_mask(params, [r"^heads/", r"LayerNorm|layer_norm|_norm"])
    tx = optim.make_optimizer(opt_cfg(), params, trainable=mask)
    state = create_state(params, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, tx))
    for i in range(3):
        state, _ = step(state, mixed_batch(seed=i))
    flat_m = jax.tree_util.tree_leaves(mask)
    flat_0 = jax.tree_util.tree_leaves(params)
    flat_1 = jax.tree_util.tree_leaves(state.params)
    n_frozen = n_moved = 0
    for m, a, b in zip(flat_m, flat_0, flat_1):
        if m:
            n_moved += int(not np.array_equal(a, b))
        else:
            n_frozen += 1
            np.testing.assert_array_equal(a, b)
    assert n_frozen > 0 and n_moved > 0


def test_bad_config_errors(setup):
    model, params = setup
    with pytest.raises(ValueError, match="config.trainable.*nomatch"):
        optim.trainable_mask(params, ["nomatch"])
    with pytest.raises(ValueError, match="config.optimizer.*'lamb'"):
        optim.make_optimizer(opt_cfg(optimizer="lamb"), params)
    with pytest.raises(ValueError, match="config.schedule"):
        optim.make_optimizer(opt_cfg(schedule="exp"), params)
    with pytest.raises(ValueError, match="config.task_weights"):
        make_train_step(model, optim.make_optimizer(opt_cfg(), params), task_weights=[1.0])
    with pytest.raises(FloatingPointError, match="step 7.*'reg'"):
        finite_or_raise({"loss": np.nan, "task_loss": np.array([0, 0, np.nan, 0, 0, 0, 0.])}, 7,
                        [t.name for t in TASKS])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_step(setup, policy):
    model, params = setup
    cfg = opt_cfg(optimizer="sgd", weight_decay=0.0, warmup_steps=0, schedule="constant")
    tx = optim.make_optimizer(cfg, params)
    remat_model = MultiTaskModel(tiny_bert(hidden_dropout=0.0, attention_dropout=0.0, remat=policy),
                                 TASKS, head_dropout=0.0)
    b = mixed_batch()
    ref = jax.jit(make_train_step(model, tx))(create_state(params, tx, jax.random.key(1)), b)
    got = jax.jit(make_train_step(remat_model, tx))(create_state(params, tx, jax.random.key(1)), b)
    for x, y in zip(jax.tree_util.tree_leaves(ref[0].params), jax.tree_util.tree_leaves(got[0].params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="config.remat: unknown remat policy 'some'"):
        tiny_bert(remat="some")


def test_bf16_compute_keeps_fp32_master_weights(setup):
    model, params = setup
    bf16 = MultiTaskModel(tiny_bert(hidden_dropout=0.0, attention_dropout=0.0, dtype="bfloat16"),
                          TASKS, head_dropout=0.0)
    tx = optim.make_optimizer(opt_cfg(), params)
    state, metrics = jax.jit(make_train_step(bf16, tx))(create_state(params, tx, jax.random.key(1)), mixed_batch())
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    out = bf16.apply({"params": params}, mixed_batch())
    assert out["pooled"].dtype == jnp.bfloat16
    _, ref_metrics = jax.jit(make_train_step(model, tx))(create_state(params, tx, jax.random.key(1)), mixed_batch())
    np.testing.assert_allclose(metrics["task_loss"], ref_metrics["task_loss"], rtol=0.05, atol=0.02)
