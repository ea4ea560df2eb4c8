"""Shared helpers of the PEFT tests: tiny backbones, tasks, mixed batches, perturbed params."""

from __future__ import annotations

import zlib

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from mtlx.batch import IGNORE_INDEX, make_batch
from mtlx.models.bert import BertConfig
from mtlx.models.heads import TaskHead
from mtlx.models.t5 import T5Config

TASKS = (TaskHead("a", "classification", 2), TaskHead("b", "classification", 3),
         TaskHead("c", "regression"), TaskHead("d", "classification", 2))
T5_TASKS = TASKS + (TaskHead("gen", "seq2seq"),)
NAMES = tuple(t.name for t in TASKS)
T5_NAMES = tuple(t.name for t in T5_TASKS)
L, LT, VOCAB = 7, 4, 50


def tiny_bert(**kw) -> BertConfig:
    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
               max_position_embeddings=48, type_vocab_size=2, hidden_dropout=0.0,
               attention_dropout=0.0)
    cfg.update(kw)
    return BertConfig(**cfg)


def tiny_t5(**kw) -> T5Config:
    cfg = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
               dropout_rate=0.0, relative_attention_num_buckets=8,
               relative_attention_max_distance=16)
    cfg.update(kw)
    return T5Config(**cfg)


def batch_for(task_ids, seed: int = 0, t5: bool = False):
    """A padded batch; row i's content depends only on (seed, i), its task on task_ids[i]."""
    task_ids = np.asarray(task_ids)
    b = len(task_ids)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, L + 1, size=b)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, VOCAB, size=(b, L)) * mask
    labels = np.where(task_ids == 1, rng.integers(0, 3, b), rng.integers(0, 2, b))
    labels = np.where(np.isin(task_ids, [0, 1, 3]), labels, IGNORE_INDEX)
    fields = dict(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels,
                  label_values=rng.normal(size=b),
                  token_type_ids=(np.arange(L)[None] >= lengths[:, None] // 2) * mask)
    if t5:
        dec = rng.integers(1, VOCAB, size=(b, LT))
        dmask = np.ones((b, LT), np.int32)
        dmask[::2, -1] = 0
        targets = np.where((task_ids[:, None] == 4) & (dmask > 0), dec, IGNORE_INDEX)
        fields.update(decoder_input_ids=dec, decoder_attention_mask=dmask, target_ids=targets,
                      token_type_ids=np.zeros((b, L), np.int32))
    return make_batch(**fields)


def perturb(params, scale: float = 0.3, seed: int = 0):
    """Every leaf plus seeded noise (zero-initialised LoRA B / adapter up-projections become
    non-zero), keyed by path so it does not depend on the tree's order."""
    flat = tu.flatten_dict(params, sep="/")
    out = {}
    for k, v in flat.items():
        rng = np.random.default_rng(zlib.crc32(f"{seed}/{k}".encode()))
        out[k] = jnp.asarray(np.asarray(v) + scale * rng.normal(size=v.shape).astype(v.dtype))
    return tu.unflatten_dict(out, sep="/")


def outputs_of(out, rows=None):
    """The model outputs as numpy, restricted to `rows`."""
    res = {}
    for k, v in out.items():
        v = np.asarray(v)
        res[k] = v if rows is None else v[rows]
    return res


def abstract(model, batch):
    """The parameter shapes (jax.eval_shape of init: traced, not compiled)."""
    from mtlx.models.multitask import init_params
    return jax.eval_shape(lambda b: init_params(model, jax.random.key(0), b), batch)


def random_params(model, batch, seed: int = 0, scale: float = 0.3):
    """Seeded random parameters of the model's shapes, without compiling its init: N(0, scale)
    everywhere, 1 + N(0, scale) for scales (layer norms, (IA)^3). Zero-initialised weights
    (LoRA B, adapter up-projections) come out non-zero, as the tests need."""
    flat = tu.flatten_dict(abstract(model, batch), sep="/")
    out = {}
    for k, v in flat.items():
        rng = np.random.default_rng(zlib.crc32(f"{seed}/{k}".encode()))
        x = scale * rng.normal(size=v.shape)
        if k.endswith("/scale"):
            x = x + 1.0
        out[k] = jnp.asarray(x.astype(v.dtype))
    return tu.unflatten_dict(out, sep="/")


def init(model, batch, seed: int = 0):
    """init_params under jit (eager init dispatches every small op: many times slower)."""
    from mtlx.models.multitask import init_params
    return jax.jit(lambda b: init_params(model, jax.random.key(seed), b))(batch)


def apply_jit(model, params, batch):
    return outputs_of(jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch))


# ---------------------------------------------------------------- mixed-batch comparisons

# Two rows per task plus one padding row (-1); compared with the same rows, one task at a time.
MIXED = [0, 1, 2, 3, 2, 0, 3, 1, -1]
T5_MIXED = [0, 4, 1, 2, 4, 3, 2, 0, 3, 1, -1]

METHODS = {
    "lora": [{"method": "lora", "rank": 2, "alpha": 4.0,
              "targets": ["attention.query", "attention.value", "ffn.input"]}],
    "lora_ragged": [{"method": "lora", "rank": 2, "alpha": 4.0, "impl": "ragged"}],
    "houlsby": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4}],
    "pfeiffer": [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4,
                  "impl": "ragged"}],
    "houlsby_onehot": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4,
                        "impl": "onehot"}],
    "lora_onehot": [{"method": "lora", "rank": 2, "alpha": 4.0, "impl": "onehot"}],
    "parallel": [{"method": "adapter", "variant": "parallel", "reduction_factor": 4,
                  "scaling": 4.0}],
    "task_layer_norm": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4,
                         "layer_norm": "post"}],
    "prefix": [{"method": "prefix", "length": 3}],
    "prompt": [{"method": "prompt", "length": 3}],
    "compacter": [{"method": "compacter", "reduction_factor": 4, "phm_dim": 2}],
    "compacter_per_layer": [{"method": "compacter", "reduction_factor": 2, "phm_dim": 4,
                             "phm_rank": 2, "shared_rules": False, "layer_norm": "pre"}],
    "ia3": [{"method": "ia3"}],
    "fusion": [{"method": "fusion", "reduction_factor": 4, "sources": ["a", "b", "src_x"]}],
    "combined": [{"method": "lora", "rank": 2, "tasks": ["b", "c"]},
                 {"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4},
                 {"method": "prefix", "length": 2, "tasks": ["a"]},
                 {"method": "ia3", "tasks": ["a", "d"]}],
}


