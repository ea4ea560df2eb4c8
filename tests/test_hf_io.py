"""Reading and writing Hugging Face checkpoints: formats, round trips through transformers, and
every error the loader promises."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

from mtlx.models import bert, hf
from tests.hf_tiny import padded_batch, save_tiny_bert, save_tiny_roberta, torch_outputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _leaves(params):
    return {"/".join(str(k.key) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory):
    path, model = save_tiny_bert(tmp_path_factory.mktemp("bert"))
    return path, model, hf.load_pretrained(path)


def _write_state_dict(path, state, config_from):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(config_from, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(cfg)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return str(path)


# ----------------------------------------------------------------------------- formats

def test_safetensors_params_are_the_hf_weights(bert_ckpt):
    _, model, (cfg, params) = bert_ckpt
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    leaves = _leaves(params)
    for mtlx_path, hf_key in bert.hf_param_names(cfg).items():
        expect = sd[hf_key].T if mtlx_path.endswith("kernel") else sd[hf_key]
        np.testing.assert_array_equal(leaves[mtlx_path], expect, err_msg=mtlx_path)
        assert leaves[mtlx_path].dtype == np.float32


def test_pytorch_bin_gives_the_same_params(tmp_path, bert_ckpt):
    _, _, (_, params) = bert_ckpt
    path, _ = save_tiny_bert(tmp_path, safe_serialization=False)  # same seed, same weights
    assert os.listdir(path) and "model.safetensors" not in os.listdir(path)
    _, bin_params = hf.load_pretrained(path)
    _assert_same_params(bin_params, params)


def test_prefixed_legacy_keys_and_head_weights_load(tmp_path, bert_ckpt):
    """BertFor* checkpoints: 'bert.' prefix, TF-era LayerNorm gamma/beta, the old position_ids
    buffer and task-head weights (ignored) all load to the same encoder params."""
    path, model, (_, params) = bert_ckpt
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state["bert." + k] = v
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["classifier.weight"] = torch.zeros(3, 32)
    state["cls.predictions.bias"] = torch.zeros(101)
    _, got = hf.load_pretrained(_write_state_dict(tmp_path / "prefixed", state, path))
    _assert_same_params(got, params)


def test_sequence_classification_checkpoint_loads_encoder(tmp_path, bert_ckpt):
    path, model, (_, params) = bert_ckpt
    cls = transformers.BertForSequenceClassification(model.config)
    cls.bert.load_state_dict(model.state_dict())
    cls.save_pretrained(tmp_path / "cls")
    _, got = hf.load_pretrained(str(tmp_path / "cls"))
    _assert_same_params(got, params)


def test_sharded_safetensors(tmp_path, bert_ckpt):
    _, model, (_, params) = bert_ckpt
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    _, got = hf.load_pretrained(str(tmp_path / "sharded"))
    _assert_same_params(got, params)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path, bert_ckpt):
    _, model, (_, params) = bert_ckpt
    import copy
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    m16.save_pretrained(tmp_path / "bf16")
    _, got = hf.load_pretrained(str(tmp_path / "bf16"))
    rounded = {k: v.float().numpy() for k, v in m16.state_dict().items()}
    leaves = _leaves(got)
    for mtlx_path, hf_key in bert.hf_param_names(bert.config_from_hf(model.config.to_dict())).items():
        expect = rounded[hf_key].T if mtlx_path.endswith("kernel") else rounded[hf_key]
        assert leaves[mtlx_path].dtype == np.float32
        np.testing.assert_array_equal(leaves[mtlx_path], expect, err_msg=mtlx_path)


def test_overrides_reach_the_config(bert_ckpt):
    path, _, _ = bert_ckpt
    cfg, params = hf.load_pretrained(path, dtype="bfloat16", attention_impl="xla", attention_dropout=0.0)
    assert cfg.dtype == np.dtype("bfloat16") and cfg.attention_impl == "xla" and cfg.attention_dropout == 0.0
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))


def test_checkpoint_without_pooler(tmp_path):
    path, model = save_tiny_bert(tmp_path, add_pooling_layer=False)
    with pytest.raises(KeyError, match=r"pooler\.dense\.weight.*add_pooler=False"):
        hf.load_pretrained(path)
    cfg, params = hf.load_pretrained(path, add_pooler=False)
    ids, mask, types = padded_batch(np.random.default_rng(0), (5, 2), cfg.vocab_size, type_split=True)
    out = bert.module(cfg).apply({"params": params}, ids, mask, types)
    ref = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert out.pooled_output is None
    assert np.abs(np.asarray(out.last_hidden_state) - ref["last_hidden_state"]).max() <= TOL


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_export_round_trip_through_transformers(tmp_path, family):
    save = save_tiny_bert if family == "bert" else save_tiny_roberta
    path, model = save(tmp_path / "src", seed=3)
    cfg, params = hf.load_pretrained(path)
    out_dir = hf.export_pretrained(str(tmp_path / "exported"), cfg, params)
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left

    cls = transformers.BertModel if family == "bert" else transformers.RobertaModel
    for loader in (transformers.AutoModel, cls):
        back = loader.from_pretrained(out_dir, attn_implementation="eager").eval()
        assert type(back) is cls
        ids, mask, types = padded_batch(np.random.default_rng(1), (7, 3, 5), cfg.vocab_size,
                                        pad_id=cfg.pad_token_id, type_split=family == "bert")
        types = types if family == "bert" else None
        a = torch_outputs(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = torch_outputs(back, input_ids=ids, attention_mask=mask, token_type_ids=types)
        for key in ("last_hidden_state", "pooler_output"):
            assert np.abs(a[key] - b[key]).max() <= TOL
    cfg2, params2 = hf.load_pretrained(out_dir)
    assert cfg2 == cfg
    _assert_same_params(params2, params)


def test_export_bfloat16_params(tmp_path, bert_ckpt):
    import dataclasses
    path, _, (cfg, params) = bert_ckpt
    cfg16 = dataclasses.replace(cfg, param_dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda x: x.astype(cfg16.param_dtype), params)
    out_dir = hf.export_pretrained(str(tmp_path / "bf16"), cfg16, params16)
    back = transformers.AutoModel.from_pretrained(out_dir)
    leaves = _leaves(params16)
    for mtlx_path, hf_key in bert.hf_param_names(cfg).items():
        got = back.state_dict()[hf_key].numpy()
        assert got.dtype == np.float32
        expect = leaves[mtlx_path].astype(np.float32)
        np.testing.assert_array_equal(got, expect.T if mtlx_path.endswith("kernel") else expect)


def test_export_refuses_existing_dir_unless_overwrite(tmp_path, bert_ckpt):
    _, _, (cfg, params) = bert_ckpt
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.export_pretrained(str(target), cfg, params)
    assert (target / "keep.txt").read_text() == "old"
    hf.export_pretrained(str(target), cfg, params, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_is_atomic_on_failure(tmp_path, bert_ckpt, monkeypatch):
    _, _, (cfg, params) = bert_ckpt
    import safetensors.numpy

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        hf.export_pretrained(str(tmp_path / "new"), cfg, params)
    assert os.listdir(tmp_path) == []
    # Replacing an existing checkpoint: the old one survives the failure untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        hf.export_pretrained(str(old), cfg, params, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"] and (old / "config.json").read_text() == "{}"


def test_export_refuses_extension_params(tmp_path, bert_ckpt):
    _, _, (cfg, params) = bert_ckpt
    extended = jax.tree_util.tree_map(lambda x: x, params)
    extended["layer_0"]["attention"]["adapter"] = {"kernel": np.zeros((32, 4), np.float32)}
    with pytest.raises(ValueError, match="layer_0/attention/adapter/kernel"):
        hf.export_pretrained(str(tmp_path / "x"), cfg, extended)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- errors

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(str(tmp_path))


def test_no_weights_lists_what_was_looked_for(tmp_path, bert_ckpt):
    path, _, _ = bert_ckpt
    _write_state_dict(tmp_path, {}, path)
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        hf.load_pretrained(str(tmp_path))
    for name in hf.WEIGHT_FILES:
        assert name in str(e.value)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2") as e:
        hf.load_pretrained(str(tmp_path))
    for name in ("bert", "roberta", "t5"):
        assert name in str(e.value)


def test_invalid_config_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "bert",\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json:3"):
        hf.load_pretrained(str(tmp_path))


def test_shape_mismatch_names_path_shapes_and_hf_key(tmp_path, bert_ckpt):
    path, model, _ = bert_ckpt
    p = _write_state_dict(tmp_path, model.state_dict(), path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    hf_cfg["vocab_size"] = 120
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(p)
    msg = str(e.value)
    for part in ("embeddings/word_embeddings/embedding", "(101, 32)", "(120, 32)",
                 "embeddings.word_embeddings.weight"):
        assert part in msg, msg


def test_missing_weight_names_hf_key(tmp_path, bert_ckpt):
    path, model, _ = bert_ckpt
    state = dict(model.state_dict())
    del state["encoder.layer.1.output.dense.bias"]
    with pytest.raises(KeyError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        hf.load_pretrained(_write_state_dict(tmp_path, state, path))


def test_extra_layer_weights_are_an_error(tmp_path, bert_ckpt):
    path, model, _ = bert_ckpt
    p = _write_state_dict(tmp_path, model.state_dict(), path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    hf_cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\."):
        hf.load_pretrained(p)


def test_unknown_override_is_an_error(bert_ckpt):
    path, _, _ = bert_ckpt
    with pytest.raises(TypeError, match="hidden_sise"):
        hf.load_pretrained(path, hidden_sise=3)


def test_pytorch_bin_without_torch_says_so(tmp_path, bert_ckpt, monkeypatch):
    path, model, _ = bert_ckpt
    p = _write_state_dict(tmp_path, model.state_dict(), path)
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs torch"):
        hf.load_pretrained(p)


class _Payload:
    """Unpickling this would create a file: the loader must refuse before that."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pytorch_bin_is_never_fully_unpickled(tmp_path, bert_ckpt):
    path, _, _ = bert_ckpt
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    p = tmp_path / "ckpt"
    _write_state_dict(p, {}, path)
    with open(p / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": payload}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        hf.load_pretrained(str(p))
    assert not marker.exists()


def test_check_tokenizer_fits(tmp_path):
    cfg = bert.BertConfig(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4)
    hf.check_tokenizer_fits(101, cfg)
    hf.check_tokenizer_fits(90, cfg)
    with pytest.raises(ValueError, match=r"150 tokens.*101 rows"):
        hf.check_tokenizer_fits(150, cfg)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(145)]) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(vocab))
    assert len(tok) == 150
    with pytest.raises(ValueError, match=r"150 tokens.*101 rows"):
        hf.check_tokenizer_fits(tok, cfg)
