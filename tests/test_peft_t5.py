"""Every PEFT method on a tiny T5, encoder and decoder (self- and cross-attention): a
mixed-task batch (classification, regression and a seq2seq task) gives each example what it
gets in a single-task batch (<= 1e-5, float32); tasks without weights get the plain model."""

import numpy as np
import pytest

from mtlx.models.multitask import MultiTaskModel

from tests.peft_common import (METHODS, T5_MIXED, T5_NAMES, T5_TASKS, apply_jit, batch_for, build,
                               compare_mixed_vs_single, random_params, strip_extensions, tiny_t5)

# T5 also has decoder cross-attention sites.
T5_METHODS = dict(METHODS, **{
    "lora": [dict(METHODS["lora"][0], targets=METHODS["lora"][0]["targets"]
                  + ["cross_attention.key", "decoder.*.cross_attention.output"])],
    "parallel": [dict(METHODS["parallel"][0], sites=["ffn", "cross_attention"])],
})


@pytest.mark.parametrize("method", ["lora", "houlsby", "prefix", "prompt", "compacter", "ia3",
                                    "parallel", "fusion"])
def test_t5_mixed_batch_equals_single_task_batches(method):
    model = build(tiny_t5(), T5_TASKS, T5_NAMES, T5_METHODS[method])
    params = random_params(model, batch_for(T5_MIXED, t5=True))
    compare_mixed_vs_single(model, params, T5_MIXED, t5=True)


def test_t5_encoder_tasks_without_weights_get_the_plain_model():
    cfgs = [{"method": "lora", "rank": 2, "tasks": ["b", "gen"]},
            {"method": "prefix", "length": 2, "tasks": ["b"]}]
    model = build(tiny_t5(), T5_TASKS, T5_NAMES, cfgs)
    batch = batch_for(T5_MIXED, seed=3, t5=True)
    params = random_params(model, batch)
    plain = MultiTaskModel(tiny_t5(), T5_TASKS, head_dropout=0.0)
    out = apply_jit(model, params, batch)
    ref = apply_jit(plain, strip_extensions(params, plain, t5=True), batch)
    rows = np.isin(np.asarray(T5_MIXED), [0, 2, 3])
    np.testing.assert_allclose(out["pooled"][rows], ref["pooled"][rows], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["seq2seq"][rows], ref["seq2seq"][rows], atol=1e-5, rtol=0)


def test_t5_beam_search_routes_each_beam_by_its_example_task():
    """Beam search repeats each example's task id for its beams: one input under every task in
    one batch decodes as each (input, task) alone does, and the tasks' LoRA weights (decoder
    and cross-attention included) change the text."""
    import jax.numpy as jnp
    from mtlx.models.multitask import generate
    model = build(tiny_t5(), T5_TASKS, T5_NAMES, T5_METHODS["lora"])
    batch = batch_for(T5_MIXED, seed=5, t5=True)
    params = random_params(model, batch, scale=0.6)
    n = len(T5_TASKS)
    same = batch.select(np.zeros(n, np.int64)).replace(task_ids=jnp.arange(n, dtype=jnp.int32))
    mixed = np.asarray(generate(model, params, same, 6, num_beams=3))
    for i in range(n):
        alone = np.asarray(generate(model, params, same.select(np.array([i])), 6, num_beams=3))
        np.testing.assert_array_equal(mixed[i], alone[0], err_msg=f"task {T5_NAMES[i]}")
    assert len({tuple(r) for r in mixed}) > 1, mixed
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        generate(model, params, same, 6, num_beams=0)


def test_prompt_positions_stay_hidden_from_the_decoder_of_tasks_without_a_prompt():
    """Prompt tuning owned by one seq2seq task: another seq2seq task's rows get the plain
    model in the decoder too, teacher-forced and decoded (the decoder's cross-attention was
    handed the input mask widened with ones, so it read the prompt positions: 0.29 apart)."""
    from mtlx.models.heads import TaskHead
    from mtlx.models.multitask import generate
    tasks = T5_TASKS + (TaskHead("gen2", "seq2seq"),)
    names = tuple(t.name for t in tasks)
    ids = [4, 5, 4, 5, 0, 5]
    model = build(tiny_t5(), tasks, names, [{"method": "prompt", "length": 3, "tasks": ["gen"]}])
    batch = batch_for(ids, seed=3, t5=True)
    params = random_params(model, batch)
    plain = MultiTaskModel(tiny_t5(), tasks, head_dropout=0.0)
    plain_params = strip_extensions(params, plain, t5=True)
    out, ref = apply_jit(model, params, batch), apply_jit(plain, plain_params, batch)
    rows = np.asarray(ids) == 5
    np.testing.assert_allclose(out["seq2seq"][rows], ref["seq2seq"][rows], atol=1e-5)
    assert np.abs(out["seq2seq"][~rows] - ref["seq2seq"][~rows]).max() > 1e-2  # gen's prompt acts
    for beams in (1, 2):
        got = np.asarray(generate(model, params, batch, 6, num_beams=beams))
        want = np.asarray(generate(plain, plain_params, batch, 6, num_beams=beams))
        np.testing.assert_array_equal(got[rows], want[rows])


def test_ia3_and_lora_defaults_cover_cross_attention_like_peft():
    """PEFT's T5 defaults (and T-Few's released (IA)^3) rescale / adapt the keys and values
    (IA3) and the queries and values (LoRA) of the decoder's cross-attention too."""
    from mtlx.peft import registry
    cfg = registry.attach(tiny_t5(), [{"method": "ia3"}, {"method": "lora"}], list(T5_NAMES))
    sites = registry.discover_sites(cfg)["projection"]
    hit = {e.name: sorted({s.name for s in sites if e.projection(s) is not None})
           for e in cfg.extensions}
    assert hit["ia3"] == ["attention.key", "attention.value", "cross_attention.key",
                          "cross_attention.value"]
    assert hit["lora"] == ["attention.query", "attention.value", "cross_attention.query",
                           "cross_attention.value"]
    # PEFT's default target modules for t5 (peft.utils.constants), by HF module name
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA)
    assert set(IA3["t5"]) >= {"k", "v"} and set(LORA["t5"]) == {"q", "v"}
