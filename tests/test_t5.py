"""T5 (v1.0 and v1.1) against Hugging Face's PyTorch T5 on tiny random models.

The references are transformers' own models, built from configs with fixed seeds, every weight
perturbed (tests/hf_tiny.py) so a swapped or missing weight shows up in the outputs. v1.0:
ReLU FFN, tied and scaled LM head. v1.1: gated-GELU FFN, an untied LM head holding values
different from the embedding (as in the released v1.1 checkpoints), more decoder than encoder
layers, and few relative-position buckets so that the log-spaced buckets are reached by short
sequences.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from mtlx.models.tree import flat_paths
from mtlx.models import hf as mhf  # noqa: E402
from mtlx.models import t5  # noqa: E402
from mtlx.models.layers import Extension  # noqa: E402
from tests.hf_tiny import build_tiny, perturb_  # noqa: E402

ATOL = 1e-5
TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VARIANTS = {
    "v1.0": dict(TINY, feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 num_decoder_layers=3, relative_attention_num_buckets=8,
                 relative_attention_max_distance=12),
}
SRC_LENGTHS = (11, 6, 2)
TGT_LENGTHS = (4, 7, 1)


def _save_reference(variant: str, path: str):
    """Saves a tiny T5ForConditionalGeneration and returns it reloaded from disk (the form a
    checkpoint user sees: for v1.1 transformers then keeps lm_head apart from shared)."""
    config = transformers.T5Config(**VARIANTS[variant])
    model = build_tiny(transformers.T5ForConditionalGeneration, config, seed=3, perturb=False)
    if variant == "v1.1":
        # transformers >= 5 ties T5's lm_head to shared at construction; released v1.1
        # checkpoints have their own lm_head.weight, so give the model one.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape) * 0.3)
    perturb_(model, seed=3, std=0.1)
    model.save_pretrained(path, safe_serialization=True)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return loaded.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def ref(request, tmp_path_factory):
    variant = request.param
    path = str(tmp_path_factory.mktemp(f"t5-{variant}"))
    model = _save_reference(variant, path)
    tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert tied == (variant == "v1.0"), "the reference model's LM head is not what the test needs"
    with open(os.path.join(path, "config.json")) as f:
        cfg = t5.config_from_hf(json.load(f))
    params = t5.params_from_hf(load_file(os.path.join(path, "model.safetensors")), cfg)
    return dict(variant=variant, path=path, model=model, cfg=cfg, params=params)


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    b = len(SRC_LENGTHS)
    ids = np.zeros((b, max(SRC_LENGTHS)), np.int64)
    mask = np.zeros_like(ids)
    labels = np.full((b, max(TGT_LENGTHS)), -100, np.int64)
    for i, (n, m) in enumerate(zip(SRC_LENGTHS, TGT_LENGTHS)):
        ids[i, :n] = rng.integers(2, 100, n)
        mask[i, :n] = 1
        labels[i, :m] = rng.integers(2, 100, m)
    return ids, mask, labels


def _torch_forward(model, ids, mask, dec_ids, dec_mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    decoder_input_ids=torch.as_tensor(dec_ids),
                    decoder_attention_mask=torch.as_tensor(dec_mask))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def _teacher_forcing(model, ids, mask, labels):
    dec_ids = model._shift_right(torch.as_tensor(labels)).numpy()
    # Real decoder inputs: the start token plus every real label but the last.
    dec_mask = (np.arange(labels.shape[1])[None] < (labels != -100).sum(1)[:, None]).astype(np.int64)
    return dec_ids, dec_mask


@functools.partial(jax.jit, static_argnums=0)
def _ours(cfg, params, ids, mask, dec_ids, dec_mask):
    """(EncoderOutput, logits) through the public encode/decode methods."""
    model = t5.T5Model(cfg)
    v = {"params": params}
    enc = model.apply(v, ids, mask, method=t5.T5Model.encode)
    logits = model.apply(v, dec_ids, enc.last_hidden_state, mask, dec_mask,
                         method=t5.T5Model.decode)
    return enc, logits


# --------------------------------------------------------------------------- parity

def test_relative_position_buckets_match_hf():
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = np.arange(-300, 300)
    bucket = jax.jit(t5.relative_position_bucket, static_argnums=(1, 2, 3))
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 12), (16, 20)):
            want = hf_bucket(torch.as_tensor(rel), bidirectional, buckets, dist).numpy()
            got = np.asarray(bucket(rel, bidirectional, buckets, dist))
            np.testing.assert_array_equal(got, want, err_msg=f"{bidirectional} {buckets} {dist}")


def test_encoder_and_decoder_match_hf(ref):
    ids, mask, labels = _batch()
    dec_ids, dec_mask = _teacher_forcing(ref["model"], ids, mask, labels)
    hf_enc, hf_logits = _torch_forward(ref["model"], ids, mask, dec_ids, dec_mask)
    enc, logits = _ours(ref["cfg"], ref["params"], ids, mask, dec_ids, dec_mask)
    assert logits.dtype == jnp.float32 and logits.shape == hf_logits.shape
    np.testing.assert_allclose(np.asarray(enc.last_hidden_state), hf_enc, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=ATOL, rtol=0)
    # pooled_output is the documented masked mean of the encoder output.
    m = mask[..., None]
    np.testing.assert_allclose(np.asarray(enc.pooled_output), (hf_enc * m).sum(1) / m.sum(1),
                               atol=ATOL, rtol=0)


def test_config_from_hf_reads_the_variant(ref):
    cfg = ref["cfg"]
    want = VARIANTS[ref["variant"]]
    assert cfg.feed_forward_proj == want["feed_forward_proj"]
    assert cfg.tie_word_embeddings == want["tie_word_embeddings"]
    assert cfg.num_decoder_layers == want.get("num_decoder_layers", want["num_layers"])
    assert cfg.relative_attention_num_buckets == want.get("relative_attention_num_buckets", 32)


def test_load_pretrained_gives_the_same_params(ref):
    cfg, params = mhf.load_pretrained(ref["path"])
    assert cfg == ref["cfg"]
    flat = flat_paths(params)
    assert sorted(flat) == sorted(flat_paths(ref["params"]))
    for k, v in flat_paths(ref["params"]).items():
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    # Same paths and shapes as the module's own init, and every HF key named.
    abstract = flat_paths(t5.abstract_params(cfg))
    assert {k: v.shape for k, v in abstract.items()} == {k: v.shape for k, v in flat.items()}
    assert set(t5.hf_param_names(cfg)) == set(flat)


def test_round_trip_through_transformers(ref, tmp_path):
    cfg, params = ref["cfg"], ref["params"]
    save_file(t5.params_to_hf(params, cfg), str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with open(tmp_path / "config.json", "w") as f:
        json.dump(t5.config_to_hf(cfg), f)
    back = transformers.T5ForConditionalGeneration.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    assert back.config.num_decoder_layers == cfg.num_decoder_layers
    ids, mask, labels = _batch(seed=1)
    dec_ids, dec_mask = _teacher_forcing(back, ids, mask, labels)
    hf_enc, hf_logits = _torch_forward(back, ids, mask, dec_ids, dec_mask)
    orig_enc, orig_logits = _torch_forward(ref["model"], ids, mask, dec_ids, dec_mask)
    enc, logits = _ours(cfg, params, ids, mask, dec_ids, dec_mask)
    np.testing.assert_allclose(hf_logits, orig_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(enc.last_hidden_state), hf_enc, atol=ATOL, rtol=0)
    # The bare T5Model loads the same file (lm_head is just an unused key there), and its
    # last_hidden_state is our decode_hidden.
    bare = transformers.T5Model.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        want = bare(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    decoder_input_ids=torch.as_tensor(dec_ids),
                    decoder_attention_mask=torch.as_tensor(dec_mask)).last_hidden_state.numpy()
    got = t5.T5Model(cfg).apply({"params": params}, jnp.asarray(dec_ids), enc.last_hidden_state,
                                jnp.asarray(mask), jnp.asarray(dec_mask),
                                method=t5.T5Model.decode_hidden)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_export_pretrained_then_load_pretrained(ref, tmp_path):
    out = mhf.export_pretrained(str(tmp_path / "out"), ref["cfg"], ref["params"])
    cfg, params = mhf.load_pretrained(out)
    assert cfg == ref["cfg"]
    for k, v in flat_paths(ref["params"]).items():
        np.testing.assert_array_equal(flat_paths(params)[k], v, err_msg=k)


def _hf_greedy(model, ids, mask, max_new, eos):
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=0,
                             eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0,
                             # transformers sizes its KV cache by num_layers, which breaks
                             # generate() when num_decoder_layers differs (v1.1 fixture).
                             use_cache=False).numpy()
    assert (out[:, 0] == 0).all()
    out = out[:, 1:]  # drop the decoder start token
    # generate stops when every row is done: pad the shorter output as our buffer is.
    return np.pad(out, [(0, 0), (0, max_new - out.shape[1])], constant_values=0)


def test_greedy_decode_matches_generate(ref):
    cfg, params, model = ref["cfg"], ref["params"], ref["model"]
    ids, mask, _ = _batch(seed=2)
    n = 8
    # Pick as EOS a token that transformers generates mid-way in some row when no EOS stops it,
    # so that the comparison covers rows that stop early (pad after EOS) and rows that do not.
    never = cfg.vocab_size - 1
    free = _hf_greedy(model, ids, mask, n, never)
    eos = int(next(t for t in free[:, 1:-1].ravel() if t not in (never, 0)))
    stopped = np.asarray(t5.greedy_decode(params, dataclasses.replace(cfg, eos_token_id=eos),
                                          jnp.asarray(ids), jnp.asarray(mask), n))
    assert stopped.shape == (len(ids), n) and stopped.dtype == np.int32
    np.testing.assert_array_equal(stopped, _hf_greedy(model, ids, mask, n, eos))
    row = next(i for i in range(len(ids)) if eos in stopped[i, :-1])
    first = list(stopped[row]).index(eos)
    assert (stopped[row, first + 1:] == cfg.pad_token_id).all()
    np.testing.assert_array_equal(stopped[row, :first + 1], free[row, :first + 1])


def _hf_beams(model, ids, mask, max_new, eos, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             do_sample=False, max_length=max_new + 1, min_new_tokens=0,
                             eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0,
                             use_cache=False, **kw).numpy()
    assert (out[:, 0] == 0).all()
    return out[:, 1:]


def _through_eos(row, eos):
    row = list(row)
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def flat_ref(tmp_path_factory):
    """A v1.1 model whose LM head is scaled down (flatter next-token distributions), so beam
    search and greedy decoding part ways and beams end at different lengths."""
    path = str(tmp_path_factory.mktemp("t5-flat"))
    config = transformers.T5Config(**VARIANTS["v1.1"])
    model = build_tiny(transformers.T5ForConditionalGeneration, config, seed=3, perturb=False)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape) * 0.3)
    perturb_(model, seed=3, std=0.1)
    model.save_pretrained(path, safe_serialization=True)
    model = transformers.T5ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager").eval()
    with open(os.path.join(path, "config.json")) as f:
        cfg = t5.config_from_hf(json.load(f))
    return model, cfg, t5.params_from_hf(load_file(os.path.join(path, "model.safetensors")), cfg)


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(3, 1.0, False), (4, 0.6, False), (3, 0.0, "never"), (3, 2.0, "never"),
                          (2, 1.0, True), (4, -1.0, False)])
def test_beam_search_decode_matches_generate(flat_ref, num_beams, length_penalty, early_stopping):
    """Each row's best hypothesis equals transformers' generate(num_beams=...) token for token
    through its EOS; after it, mtlx pads (transformers fills T5's finished rows with EOS: its
    fill value is `pad_token_id or eos_token_id`, and T5's pad id is 0)."""
    model, cfg, params = flat_ref
    ids, mask, _ = _batch(seed=2)
    n = 8
    never = cfg.vocab_size - 1
    greedy = _hf_greedy(model, ids, mask, n, never)
    free = _hf_beams(model, ids, mask, n, never, num_beams=4)
    assert (free != greedy).any(), "the fixture no longer separates beam search from greedy"
    seen_eos = 0
    # EOS tokens that the beams emit mid-way, so hypotheses finish at different steps
    for eos in sorted({int(t) for t in free[:, 1:-1].ravel()} - {0, never})[:3]:
        want = _hf_beams(model, ids, mask, n, eos, num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping)
        got = np.asarray(t5.beam_search_decode(
            params, dataclasses.replace(cfg, eos_token_id=eos), jnp.asarray(ids),
            jnp.asarray(mask), n, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping))
        assert got.shape == (len(ids), n) and got.dtype == np.int32
        for g, w in zip(got, want):
            assert _through_eos(g, eos) == _through_eos(w, eos), (eos, g, w)
            if eos in list(g):
                seen_eos += 1
                assert (g[list(g).index(eos) + 1:] == cfg.pad_token_id).all()
    # some hypotheses ended in EOS (with 'never' and a length penalty of 2 every best
    # hypothesis runs to max_length on this model: what that case checks is the heuristic's
    # max_length bound)
    assert seen_eos > 0 or (early_stopping == "never" and length_penalty > 1), seen_eos


def test_beam_search_options_are_checked(ref):
    cfg, params = ref["cfg"], ref["params"]
    ids = jnp.ones((1, 3), jnp.int32)
    for kw, match in (({"num_beams": 0}, "num_beams must be a positive integer"),
                      ({"length_penalty": "1"}, "length_penalty must be a number"),
                      ({"early_stopping": "sometimes"}, "early_stopping must be one of")):
        with pytest.raises(ValueError, match=match):
            t5.beam_search_decode(params, cfg, ids, None, 4, **kw)


def test_cached_decoding_equals_teacher_forcing(ref):
    """Each decode_step's logits equal the teacher-forced logits at that position."""
    cfg, params = ref["cfg"], ref["params"]
    model = t5.T5Model(cfg)
    v = {"params": params}
    ids, mask, labels = _batch(seed=4)
    dec_ids = np.asarray(ref["model"]._shift_right(torch.as_tensor(labels)))
    enc = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method=t5.T5Model.encode)
    full = model.apply(v, jnp.asarray(dec_ids), enc.last_hidden_state, jnp.asarray(mask),
                       method=t5.T5Model.decode)
    cache = model.apply(v, enc.last_hidden_state, dec_ids.shape[1], method=t5.T5Model.init_cache)
    decode_step = jax.jit(functools.partial(model.apply, method=t5.T5Model.decode_step))
    for t in range(dec_ids.shape[1]):
        step, cache = decode_step(v, jnp.asarray(dec_ids[:, t]), jnp.asarray(t), cache,
                                  jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), atol=ATOL, rtol=0)


