"""cuDNN attention's padding mode: which masks reach cuDNN as key lengths, and that they mean the
same as the boolean mask.

cuDNN itself needs an NVIDIA GPU (scripts/gpu_check.sh compares it with XLA's attention there).
Here `jax.nn.dot_product_attention` is wrapped: a call asking for implementation='cudnn' is
recorded and computed by JAX's own XLA implementation with the same arguments, whose
`key_value_seq_lengths` handling is JAX's reference for cuDNN's padding mode. The model with
attention_impl='cudnn' must then give the outputs and gradients of attention_impl='xla' (boolean
masks), and the recorded calls say which path each mask took.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models import bert
from mtlx.models.attention import attend, right_padding_lengths
from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from tests.peft_common import NAMES, TASKS, batch_for, random_params, tiny_bert


@pytest.fixture
def cudnn_calls(monkeypatch):
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        if implementation == "cudnn":
            calls.append({"mask": mask, "bias": bias,
                          "key_value_seq_lengths": kw.get("key_value_seq_lengths")})
            implementation = "xla"
        return real(q, k, v, bias=bias, mask=mask, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


def _lengths_of(batch):
    return np.asarray(batch.attention_mask).sum(-1)


def _outputs_and_grads(cfg, batch, calls, seed=0):
    """Pooled outputs and the gradients of a loss on them, eagerly (the recorded calls are
    those of this forward and backward, not of the parameters' abstract init)."""
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    params = random_params(model, batch, seed=seed, scale=0.2)
    calls.clear()

    def loss(p):
        out = model.apply({"params": p}, batch)
        return jnp.sum(out["pooled"] ** 2), out["pooled"]

    (l, pooled), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return np.asarray(pooled), grads


def _assert_same(a, b, tol=2e-5):
    (pa, ga), (pb, gb) = a, b
    np.testing.assert_allclose(pa, pb, atol=tol, rtol=tol)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_attend_key_lengths_equal_the_right_padding_mask(cudnn_calls):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 6, 2, 4)), jnp.float32) for _ in range(3))
    lengths = np.array([6, 2, 4])
    mask = jnp.asarray(np.arange(6)[None] < lengths[:, None])[:, None, None, :]
    np.testing.assert_array_equal(np.asarray(right_padding_lengths(mask)), lengths)
    ref = attend(q, k, v, mask=mask, implementation="xla")
    got = attend(q, k, v, mask=mask, implementation="cudnn", key_lengths=right_padding_lengths(mask))
    (call,) = cudnn_calls
    assert call["mask"] is None and call["bias"] is None
    np.testing.assert_array_equal(np.asarray(call["key_value_seq_lengths"]), lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)
    # Elsewhere key_lengths is ignored and the mask is used.
    np.testing.assert_allclose(np.asarray(attend(q, k, v, mask=mask, implementation="xla",
                                                 key_lengths=jnp.zeros(3, jnp.int32))),
                               np.asarray(ref), atol=1e-6)


def test_right_padding_lengths_refuses_a_full_mask():
    with pytest.raises(ValueError, match=r"\[B, 1, 1, Lk\]"):
        right_padding_lengths(jnp.ones((2, 1, 5, 5), bool))


@pytest.mark.parametrize("extensions", [[], [{"method": "adapter", "reduction_factor": 4}],
                                        [{"method": "lora", "rank": 2}]], ids=["plain", "adapter", "lora"])
def test_padded_batch_reaches_cudnn_as_key_lengths(cudnn_calls, extensions):
    batch = batch_for([0, 1, 2, 3, 1])
    assert not np.asarray(batch.attention_mask).all()   # the batch really has padding
    base = registry.attach(tiny_bert(), extensions, NAMES) if extensions else tiny_bert()
    ref = _outputs_and_grads(dataclasses.replace(base, attention_impl="xla"), batch, cudnn_calls)
    assert not cudnn_calls
    got = _outputs_and_grads(dataclasses.replace(base, attention_impl="cudnn"), batch, cudnn_calls)
    assert len(cudnn_calls) == base.num_layers
    for call in cudnn_calls:
        assert call["mask"] is None and call["bias"] is None
        np.testing.assert_array_equal(np.asarray(call["key_value_seq_lengths"]), _lengths_of(batch))
    _assert_same(got, ref)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_and_prefix_masks_reach_cudnn_as_masks(cudnn_calls, method):
    """Prefix/prompt columns are opened or closed per example (by task), so those masks are not
    right padding: they must stay boolean masks (cuDNN gets them as a bias)."""
    batch = batch_for([0, 1, 2, 3, 1])
    base = registry.attach(tiny_bert(), [{"method": method, "length": 2,
                                          "tasks": ["a", "c"]}], NAMES)
    ref = _outputs_and_grads(dataclasses.replace(base, attention_impl="xla"), batch, cudnn_calls)
    got = _outputs_and_grads(dataclasses.replace(base, attention_impl="cudnn"), batch, cudnn_calls)
    assert cudnn_calls
    for call in cudnn_calls:
        assert call["key_value_seq_lengths"] is None and call["mask"] is not None
    _assert_same(got, ref)


def test_packed_rows_reach_cudnn_as_block_masks(cudnn_calls):
    cfg = tiny_bert(max_position_embeddings=48)
    ids = np.array([[5, 6, 7, 8, 9, 10, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 2, 0, 0]], np.int32)
    run = lambda c: bert.module(c).apply(
        {"params": params}, ids, mask, position_ids=pos, segment_ids=seg).last_hidden_state
    params = bert.module(cfg).init(jax.random.PRNGKey(0), ids, mask)["params"]
    ref = run(dataclasses.replace(cfg, attention_impl="xla"))
    got = run(dataclasses.replace(cfg, attention_impl="cudnn"))
    assert len(cudnn_calls) == cfg.num_layers
    for call in cudnn_calls:
        assert call["key_value_seq_lengths"] is None and call["mask"] is not None
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


def test_a_row_without_real_tokens_stays_finite_on_the_cudnn_path(cudnn_calls):
    """Filler rows (no real token) reach cuDNN with one key, not zero (0/0 in a fused softmax);
    the other rows are unchanged."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 5, 2, 4)), jnp.float32) for _ in range(3))
    lengths = np.array([5, 0, 3])
    mask = jnp.asarray(np.arange(5)[None] < lengths[:, None])[:, None, None, :]
    got = attend(q, k, v, mask=mask, implementation="cudnn", key_lengths=right_padding_lengths(mask))
    np.testing.assert_array_equal(np.asarray(cudnn_calls[0]["key_value_seq_lengths"]), [5, 1, 3])
    ref = attend(q, k, v, mask=mask, implementation="xla")
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got)[[0, 2]], np.asarray(ref)[[0, 2]], atol=1e-6)
