"""Task-conditional layer norm: identity at init, equal to per-task gamma/beta, routed per example."""

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from mtlx.models import heads as H
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.peft import registry

from tests.test_multitask import TASKS, mixed_batch, tiny_bert

NAMES = [t.name for t in TASKS]


def perturbed(params, seed=0):
    flat = tu.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    for k in flat:
        if "/task_layer_norm/" in k:
            flat[k] = flat[k] + rng.normal(scale=0.3, size=flat[k].shape).astype(np.float32)
    return tu.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def models():
    cfg = registry.attach(tiny_bert(), [{"method": "task_layer_norm"}], NAMES)
    return MultiTaskModel(cfg, TASKS), MultiTaskModel(tiny_bert(), TASKS)


def test_identity_at_init_and_one_pair_per_task_and_norm(models):
    model, plain = models
    batch = mixed_batch()
    params = init_params(model, jax.random.key(0), batch)
    base = init_params(plain, jax.random.key(0), batch)
    a, b = model.apply({"params": params}, batch), plain.apply({"params": base}, batch)
    np.testing.assert_allclose(a["classification"], b["classification"], atol=1e-6)
    keys = [k for k in tu.flatten_dict(params, sep="/") if "task_layer_norm" in k]
    assert len(keys) == 2 * 2 * len(TASKS) * 2  # 2 layers x {attention, ffn} x tasks x {scale, bias}


def test_equals_a_model_with_that_tasks_gamma_and_beta(models):
    model, plain = models
    batch = mixed_batch()
    params = perturbed(init_params(model, jax.random.key(0), batch))
    out = model.apply({"params": params}, batch)
    ids = np.asarray(batch.task_ids)
    for t, name in enumerate(NAMES[:3]):
        # Fold task t's affine into the shared norms: gamma*s, beta*s + b.
        base = tu.flatten_dict(params, sep="/")
        plain_params = {}
        for k, v in base.items():
            if "task_layer_norm" in k:
                continue
            if k.endswith("layer_norm/scale") and "/embeddings/" not in k:
                pre = k[: -len("layer_norm/scale")]
                s, b_ = base[f"{pre}task_layer_norm/{name}/scale"], base[f"{pre}task_layer_norm/{name}/bias"]
                plain_params[k] = v * s
                plain_params[k.replace("/scale", "/bias")] = base[k.replace("/scale", "/bias")] * s + b_
            elif k not in plain_params:
                plain_params[k] = v
        folded = plain.apply({"params": tu.unflatten_dict(plain_params, sep="/")}, batch)
        rows = ids == t
        kind = TASKS[t].kind
        np.testing.assert_allclose(np.asarray(out[kind])[rows], np.asarray(folded[kind])[rows], atol=2e-5)


def test_mixed_batch_equals_each_task_alone(models):
    model, _ = models
    batch = mixed_batch()
    params = perturbed(init_params(model, jax.random.key(0), batch))
    out = model.apply({"params": params}, batch)
    ids = np.asarray(batch.task_ids)
    for t, task in enumerate(TASKS):
        rows = np.flatnonzero(ids == t)
        alone = model.apply({"params": params}, batch.select(rows))
        keys = ["span_start", "span_end"] if task.kind == "span" else [task.kind]
        for k in keys:
            np.testing.assert_allclose(np.asarray(out[k])[rows], alone[k], atol=1e-5)


def test_t5_norm_sites_and_bad_targets():
    from mtlx.models.t5 import T5Config
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    sites = registry.discover_sites(cfg)["layer_norm"]
    assert {s.name for s in sites} == {"attention.layer_norm", "cross_attention.layer_norm", "ffn.layer_norm"}
    with pytest.raises(ValueError, match="task_layer_norm.targets"):
        registry.build_extensions([{"method": "task_layer_norm", "targets": ["pooler"]}], NAMES)


def test_prompt_tuning_with_token_heads_is_a_clear_error():
    cfg = registry.attach(tiny_bert(), [{"method": "prompt", "length": 3}], NAMES)
    with pytest.raises(ValueError, match="changed the sequence length from 9 to 12"):
        init_params(MultiTaskModel(cfg, TASKS), jax.random.key(0), mixed_batch())
