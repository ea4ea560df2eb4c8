"""BertConfig.scan_layers: the layers run as one jax.lax.scan, with the unrolled model's
parameter tree, outputs and gradients; extensions that are not the same at every layer are a
clear error."""

import dataclasses

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtlx.models import bert
from mtlx.models.layers import Extension
from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from mtlx.train import optim
from mtlx.train.step import count_compilations, create_state, make_train_step

from tests.peft_common import MIXED, NAMES, TASKS, batch_for, outputs_of, random_params, tiny_bert

ATOL = 1e-5


def _cfg(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
                max_position_embeddings=32, type_vocab_size=2, hidden_dropout=0.1,
                attention_dropout=0.1)
    base.update(kw)
    return bert.BertConfig(**base)


def _scan(cfg):
    return dataclasses.replace(cfg, scan_layers=True)


def _inputs(seed=0, b=3, l=9):
    rng = np.random.default_rng(seed)
    lengths = np.array([l, l - 3, 4])[:b]
    mask = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(1, 50, (b, l)) * mask).astype(np.int32)
    types = ((np.arange(l)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)


def _packed_inputs():
    # Two rows of two segments each (plus padding), positions restarting per segment.
    segs = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
    pos = np.zeros_like(segs)
    for r in range(2):
        for s in (1, 2):
            where = np.flatnonzero(segs[r] == s)
            pos[r, where] = np.arange(len(where))
    ids = (np.random.default_rng(3).integers(1, 50, segs.shape) * (segs > 0)).astype(np.int32)
    pool = np.array([[0, 3], [0, 5]], np.int32)
    return dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray((segs > 0).astype(np.int32)),
                position_ids=jnp.asarray(pos), segment_ids=jnp.asarray(segs),
                pool_positions=jnp.asarray(pool))


