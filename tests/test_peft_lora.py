"""LoRA against Hugging Face PEFT (a reference no one here wrote): same outputs with the same
weights, merged == unmerged, and export to / import from PEFT's on-disk format."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models import hf
from mtlx.models.bert import BertEncoder
from mtlx.models.layers import Routing
from mtlx.peft import peft_io, registry
from mtlx.peft.lora import LoRA, lora_params, merge_lora, unmerge_lora

from tests.hf_tiny import padded_batch, save_tiny_bert, torch_outputs
from tests.peft_common import perturb

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TASKS = ("t0", "t1", "t2")
R_, ALPHA = 2, 6.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF BertModel with a random PEFT LoRA on query/value, and the mtlx encoder with
    the same base weights and LoRA for 3 tasks (random, non-zero)."""
    tmp = tmp_path_factory.mktemp("lora")
    path, hf_model = save_tiny_bert(tmp, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
        target_modules=["query", "value"], r=R_, lora_alpha=ALPHA, lora_dropout=0.0,
        init_lora_weights=False)).eval()
    peft_dir = os.path.join(str(tmp), "peft-adapter")
    peft_model.save_pretrained(peft_dir)
    cfg, base = hf.load_pretrained(path, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = registry.attach(cfg, [{"method": "lora", "rank": R_, "alpha": ALPHA}], TASKS)
    ext = cfg.extensions[0]
    ids, mask, types = padded_batch(np.random.default_rng(0), [7, 5, 6, 3, 7, 4], 101,
                                    type_split=True)
    enc = BertEncoder(cfg)
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), ids, mask,
                                             routing=Routing(jnp.zeros(6, jnp.int32)))["params"])
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    params = perturb(params, seed=3)  # random LoRA for every task
    params = _with_base(params, base)
    return dict(tmp=tmp, path=path, hf_model=hf_model, peft_model=peft_model, peft_dir=peft_dir,
                cfg=cfg, ext=ext, params=params, ids=ids, mask=mask, types=types, enc=enc)


def _with_base(params, base):
    import flax.traverse_util as tu
    flat = tu.flatten_dict(params, sep="/")
    flat.update({k: jnp.asarray(v) for k, v in tu.flatten_dict(base, sep="/").items()})
    return tu.unflatten_dict(flat, sep="/")


def _run(s, params, task_ids, cfg=None):
    enc = BertEncoder(cfg) if cfg is not None else s["enc"]
    out = jax.jit(lambda p, t: enc.apply({"params": p}, s["ids"], s["mask"], s["types"],
                                         routing=Routing(t)))(params, jnp.asarray(task_ids))
    return np.asarray(out.last_hidden_state), np.asarray(out.pooled_output)