def test_bf16_compute_stays_close_to_float32(ref):
    cfg, params = ref["cfg"], ref["params"]
    ids, mask, labels = _batch()
    dec_ids, dec_mask = _teacher_forcing(ref["model"], ids, mask, labels)
    enc32, logits32 = _ours(cfg, params, ids, mask, dec_ids, dec_mask)
    enc16, logits16 = _ours(dataclasses.replace(cfg, dtype="bfloat16"), params, ids, mask,
                            dec_ids, dec_mask)
    assert enc16.last_hidden_state.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    for a, b in ((enc16.last_hidden_state, enc32.last_hidden_state), (logits16, logits32)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.isfinite(a).all()
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 0.05, rel
        assert rel > 0  # bf16 really ran
    # Params stay float32 under bf16 compute.
    abstract = t5.abstract_params(dataclasses.replace(cfg, dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}


def _random_model(**overrides):
    """A small randomly initialised model (no HF reference needed) for behaviour tests."""
    fields = {f.name for f in dataclasses.fields(t5.T5Config)}
    cfg = t5.T5Config(**{**{k: v for k, v in VARIANTS["v1.1"].items() if k in fields},
                         "num_layers": 1, "num_decoder_layers": 2, **overrides})
    ids, mask, labels = _batch()
    dec_ids = np.where(labels == -100, 0, labels)
    dec_mask = (labels != -100).astype(np.int64)
    params = t5.T5Model(cfg).init(jax.random.PRNGKey(0), ids, mask, dec_ids)["params"]
    return cfg, params, [jnp.asarray(x) for x in (ids, mask, dec_ids, dec_mask)]


def test_dropout_is_active_only_when_not_deterministic():
    cfg, params, args = _random_model()
    model = t5.T5Model(cfg)

    def key(seed):  # 'rbg' keys: threefry's dropout masks take ~10 s to compile on CPU
        return jax.random.key(seed, impl="rbg")

    a, b = (model.apply({"params": params}, *args, deterministic=False,
                        rngs={"dropout": key(seed)}) for seed in (0, 1))
    c = model.apply({"params": params}, *args)
    assert np.isfinite(np.asarray(a)).all()
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    # With a vanishing rate every unit is kept: the training path (explicit attention with
    # probability dropout) must then compute what the inference path does.
    keep_all = dataclasses.replace(cfg, dropout_rate=1e-9)
    d = t5.T5Model(keep_all).apply({"params": params}, *args, deterministic=False,
                                   rngs={"dropout": key(0)})
    np.testing.assert_allclose(np.asarray(d), np.asarray(c), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- extension hooks

class _Recorder(Extension):
    """Records every site it is asked about; attaches nothing."""
    name = "recorder"

    def __init__(self):
        self.seen = set()

    def projection(self, site):
        self.seen.add(("projection", str(site)))

    def sublayer(self, site):
        self.seen.add(("sublayer", str(site)))

    def attention_kv(self, site):
        self.seen.add(("attention_kv", str(site)))

    def embeddings(self, site):
        self.seen.add(("embeddings", str(site)))


def test_extension_hooks_cover_every_site():
    rec = _Recorder()
    cfg = t5.T5Config(**{**{k: v for k, v in VARIANTS["v1.1"].items()
                            if k in {f.name for f in dataclasses.fields(t5.T5Config)}},
                         "extensions": (rec,)})
    t5.abstract_params(cfg)
    want = {("embeddings", "encoder.layer0.embeddings")}
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            kinds = ["attention"] + (["cross_attention"] if stack == "decoder" else [])
            for kind in kinds:
                want |= {("projection", f"{stack}.layer{i}.{kind}.{p}")
                         for p in ("query", "key", "value", "output")}
            want |= {("projection", f"{stack}.layer{i}.ffn.{p}") for p in ("input", "gate", "output")}
            want |= {("sublayer", f"{stack}.layer{i}.{k}") for k in kinds + ["ffn"]}
            want.add(("attention_kv", f"{stack}.layer{i}.attention"))
    assert rec.seen == want


class _MaskedPrefix(Extension):
    """Prepends P random keys/values that the mask hides: outputs must not change (this checks
    that the position bias and mask are widened consistently)."""
    name = "masked_prefix"
    P = 3

    def attention_kv(self, site):
        import flax.linen as nn
        P = self.P

        class Prefix(nn.Module):
            @nn.compact
            def __call__(self, k, v, mask, routing):
                b, _, h, d = k.shape
                pk = jax.random.normal(jax.random.PRNGKey(site.layer), (b, P, h, d), k.dtype)
                pad = jnp.zeros(mask.shape[:-1] + (P,), bool)
                return (jnp.concatenate([pk, k], 1), jnp.concatenate([pk * 2, v], 1),
                        jnp.concatenate([pad, mask], -1))

        return Prefix()


def test_prepended_keys_widen_bias_and_mask():
    cfg0, params, (ids, mask, dec_ids, dec_mask) = _random_model()
    cfg = dataclasses.replace(cfg0, extensions=(_MaskedPrefix(),))
    v = {"params": params}
    logits0 = t5.T5Model(cfg0).apply(v, ids, mask, dec_ids, dec_mask)
    causal_only = t5.T5Model(cfg0).apply(v, ids, mask, dec_ids)  # what decode_step sees
    model = t5.T5Model(cfg)
    enc0 = t5.T5Model(cfg0).apply(v, ids, mask, method=t5.T5Model.encode)
    enc1 = model.apply(v, ids, mask, method=t5.T5Model.encode)
    np.testing.assert_allclose(np.asarray(enc1.last_hidden_state),
                               np.asarray(enc0.last_hidden_state), atol=ATOL, rtol=0)
    # Logits reach ~12 here: float32 rounding of the wider softmax's sums scales with them.
    np.testing.assert_allclose(np.asarray(model.apply(v, ids, mask, dec_ids, dec_mask)),
                               np.asarray(logits0), atol=ATOL, rtol=2e-6)
    # The cached decoding path goes through the same hook (over the whole cache buffer).
    cache = model.apply(v, enc1.last_hidden_state, dec_ids.shape[1], method=t5.T5Model.init_cache)
    for t in range(dec_ids.shape[1]):
        step, cache = model.apply(v, dec_ids[:, t], jnp.asarray(t), cache, mask,
                                  method=t5.T5Model.decode_step)
        np.testing.assert_allclose(np.asarray(step), np.asarray(causal_only[:, t]), atol=ATOL,
                                   rtol=0)


# --------------------------------------------------------------------------- errors

def test_unsupported_feed_forward_proj():
    hf = t5.config_to_hf(t5.T5Config(**{k: v for k, v in TINY.items()}))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.config_from_hf({**hf, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config(feed_forward_proj="gelu")
    with pytest.raises(ValueError, match="model_type"):
        t5.config_from_hf({**hf, "model_type": "mt5"})
    with pytest.raises(ValueError, match="eos_token_id"):
        t5.config_from_hf({**hf, "eos_token_id": [1, 2]})
    with pytest.raises(KeyError, match="d_model"):
        t5.config_from_hf({k: v for k, v in hf.items() if k != "d_model"})


def test_config_from_hf_tie_semantics():
    hf = t5.config_to_hf(t5.T5Config(**TINY))
    base = {k: v for k, v in hf.items() if k not in ("tie_word_embeddings", "scale_decoder_outputs")}
    assert t5.config_from_hf(base).tie_word_embeddings  # HF default: tied
    assert not t5.config_from_hf({**base, "tie_word_embeddings": False}).tie_word_embeddings
    # transformers >= 5 writes tie_word_embeddings true for v1.1 and keeps the truth here:
    assert not t5.config_from_hf({**base, "tie_word_embeddings": True,
                                  "scale_decoder_outputs": False}).tie_word_embeddings
    loaded = transformers.T5Config.from_dict(t5.config_to_hf(t5.T5Config(**TINY, tie_word_embeddings=False)))
    assert not loaded.scale_decoder_outputs


def test_missing_and_unexpected_weights(ref):
    cfg = ref["cfg"]
    tensors = load_file(os.path.join(ref["path"], "model.safetensors"))
    key = f"decoder.block.{cfg.num_decoder_layers - 1}.layer.2.DenseReluDense.wo.weight"
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        t5.params_from_hf({k: v for k, v in tensors.items() if k != key}, cfg)
    with pytest.raises(KeyError, match="shared.weight"):
        t5.params_from_hf({k: v for k, v in tensors.items() if k != "shared.weight"}, cfg)
    # The embedding aliases are accepted in place of shared.weight.
    alias = {("decoder.embed_tokens.weight" if k == "shared.weight" else k): v
             for k, v in tensors.items()}
    got = t5.params_from_hf(alias, cfg)
    np.testing.assert_array_equal(got["shared"]["embedding"], ref["params"]["shared"]["embedding"])
    with pytest.raises(ValueError, match="differ"):
        t5.params_from_hf({**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="no place"):
        t5.params_from_hf(tensors, dataclasses.replace(cfg, num_layers=1))
    if cfg.tie_word_embeddings:
        with pytest.raises(ValueError, match="lm_head"):
            t5.params_from_hf({**tensors, "lm_head.weight": tensors["shared.weight"] + 1}, cfg)
    else:
        # transformers >= 5 saves only shared.weight for a tied v1.1 head: the head aliases it.
        got = t5.params_from_hf({k: v for k, v in tensors.items() if k != "lm_head.weight"}, cfg)
        np.testing.assert_array_equal(got["lm_head"]["kernel"], tensors["shared.weight"].T)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    with pytest.raises(ValueError, match="Linear"):
        t5.params_from_hf({**tensors, q: tensors[q].ravel()}, cfg)


def test_params_to_hf_refuses_extension_params(ref):
    params = {**ref["params"], "encoder": {**ref["params"]["encoder"], "prompt": np.zeros((3, 32))}}
    with pytest.raises(ValueError, match="encoder/prompt"):
        t5.params_to_hf(params, ref["cfg"])
    broken = {k: v for k, v in ref["params"].items() if k != "shared"}
    with pytest.raises(KeyError, match="shared.weight"):
        t5.params_to_hf(broken, ref["cfg"])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_tree_loss_and_gradients(policy):
    """T5Config.remat wraps every encoder and decoder block: the parameter tree, the output and
    the gradients are the unwrapped model's; cached decoding (the blocks' other methods) still
    runs; the remat really is in the differentiated program."""
    cfg, params, args = _random_model()
    rcfg = dataclasses.replace(cfg, remat=policy)
    rparams = t5.T5Model(rcfg).init(jax.random.PRNGKey(0), *args[:3])["params"]
    assert jax.tree.structure(rparams) == jax.tree.structure(params)

    def loss(c):
        def f(p):
            return jnp.mean(t5.T5Model(c).apply({"params": p}, *args) ** 2)
        return f

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss(c)))(params) for c in (cfg, rcfg))
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    def remats(c):   # jax.checkpoint's primitive in the gradient's jaxpr, one per block
        return str(jax.make_jaxpr(jax.grad(loss(c)))(params)).count("remat")
    assert remats(cfg) == 0 and remats(rcfg) >= cfg.num_layers + cfg.num_decoder_layers
    model = t5.T5Model(rcfg)
    enc = model.apply({"params": params}, args[0], args[1], method=t5.T5Model.encode)
    cache = model.apply({"params": params}, enc.last_hidden_state, 3, method=t5.T5Model.init_cache)
    out, _ = model.apply({"params": params}, args[2][:, 0], jnp.asarray(0), cache, args[1],
                         method=t5.T5Model.decode_step)
    assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="unknown remat policy"):
        dataclasses.replace(cfg, remat="most")
