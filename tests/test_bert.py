"""BERT/RoBERTa encoder: parity with Hugging Face's PyTorch models, dtypes, packing, PEFT hooks.

References are transformers' BertModel/RobertaModel (eager attention, float32), built tiny and
random with a fixed seed (tests/hf_tiny.py); nothing here compares against numbers we wrote.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models import bert, hf
from mtlx.models.attention import attend, padding_mask
from mtlx.models.layers import Extension, Routing, Site
from tests.hf_tiny import padded_batch, save_tiny_bert, save_tiny_roberta, torch_outputs

torch = pytest.importorskip("torch")

TOL = 1e-5
LENGTHS = (9, 4, 6, 1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path, model = save_tiny_bert(tmp_path_factory.mktemp("bert"))
    cfg, params = hf.load_pretrained(path)
    return cfg, params, model


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    path, model = save_tiny_roberta(tmp_path_factory.mktemp("roberta"))
    cfg, params = hf.load_pretrained(path)
    return cfg, params, model


def _batch(cfg, seed=0, lengths=LENGTHS):
    ids, mask, types = padded_batch(np.random.default_rng(seed), lengths, cfg.vocab_size,
                                    pad_id=cfg.pad_token_id, type_split=cfg.type_vocab_size > 1)
    return ids, mask, types


def _run(cfg, params, ids, mask, types=None, **kw):
    return bert.module(cfg).apply({"params": params}, ids, mask, types, **kw)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ----------------------------------------------------------------------------- HF parity

def test_bert_matches_hf_on_padded_batch_with_token_types(tiny_bert):
    cfg, params, model = tiny_bert
    ids, mask, types = _batch(cfg)
    assert types.any() and not mask.all()  # the batch really exercises types and padding
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = _run(cfg, params, ids, mask, types)
    assert out.last_hidden_state.shape == (len(LENGTHS), max(LENGTHS), cfg.hidden_size)
    assert _max_diff(out.last_hidden_state, ref["last_hidden_state"]) <= TOL
    assert _max_diff(out.pooled_output, ref["pooler_output"]) <= TOL


def test_roberta_matches_hf_on_padded_batch(tiny_roberta):
    cfg, params, model = tiny_roberta
    assert cfg.model_type == "roberta" and cfg.type_vocab_size == 1 and cfg.pad_token_id == 1
    ids, mask, _ = _batch(cfg, seed=1)
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask)
    out = _run(cfg, params, ids, mask)
    assert _max_diff(out.last_hidden_state, ref["last_hidden_state"]) <= TOL
    assert _max_diff(out.pooled_output, ref["pooler_output"]) <= TOL


def test_roberta_default_position_ids_match_hf():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
    cfg = bert.BertConfig(model_type="roberta", pad_token_id=1, vocab_size=50)
    ids = np.array([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1], [0, 4, 5, 6, 7, 2]])
    ref = RobertaEmbeddings.create_position_ids_from_input_ids(torch.as_tensor(ids), 1).numpy()
    np.testing.assert_array_equal(np.asarray(bert.default_position_ids(jnp.asarray(ids), cfg)), ref)


def test_explicit_position_ids_match_hf(tiny_bert):
    cfg, params, model = tiny_bert
    ids, mask, types = _batch(cfg, seed=2)
    pos = np.random.default_rng(3).integers(0, cfg.max_position_embeddings, ids.shape)
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos)
    out = _run(cfg, params, ids, mask, types, position_ids=pos)
    assert _max_diff(out.last_hidden_state, ref["last_hidden_state"]) <= TOL


@pytest.mark.parametrize("name", sorted(bert.ACTIVATIONS))
def test_activations_match_hf(name):
    from transformers.activations import ACT2FN
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    ref = ACT2FN[name](torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(bert.ACTIVATIONS[name](jnp.asarray(x))), ref, atol=2e-6)


# ----------------------------------------------------------------------------- dtypes, packing

def test_bf16_compute_runs_and_stays_close_to_float32(tiny_bert):
    cfg, params, _ = tiny_bert
    ids, mask, types = _batch(cfg)
    ref = _run(cfg, params, ids, mask, types)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    out = jax.jit(lambda p: _run(cfg16, p, ids, mask, types))(params)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    diff = np.abs(np.asarray(out.last_hidden_state, np.float32) - np.asarray(ref.last_hidden_state))
    assert np.isfinite(diff).all()
    # bf16 keeps ~3 significant digits; LayerNorm outputs are O(1).
    assert diff.max() < 0.15 and diff.mean() < 0.02, (diff.max(), diff.mean())


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_segment_ids_equal_running_segments_separately(family, tiny_bert, tiny_roberta):
    cfg, params, _ = tiny_bert if family == "bert" else tiny_roberta
    rng = np.random.default_rng(4)
    lens = (5, 3)
    seqs = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in lens]
    typs = [np.array([0] * (n - 2) + [1] * 2, np.int32) % cfg.type_vocab_size for n in lens]
    offset = cfg.pad_token_id + 1 if family == "roberta" else 0
    total = sum(lens) + 2  # two padding tokens at the end of the packed row
    ids = np.full((1, total), cfg.pad_token_id, np.int32)
    types = np.zeros((1, total), np.int32)
    segs = np.zeros((1, total), np.int32)
    pos = np.zeros((1, total), np.int32)
    start = 0
    for k, (s, t) in enumerate(zip(seqs, typs)):
        ids[0, start:start + len(s)] = s
        types[0, start:start + len(s)] = t
        segs[0, start:start + len(s)] = k + 1
        pos[0, start:start + len(s)] = np.arange(len(s)) + offset
        start += len(s)
    mask = (segs > 0).astype(np.int32)
    packed = _run(cfg, params, ids, mask, types, position_ids=pos, segment_ids=segs)
    start = 0
    for s, t in zip(seqs, typs):
        alone = _run(cfg, params, s[None], np.ones((1, len(s)), np.int32), t[None])
        got = packed.last_hidden_state[0, start:start + len(s)]
        assert _max_diff(got, alone.last_hidden_state[0]) <= TOL
        start += len(s)
    # Without segment_ids the two sequences see each other: the test above is not vacuous.
    mixed = _run(cfg, params, ids, mask, types, position_ids=pos)
    assert _max_diff(mixed.last_hidden_state[0, :lens[0]], packed.last_hidden_state[0, :lens[0]]) > 1e-3


# ----------------------------------------------------------------------------- dropout

def test_attention_prob_dropout_path_equals_attend_at_rate_zero():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (2, 5, 4, 8)) for key in (k1, k2, k3))
    mask = padding_mask(jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    ref = attend(q, k, v, mask=mask)
    got = bert.attend_with_prob_dropout(q, k, v, mask, 0.0, None)
    assert _max_diff(got, ref) <= 1e-6
    # With dropout the expectation over masks is the undropped output (inverted dropout).
    rngs = jax.random.split(jax.random.PRNGKey(1), 2000)
    mean = jax.vmap(lambda r: bert.attend_with_prob_dropout(q, k, v, mask, 0.3, r))(rngs).mean(0)
    assert _max_diff(mean, ref) < 0.1


def test_training_mode_applies_dropout_reproducibly(tiny_bert):
    cfg, params, _ = tiny_bert
    ids, mask, types = _batch(cfg)
    enc = bert.module(cfg)
    run = lambda seed: enc.apply({"params": params}, ids, mask, types, deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(seed)}).last_hidden_state
    eval_out = _run(cfg, params, ids, mask, types).last_hidden_state
    a, b, c = run(0), run(0), run(1)
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _max_diff(a, c) > 1e-3 and _max_diff(a, eval_out) > 1e-3


def test_cudnn_with_attention_dropout_in_training_is_a_clear_error(tiny_bert):
    cfg, params, _ = tiny_bert
    ids, mask, types = _batch(cfg)
    cfg = dataclasses.replace(cfg, attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_dropout"):
        bert.module(cfg).apply({"params": params}, ids, mask, types, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(0)})


# ----------------------------------------------------------------------------- PEFT hooks

class _Scale(nn.Module):
    """sub_out * task_ids (per row): task 0 switches the sublayer off, task 1 leaves it alone."""
    @nn.compact
    def __call__(self, sub_in, sub_out, routing):
        return sub_out * routing.task_ids[:, None, None].astype(sub_out.dtype)


class _ZeroValues(nn.Module):
    @nn.compact
    def __call__(self, k, v, mask, routing):
        return k, jnp.zeros_like(v), mask


class _ZeroEmbeddings(nn.Module):
    @nn.compact
    def __call__(self, emb, mask, routing):
        return jnp.zeros_like(emb), mask


class _Probe(Extension):
    """Records the sites the encoder offers and attaches a module at chosen ones."""
    name = "probe"

    def __init__(self, sublayer_at=(), kv_at=(), embeddings=False):
        self.sublayer_at, self.kv_at, self.embeddings_on = set(sublayer_at), set(kv_at), embeddings
        self.seen = []

    def projection(self, site):
        self.seen.append(("projection", site))

    def sublayer(self, site):
        self.seen.append(("sublayer", site))
        return _Scale() if site in self.sublayer_at else None

    def attention_kv(self, site):
        self.seen.append(("attention_kv", site))
        return _ZeroValues() if site in self.kv_at else None

    def embeddings(self, site):
        self.seen.append(("embeddings", site))
        return _ZeroEmbeddings() if self.embeddings_on else None


def _zeroed_hf(model, *names):
    """A copy of the HF model with the named parameters (and their biases) set to zero."""
    import copy
    m = copy.deepcopy(model)
    state = m.state_dict()
    with torch.no_grad():
        for n in names:
            state[n].zero_()
    return m


def test_every_site_is_offered_with_its_name_and_layer(tiny_bert):
    cfg, params, _ = tiny_bert
    probe = _Probe()
    ids, mask, types = _batch(cfg)
    _run(dataclasses.replace(cfg, extensions=(probe,)), params, ids, mask, types)
    seen = set(probe.seen)
    for i in range(cfg.num_layers):
        for name in ("attention.query", "attention.key", "attention.value", "attention.output",
                     "ffn.input", "ffn.output"):
            assert ("projection", Site("encoder", i, name)) in seen
        assert ("sublayer", Site("encoder", i, "attention")) in seen
        assert ("sublayer", Site("encoder", i, "ffn")) in seen
        assert ("attention_kv", Site("encoder", i, "attention")) in seen
    assert ("embeddings", bert.EMBEDDINGS_SITE) in seen
    assert len([s for s in probe.seen if s[0] == "projection"]) == 6 * cfg.num_layers


@pytest.mark.parametrize("sublayer,hf_zeroed", [
    ("attention", ["encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.attention.output.dense.bias"]),
    ("ffn", ["encoder.layer.0.output.dense.weight", "encoder.layer.0.output.dense.bias"]),
])
def test_sublayer_hook_sits_before_residual_and_layer_norm(tiny_bert, sublayer, hf_zeroed):
    """Switching a sublayer's output off at the hook must equal HF with that sublayer's output
    dense zeroed: LayerNorm(x + 0). Routing reaches the hook: only task-0 rows are switched off."""
    cfg, params, model = tiny_bert
    ids, mask, types = _batch(cfg)
    task_ids = jnp.array([0, 1, 0, 1])
    ext = _Probe(sublayer_at={Site("encoder", 0, sublayer)})
    out = _run(dataclasses.replace(cfg, extensions=(ext,)), params, ids, mask, types,
               routing=Routing(task_ids=task_ids)).last_hidden_state
    off = torch_outputs(_zeroed_hf(model, *hf_zeroed), input_ids=ids, attention_mask=mask,
                        token_type_ids=types)["last_hidden_state"]
    on = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)["last_hidden_state"]
    assert _max_diff(out[0::2], off[0::2]) <= TOL
    assert _max_diff(out[1::2], on[1::2]) <= TOL
    assert _max_diff(off, on) > 1e-2


def test_attention_kv_hook_sees_values(tiny_bert):
    cfg, params, model = tiny_bert
    ids, mask, types = _batch(cfg)
    ext = _Probe(kv_at={Site("encoder", 1, "attention")})
    out = _run(dataclasses.replace(cfg, extensions=(ext,)), params, ids, mask, types).last_hidden_state
    ref = torch_outputs(_zeroed_hf(model, "encoder.layer.1.attention.self.value.weight",
                                   "encoder.layer.1.attention.self.value.bias"),
                        input_ids=ids, attention_mask=mask, token_type_ids=types)["last_hidden_state"]
    assert _max_diff(out, ref) <= TOL


def test_embeddings_hook_sees_embedding_output(tiny_bert):
    cfg, params, model = tiny_bert
    ids, mask, types = _batch(cfg)
    ext = _Probe(embeddings=True)
    out = _run(dataclasses.replace(cfg, extensions=(ext,)), params, ids, mask, types).last_hidden_state
    ref = torch_outputs(_zeroed_hf(model, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"),
                        input_ids=ids, attention_mask=mask, token_type_ids=types)["last_hidden_state"]
    assert _max_diff(out, ref) <= TOL


# ----------------------------------------------------------------------------- config

def test_config_is_hashable_and_normalised():
    a = bert.BertConfig(dtype="bfloat16", extensions=[])
    b = bert.BertConfig(dtype=jnp.bfloat16, extensions=())
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 30, "num_heads": 4}, "num_heads"),
    ({"hidden_act": "gelu_10"}, "hidden_act"),
    ({"model_type": "albert"}, "model_type"),
    ({"attention_impl": "flash"}, "attention_impl"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bert.BertConfig(**kwargs)


def _hf_dict(**kw):
    import transformers
    d = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=48).to_dict()
    d.update(kw)
    return d


@pytest.mark.parametrize("kw,key", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_act": "gelu_10"}, "hidden_act"),
    ({"is_decoder": True}, "is_decoder"),
    ({"add_cross_attention": True}, "add_cross_attention"),
])
def test_config_from_hf_names_unsupported_key(kw, key):
    with pytest.raises(ValueError, match=key):
        bert.config_from_hf(_hf_dict(**kw))


@pytest.mark.parametrize("model_type", bert.MODEL_TYPES)
def test_config_to_hf_loads_in_transformers_and_round_trips(model_type):
    import transformers
    cfg = bert.BertConfig(vocab_size=77, hidden_size=24, num_layers=3, num_heads=6,
                          intermediate_size=40, hidden_act="gelu_new", model_type=model_type,
                          pad_token_id=1 if model_type == "roberta" else 0, type_vocab_size=1,
                          layer_norm_eps=1e-5, hidden_dropout=0.05, attention_dropout=0.0)
    loaded = transformers.AutoConfig.for_model(**bert.config_to_hf(cfg))
    assert loaded.model_type == model_type
    assert bert.config_from_hf(loaded.to_dict()) == cfg


def test_abstract_params_match_init_and_hf_names(tiny_bert):
    cfg, params, _ = tiny_bert
    abstract = bert.abstract_params(cfg)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, abstract)
    assert shapes == jax.tree_util.tree_map(np.shape, params)
    paths = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    assert paths == set(bert.hf_param_names(cfg))
    assert "layer_0/attention/query/kernel" in paths and "pooler/dense/kernel" in paths