def _peft_factors(peft_model):
    """{module: (A [in, r], B [r, out])} of the in-memory PEFT model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.replace("base_model.model.", "")
            out[key] = (module.lora_A["default"].weight.detach().numpy().T,
                        module.lora_B["default"].weight.detach().numpy().T)
    return out


def test_outputs_equal_peft_with_the_same_weights(setup):
    s = setup
    # Copy PEFT's in-memory LoRA into task t1 by hand (no file format involved).
    factors = _peft_factors(s["peft_model"])
    assert len(factors) == 4  # 2 layers x query, value
    params = jax.tree_util.tree_map(lambda x: x, s["params"])
    for i in range(2):
        for name in ("query", "value"):
            a, b = factors[f"encoder.layer.{i}.attention.self.{name}"]
            node = params[f"layer_{i}"]["attention"][name]["lora"]["t1"]
            node["A"], node["B"] = jnp.asarray(a), jnp.asarray(b)
    ref = torch_outputs(s["peft_model"], input_ids=s["ids"], attention_mask=s["mask"],
                        token_type_ids=s["types"])
    # A mixed batch: rows of t1 use PEFT's weights, the others other tasks' random LoRA.
    task_ids = np.array([1, 0, 1, 2, 1, 0])
    hidden, pooled = _run(s, params, task_ids)
    rows = task_ids == 1
    np.testing.assert_allclose(hidden[rows], ref["last_hidden_state"][rows], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled[rows], ref["pooler_output"][rows], atol=1e-5, rtol=0)
    # ... and the other rows really differ (their tasks have other LoRA weights).
    assert np.abs(hidden[~rows] - ref["last_hidden_state"][~rows]).max() > 1e-3


def test_import_from_peft_directory_equals_peft(setup):
    s = setup
    params = peft_io.import_peft_lora(s["peft_dir"], s["params"], s["cfg"], s["ext"], "t2")
    ref = torch_outputs(s["peft_model"], input_ids=s["ids"], attention_mask=s["mask"],
                        token_type_ids=s["types"])
    hidden, _ = _run(s, params, np.full(6, 2))
    np.testing.assert_allclose(hidden, ref["last_hidden_state"], atol=1e-5, rtol=0)
    # only t2 changed
    np.testing.assert_array_equal(params["layer_0"]["attention"]["query"]["lora"]["t0"]["A"],
                                  s["params"]["layer_0"]["attention"]["query"]["lora"]["t0"]["A"])


def test_merged_equals_unmerged_and_unmerge_restores(setup):
    s = setup
    ext = s["ext"]
    task_ids = np.full(6, 1)
    hidden, pooled = _run(s, s["params"], task_ids)
    merged = merge_lora(s["params"], ext, "t1")
    assert "lora" not in merged["layer_0"]["attention"]["query"]
    plain_cfg = registry.without_extension(s["cfg"], "lora")
    h2, p2 = _run(s, merged, task_ids, cfg=plain_cfg)
    np.testing.assert_allclose(h2, hidden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(p2, pooled, atol=1e-5, rtol=0)
    # the merged kernel really moved
    assert np.abs(merged["layer_0"]["attention"]["query"]["kernel"]
                  - s["params"]["layer_0"]["attention"]["query"]["kernel"]).max() > 1e-3
    back = unmerge_lora(merged, lora_params(s["params"], ext), ext, "t1")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(s["params"])
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(s["params"])):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def test_merge_matches_peft_merge_and_unload(setup):
    s = setup
    params = peft_io.import_peft_lora(s["peft_dir"], s["params"], s["cfg"], s["ext"], "t0")
    merged = merge_lora(params, s["ext"], "t0")
    import copy
    torch_merged = copy.deepcopy(s["peft_model"]).merge_and_unload()
    w = torch_merged.encoder.layer[1].attention.self.value.weight.detach().numpy().T
    np.testing.assert_allclose(merged["layer_1"]["attention"]["value"]["kernel"], w, atol=1e-6)


def test_export_loads_in_peft_and_reproduces_outputs(setup):
    s = setup
    out_dir = os.path.join(str(s["tmp"]), "export-t2")
    peft_io.export_peft_lora(out_dir, {"backbone": s["params"], "heads": {}}, s["cfg"], s["ext"],
                             "t2", base_model_name_or_path=s["path"])
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["peft_type"] == "LORA" and conf["r"] == R_ and conf["lora_alpha"] == ALPHA
    import transformers
    base = transformers.BertModel.from_pretrained(s["path"], attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(base, out_dir).eval()
    ref = torch_outputs(loaded, input_ids=s["ids"], attention_mask=s["mask"],
                        token_type_ids=s["types"])
    hidden, pooled = _run(s, s["params"], np.full(6, 2))
    np.testing.assert_allclose(ref["last_hidden_state"], hidden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ref["pooler_output"], pooled, atol=1e-5, rtol=0)
    # round trip through our own importer gives the same factors back
    again = peft_io.import_peft_lora(out_dir, s["params"], s["cfg"], s["ext"], "t0")
    np.testing.assert_allclose(again["layer_1"]["attention"]["value"]["lora"]["t0"]["B"],
                               s["params"]["layer_1"]["attention"]["value"]["lora"]["t2"]["B"],
                               atol=1e-7)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        peft_io.export_peft_lora(out_dir, s["params"], s["cfg"], s["ext"], "t2")


def test_import_errors_name_the_key(setup, tmp_path):
    s = setup
    other = LoRA(task_names=TASKS, rank=4, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"r=2 but the mtlx extension has lora.rank=4"):
        peft_io.import_peft_lora(s["peft_dir"], s["params"], s["cfg"], other, "t0")
    more = LoRA(task_names=TASKS, rank=R_, alpha=ALPHA,
                targets=("attention.query", "attention.value", "attention.key"))
    cfg_more = registry.attach(registry.without_extension(s["cfg"], "lora"),
                               [{"method": "lora", "rank": R_, "alpha": ALPHA,
                                 "targets": list(more.targets)}], TASKS)
    shapes = jax.eval_shape(lambda: BertEncoder(cfg_more).init(
        jax.random.key(0), s["ids"], s["mask"], routing=Routing(jnp.zeros(6, jnp.int32)))["params"])
    params_more = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    with pytest.raises(ValueError, match=r"no LoRA weights for module\(s\) \['encoder.layer.0.attention.self.key'"):
        peft_io.import_peft_lora(s["peft_dir"], params_more, cfg_more, cfg_more.extensions[0], "t0")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft_io.import_peft_lora(str(tmp_path), s["params"], s["cfg"], s["ext"], "t0")
    with pytest.raises(KeyError, match="task 'nope' has no LoRA weights"):
        peft_io.export_peft_lora(str(tmp_path / "x"), s["params"], s["cfg"], s["ext"], "nope")


def test_t5_export_with_decoder_and_cross_attention_loads_in_peft(tmp_path):
    """The same export for T5: LoRA in encoder self-attention and decoder self- and
    cross-attention; PEFT on HF's T5Model reproduces the decoder's hidden states."""
    import transformers
    from mtlx.models.t5 import T5Model
    from tests.hf_tiny import save_tiny
    config = transformers.T5Config(vocab_size=60, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, feed_forward_proj="relu",
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    path, _ = save_tiny(transformers.T5Model, config, tmp_path / "t5", seed=1)
    cfg, base = hf.load_pretrained(path, dropout_rate=0.0)
    targets = ["attention.query", "attention.value", "cross_attention.query", "cross_attention.value"]
    cfg = registry.attach(cfg, [{"method": "lora", "rank": 2, "alpha": 3.0, "targets": targets}],
                          ("x", "y"))
    ext = cfg.extensions[0]
    rng = np.random.default_rng(0)
    ids, mask, _ = padded_batch(rng, [6, 4, 5], 60)
    dec, dmask, _ = padded_batch(rng, [3, 3, 2], 60)
    model = T5Model(cfg)
    routing = Routing(jnp.asarray([1, 1, 1]))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, mask, dec, dmask,
                                               routing=routing)["params"])
    params = _with_base(perturb(jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                       shapes), seed=5), base)

    def hidden(p):
        enc = model.apply({"params": p}, ids, mask, routing, method=T5Model.encode)
        return np.asarray(model.apply({"params": p}, dec, enc.last_hidden_state, mask, dmask,
                                      routing, method=T5Model.decode_hidden))

    ours = hidden(params)
    out_dir = peft_io.export_peft_lora(str(tmp_path / "t5-lora"), params, cfg, ext, "y")
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        assert len(json.load(f)["target_modules"]) == 2 * 2 + 2 * 4  # enc q,v; dec q,v + cross q,v
    hf_base = transformers.T5Model.from_pretrained(path, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(hf_base, out_dir).eval()
    ref = torch_outputs(loaded, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                        decoder_attention_mask=dmask)
    rows = dmask.astype(bool)
    np.testing.assert_allclose(ours[rows], ref["last_hidden_state"][rows], atol=1e-5, rtol=0)
    with loaded.disable_adapter():  # the LoRA really matters
        plain = torch_outputs(loaded, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                              decoder_attention_mask=dmask)
    assert np.abs(plain["last_hidden_state"][rows] - ours[rows]).max() > 1e-3


def test_merging_refuses_an_extension_that_scales_the_output_first():
    """Output hooks run in config order: with (IA)^3 before LoRA on attention.value the model
    computes (x W + b) * l + s x A B, which no merged kernel reproduces (1.53 apart); LoRA
    first, (IA)^3 scales the merged product as it scaled the sum."""
    from mtlx.peft.lora import check_mergeable
    from tests.peft_common import tiny_bert
    ia3_first = registry.attach(tiny_bert(), [{"method": "ia3"}, {"method": "lora", "rank": 2}],
                                ["a", "b"])
    lora = next(e for e in ia3_first.extensions if e.name == "lora")
    with pytest.raises(ValueError, match=r"lora 'lora' cannot be merged exactly: 'ia3' changes "
                                         r"the output of encoder.layer0.attention.value"):
        registry.without_extension(ia3_first, "lora")
    with pytest.raises(ValueError, match="cannot be merged exactly"):
        merge_lora({}, lora, "a", backbone_config=ia3_first)
    lora_first = registry.attach(tiny_bert(), [{"method": "lora", "rank": 2}, {"method": "ia3"}],
                                 ["a", "b"])
    check_mergeable(lora_first, next(e for e in lora_first.extensions if e.name == "lora"))
    assert [e.name for e in registry.without_extension(lora_first, "lora").extensions] == ["ia3"]
