"""Every PEFT method, routed per example: a mixed-task batch gives each example exactly what it
gets in a single-task batch (<= 1e-5, float32), on a tiny BERT and RoBERTa (T5:
tests/test_peft_t5.py), and tasks without weights get the plain model's outputs."""

import dataclasses

import jax
import jax.extend
import numpy as np
import pytest

from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from mtlx.peft import routing as R

from tests.peft_common import (METHODS, MIXED, NAMES, TASKS, abstract, apply_jit, batch_for, build,
                               compare_mixed_vs_single, init, random_params,
                               strip_extensions, tiny_bert)

# A subset of tasks own weights: the others must see the plain model.
SUBSET = ("b", "c")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bert_mixed_batch_equals_single_task_batches(method):
    model = build(tiny_bert(), TASKS, NAMES, METHODS[method])
    params = random_params(model, batch_for(MIXED))
    out = compare_mixed_vs_single(model, params, MIXED, t5=False)
    # The method really changes the outputs (random non-zero weights).
    plain = MultiTaskModel(tiny_bert(), TASKS, head_dropout=0.0)
    ref = apply_jit(plain, strip_extensions(params, plain), batch_for(MIXED, seed=1))
    assert np.abs(out["pooled"] - ref["pooled"]).max() > 1e-3, "the method changed nothing"


@pytest.mark.parametrize("method", ["lora", "houlsby", "parallel", "prefix", "prompt",
                                    "compacter", "ia3", "fusion"])
def test_tasks_without_weights_get_the_plain_model(method):
    cfgs = [dict(c, tasks=list(SUBSET)) for c in METHODS[method]]
    model = build(tiny_bert(), TASKS, NAMES, cfgs)
    params = random_params(model, batch_for(MIXED))
    plain = MultiTaskModel(tiny_bert(), TASKS, head_dropout=0.0)
    batch = batch_for(MIXED, seed=2)
    out = apply_jit(model, params, batch)
    ref = apply_jit(plain, strip_extensions(params, plain), batch)
    ids = np.asarray(MIXED)
    without = np.isin(ids, [NAMES.index(t) for t in NAMES if t not in SUBSET])
    with_w = np.isin(ids, [NAMES.index(t) for t in SUBSET])
    np.testing.assert_allclose(out["pooled"][without], ref["pooled"][without], atol=1e-5, rtol=0)
    assert np.abs(out["pooled"][with_w] - ref["pooled"][with_w]).max() > 1e-3


def test_parameters_are_keyed_by_task_name():
    model = build(tiny_bert(), TASKS, NAMES, METHODS["combined"])
    params = abstract(model, batch_for(MIXED))
    bb = params["backbone"]
    assert set(bb["layer_0"]["attention"]["query"]["lora"]) == {"b", "c"}
    assert bb["layer_0"]["attention"]["query"]["lora"]["b"]["A"].shape == (16, 2)
    assert set(bb["layer_1"]["ffn"]["adapter"]) == set(NAMES)
    assert bb["layer_1"]["ffn"]["adapter"]["a"]["down"]["kernel"].shape == (16, 4)
    assert set(bb["layer_0"]["attention"]["prefix"]) == {"a"}
    assert set(bb["layer_0"]["ffn"]["output"]["ia3"]) == {"a", "d"}
    assert bb["layer_0"]["ffn"]["output"]["ia3"]["a"]["scale"].shape == (32,)  # FFN activations
    assert bb["layer_0"]["attention"]["key"]["ia3"]["d"]["scale"].shape == (16,)


def test_adding_a_task_keeps_every_other_weight():
    import flax.traverse_util as tu
    from mtlx.models.heads import TaskHead
    cfgs = METHODS["combined"][:2]
    p1 = init(build(tiny_bert(num_layers=1), TASKS, NAMES, cfgs), batch_for(MIXED))
    more = TASKS + (TaskHead("e", "classification", 2),)
    p2 = init(build(tiny_bert(num_layers=1), more, NAMES + ("e",), cfgs), batch_for(MIXED))
    f1, f2 = tu.flatten_dict(p1, sep="/"), tu.flatten_dict(p2, sep="/")
    assert set(f1) < set(f2)
    assert all("/e/" in k or k.startswith("heads/e/") for k in set(f2) - set(f1))
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k])


