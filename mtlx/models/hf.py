"""Loading and exporting Hugging Face checkpoints (config.json + weights) for every family.

    config, params = load_pretrained("path/to/bert-base-uncased", dtype="bfloat16")
    check_tokenizer_fits(tokenizer, config)
    export_pretrained("path/to/out", config, params)   # transformers.AutoModel loads it

A family module (mtlx.models.bert, mtlx.models.t5) implements the conversion contract:
`MODEL_TYPES`, `config_from_hf(dict) -> config`, `config_to_hf(config) -> dict`,
`params_from_hf(tensors, config) -> params`, `params_to_hf(params, config) -> tensors`,
`abstract_params(config)`, `module(config)`; optionally `hf_param_names(config)` (mtlx path ->
HF key) so that error messages can name the HF key. This file only reads and writes files,
dispatches on ``model_type`` and checks the result; the arithmetic of a conversion lives with
its model.

Weights are read from model.safetensors, sharded safetensors (model.safetensors.index.json),
or pytorch_model.bin (also sharded), the last only through ``torch.load(weights_only=True)``:
nothing else is ever unpickled. The returned params are host numpy arrays holding only the
pretrained weights; parameters that PEFT extensions add are created by the model's own init.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from mtlx.models.tree import flat_paths

FAMILIES = {"bert": "mtlx.models.bert", "roberta": "mtlx.models.bert", "t5": "mtlx.models.t5"}

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)


def family(model_type: str):
    """The conversion module of a HF model_type (imported on first use)."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path!r} is missing: a Hugging Face checkpoint directory "
                                f"needs {CONFIG_FILE} next to its weights")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if "model_type" not in hf:
        raise ValueError(f"{config_path} has no 'model_type'; supported: {sorted(FAMILIES)}")
    return hf


# --------------------------------------------------------------------------- reading weights

def _read_safetensors(file: str) -> dict:
    from safetensors import safe_open
    out = {}
    with safe_open(file, framework="np") as f:
        keys = list(f.keys())
        bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
        for k in keys:
            if k not in bf16:
                out[k] = f.get_tensor(k)
    if bf16:
        # safetensors' numpy reader has no bfloat16; its flax reader does (ml_dtypes).
        with safe_open(file, framework="flax") as f:
            for k in bf16:
                out[k] = np.asarray(jax.device_get(f.get_tensor(k)))
    return out


def _read_torch(file: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{file} is a PyTorch checkpoint and reading it needs torch, which is not "
                          f"installed: install torch (CPU build is enough) or convert the checkpoint "
                          f"to model.safetensors") from None
    # weights_only=True: tensors and plain containers only; never run pickled code.
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{file} holds a {type(state).__name__}, expected a state dict")
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{file}: entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        out[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


def _read_index(path: str, index_name: str, reader) -> dict:
    index_file = os.path.join(path, index_name)
    with open(index_file) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise ValueError(f"{index_file} has no 'weight_map'")
    out = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = os.path.join(path, shard)
        if not os.path.isfile(shard_file):
            raise FileNotFoundError(f"shard {shard!r} named in {index_file} is missing")
        out.update(reader(shard_file))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise KeyError(f"weights {missing[:8]} are listed in {index_file} but absent from their shards")
    return out


def read_weights(path: str) -> dict:
    """All tensors of a checkpoint directory as numpy arrays, keyed by HF name."""
    if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
        return _read_safetensors(os.path.join(path, SAFETENSORS_FILE))
    if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
        return _read_index(path, SAFETENSORS_INDEX, _read_safetensors)
    if os.path.isfile(os.path.join(path, TORCH_FILE)):
        return _read_torch(os.path.join(path, TORCH_FILE))
    if os.path.isfile(os.path.join(path, TORCH_INDEX)):
        return _read_index(path, TORCH_INDEX, _read_torch)
    raise FileNotFoundError(f"no weights in {path!r}: looked for {', '.join(WEIGHT_FILES)}")


# --------------------------------------------------------------------------- checking

def _without_extensions(config):
    if dataclasses.is_dataclass(config) and getattr(config, "extensions", ()):
        return dataclasses.replace(config, extensions=())
    return config


def check_params(params, config, fam=None) -> None:
    """Raises ValueError unless `params` has exactly the backbone's parameter paths and shapes
    (extension parameters excluded), naming the mtlx path, both shapes and the HF key."""
    fam = fam or family(config.model_type)
    base = _without_extensions(config)
    expected = flat_paths(fam.abstract_params(base))
    got = flat_paths(params)
    names = fam.hf_param_names(base) if hasattr(fam, "hf_param_names") else {}

    def hf(p):
        return f" (HF {names[p]!r})" if p in names else ""

    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"converted params lack {len(missing)} parameter(s): "
                         + ", ".join(p + hf(p) for p in missing[:8]))
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValueError(f"converted params have unexpected parameter(s) {extra[:8]}")
    for p, spec in expected.items():
        shape = tuple(np.shape(got[p]))
        if shape != tuple(spec.shape):
            raise ValueError(f"parameter {p}{hf(p)} has shape {shape} in the checkpoint but the "
                             f"config expects {tuple(spec.shape)}")


# --------------------------------------------------------------------------- public API

def load_pretrained(path: str, **overrides: Any):
    """(config, params) from a Hugging Face checkpoint directory.

    `overrides` replace config fields after conversion, e.g. dtype='bfloat16',
    attention_impl='cudnn', extensions=(...), add_pooler=False, attention_dropout=0.0.
    """
    hf = read_config(path)
    fam = family(hf["model_type"])
    config = fam.config_from_hf(hf)
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"load_pretrained: unknown config field(s) {unknown} for "
                            f"{type(config).__name__}; fields: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    tensors = read_weights(path)
    params = fam.params_from_hf(tensors, _without_extensions(config))
    check_params(params, config, fam)
    return config, params


def check_tokenizer_fits(tokenizer_or_vocab_size, config) -> None:
    """Raises ValueError when the tokenizer can produce ids past the embedding table.

    JAX does not fail on an out-of-range embedding lookup (it returns NaN or clamps), so this
    has to be checked on the host. `tokenizer_or_vocab_size`: an int or a tokenizer (its
    ``len()``, which counts added tokens).
    """
    if isinstance(tokenizer_or_vocab_size, (int, np.integer)):
        size = int(tokenizer_or_vocab_size)
    elif hasattr(tokenizer_or_vocab_size, "__len__"):
        size = len(tokenizer_or_vocab_size)
    else:
        size = int(tokenizer_or_vocab_size.vocab_size)
    table = int(config.vocab_size)
    if size > table:
        raise ValueError(f"the tokenizer has {size} tokens but the model's embedding table "
                         f"(vocab_size) has {table} rows: ids {table}..{size - 1} would be out of "
                         f"range; use the checkpoint's own tokenizer or resize the embeddings")


def export_pretrained(path: str, config, params, *, overwrite: bool = False) -> str:
    """Writes config.json + model.safetensors that transformers' AutoModel loads.

    Atomic: everything is written into a temporary directory next to `path` and renamed into
    place, so a failure leaves no half-written checkpoint. An existing non-empty `path` is an
    error unless ``overwrite=True`` (then it is replaced only after the new one is complete).
    """
    from safetensors.numpy import save_file

    fam = family(config.model_type)
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    old = None
    try:
        tensors = fam.params_to_hf(params, config)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(fam.config_to_hf(config), f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.rename(os.path.join(old, "x"), path)  # put the previous checkpoint back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
