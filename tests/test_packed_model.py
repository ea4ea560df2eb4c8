"""Packed rows through the multi-task model: per-segment heads and losses equal the unpacked
examples run one per row; with rows of one task and with rows that mix tasks (per-token
routing of the task-specific modules and token-level heads)."""

import dataclasses

import jax
import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX, make_batch
from mtlx.data import load_split, load_tokenizer, mixture_for, sample_root, tokenize_split
from mtlx.data.packing import make_packed_iterator
from mtlx.models import heads as H
from mtlx.models.bert import BertConfig
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.models.t5 import T5Config

NAMES = ("sst2", "stsb", "ud_pos")
TASKS = (TaskHead("sst2", "classification", 2), TaskHead("stsb", "regression"),
         TaskHead("ud_pos", "token_classification", 17))


def _packed(mix_tasks: bool):
    tok = load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    data = {t: tokenize_split(load_split(t, "train"), tok) for t in NAMES}
    it = make_packed_iterator(data, mixture_for(data, tasks=NAMES), batch_size=4, seed=0,
                              row_len=128, max_segments=6, mix_tasks=mix_tasks)
    return next(it)


@pytest.fixture(scope="module")
def packed():
    return _packed(False)


@pytest.fixture(scope="module")
def mixed():
    pb = _packed(True)
    seg = np.asarray(pb.segments.task_ids)
    # Really mixed: some row holds segments of two or more tasks, one a token-level task.
    assert max(len(set(r[r >= 0].tolist())) for r in seg) >= 2
    assert pb.segments.mixed and (np.asarray(pb.batch.task_ids) == -1).all()
    return pb


@pytest.fixture(params=["one_task_rows", "mixed_rows"])
def layout(request, packed, mixed):
    return packed if request.param == "one_task_rows" else mixed


def unpack(pb):
    """The packed segments as ordinary padded rows, one example per row."""
    b, s = pb.batch, pb.segments
    rows = []
    for r in range(b.input_ids.shape[0]):
        for k in range(int(np.asarray(s.mask[r]).sum())):
            idx = np.flatnonzero(np.asarray(b.segment_ids[r]) == k + 1)
            rows.append((r, k, idx))
    width = max(len(i) for *_, i in rows)
    n = len(rows)
    ids = np.zeros((n, width), np.int32)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    tok = np.full((n, width), IGNORE_INDEX, np.int32)
    task_ids, labels, values = np.zeros(n, np.int32), np.full(n, IGNORE_INDEX), np.zeros(n, np.float32)
    for i, (r, k, idx) in enumerate(rows):
        ids[i, : len(idx)] = np.asarray(b.input_ids)[r, idx]
        types[i, : len(idx)] = np.asarray(b.token_type_ids)[r, idx]
        mask[i, : len(idx)] = 1
        tok[i, : len(idx)] = np.asarray(b.token_labels)[r, idx]
        task_ids[i] = np.asarray(s.task_ids)[r, k]
        labels[i] = np.asarray(s.labels)[r, k]
        values[i] = np.asarray(s.label_values)[r, k]
    return rows, make_batch(input_ids=ids, attention_mask=mask, token_type_ids=types,
                            task_ids=task_ids, labels=labels, label_values=values, token_labels=tok)


BACKBONES = {
    "bert": lambda: BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64),
    # T5: relative position bias from per-segment positions, mean pooling per segment.
    "t5": lambda: T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                           num_heads=4, relative_attention_num_buckets=8,
                           relative_attention_max_distance=16, feed_forward_proj="gated-gelu"),
    "t5_remat": lambda: T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16, remat="full"),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_packed_outputs_and_losses_equal_unpacked(layout, backbone):
    packed = layout
    model = MultiTaskModel(BACKBONES[backbone](), TASKS, head_dropout=0.0)
    rows, flat = unpack(packed)
    assert len(rows) > packed.batch.input_ids.shape[0]  # really packed: more examples than rows
    assert len({int(t) for t in flat.task_ids}) >= 2
    params = init_params(model, jax.random.key(0), flat)
    out_p = model.apply({"params": params}, packed.batch, segments=packed.segments)
    out_f = model.apply({"params": params}, flat)
    s = packed.segments.mask.shape[1]
    for i, (r, k, idx) in enumerate(rows):
        t = int(flat.task_ids[i])
        if TASKS[t].kind == "classification":
            np.testing.assert_allclose(out_p["classification"][r * s + k], out_f["classification"][i], atol=1e-5)
        elif TASKS[t].kind == "regression":
            np.testing.assert_allclose(out_p["regression"][r * s + k], out_f["regression"][i], atol=1e-5)
        else:
            np.testing.assert_allclose(np.asarray(out_p["token_classification"])[r, idx],
                                       np.asarray(out_f["token_classification"])[i, : len(idx)], atol=1e-5)
    lp, cp = H.packed_task_losses(out_p, packed.batch, packed.segments, TASKS)
    lf, cf = H.task_losses(out_f, flat, TASKS)
    np.testing.assert_allclose(cp, cf)
    np.testing.assert_allclose(lp, lf, rtol=1e-5, atol=1e-6)


def test_packing_refuses_unpackable_heads(packed):
    with pytest.raises(ValueError, match=r"packed rows do not support head kinds \['span'\]"):
        H.packed_task_losses({}, packed.batch, packed.segments, TASKS + (TaskHead("qa", "span"),))


@pytest.mark.parametrize("weighting,backbone,rows", [
    (None, "bert", "one_task"), ("mgda", "bert", "one_task"), (None, "t5", "one_task"),
    (None, "t5_remat", "one_task"), (None, "bert", "mixed"), ("mgda", "bert", "mixed"),
    (None, "t5", "mixed")])
