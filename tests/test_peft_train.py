"""What trains is chosen by configuration: with the default PEFT patterns (method + heads +
layer norms) frozen parameters stay bit-identical over several optimizer steps of the one
compiled multi-task step, and the trainable ones move."""

import flax.traverse_util as tu
import jax
import ml_collections
import numpy as np
import pytest

from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from mtlx.train import optim
from mtlx.train.step import create_state, make_train_step

from tests.peft_common import NAMES, TASKS, batch_for, random_params, tiny_bert

CASES = {
    "lora": [{"method": "lora", "rank": 2}],
    "adapter+prefix": [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4},
                       {"method": "prefix", "length": 2, "tasks": ["a", "b"]}],
    "compacter": [{"method": "compacter", "reduction_factor": 4, "phm_dim": 2}],
    "fusion": [{"method": "fusion", "reduction_factor": 4}],
}


def opt_cfg():
    return ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-2, warmup_steps=0,
                                          num_train_steps=10, schedule="constant",
                                          weight_decay=0.01, grad_clip_norm=1.0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_parameters_stay_bit_identical(case):
    cfg = registry.attach(tiny_bert(), CASES[case], NAMES)
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    batch = batch_for([0, 1, 2, 3, 0, 1, 2, 3])
    params = random_params(model, batch, scale=0.1)
    patterns = registry.trainable_patterns(cfg)
    mask = optim.trainable_mask(params, patterns)
    tx = optim.make_optimizer(opt_cfg(), params, trainable=mask)
    state = create_state(params, tx, jax.random.key(0))
    step = jax.jit(make_train_step(model, tx))
    for i in range(3):
        state, metrics = step(state, batch_for([0, 1, 2, 3, 0, 1, 2, 3], seed=i))
        assert np.isfinite(float(metrics["loss"]))
    before, after = tu.flatten_dict(params, sep="/"), tu.flatten_dict(state.params, sep="/")
    flat_mask = tu.flatten_dict(mask, sep="/")
    frozen = [k for k, m in flat_mask.items() if not m]
    trained = [k for k, m in flat_mask.items() if m]
    assert any(k.startswith("backbone/layer_0/attention/query/kernel") for k in frozen)
    for k in frozen:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)
    moved = [k for k in trained if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    # The method's own weight matrices all moved (biases may have an exactly-zero gradient,
    # e.g. fusion's key bias, which the softmax over adapters ignores), and so did heads and
    # layer norms.
    method_keys = [k for k in trained if not k.startswith("heads/") and "layer_norm" not in k]
    matrices = [k for k in method_keys if np.ndim(before[k]) >= 2]
    assert matrices and set(matrices) <= set(moved), sorted(set(matrices) - set(moved))[:5]
    assert any(k.startswith("heads/") for k in moved)
    assert any("layer_norm" in k for k in moved)


def test_default_patterns_per_method():
    exts = registry.build_extensions(
        [{"method": "lora"}, {"method": "fusion", "reduction_factor": 4},
         {"method": "compacter"}], NAMES)
    pats = registry.trainable_patterns(exts)
    assert pats == ("(^|/)lora/", "(^|/)fusion/layers/", "(^|/)compacter/",
                    "(^|/)generators_compacter/", registry.HEADS_PATTERN,
                    registry.LAYER_NORM_PATTERN)
    assert registry.trainable_patterns(exts[0], layer_norms=False, heads=False) == ("(^|/)lora/",)
    # a model without heads (all tasks seq2seq): the heads default is dropped when params say so
    no_heads = {"backbone": {"layer_0": {"lora": {"a": 1}, "layer_norm": {"scale": 1}}}}
    assert registry.trainable_patterns(exts[0], params=no_heads) == (
        "(^|/)lora/", registry.LAYER_NORM_PATTERN)


def test_fusion_trains_only_its_fusion_layers():
    cfg = registry.attach(tiny_bert(), CASES["fusion"], NAMES)
    model = MultiTaskModel(cfg, TASKS)
    params = random_params(model, batch_for([0, 1]))
    mask = tu.flatten_dict(optim.trainable_mask(params, registry.trainable_patterns(cfg)), sep="/")
    assert mask["backbone/layer_0/ffn/fusion/layers/a/query/kernel"]
    assert not mask["backbone/layer_0/ffn/fusion/adapters/a/down/kernel"]
