"""The train state's small leaves stacked at the step's jit boundary (mtlx.train.stacking):
the plan, the round trip, and steps equal to the unstacked step (one device and sharded)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.train import sharding, stacking


def _tree():
    return {"heads": {f"t{i}": {"kernel": jnp.full((4, 3), float(i)), "bias": jnp.arange(3.0) + i}
                      for i in range(3)},
            "big": jnp.ones((300, 300)),             # over 2^16 elements: passes as it is
            "lone": jnp.zeros((5, 7), jnp.bfloat16),  # no other leaf of its shape and dtype
            "ids": jnp.arange(3, dtype=jnp.int32), "ids2": jnp.arange(3, 6, dtype=jnp.int32),
            "key": jax.random.key(0)}


def test_plan_groups_same_shape_dtype_small_leaves_and_round_trips():
    tree = _tree()
    plan = stacking.StackPlan.for_tree(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    shapes = sorted((leaves[g[0]].shape, str(leaves[g[0]].dtype), len(g)) for g in plan.groups)
    assert shapes == [((3,), "float32", 3), ((3,), "int32", 2), ((4, 3), "float32", 3)]
    rest = sorted(str(leaves[i].shape) for i in plan.rest)
    assert rest == ["()", "(300, 300)", "(5, 7)"]  # the key, the big leaf, the lone one
    assert plan.num_arrays == 6 and plan.num_leaves == 11
    packed = plan.pack(tree)
    assert isinstance(packed, stacking.Stacked) and len(jax.tree_util.tree_leaves(packed)) == 6
    for unpack in (plan.unpack, stacking.unpack_fn(plan), jax.jit(plan.unpack)):
        back = unpack(packed if unpack is plan.unpack else stacking.pack_fn(plan)(tree))
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
        for a, b in zip(jax.tree_util.tree_leaves(back), leaves):
            if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.dtype == b.dtype


def test_plan_refuses_another_tree_and_wants_stacking_reads_its_setting():
    plan = stacking.StackPlan.for_tree(_tree())
    with pytest.raises(ValueError, match="structure differs"):
        plan.pack({"x": jnp.ones(3)})
    with pytest.raises(ValueError, match="stacks"):
        plan.unpack(stacking.Stacked((), ()))
    few = [jnp.ones(2)] * 3
    many = [jnp.ones(2)] * stacking.AUTO_MIN_LEAVES
    assert not stacking.wants_stacking("auto", few) and stacking.wants_stacking("auto", many)
    assert stacking.wants_stacking("on", few) and not stacking.wants_stacking("off", many)
    assert stacking.wants_stacking(True, few) and not stacking.wants_stacking(False, many)
    with pytest.raises(ValueError, match="config.stack_state"):
        stacking.wants_stacking("yes", few)


def _run_cell(stack, optimizer="adamw"):
    from mtlx.bench import workload as W
    cell = W.Cell("adapters", "tiny", 32, 8, 8,
                  dataclasses.replace(W.Features(), stack_state=stack, optimizer=optimizer))
    setup = W.build_mtlx(cell, num_batches=3)
    state, out = setup.state, []
    for b in setup.batches[:3]:
        state, metrics = setup.step(state, b)
        out.append(jax.device_get(metrics))
    return setup, state, out


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_stacked_step_equals_the_unstacked_step(optimizer):
    s_on, st_on, m_on = _run_cell("on", optimizer)
    s_off, st_off, m_off = _run_cell("off", optimizer)
    assert isinstance(st_on, stacking.Stacked) and not isinstance(st_off, stacking.Stacked)
    n_leaves = len(jax.tree_util.tree_leaves(st_off))
    assert len(jax.tree_util.tree_leaves(st_on)) < n_leaves / 4  # the call's arrays
    plan = stacking.StackPlan.for_tree(st_off)
    full = stacking.unpack_fn(plan)(st_on)
    # The same computation compiled into other fusions: equal up to float32 rounding (an
    # ulp or two after three AdamW steps; dev CPU), not bit for bit.
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(st_off)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b)
            continue
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
        worst = max(worst, float(np.max(np.abs(a - b))))
    assert worst < 1e-6
    for a, b in zip(m_on, m_off):
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert int(full.step) == 3


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_sharded_stacked_step_matches_the_sharded_step(optimizer):
    """The boundary stacked on a DP2 x FSDP4 mesh; with Adafactor the update runs on stacks
    too (vmapped over their rows)."""
    from tests.test_sharding import STEPS, batch16, reference_setup
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    results = []
    for stack in (False, True):
        step, state = reference_setup(optimizer, stacked=stack and optimizer == "adafactor")
        abstract = jax.eval_shape(lambda s: s, state)
        tree_sh = sharding.tree_shardings(mesh, abstract)
        plan = stacking.StackPlan.for_tree(abstract, tree_sh) if stack else None
        jitted, state_sh = sharding.jit_train_step(step, mesh, abstract, batch16(0), stack=plan)
        if plan is None:
            state = jax.device_put(state, tree_sh)
        else:
            assert plan.groups  # the heads' biases and the layer norms stack
            state = stacking.put(state, plan, tree_sh)
            for arr, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state_sh)):
                assert arr.sharding.is_equivalent_to(sh, arr.ndim)
        for i in range(STEPS):
            b = batch16(i)
            state, _ = jitted(state, jax.device_put(b, sharding.batch_sharding(mesh, b)))
        if plan is not None:
            state = stacking.unpack_fn(plan)(state)
        results.append([(jax.tree_util.keystr(p), np.asarray(x))
                        for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]])
    for (path, a), (_, b) in zip(*results):  # other fusions: float32 rounding apart
        if optimizer == "adafactor" and ("['key']['bias']" in path or "['qa']['bias']" in path):
            # Gradients zero but for rounding (softmax ignores a bias shared by every key, or
            # by every position of a span's start / end), which Adafactor normalises into
            # updates of +-1 x the learning rate (0.01) x its parameter-scale floor (1e-3): the
            # two runs' rounding differs, so these leaves agree only to a sign flip a step.
            np.testing.assert_allclose(a, b, rtol=0, atol=STEPS * 2e-5)
            continue
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9, err_msg=path)


@pytest.mark.parametrize("name,masked", [("adamw", True), ("sgd", True), ("adafactor", True),
                                         ("adafactor", False)])
def test_stacked_update_equals_the_per_leaf_update(name, masked):
    """make_optimizer(..., stacked=True): same state (per leaf, name-keyed), same updates:
    weight decay only where the per-leaf mask puts it, frozen leaves untouched, clipping.
    Adafactor runs vmapped over its stacks: the (130, 140) kernels' second moments are
    factored per leaf (a row and a column vector each), the small leaves' are not."""
    import ml_collections
    import optax
    from mtlx.train import optim
    rng = np.random.default_rng(0)
    params = {f"task{i}": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
                           "wide": jnp.asarray(rng.normal(size=(130, 140)), jnp.float32)}
              for i in range(5)}
    params["layer_norm"] = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
    params["big"] = jnp.asarray(rng.normal(size=(300, 300)), jnp.float32)
    params["frozen"] = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}
    trainable = jax.tree_util.tree_map(lambda x: True, params)
    trainable["frozen"] = {"kernel": False, "bias": False}
    if not masked:
        trainable = None
    cfg = ml_collections.ConfigDict(dict(optimizer=name, learning_rate=1e-2, warmup_steps=0,
                                         num_train_steps=10, schedule="constant", weight_decay=0.1,
                                         grad_clip_norm=1.0, momentum=0.9))
    plain = optim.make_optimizer(cfg, params, trainable)
    stacked = optim.make_optimizer(cfg, params, trainable, stacked=True)
    sa, sb = plain.init(params), stacked.init(params)
    assert jax.tree_util.tree_structure(sa) == jax.tree_util.tree_structure(sb)
    pa = pb = pc = params
    sc = stacked.init(params)
    fused = jax.jit(lambda g, s, p: optim.update_params(stacked, g, s, p))
    for _ in range(4):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(3 * rng.normal(size=x.shape), x.dtype), params)
        ua, sa = jax.jit(plain.update)(g, sa, pa)
        ub, sb = jax.jit(stacked.update)(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        pc, sc = fused(g, sc, pc)  # the updates added on the stacks (what the step calls)
    for a, b in zip(jax.tree_util.tree_leaves((pa, sa)), jax.tree_util.tree_leaves((pb, sb))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    assert jax.tree_util.tree_structure((pc, sc)) == jax.tree_util.tree_structure((pb, sb))
    for b, c in zip(jax.tree_util.tree_leaves((pb, sb)), jax.tree_util.tree_leaves((pc, sc))):
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=1e-6, atol=1e-8)
    if masked:
        np.testing.assert_array_equal(np.asarray(pb["frozen"]["kernel"]), 1.0)
        np.testing.assert_array_equal(np.asarray(pc["frozen"]["kernel"]), 1.0)
    if name == "adafactor":  # factored by each leaf's shape, not the stack's
        shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(sb)}
        assert {(130,), (140,), (300,)} <= shapes and (5, 130) not in shapes
    # a transformation without update_and_apply: update, then optax.apply_updates
    pd, _ = optim.update_params(plain, g, sa, pa)
    ud, _ = plain.update(g, sa, pa)
    for a, d in zip(jax.tree_util.tree_leaves(optax.apply_updates(pa, ud)), jax.tree_util.tree_leaves(pd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(d))
    # a few programs, not one a leaf: the stacked update's traced program is smaller
    n_plain = len(jax.make_jaxpr(plain.update)(g, sa, pa).eqns)
    n_stacked = len(jax.make_jaxpr(stacked.update)(g, sb, pb).eqns)
    assert n_stacked < n_plain


def _entry_instructions(compiled_text: str) -> int:
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    return sum(1 for line in entry.splitlines()[1:] if " = " in line)


def test_stacked_step_program_does_not_grow_a_program_per_task_leaf():
    """A many-task step is about as many top-level ops as a two-task step: the per-task leaves'
    gradients, norm, update and new values stay on stacks end to end (a stack of a stack's
    rows folds back into it). Before the twelfth session the adding of updates and the
    gradient norm ran per leaf: 3,227 ops at 64 tasks against 698 for one (tiny adapters)."""
    from mtlx.bench import workload

    def count(tasks):
        cell = workload.Cell("adapters", "tiny", 16, tasks, 4, workload.Features(stack_state="on"))
        s = workload.build_mtlx(cell, num_batches=1)
        return _entry_instructions(s.step.lower(s.state, s.batches[0]).compile().as_text())
    few, many = count(2), count(32)
    # 32 tasks x (4 adapter sites x 4 leaves + 2 head leaves) x (param, 2 moments) = 1,728 more
    # leaves: a program per leaf would more than triple the count
    assert many < 1.5 * few, (few, many)
