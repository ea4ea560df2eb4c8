"""The multi-task model over mixed-task batches: routing, losses, name-keyed parameters."""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX, make_batch
from mtlx.models import heads as H
from mtlx.models.bert import BertConfig
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.models.report import format_report, parameter_report

TASKS = (
    TaskHead("cls2", "classification", 2),
    TaskHead("cls3", "classification", 3),
    TaskHead("reg", "regression"),
    TaskHead("tok", "token_classification", 5),
    TaskHead("qa", "span"),
    TaskHead("mc", "multiple_choice"),
    TaskHead("tags", "multilabel", 4),
)
B, L = 14, 9


def tiny_bert(**kw):
    cfg = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
               max_position_embeddings=32, type_vocab_size=2)
    cfg.update(kw)
    return BertConfig(**cfg)


def mixed_batch(seed=0, task_ids=None):
    rng = np.random.default_rng(seed)
    if task_ids is None:
        task_ids = np.array([0, 1, 2, 3, 4, 5, 5, 5, 6, 0, 3, 1, 5, 5])
    lengths = rng.integers(3, L + 1, size=B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, 50, size=(B, L)) * mask
    tok = np.where(mask > 0, rng.integers(0, 5, size=(B, L)), IGNORE_INDEX)
    labels = np.full(B, IGNORE_INDEX)
    groups = np.full(B, -1)
    for i, t in enumerate(task_ids):
        if TASKS[t].kind == "classification":
            labels[i] = rng.integers(0, TASKS[t].num_labels)
    # two multiple-choice questions: rows 5,6,7 (answer row 6) and rows 12,13 (answer row 12)
    groups[[5, 6, 7]] = 0
    groups[[12, 13]] = 1
    labels[[5, 7, 13]] = 0
    labels[[6, 12]] = 1
    return make_batch(
        input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, (B, L)) * mask,
        task_ids=task_ids, labels=labels, label_values=rng.normal(size=B),
        token_labels=tok, start_positions=np.minimum(1, lengths - 1),
        end_positions=np.minimum(2, lengths - 1), group_ids=groups,
        multi_labels=rng.integers(0, 2, (B, 4)).astype(np.float32))


@pytest.fixture(scope="module")
def model_and_params():
    model = MultiTaskModel(tiny_bert(), TASKS)
    params = init_params(model, jax.random.key(0), mixed_batch())
    return model, params


def run(model, params, batch):
    return jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)


def rows_of(batch, rows):
    return batch.select(np.asarray(rows))


def kind_outputs(out, kind):
    if kind == "span":
        return [out["span_start"], out["span_end"]]
    return [out[kind]]


def test_heads_keyed_by_task_name(model_and_params):
    _, params = model_and_params
    assert set(params["heads"]) == {t.name for t in TASKS}
    assert params["heads"]["cls3"]["kernel"].shape == (16, 3)
    assert params["heads"]["qa"]["kernel"].shape == (16, 2)