def test_train_step_on_packed_rows_equals_the_step_on_the_examples(packed, mixed, weighting,
                                                                   backbone, rows):
    """The ONE train step takes packed batches: per-task losses, counts and the updated
    parameters equal the step on the same examples one per row (no dropout); with a per-task
    strategy too. The representation option refuses packed rows."""
    import optax
    from mtlx import weighting as W
    from mtlx.train import step as S
    packed = mixed if rows == "mixed" else packed
    cfg = BACKBONES[backbone]()
    no_dropout = ({"dropout_rate": 0.0} if backbone.startswith("t5")
                  else {"hidden_dropout": 0.0, "attention_dropout": 0.0})
    model = MultiTaskModel(dataclasses.replace(cfg, **no_dropout), TASKS, head_dropout=0.0)
    _, flat = unpack(packed)
    params = init_params(model, jax.random.key(0), flat)
    tx = optax.sgd(0.1)
    strategy = W.get_strategy(weighting) if weighting else None

    def run(batch):
        state = S.create_state(params, tx, jax.random.key(1),
                               S.init_weighting(strategy, model, params) if strategy else None)
        return jax.jit(S.make_train_step(model, tx, weighting=strategy))(state, batch)

    np.testing.assert_allclose(S.task_counts(packed, TASKS), S.task_counts(flat, TASKS))
    (sp, mp), (sf, mf) = run(packed), run(flat)
    np.testing.assert_allclose(mp["task_count"], mf["task_count"])
    np.testing.assert_allclose(mp["task_loss"], mf["task_loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(sp.params), jax.tree_util.tree_leaves(sf.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    if weighting:
        rep = S.make_train_step(model, tx, weighting=strategy, grads_wrt="representation")
        state = S.create_state(params, tx, jax.random.key(1), S.init_weighting(strategy, model, params))
        with pytest.raises(ValueError, match="cannot be combined with packed rows"):
            rep(state, packed)


# Every routed PEFT method on rows that mix tasks: each token gets its own task's weights. A
# subset of tasks owning weights checks that the others' tokens see the plain model.
PEFT = {
    "houlsby": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4}],
    "houlsby_ragged": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 4,
                        "impl": "ragged", "layer_norm": "post"}],
    "lora_subset": [{"method": "lora", "rank": 2, "alpha": 4.0, "tasks": ["sst2", "ud_pos"]}],
    "compacter": [{"method": "compacter", "reduction_factor": 4, "phm_dim": 2}],
    "ia3_and_parallel": [{"method": "ia3", "tasks": ["stsb"]},
                         {"method": "adapter", "variant": "parallel", "reduction_factor": 4}],
    "fusion": [{"method": "fusion", "reduction_factor": 4, "sources": list(NAMES) + ["src"]}],
    "hyperformer++": [{"method": "hyperformer++", "reduction_factor": 4}],
    "hyper_lora": [{"method": "hyper_lora", "rank": 2}],
    "task_layer_norm": [{"method": "task_layer_norm", "tasks": ["stsb", "ud_pos"]}],
}


@pytest.mark.parametrize("method", sorted(PEFT) + ["houlsby_scan"])
def test_mixed_rows_route_every_token_to_its_task(mixed, method):
    from mtlx.peft import registry
    from tests.peft_common import random_params
    backbone = BACKBONES["bert"]()
    if method == "houlsby_scan":   # the layers as one lax.scan: the per-token ids reach it too
        backbone, method = dataclasses.replace(backbone, scan_layers=True), "houlsby"
    cfg = registry.attach(backbone, PEFT[method], NAMES)
    model = MultiTaskModel(cfg, TASKS, head_dropout=0.0)
    rows, flat = unpack(mixed)
    params = random_params(model, flat, scale=0.2)
    apply = jax.jit(lambda p, b, s=None: model.apply({"params": p}, b, segments=s))
    out_p, out_f = apply(params, mixed.batch, mixed.segments), apply(params, flat)
    s = mixed.segments.mask.shape[1]
    for i, (r, k, idx) in enumerate(rows):
        kind = TASKS[int(flat.task_ids[i])].kind
        if kind == "token_classification":
            got = np.asarray(out_p[kind])[r, idx]
            want = np.asarray(out_f[kind])[i, : len(idx)]
        else:
            got, want = out_p[kind][r * s + k], out_f[kind][i]
        # float32 rounding scales with the example's outputs (hyper_lora's reach ~2.6 here and
        # differ by up to 4e-5 with either GELU gradient policy: a different order of sums)
        atol = 2e-5 * max(1.0, float(np.abs(np.asarray(want)).max()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=f"{method}: example {i} ({kind})")
    lp, cp = H.packed_task_losses(out_p, mixed.batch, mixed.segments, TASKS)
    lf, cf = H.task_losses(out_f, flat, TASKS)
    np.testing.assert_allclose(cp, cf)
    np.testing.assert_allclose(lp, lf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_mixed_rows_refuse_prompt_and_prefix_tuning(mixed, method):
    from mtlx.peft import registry
    cfg = registry.attach(BACKBONES["bert"](), [{"method": method, "length": 2}], NAMES)
    # Prompt tuning lengthens the input: sequence-level heads only.
    tasks = TASKS[:2] + (TaskHead("ud_pos", "classification", 2),)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    _, flat = unpack(mixed)
    params = init_params(model, jax.random.key(0), flat)
    with pytest.raises(ValueError, match=f"{method} tuning gives each ROW .*packing_mix_tasks=False"):
        model.apply({"params": params}, mixed.batch, segments=mixed.segments)