# ------------------------------------------------------------------ routing functions alone

@pytest.mark.parametrize("impl", R.IMPLEMENTATIONS)
@pytest.mark.parametrize("k,n", [(4, 7), (7, 4)])   # onehot: input spread (k <= n) or output select
def test_routed_matmul_equals_per_example_loop(impl, k, n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, k)).astype(np.float32)
    w = rng.normal(size=(3, k, n)).astype(np.float32)
    group = np.array([2, 0, 2, 1, 0, 2])
    got = np.asarray(R.routed_matmul(x, w, group, impl))
    want = np.stack([x[i] @ w[g] for i, g in enumerate(group)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # gradients too (the ragged path sorts and unsorts)
    gx, gw = jax.grad(lambda a, b: (R.routed_matmul(a, b, group, impl) ** 2).sum(), (0, 1))(x, w)
    rx, rw = jax.grad(lambda a, b: (jax.numpy.einsum("bik,bkn->bin", a, b[group]) ** 2).sum(),
                      (0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, atol=1e-4)
    np.testing.assert_allclose(gw, rw, atol=1e-4)


@pytest.mark.parametrize("impl", R.IMPLEMENTATIONS)
@pytest.mark.parametrize("k,n", [(4, 7), (7, 4)])
def test_per_token_routed_matmul_equals_a_loop_over_tokens(impl, k, n):
    """Rows that mix tasks: group [B, L] routes every token (x [B, L, ..., k]); 'gather' runs
    as 'onehot' there (few groups). Values and gradients against a loop over tokens."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 2, k)).astype(np.float32)   # an inner axis as fusion's sources
    w = rng.normal(size=(3, k, n)).astype(np.float32)
    group = rng.integers(0, 3, size=(3, 4))
    got = np.asarray(R.routed_matmul(x, w, group, impl))
    want = np.stack([np.stack([x[b, l] @ w[group[b, l]] for l in range(4)]) for b in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    ref = lambda a, b: (jax.numpy.einsum("blik,blkn->blin", a, b[group]) ** 2).sum()  # noqa: E731
    gx, gw = jax.grad(lambda a, b: (R.routed_matmul(a, b, group, impl) ** 2).sum(), (0, 1))(x, w)
    rx, rw = jax.grad(ref, (0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, atol=1e-4)
    np.testing.assert_allclose(gw, rw, atol=1e-4)


def test_per_token_gather_runs_as_onehot_for_few_groups_and_ragged_for_many():
    def primitives(g):
        x = np.ones((2, 3, 4), np.float32)
        w = np.ones((g, 4, 5), np.float32)
        group = np.zeros((2, 3), np.int32)
        jaxpr = jax.make_jaxpr(lambda a, b: R.routed_matmul(a, b, group, "gather"))(x, w)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}
    few, many = primitives(R.PER_TOKEN_ONEHOT_MAX_GROUPS), primitives(R.PER_TOKEN_ONEHOT_MAX_GROUPS + 1)
    assert "ragged_dot_general" not in few and "gather" not in few
    assert "ragged_dot_general" in many or "ragged_dot" in many
    rng = np.random.default_rng(4)
    g = R.PER_TOKEN_ONEHOT_MAX_GROUPS + 1
    x, w = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.normal(size=(g, 3, 2)).astype(np.float32)
    group = rng.integers(0, g, size=(2, 5))
    np.testing.assert_allclose(R.routed_matmul(x, w, group, "gather"),
                               np.einsum("blk,blkn->bln", x, w[group]), atol=1e-5)


def test_per_token_bias_scale_and_members():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(2, 5, 4)).astype(np.float32)
    bias, scale = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    group = rng.integers(0, 3, size=(2, 5))
    np.testing.assert_allclose(R.add_bias(y, bias, group), y + bias[group], atol=1e-6)
    np.testing.assert_allclose(R.scale_rows(y, scale, group), y * scale[group], atol=1e-6)
    member = group != 1
    np.testing.assert_array_equal(R.keep_members(member, y + 1, y),
                                  np.where(member[..., None], y + 1, y))
    assert R.per_example(np.ones((1, 4)), group).shape == (2, 5, 4)


def test_task_layer_norm_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 8)).astype(np.float32)
    scale, bias = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))
    group = np.array([1, 0, 1])
    got = np.asarray(R.task_layer_norm(x, scale, bias, group, eps=1e-5))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * scale[group][:, None] + bias[group][:, None]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_routing_impl_is_an_error():
    with pytest.raises(ValueError, match=r"peft\[0\]: lora.impl: unknown routing implementation"):
        registry.build_extensions([{"method": "lora", "impl": "loop"}], NAMES)


def test_bare_backbone_without_task_ids_is_an_error_naming_the_site():
    from mtlx.models.bert import BertEncoder
    cfg = registry.attach(tiny_bert(), [{"method": "lora"}], NAMES)
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"encoder.layer0.attention.query: no routing.task_ids"):
        jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.key(0), ids, ids))
    # a one-task method needs no routing
    one = registry.attach(tiny_bert(), [{"method": "lora"}], ("only",))
    jax.eval_shape(lambda: BertEncoder(one).init(jax.random.key(0), ids, ids))


def test_extension_is_hashable_and_equal_by_value():
    a = registry.build_extensions([{"method": "lora", "targets": ["attention.query"]}], NAMES)
    b = registry.build_extensions([{"method": "lora", "targets": ("attention.query",)}], NAMES)
    assert a == b and hash(a) == hash(b)
    assert dataclasses.replace(a[0], rank=4) != a[0]


def test_roberta_mixed_batch_equals_single_task_batches():
    cfgs = METHODS["combined"] + [{"method": "prompt", "length": 2, "tasks": ["a", "c"]}]
    model = build(tiny_bert(model_type="roberta", pad_token_id=1), TASKS, NAMES, cfgs)
    params = random_params(model, batch_for(MIXED))
    compare_mixed_vs_single(model, params, MIXED, t5=False)


@pytest.mark.parametrize("impl", R.IMPLEMENTATIONS)
def test_batch_sharded_over_devices_gives_the_same_outputs(impl):
    """Data parallel: the batch split over the 8 host devices, task weights replicated; each
    example still gets its own task's weights (gather or ragged_dot across shards)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = np.array(jax.devices()[:8])
    if len(devices) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host CPU devices)")
    cfgs = [{"method": "lora", "rank": 2, "impl": impl},
            {"method": "adapter", "reduction_factor": 4, "impl": impl, "tasks": ["a", "c"]}]
    model = build(tiny_bert(), TASKS, NAMES, cfgs)
    ids = [0, 1, 2, 3, 2, 0, 3, 1, 1, 1, 0, 2, 3, 3, 0, 2]
    batch = batch_for(ids, seed=4)
    params = random_params(model, batch)
    ref = apply_jit(model, params, batch)
    mesh = Mesh(devices, ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    out = apply_jit(model, replicated, sharded)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=0)


def _primitives(fn, *args):
    """Every primitive of fn's jaxpr, nested jaxprs (custom VJPs' rules, jit) included."""
    out = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            out.add(str(e.primitive))
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


@pytest.mark.parametrize("policy", ["onehot", "scatter"])
@pytest.mark.parametrize("group_shape", [(9,), (3, 4)])   # per example, per token
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gathered_rows_gradient_is_the_sum_per_group(policy, group_shape, dtype):
    """take_rows' gradient with respect to the stacked weights: each group's row gets the sum
    of its examples' (tokens') cotangents, whichever way it is summed (a one-hot contraction
    for accelerators, autodiff's scatter-add), against float64 sums in a loop."""
    rng = np.random.default_rng(5)
    w = jax.numpy.asarray(rng.normal(size=(4, 6, 3)), dtype)
    group = rng.integers(0, 4, size=group_shape)
    group[(0,) * len(group_shape)] = 3      # group 1 may be empty, the others not
    ct = jax.numpy.asarray(rng.normal(size=group_shape + (6, 3)), dtype)

    def loss(v):
        with R.gather_grad(policy):
            rows = R.take_rows(v, jax.numpy.asarray(group))
        return jax.numpy.sum(rows.astype(np.float32) * ct.astype(np.float32))
    got = np.asarray(jax.jit(jax.grad(loss))(w), np.float64)
    want = np.zeros((4, 6, 3))
    for idx in np.ndindex(*group_shape):
        want[group[idx]] += np.asarray(ct[idx], np.float64)
    # float32: sums in another order; bf16: the sum rounded once to bf16 (8 bits)
    tol = 1e-5 if dtype == "float32" else 2.0 ** -8 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    with R.gather_grad(policy):
        prims = _primitives(jax.grad(loss), w)
    assert ("scatter-add" in prims) == (policy == "scatter"), prims
    assert ("dot_general" in prims) == (policy == "onehot"), prims


def test_gathered_rows_gradient_policy_auto_is_scatter_on_a_cpu_and_checked():
    assert jax.default_backend() == "cpu" and R.gathers_by_onehot() is False
    with R.gather_grad("onehot"):
        assert R.gathers_by_onehot() is True
    assert R._GATHER_GRAD.value == "auto"
    with pytest.raises(ValueError, match="mtlx.peft.routing: policy must be one of"):
        R.set_gather_grad("atomic")


@pytest.mark.parametrize("method", ["houlsby", "lora", "prefix", "hyperformer++"])
def test_model_gradients_equal_under_both_gather_gradients(method):
    """A mixed batch through a routed model: the per-task weights' gradients (and everything
    else's, the hypernetwork's generator included: its generated weights are gathered per
    example) agree between the one-hot contraction and the scatter-add, on one device and with
    the batch split over the 8 host devices (the contraction then crosses the batch axis).
    Each pair is compared at the same placement: splitting the batch alone moves the
    hypernetwork's gradients by up to 4e-4 (the all-reduce's order of sums)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    cfgs = {"houlsby": [dict(METHODS["houlsby"][0], tasks=["a", "c", "d"])],
            "hyperformer++": [{"method": "hyperformer++", "reduction_factor": 4}]}.get(method)
    cfgs = cfgs or METHODS[method]
    model = build(tiny_bert(), TASKS, NAMES, cfgs)
    ids = [0, 1, 2, 3, 2, 0, 3, 1, 1, 1, 0, 2, 3, 3, 0, 2]
    batch = batch_for(ids, seed=6)
    params = random_params(model, batch)

    def loss(p, b):
        out = model.apply({"params": p}, b)
        return sum(jax.numpy.sum(jax.numpy.square(v.astype(np.float32)))
                   for v in jax.tree_util.tree_leaves(out) if jax.numpy.issubdtype(v.dtype, np.floating))

    placements = {"one device": (params, batch)}
    if len(jax.devices()) >= 8:
        mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
        placements["8 devices"] = (jax.device_put(params, NamedSharding(mesh, P())),
                                   jax.device_put(batch, NamedSharding(mesh, P("data"))))
    for where, args in placements.items():
        grads = {}
        for policy in ("scatter", "onehot"):
            with R.gather_grad(policy):
                grads[policy] = dict(jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(*args)))
        routed = 0
        for path, g in grads["scatter"].items():
            name = jax.tree_util.keystr(path)
            np.testing.assert_allclose(grads["onehot"][path], g, atol=2e-5, rtol=2e-5,
                                       err_msg=f"{where}: {name}")
            routed += ("'a'" in name or "'c'" in name or "generator" in name or "hyper" in name) \
                and float(np.abs(g).max()) > 0
        assert routed > 0   # the tasks' own (or generating) weights got non-zero gradients