def _perturbed(params, seed=0, scale=0.3):
    flat = tu.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    return tu.unflatten_dict({k: v + scale * jnp.asarray(rng.normal(size=v.shape), v.dtype)
                              for k, v in sorted(flat.items())}, sep="/")


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _assert_trees_close(got, ref):
    """Equal up to float32 rounding (rtol 1e-5; gradients here reach O(10))."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    flat_ref, flat_got = tu.flatten_dict(ref, sep="/"), tu.flatten_dict(got, sep="/")
    for k in flat_ref:
        np.testing.assert_allclose(np.asarray(flat_got[k]), np.asarray(flat_ref[k]), atol=ATOL,
                                   rtol=1e-5, err_msg=k)


def _encoder_fns(cfg, kwargs):
    enc = bert.module(cfg)

    def forward(p):
        out = enc.apply({"params": p}, **kwargs)
        return out.last_hidden_state, out.pooled_output

    def loss(p):
        h, pooled = forward(p)
        # A non-trivial scalar of both outputs (sum alone has a near-zero LayerNorm gradient).
        return jnp.sum(jnp.sin(3.0 * h)) + jnp.sum(pooled ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss))


def test_param_tree_is_the_unrolled_one_and_loads_both_ways():
    cfg = _cfg()
    ids, mask, types = _inputs()
    plain = bert.module(cfg).init(jax.random.PRNGKey(0), ids, mask, types)["params"]
    scanned = bert.module(_scan(cfg)).init(jax.random.PRNGKey(0), ids, mask, types)["params"]
    assert sorted(tu.flatten_dict(plain, sep="/")) == sorted(tu.flatten_dict(scanned, sep="/"))
    assert "layer_2" in plain and "layer_0/attention/query/kernel" in tu.flatten_dict(plain, sep="/")
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(scanned)
    # init unrolls in both cases: the same rng gives the same values, not only the same shapes
    assert _max_diff(plain, scanned) == 0.0
    # params made by either model run in the other (checkpoints and HF weights are shared)
    for cfg_a, cfg_b in ((cfg, _scan(cfg)), (_scan(cfg), cfg)):
        p = bert.module(cfg_a).init(jax.random.PRNGKey(1), ids, mask, types)["params"]
        out = bert.module(cfg_b).apply({"params": p}, ids, mask, types)
        assert np.isfinite(np.asarray(out.last_hidden_state)).all()
    # abstract_params (what HF I/O and PEFT coverage checks use) is the same tree too
    assert (jax.tree_util.tree_structure(bert.abstract_params(_scan(cfg)))
            == jax.tree_util.tree_structure(bert.abstract_params(cfg)))


def test_the_scanned_model_traces_one_layer_body_in_a_scan():
    cfg = _scan(_cfg(num_layers=4))
    ids, mask, types = _inputs()
    params = bert.module(cfg).init(jax.random.PRNGKey(0), ids, mask, types)["params"]

    def n_dots(c):
        jaxpr = jax.make_jaxpr(lambda p: bert.module(c).apply({"params": p}, ids, mask, types))(params)
        return str(jaxpr).count("dot_general"), str(jaxpr).count("scan[")

    dots_scan, scans = n_dots(cfg)
    dots_plain, no_scans = n_dots(dataclasses.replace(cfg, scan_layers=False))
    assert scans == 1 and no_scans == 0
    # every matmul of a layer appears once per layer unrolled, once in all under scan; the
    # pooler's dense is the one matmul outside the layers
    assert dots_plain - 1 == 4 * (dots_scan - 1) and dots_scan > 1


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_outputs_and_gradients_equal_the_unrolled_model(remat):
    cfg = _cfg(remat=remat)
    ids, mask, types = _inputs()
    params = _perturbed(bert.module(cfg).init(jax.random.PRNGKey(0), ids, mask, types)["params"])
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    fwd, grad = _encoder_fns(cfg, kwargs)
    fwd_s, grad_s = _encoder_fns(_scan(cfg), kwargs)
    ref, got = fwd(params), fwd_s(params)
    assert _max_diff(ref, got) <= ATOL
    g_ref, g_got = grad(params), grad_s(params)
    _assert_trees_close(g_got, g_ref)
    # every layer gets a gradient of its own (not, e.g., layer 0's for all)
    gq = [np.asarray(g_got[f"layer_{i}"]["attention"]["query"]["kernel"]) for i in range(3)]
    assert all(np.abs(g).max() > 1e-4 for g in gq) and _max_diff(gq[0], gq[2]) > 1e-4


def test_packed_rows_equal_the_unrolled_model():
    cfg = _cfg()
    kwargs = _packed_inputs()
    params = _perturbed(bert.module(cfg).init(jax.random.PRNGKey(0), kwargs["input_ids"],
                                              kwargs["attention_mask"])["params"], seed=1)
    fwd, grad = _encoder_fns(cfg, kwargs)
    fwd_s, grad_s = _encoder_fns(_scan(cfg), kwargs)
    ref, got = fwd(params), fwd_s(params)
    assert got[1].shape == (2, 2, 16)  # pooled per segment
    assert _max_diff(ref, got) <= ATOL
    _assert_trees_close(grad_s(params), grad(params))


def test_dropout_under_scan_is_active_and_reproducible():
    cfg = _scan(_cfg())
    ids, mask, types = _inputs()
    params = bert.module(cfg).init(jax.random.PRNGKey(0), ids, mask, types)["params"]
    run = jax.jit(lambda seed: bert.module(cfg).apply(
        {"params": params}, ids, mask, types, deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(seed)}).last_hidden_state)
    eval_out = bert.module(cfg).apply({"params": params}, ids, mask, types).last_hidden_state
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _max_diff(a, c) > 1e-3 and _max_diff(a, eval_out) > 1e-3
    # without a dropout rng, training mode fails as the unrolled model does
    with pytest.raises(Exception, match="dropout"):
        bert.module(cfg).apply({"params": params}, ids, mask, types, deterministic=False)


def test_hf_parity_holds_through_scan(tmp_path):
    pytest.importorskip("torch")
    from mtlx.models import hf
    from tests.hf_tiny import padded_batch, save_tiny_bert, torch_outputs
    path, model = save_tiny_bert(tmp_path, num_hidden_layers=3)
    cfg, params = hf.load_pretrained(path)
    ids, mask, types = padded_batch(np.random.default_rng(0), (9, 4, 6, 1), cfg.vocab_size,
                                    type_split=True)
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = bert.module(_scan(cfg)).apply({"params": params}, ids, mask, types)
    valid = mask.astype(bool)
    assert _max_diff(np.asarray(out.last_hidden_state)[valid], ref["last_hidden_state"][valid]) <= ATOL
    assert _max_diff(out.pooled_output, ref["pooler_output"]) <= ATOL


# ------------------------------------------------------------------------------- PEFT

UNIFORM = {
    "houlsby": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4}],
    "lora+ia3+task_norm": [{"method": "lora", "rank": 2, "targets": ["attention.query", "ffn.input"]},
                           {"method": "ia3", "tasks": ["a", "d"]},
                           {"method": "task_layer_norm"}],
    "prefix+compacter": [{"method": "prefix", "length": 2, "tasks": ["a", "b"]},
                         {"method": "compacter", "reduction_factor": 4, "phm_dim": 2}],
}


@pytest.mark.parametrize("case", sorted(UNIFORM))
def test_layer_uniform_extensions_equal_the_unrolled_model(case):
    cfg = registry.attach(tiny_bert(num_layers=3), UNIFORM[case], NAMES)
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    model_s = MultiTaskModel(_scan(cfg), TASKS, head_dropout=0.0)
    batch = batch_for(MIXED, seed=1)
    params = random_params(model, batch, scale=0.2)

    def loss(m):
        def f(p):
            out = m.apply({"params": p}, batch)
            return sum(jnp.sum(jnp.sin(v.astype(jnp.float32))) for v in jax.tree_util.tree_leaves(out))
        return jax.jit(jax.grad(f))

    ref = outputs_of(jax.jit(lambda p: model.apply({"params": p}, batch))(params))
    got = outputs_of(jax.jit(lambda p: model_s.apply({"params": p}, batch))(params))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=ATOL, rtol=0, err_msg=k)
    g_ref, g_got = loss(model)(params), loss(model_s)(params)
    _assert_trees_close(g_got, g_ref)
    flat_got = tu.flatten_dict(g_got, sep="/")
    # the extensions' own parameters in the last layer get (non-zero) gradients
    names = {e.name for e in cfg.extensions}
    own = [k for k in flat_got if k.startswith("backbone/layer_2/") and names & set(k.split("/"))]
    assert own and max(float(np.abs(flat_got[k]).max()) for k in own) > 1e-4


def test_hypernetwork_extension_is_refused_under_scan():
    cfg = registry.attach(tiny_bert(), [{"method": "hyperformer++", "reduction_factor": 4}], NAMES)
    ext = cfg.extensions[-1]
    with pytest.raises(ValueError, match=rf"scan_layers.*{type(ext).__name__} '{ext.name}'.*layer_uniform"):
        bert.check_scan_layers(_scan(cfg))
    model = MultiTaskModel(_scan(cfg), TASKS, head_dropout=0.0)
    with pytest.raises(ValueError, match="scan_layers"):
        random_params(model, batch_for(MIXED))
    bert.check_scan_layers(cfg)  # unrolled: fine


def test_layer_subset_sites_are_refused_under_scan():
    cfg = registry.attach(tiny_bert(num_layers=3),
                          [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4,
                            "sites": ["encoder.layer[0-1].ffn"]}], NAMES)
    with pytest.raises(ValueError, match=r"scan_layers=True needs every extension to attach "
                                         r"identically.*Adapter 'adapter'.*encoder\.layer2\.ffn"):
        bert.check_scan_layers(_scan(cfg))
    # the same adapter on every layer is fine
    bert.check_scan_layers(_scan(registry.attach(
        tiny_bert(num_layers=3), [{"method": "adapter", "variant": "pfeiffer",
                                   "reduction_factor": 4}], NAMES)))


class _Identity(nn.Module):
    def __call__(self, sub_in, sub_out, routing):
        return sub_out


@dataclasses.dataclass(frozen=True)
class _Undeclared(Extension):
    """Attaches the same module everywhere but does not say it is layer-uniform."""
    name: str = "custom"

    def sublayer(self, site):
        return _Identity(name=self.name)


def test_extension_without_layer_uniform_declaration_is_refused():
    cfg = _scan(_cfg(extensions=(_Undeclared(),)))
    with pytest.raises(ValueError,
                       match="scan_layers=True cannot run extension _Undeclared 'custom'"):
        bert.check_scan_layers(cfg)
    # an extension that attaches nowhere inside the layers (embeddings only) needs no declaration
    cfg = registry.attach(tiny_bert(), [{"method": "prompt", "length": 2}], NAMES)
    bert.check_scan_layers(_scan(cfg))


# ------------------------------------------------------------------------------- train step

def test_train_step_with_scan_compiles_once_and_matches_unrolled():
    cfg = registry.attach(tiny_bert(num_layers=3), UNIFORM["houlsby"], NAMES)
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    model_s = MultiTaskModel(_scan(cfg), TASKS, head_dropout=0.0)
    batch = batch_for([0, 1, 2, 3, 0, 1, 2, 3])
    params = random_params(model, batch, scale=0.1)
    opt = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-2, warmup_steps=0,
                                         num_train_steps=10, schedule="constant",
                                         weight_decay=0.01, grad_clip_norm=1.0))
    tx = optim.make_optimizer(opt, params, trainable=optim.trainable_mask(
        params, registry.trainable_patterns(cfg)))
    states, metrics = {}, {}
    for key, m in (("plain", model), ("scan", model_s)):
        step = jax.jit(make_train_step(m, tx))
        state = create_state(params, tx, jax.random.key(0))
        for i, ids in enumerate(([0, 1, 2, 3, 0, 1, 2, 3], [2, 2, 2, 2, 1, 1, 1, 1],
                                 [3, 3, 3, 3, 3, 3, 3, 3])):
            state, metrics[key, i] = step(state, batch_for(ids, seed=i))
        assert count_compilations(step) == 1
        states[key] = state
    for i in range(3):
        np.testing.assert_allclose(float(metrics["scan", i]["loss"]),
                                   float(metrics["plain", i]["loss"]), rtol=1e-5, atol=1e-6)
    assert _max_diff(states["scan"].params, states["plain"].params) <= 1e-4