def build(backbone, tasks, names, method_cfgs):
    from mtlx.models.multitask import MultiTaskModel
    from mtlx.peft import registry
    cfg = registry.attach(backbone, method_cfgs, names)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    return model


def compare_mixed_vs_single(model, params, mixed_ids, t5):
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    mixed = batch_for(mixed_ids, seed=1, t5=t5)
    out = outputs_of(apply(params, mixed))
    ids = np.asarray(mixed_ids)
    for t in sorted(set(ids[ids >= 0].tolist())):
        rows = np.flatnonzero(ids == t)
        # The task's rows repeated to the mixed batch's size: same shapes, one compilation.
        take = np.resize(rows, len(ids))
        alone = outputs_of(apply(params, mixed.select(take)))
        for key in out:
            np.testing.assert_allclose(out[key][rows], alone[key][: len(rows)], atol=1e-5, rtol=0,
                                       err_msg=f"task {t} output {key!r}")
    return out


def strip_extensions(params, plain_model, t5=False):
    """The params of the model without extensions (same backbone weights and heads)."""
    want = tu.flatten_dict(abstract(plain_model, batch_for(T5_MIXED if t5 else MIXED, t5=t5)), sep="/")
    have = tu.flatten_dict(params, sep="/")
    return tu.unflatten_dict({k: have[k] for k in want}, sep="/")


