"""Data-parallel, FSDP and tensor-parallel runs on 8 host CPU devices match one device."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.train import optim, sharding
from mtlx.train.step import create_state, make_train_step

from tests.test_multitask import TASKS, mixed_batch, tiny_bert

STEPS = 3


def batch16(seed):
    # 16 rows (divisible by 8 devices); rows 14-15 repeat classification rows 0-1.
    return mixed_batch(seed).select(np.r_[np.arange(14), 0, 1])


def reference_setup(optimizer="sgd", stacked=False):
    """The model, unjitted step and initial state every sharded/multi-host run starts from
    (also used by tests/mh_worker.py); stacked: the optimizer's update on stacks of the small
    same-shaped leaves (`optim.make_optimizer(..., stacked=True)`)."""
    model = MultiTaskModel(tiny_bert(hidden_dropout=0.0, attention_dropout=0.0, num_heads=4),
                           TASKS, head_dropout=0.0)
    params = init_params(model, jax.random.key(0), batch16(0))
    cfg = ml_collections.ConfigDict(dict(optimizer=optimizer, momentum=0.9,
                                         learning_rate=0.1 if optimizer == "sgd" else 0.01,
                                         warmup_steps=0, num_train_steps=10, schedule="constant",
                                         grad_clip_norm=1.0))
    tx = optim.make_optimizer(cfg, params, stacked=stacked)
    return make_train_step(model, tx), create_state(params, tx, jax.random.key(1))


def run(mesh_shape):
    step, state = reference_setup()
    if mesh_shape is None:
        jitted, place = jax.jit(step), (lambda b: b)
    else:
        mesh = sharding.make_mesh(mesh_shape)
        abstract = jax.eval_shape(lambda s: s, state)
        jitted, state_sh = sharding.jit_train_step(step, mesh, abstract, batch16(0))
        state = jax.device_put(state, state_sh)
        place = lambda b: jax.device_put(b, sharding.batch_sharding(mesh, b))
    losses = []
    for i in range(STEPS):
        state, metrics = jitted(state, place(batch16(i)))
        losses.append(np.asarray(metrics["task_loss"]))
    return jax.tree_util.tree_map(np.asarray, state.params), np.stack(losses), state


@pytest.fixture(scope="module")
def reference():
    return run(None)


@pytest.mark.parametrize("mesh_shape", [
    {"data": 8},                           # data parallel
    {"data": 2, "fsdp": 4},                # FSDP (ZeRO-3 style) + data
    {"data": 2, "tensor": 4},              # tensor parallel + data
    {"fsdp": 2, "tensor": 4},
])
def test_sharded_matches_single_device(reference, mesh_shape):
    ref_params, ref_losses, _ = reference
    params, losses, state = run(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # The parameters really are sharded as the rules say.
    q = state.params["backbone"]["layer_0"]["attention"]["query"]["kernel"]
    expect = P(sharding.LOGICAL_TO_MESH["embed"] if mesh_shape.get("fsdp", 1) > 1 else None,
               "tensor" if mesh_shape.get("tensor", 1) > 1 else None)
    assert q.sharding.spec == expect


def test_mesh_errors():
    with pytest.raises(ValueError, match="config.mesh: unknown axis \\['model'\\]"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 16 devices, 8 available"):
        sharding.make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})


def test_undividable_dims_stay_replicated():
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    assert sharding.spec_for(mesh, ("embed", "heads"), (16, 6)) == P(None, None)
    assert sharding.spec_for(mesh, ("embed", "heads"), (16, 8)) == P(None, "tensor")