def test_mixed_batch_equals_each_task_alone(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    out = run(model, params, batch)
    losses, counts = H.task_losses(out, batch, TASKS)
    for t_id, task in enumerate(TASKS):
        rows = np.flatnonzero(np.asarray(batch.task_ids) == t_id)
        alone = rows_of(batch, rows)
        out_alone = run(model, params, alone)
        for mixed_o, alone_o in zip(kind_outputs(out, task.kind), kind_outputs(out_alone, task.kind)):
            np.testing.assert_allclose(np.asarray(mixed_o)[rows], alone_o, atol=1e-5, rtol=0)
        l_alone, _ = H.task_losses(out_alone, alone, TASKS)
        np.testing.assert_allclose(losses[t_id], l_alone[t_id], atol=1e-5, rtol=1e-6)
        assert float(counts[t_id]) > 0


def test_permuting_the_batch_permutes_outputs(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    perm = np.random.default_rng(1).permutation(B)
    out, out_p = run(model, params, batch), run(model, params, rows_of(batch, perm))
    for key in out:
        np.testing.assert_allclose(np.asarray(out[key])[perm], out_p[key], atol=1e-5, rtol=0)
    l, _ = H.task_losses(out, batch, TASKS)
    l_p, _ = H.task_losses(out_p, rows_of(batch, perm), TASKS)
    np.testing.assert_allclose(l, l_p, atol=1e-6)


def test_absent_task_contributes_exactly_zero(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    only_cls = rows_of(batch, np.flatnonzero(np.asarray(batch.task_ids) == 0))
    out = run(model, params, only_cls)
    losses, counts = H.task_losses(out, only_cls, TASKS)
    assert np.all(np.isfinite(losses))
    assert np.all(np.asarray(losses)[1:] == 0.0) and np.all(np.asarray(counts)[1:] == 0)
    grads = jax.grad(lambda p: H.task_losses(model.apply({"params": p}, only_cls), only_cls, TASKS)[0].sum())(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    # Heads of absent tasks get exactly zero gradient.
    assert float(jnp.abs(grads["heads"]["reg"]["kernel"]).max()) == 0.0


def test_padding_rows_are_ignored(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    ids = np.asarray(batch.task_ids).copy()
    ids[-2:] = -1  # two padding rows (end of data)
    em = np.asarray(batch.example_mask).copy()
    em[-2:] = 0
    padded = batch.replace(task_ids=jnp.asarray(ids), example_mask=jnp.asarray(em))
    real = rows_of(batch, np.arange(B - 2))
    real = real.replace(group_ids=jnp.where(real.group_ids == 1, -1, real.group_ids))
    lp, cp = H.task_losses(run(model, params, padded), padded, TASKS)
    lr, cr = H.task_losses(run(model, params, real), real, TASKS)
    np.testing.assert_allclose(lp, lr, atol=1e-6)


def test_losses_match_direct_formulas(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    out = jax.tree_util.tree_map(np.asarray, run(model, params, batch))
    losses, _ = H.task_losses(out, batch, TASKS)
    ids, labels = np.asarray(batch.task_ids), np.asarray(batch.labels)

    def ce(logits, y):
        logits = logits - logits.max(-1, keepdims=True)
        return -(logits[y] - np.log(np.exp(logits).sum()))

    r1 = np.flatnonzero(ids == 1)  # 3-class task: only its first 3 logits exist
    expect = np.mean([ce(out["classification"][i][:3], labels[i]) for i in r1])
    np.testing.assert_allclose(losses[1], expect, rtol=1e-5)
    r2 = np.flatnonzero(ids == 2)
    np.testing.assert_allclose(losses[2], np.mean((out["regression"][r2] - np.asarray(batch.label_values)[r2]) ** 2), rtol=1e-5)
    r3 = np.flatnonzero(ids == 3)
    tl = np.asarray(batch.token_labels)
    tok = [ce(out["token_classification"][i, j], tl[i, j]) for i in r3 for j in range(L) if tl[i, j] >= 0]
    np.testing.assert_allclose(losses[3], np.mean(tok), rtol=1e-5)
    # multiple choice: softmax over each question's rows
    s = out["multiple_choice"]
    q1 = -np.log(np.exp(s[6]) / np.exp(s[[5, 6, 7]]).sum())
    q2 = -np.log(np.exp(s[12]) / np.exp(s[[12, 13]]).sum())
    np.testing.assert_allclose(losses[5], (q1 + q2) / 2, rtol=1e-5)
    # span: (CE(start) + CE(end)) / 2 over real tokens
    r4 = np.flatnonzero(ids == 4)[0]
    n = int(np.asarray(batch.attention_mask)[r4].sum())
    sp = (ce(out["span_start"][r4][:n], int(batch.start_positions[r4])) + ce(out["span_end"][r4][:n], int(batch.end_positions[r4]))) / 2
    np.testing.assert_allclose(losses[4], sp, rtol=1e-5)
    # multilabel: mean BCE over the task's 4 labels
    r6 = np.flatnonzero(ids == 6)[0]
    z, y = out["multilabel"][r6], np.asarray(batch.multi_labels)[r6]
    bce = np.mean(np.log1p(np.exp(-z)) * y + np.log1p(np.exp(z)) * (1 - y))
    np.testing.assert_allclose(losses[6], bce, rtol=1e-5)


def test_adding_a_task_keeps_other_tasks(model_and_params):
    model, params = model_and_params
    more = MultiTaskModel(tiny_bert(), TASKS + (TaskHead("new", "classification", 7),))
    params_more = init_params(more, jax.random.key(0), mixed_batch())
    flat, flat_more = tu.flatten_dict(params, sep="/"), tu.flatten_dict(params_more, sep="/")
    assert set(flat) <= set(flat_more)
    assert set(flat_more) - set(flat) == {"heads/new/kernel", "heads/new/bias"}
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat_more[k])
    batch = mixed_batch()
    a, b = run(model, params, batch), run(more, params_more, batch)
    # The widest classification head grew from 3 to 7 outputs; the real logits are unchanged.
    rows = np.flatnonzero(np.asarray(batch.task_ids) <= 1)
    np.testing.assert_allclose(np.asarray(a["classification"])[rows], np.asarray(b["classification"])[rows, :3], atol=1e-6)
    for key in ("regression", "token_classification", "span_start", "multiple_choice", "multilabel"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)


def test_reordering_tasks_keeps_parameter_names(model_and_params):
    _, params = model_and_params
    rev = MultiTaskModel(tiny_bert(), tuple(reversed(TASKS)))
    params_rev = init_params(rev, jax.random.key(0), mixed_batch(task_ids=np.zeros(B, int)))
    assert tu.flatten_dict(params_rev).keys() == tu.flatten_dict(params).keys()
    # The old parameters load into the reordered model and give the same per-example outputs.
    batch = mixed_batch()
    ids = np.asarray(batch.task_ids)
    rev_batch = batch.replace(task_ids=jnp.asarray(len(TASKS) - 1 - ids))
    a, b = run(MultiTaskModel(tiny_bert(), TASKS), params, batch), run(rev, params, rev_batch)
    # Outputs of a kind are meaningful on that kind's rows only.
    for kind in ("regression", "classification", "token_classification", "multilabel"):
        rows = np.flatnonzero([TASKS[i].kind == kind for i in ids])
        np.testing.assert_allclose(np.asarray(a[kind])[rows], np.asarray(b[kind])[rows], atol=1e-6)


def test_parameter_report(model_and_params):
    _, params = model_and_params
    names = [t.name for t in TASKS]
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == "heads", params)
    rep = parameter_report(params, names, trainable)
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert rep["total"] == total
    assert rep["per_task"]["cls3"]["task_specific"] == 16 * 3 + 3
    assert rep["per_task"]["reg"]["task_specific"] == 16 + 1
    assert rep["shared"] == rep["backbone"]
    assert rep["trainable"] == sum(r["task_specific"] for r in rep["per_task"].values())
    assert rep["shared_trainable"] == 0
    assert "cls3" in format_report(rep)


def test_bad_input_errors(model_and_params):
    model, params = model_and_params
    batch = mixed_batch()
    ids = np.asarray(batch.task_ids).copy()
    ids[0] = len(TASKS)
    bad = batch.replace(task_ids=ids)
    with pytest.raises(ValueError, match="task id 7 is out of range.*cls2"):
        model.check_batch(bad)
    with pytest.raises(KeyError, match="unknown task 'nope'.*cls2"):
        model.task_index("nope")
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        init_params(MultiTaskModel(tiny_bert(), (TaskHead("a", "regression"), TaskHead("a", "regression"))),
                    jax.random.key(0), batch)
    with pytest.raises(ValueError, match="need a T5 backbone"):
        init_params(MultiTaskModel(tiny_bert(), (TaskHead("s", "seq2seq"),)), jax.random.key(0), batch)
    with pytest.raises(ValueError, match="unknown head kind"):
        TaskHead("x", "ranking")
    with pytest.raises(ValueError, match="reserved"):
        TaskHead("heads", "regression")


def test_parameter_report_excludes_extension_weights_from_the_backbone():
    from mtlx.peft import registry
    cfg = registry.attach(tiny_bert(), [{"method": "lora", "rank": 2}], [t.name for t in TASKS])
    model = MultiTaskModel(cfg, TASKS)
    params = init_params(model, jax.random.key(0), mixed_batch())
    plain = init_params(MultiTaskModel(tiny_bert(), TASKS), jax.random.key(0), mixed_batch())
    rep = parameter_report(params, [t.name for t in TASKS], extension_names=[e.name for e in cfg.extensions])
    assert rep["backbone"] == sum(x.size for x in jax.tree_util.tree_leaves(plain["backbone"]))
    # LoRA on q and v: 2 layers x 2 projections x (16*2 + 2*16) per task
    assert rep["per_task"]["cls2"]["task_specific"] == 2 * 2 * 64 + 16 * 2 + 2


def test_extensions_built_for_another_task_order_are_refused():
    from mtlx.peft import registry
    names = [t.name for t in TASKS]
    cfg = registry.attach(tiny_bert(), [{"method": "lora", "rank": 2}], list(reversed(names)))
    with pytest.raises(ValueError):
        init_params(MultiTaskModel(cfg, TASKS), jax.random.key(0), mixed_batch())
