"""Each method's arithmetic against its definition: Hugging Face PEFT's (IA)^3 on a tiny BERT,
and the papers' formulas written out in numpy (Kronecker sums, fusion attention, adapters,
prefixes)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from mtlx.models import hf
from mtlx.models.attention import attend
from mtlx.models.bert import BertEncoder
from mtlx.models.layers import Routing
from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from mtlx.peft.adapters import bottleneck_delta
from mtlx.peft.compacter import phm_kernel
from mtlx.peft.fusion import fuse, load_fusion_sources
from mtlx.peft.prompt import insert_prompt, prepend_prefix

from tests.hf_tiny import padded_batch, save_tiny_bert, torch_outputs
from tests.peft_common import NAMES, TASKS, apply_jit, batch_for, perturb, random_params, tiny_bert


def test_phm_kernel_is_a_sum_of_kronecker_products():
    rng = np.random.default_rng(0)
    g, n, p, q, r = 2, 3, 4, 2, 2
    rules, s, t = rng.normal(size=(g, n, n, n)), rng.normal(size=(g, n, p, r)), rng.normal(size=(g, n, r, q))
    got = np.asarray(phm_kernel(jnp.asarray(rules), jnp.asarray(s), jnp.asarray(t)))
    for k in range(g):
        want = sum(np.kron(rules[k, i], s[k, i] @ t[k, i]) for i in range(n))
        np.testing.assert_allclose(got[k], want, atol=1e-5)


def _ln(x, scale, bias, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("layer_norm", ["none", "pre", "post"])
def test_bottleneck_adapter_formula(layer_norm):
    rng = np.random.default_rng(1)
    d, m, g = 6, 3, 2
    x = rng.normal(size=(3, 4, d)).astype(np.float32)
    w = {"down": {"kernel": rng.normal(size=(g, d, m)), "bias": rng.normal(size=(g, m))},
         "up": {"kernel": rng.normal(size=(g, m, d)), "bias": rng.normal(size=(g, d))},
         "norm": {"scale": rng.normal(size=(g, d)), "bias": rng.normal(size=(g, d))}}
    group = np.array([1, 0, 1])
    got = np.asarray(bottleneck_delta(x, jax.tree_util.tree_map(jnp.asarray, w), group,
                                      activation="relu", layer_norm=layer_norm))
    for b, t in enumerate(group):
        z = _ln(x[b], w["norm"]["scale"][t], w["norm"]["bias"][t]) if layer_norm == "pre" else x[b]
        h = np.maximum(z @ w["down"]["kernel"][t] + w["down"]["bias"][t], 0)
        out = h @ w["up"]["kernel"][t] + w["up"]["bias"][t]
        if layer_norm == "post":
            out = _ln(out, w["norm"]["scale"][t], w["norm"]["bias"][t])
        np.testing.assert_allclose(got[b], out, atol=1e-4)


def test_fusion_attention_formula():
    rng = np.random.default_rng(2)
    d, n, g = 5, 3, 2
    h = rng.normal(size=(2, 4, d))
    z = rng.normal(size=(2, 4, n, d))
    w = {k: {"kernel": rng.normal(size=(g, d, d)) * 0.5, "bias": rng.normal(size=(g, d))}
         for k in ("query", "key", "value")}
    group = np.array([1, 0])
    got = np.asarray(fuse(jnp.asarray(h), jnp.asarray(z), jax.tree_util.tree_map(jnp.asarray, w),
                          group, temperature=2.0))
    for b, t in enumerate(group):
        q = h[b] @ w["query"]["kernel"][t] + w["query"]["bias"][t]
        k = z[b] @ w["key"]["kernel"][t] + w["key"]["bias"][t]
        v = z[b] @ w["value"]["kernel"][t] + w["value"]["bias"][t]
        s = np.einsum("ld,lnd->ln", q, k) / 2.0
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(got[b], np.einsum("ln,lnd->ld", p, v), atol=1e-4)


def test_prefix_attention_is_attention_over_prepended_keys():
    rng = np.random.default_rng(3)
    b, l, h, d, n = 2, 4, 2, 3, 2
    q, k, v = (rng.normal(size=(b, l, h, d)).astype(np.float32) for _ in range(3))
    pk, pv = rng.normal(size=(2, n, h, d)), rng.normal(size=(2, n, h, d))
    keymask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    group = np.array([1, 0])
    k2, v2, mask = prepend_prefix(jnp.asarray(k), jnp.asarray(v), jnp.asarray(keymask[:, None, None]),
                                  jnp.asarray(pk), jnp.asarray(pv), group)
    got = np.asarray(attend(jnp.asarray(q), k2, v2, mask=mask))
    for i, t in enumerate(group):
        kk = np.concatenate([pk[t], k[i]])[:, :, :]
        vv = np.concatenate([pv[t], v[i]])
        visible = np.concatenate([np.ones(n, bool), keymask[i]])
        s = np.einsum("qhd,khd->hqk", q[i], kk) / np.sqrt(d)
        s = np.where(visible[None, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(got[i], np.einsum("hqk,khd->qhd", p, vv), atol=1e-5)


def test_prompt_inserted_after_cls_and_hidden_from_non_members():
    emb = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.ones((2, 3), jnp.int32)
    prompt = jnp.full((1, 2, 2), -1.0)
    out, m = insert_prompt(emb, mask, prompt, jnp.zeros(2, jnp.int32), 1,
                           member=jnp.array([True, False]))
    np.testing.assert_array_equal(out[0], [[0, 1], [-1, -1], [-1, -1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(out[1, 1:3], 0.0)
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 1], [1, 0, 0, 1, 1]])


# ------------------------------------------------------------------ (IA)^3 vs Hugging Face PEFT

def test_ia3_equals_peft_ia3(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    path, hf_model = save_tiny_bert(tmp_path, attention_probs_dropout_prob=0.0,
                                    hidden_dropout_prob=0.0)
    ffn = r".*layer\.\d+\.output\.dense$"  # the FFN's second Linear (not attention.output.dense)
    model = peft.get_peft_model(hf_model, peft.IA3Config(
        target_modules=r".*\.(key|value)$|" + ffn, feedforward_modules=ffn,
        init_ia3_weights=False)).eval()
    cfg, base = hf.load_pretrained(path, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = registry.attach(cfg, [{"method": "ia3"}], ("p", "q"))
    ids, mask, types = padded_batch(np.random.default_rng(0), [6, 4, 5], 101, type_split=True)
    enc = BertEncoder(cfg)
    routing = Routing(jnp.asarray([1, 1, 1]))
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), ids, mask, routing=routing)["params"])
    params = perturb(jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes), seed=1)
    import flax.traverse_util as tu
    flat = tu.flatten_dict(params, sep="/")
    flat.update({k: jnp.asarray(v) for k, v in tu.flatten_dict(base, sep="/").items()})
    copied = 0
    for name, module in model.named_modules():
        if hasattr(module, "ia3_l") and "default" in module.ia3_l:
            vec = module.ia3_l["default"].detach().numpy().reshape(-1)
            i = int(name.split("layer.")[1].split(".")[0])
            site = ("ffn/output" if name.endswith("output.dense") else
                    f"attention/{name.rsplit('.', 1)[1]}")
            key = f"layer_{i}/{site}/ia3/q/scale"
            assert flat[key].shape == vec.shape, key
            flat[key] = jnp.asarray(vec)
            copied += 1
    assert copied == 6  # 2 layers x key, value, FFN
    params = tu.unflatten_dict(flat, sep="/")
    out = enc.apply({"params": params}, ids, mask, types, routing=routing)
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref["last_hidden_state"], atol=1e-5)
    with model.disable_adapter():
        plain = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert np.abs(plain["last_hidden_state"] - ref["last_hidden_state"]).max() > 1e-3


# ------------------------------------------------------------------ AdapterFusion, two stages

def test_fusion_stage_two_uses_the_stage_one_adapters():
    """Stage-1 adapters copied into the fusion model; with a zero query the attention is
    uniform, so the fusion output is h + mean_n (z_n V + b_v): checked against the stage-1
    model's per-task adapter deltas."""
    adapter_cfg = registry.attach(tiny_bert(), [{"method": "adapter", "variant": "pfeiffer",
                                                 "reduction_factor": 4}], NAMES)
    fusion_cfg = registry.attach(tiny_bert(), [{"method": "fusion", "reduction_factor": 4,
                                                "sources": ["a", "b"]}], NAMES)
    batch = batch_for([0, 1, 2])
    stage1 = random_params(MultiTaskModel(adapter_cfg, TASKS), batch, seed=1)
    fusion_model = MultiTaskModel(fusion_cfg, TASKS, head_dropout=0.0)
    fused = random_params(fusion_model, batch, seed=2)
    fused = load_fusion_sources(fused, stage1, adapter_cfg.extensions[0], fusion_cfg.extensions[0])
    node = fused["backbone"]["layer_1"]["ffn"]["fusion"]
    for src in ("a", "b"):
        np.testing.assert_array_equal(node["adapters"][src]["up"]["kernel"],
                                      stage1["backbone"]["layer_1"]["ffn"]["adapter"][src]["up"]["kernel"])
    # Zero query -> uniform attention over the two sources; identity value -> plain mean.
    for t in node["layers"]:
        for i in (0, 1):
            lay = fused["backbone"][f"layer_{i}"]["ffn"]["fusion"]["layers"][t]
            lay["query"] = {"kernel": jnp.zeros_like(lay["query"]["kernel"]),
                            "bias": jnp.zeros_like(lay["query"]["bias"])}
            lay["value"] = {"kernel": jnp.eye(16), "bias": jnp.zeros(16)}
    # One fused layer against the stage-1 adapters' branches written out in numpy.
    from mtlx.peft.fusion import all_adapter_deltas
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16)), jnp.float32)
    src = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *[node["adapters"][s] for s in ("a", "b")])
    z = all_adapter_deltas(x, src, activation="relu")
    lay = fused["backbone"]["layer_1"]["ffn"]["fusion"]["layers"]["c"]
    w = jax.tree_util.tree_map(lambda v: v[None], lay)
    got = fuse(x, z, w, jnp.zeros(2, jnp.int32))
    want = []
    for s in ("a", "b"):
        a = stage1["backbone"]["layer_1"]["ffn"]["adapter"][s]
        h = np.maximum(np.asarray(x) @ np.asarray(a["down"]["kernel"]) + np.asarray(a["down"]["bias"]), 0)
        want.append(h @ np.asarray(a["up"]["kernel"]) + np.asarray(a["up"]["bias"]))
    np.testing.assert_allclose(np.asarray(got), np.mean(want, axis=0), atol=1e-5)
    out = apply_jit(fusion_model, fused, batch)
    assert np.all(np.isfinite(out["pooled"]))


