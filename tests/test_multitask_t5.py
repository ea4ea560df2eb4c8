"""A T5 multi-task model: text-to-text and classification tasks in one mixed batch, checked
against Hugging Face's T5ForConditionalGeneration (loss and greedy decoding)."""

import jax
import numpy as np
import pytest
import torch
import transformers

from mtlx.batch import IGNORE_INDEX, make_batch
from mtlx.models import heads as H, hf
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, greedy_generate, init_params, with_backbone

from tests.hf_tiny import build_tiny

TASKS = (TaskHead("translate", "seq2seq"), TaskHead("sentiment", "classification", 3),
         TaskHead("summarize", "seq2seq"))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("t5"))
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, feed_forward_proj="relu", decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8)
    model = build_tiny(transformers.T5ForConditionalGeneration, config, seed=1)
    model.save_pretrained(path, safe_serialization=True)
    cfg, backbone = hf.load_pretrained(path)
    mt = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    return model, cfg, mt, backbone


def make(ref_model, seed=0):
    rng = np.random.default_rng(seed)
    b, l, lt = 6, 7, 5
    task_ids = np.array([0, 1, 2, 0, 1, 2])
    lengths = np.array([7, 3, 5, 2, 6, 4])
    mask = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(2, 64, (b, l)) * mask
    tgt_len = np.array([5, 0, 3, 2, 0, 4])
    targets = np.where(np.arange(lt)[None] < tgt_len[:, None], rng.integers(2, 64, (b, lt)), IGNORE_INDEX)
    dec_in = ref_model._shift_right(torch.as_tensor(targets)).numpy()
    dec_mask = (np.arange(lt)[None] < np.maximum(tgt_len, 1)[:, None]).astype(np.int32)
    labels = np.where(task_ids == 1, rng.integers(0, 3, b), IGNORE_INDEX)
    return make_batch(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels,
                      decoder_input_ids=dec_in, decoder_attention_mask=dec_mask, target_ids=targets)


def test_seq2seq_loss_matches_hf_and_mixed_equals_alone(ref):
    model, cfg, mt, backbone = ref
    batch = make(model)
    params = with_backbone(init_params(mt, jax.random.key(0), batch), backbone)
    out = jax.jit(lambda p, b: mt.apply({"params": p}, b))(params, batch)
    losses, counts = H.task_losses(out, batch, TASKS)
    ids = np.asarray(batch.task_ids)
    for t in (0, 2):  # HF's loss = mean CE over that task's labelled target tokens
        rows = ids == t
        with torch.no_grad():
            hf_out = model(input_ids=torch.as_tensor(np.asarray(batch.input_ids)[rows]),
                           attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)[rows]),
                           decoder_attention_mask=torch.as_tensor(np.asarray(batch.decoder_attention_mask)[rows]),
                           labels=torch.as_tensor(np.asarray(batch.target_ids)[rows]).long())
        np.testing.assert_allclose(losses[t], hf_out.loss.item(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["seq2seq"])[rows], hf_out.logits.numpy(), atol=1e-5)
    assert float(counts[1]) == 2 and np.isfinite(float(losses[1]))
    alone = batch.select(np.flatnonzero(ids == 1))
    out_alone = mt.apply({"params": params}, alone)
    np.testing.assert_allclose(np.asarray(out["classification"])[ids == 1], out_alone["classification"], atol=1e-5)


def test_greedy_generate_matches_hf(ref):
    model, cfg, mt, backbone = ref
    batch = make(model)
    params = with_backbone(init_params(mt, jax.random.key(0), batch), backbone)
    got = np.asarray(greedy_generate(mt, params, batch, max_length=6))
    with torch.no_grad():
        want = model.generate(input_ids=torch.as_tensor(np.asarray(batch.input_ids)),
                              attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)),
                              do_sample=False, num_beams=1, max_new_tokens=6, min_new_tokens=0).numpy()[:, 1:]
    n = want.shape[1]
    np.testing.assert_array_equal(got[:, :n], want)