@pytest.mark.parametrize("variant", ["houlsby", "parallel"])
def test_adapter_reads_sublayer_output_or_input(variant):
    """Houlsby/Pfeiffer: out + s f(out); parallel (He et al. 2022): out + s f(in)."""
    from mtlx.models.layers import Site
    from mtlx.peft.adapters import Adapter, AdapterSublayer
    ext = Adapter(task_names=("p", "q"), variant=variant, reduction_factor=2, scaling=3.0)
    site = Site("encoder", 0, "ffn")
    rng = np.random.default_rng(4)
    sub_in = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    sub_out = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    routing = Routing(jnp.asarray([1, 0]))
    module = AdapterSublayer(ext, site)
    params = perturb(module.init(jax.random.key(0), sub_in, sub_out, routing), seed=4)
    got = module.apply(params, sub_in, sub_out, routing)
    w = jax.tree_util.tree_map(lambda *v: jnp.stack(v), params["params"]["p"], params["params"]["q"])
    x = sub_in if variant == "parallel" else sub_out
    want = sub_out + 3.0 * bottleneck_delta(x, w, jnp.asarray([1, 0]), activation=ext.activation)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_placements_by_variant():
    from tests.peft_common import abstract
    shapes = {}
    for v in ("houlsby", "pfeiffer"):
        cfg = registry.attach(tiny_bert(), [{"method": "adapter", "variant": v,
                                             "reduction_factor": 4}], NAMES)
        shapes[v] = abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))["backbone"]["layer_1"]
    assert "adapter" in shapes["houlsby"]["attention"] and "adapter" in shapes["houlsby"]["ffn"]
    assert "adapter" not in shapes["pfeiffer"]["attention"] and "adapter" in shapes["pfeiffer"]["ffn"]


def test_bfloat16_compute():
    cfg = registry.attach(tiny_bert(dtype="bfloat16"),
                          [{"method": "lora", "rank": 2}, {"method": "adapter", "layer_norm": "post",
                                                           "reduction_factor": 4},
                           {"method": "ia3"}, {"method": "prefix", "length": 2}], NAMES)
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    batch = batch_for([0, 1, 2, 3])
    out = apply_jit(model, random_params(model, batch, scale=0.1), batch)
    assert out["pooled"].dtype == jnp.bfloat16 and np.all(np.isfinite(out["pooled"].astype(np.float32)))
