"""Task balancing through the real train step (tiny BERT, mixed-task batches).

References are computed independently of the step's machinery: per-task gradients by one
`jax.grad` per task of `heads.task_losses` (not the step's vjp of segment sums), the
representation gradients from the encoder run as a separate module with the heads written out
here, the strategies' formulas from their papers (PCGrad's projection, UW's objective and one
Adam step), and FAMO's update with the next losses from a separate forward.
"""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtlx import weighting as W
from mtlx.batch import IGNORE_INDEX, make_batch
from mtlx.models import heads as H
from mtlx.models.bert import BertEncoder
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.train import optim
from mtlx.train import step as S
from mtlx.train.checkpoint import Checkpointer

from tests.test_multitask import tiny_bert

TASKS = (TaskHead("cls2", "classification", 2), TaskHead("reg", "regression"),
         TaskHead("tok", "token_classification", 3))
SEQ_TASKS = TASKS[:2]
ALL = [0, 1, 2, 0, 1, 2, 0, 2]
NO_TOK = [0, 1, 0, 1, 1, 0, 0, 1]
ONLY_TOK = [2] * 8


def make(task_ids, seed=0, length=6, num_tasks=3):
    r = np.random.default_rng(seed)
    task_ids = np.asarray(task_ids)
    b = len(task_ids)
    lengths = r.integers(3, length + 1, size=b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    tok = np.where((mask > 0) & (task_ids[:, None] == 2), r.integers(0, 3, (b, length)),
                   IGNORE_INDEX)
    return make_batch(input_ids=r.integers(1, 50, (b, length)) * mask, attention_mask=mask,
                      task_ids=task_ids, labels=np.where(task_ids == 0, r.integers(0, 2, b),
                                                         IGNORE_INDEX),
                      label_values=r.normal(size=b), token_labels=tok if num_tasks > 2 else None)


def build(tasks=TASKS):
    model = MultiTaskModel(tiny_bert(num_layers=1, hidden_dropout=0.0, attention_dropout=0.0),
                           tasks, head_dropout=0.0)
    return model, init_params(model, jax.random.key(0), make(ALL, num_tasks=len(tasks)))


@pytest.fixture(scope="module")
def tiny():
    return build()


def new_state(model, params, tx, strategy, trainable=None):
    return S.create_state(params, tx, jax.random.key(1),
                          S.init_weighting(strategy, model, params, trainable))


def per_task_grads(model, params, batch):
    """[T] losses and one full gradient tree per task: the Jacobian of heads.task_losses."""
    def losses(p):
        return H.task_losses(model.apply({"params": p}, batch), batch, model.tasks)[0]
    jac = jax.jit(jax.jacrev(losses))(params)
    t = len(model.tasks)
    return (np.asarray(losses(params), np.float64),
            [jax.tree_util.tree_map(lambda x: x[i], jac) for i in range(t)])


def is_head(path):
    return path[0] == "heads"


def split_flat(tree):
    flat = tu.flatten_dict(tree)
    shared = {k: np.asarray(v, np.float64) for k, v in flat.items() if not is_head(k)}
    return shared, {k: np.asarray(v, np.float64) for k, v in flat.items() if is_head(k)}


def delta(before, after):
    """after - before for every leaf, as a flat dict."""
    a, b = tu.flatten_dict(before), tu.flatten_dict(after)
    return {k: np.asarray(b[k], np.float64) - np.asarray(a[k], np.float64) for k in a}


def assert_tree_close(got: dict, want: dict, rtol=2e-4, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=str(k))


# ----------------------------------------------------------------------------- one backward

def test_uw_updates_state_handles_absent_tasks_compiles_once_and_checkpoints(tiny, tmp_path):
    model, params = tiny
    tx = optax.sgd(1.0)  # the update is minus the gradient: compared with a reference below
    uw = W.get_strategy("uw")
    state = new_state(model, params, tx, uw)
    assert state.weighting_opt is not None
    step = jax.jit(S.make_train_step(model, tx, weighting=uw))

    batch = make(NO_TOK, seed=1)                    # 'tok' absent
    losses, grads = per_task_grads(model, params, batch)
    s0 = np.asarray(state.weighting.params["log_var"], np.float64)
    new, m = step(state, batch)
    # Model update = -d/dtheta sum_i L_i / (2 exp(s_i)) (Kendall et al. 2018), tasks present.
    w = 0.5 * np.exp(-s0) * np.array([1.0, 1.0, 0.0])
    want = {k: -sum(w[i] * np.asarray(tu.flatten_dict(grads[i])[k], np.float64) for i in range(3))
            for k in tu.flatten_dict(params)}
    assert_tree_close(delta(params, new.params), want)
    np.testing.assert_allclose(m["task_weight"], w, rtol=1e-6)
    np.testing.assert_allclose(m["task_loss"], [losses[0], losses[1], 0.0], rtol=1e-5)
    # s takes one Adam step (lr 1e-3: -lr * sign of dUW/ds = 1/2 - L / (2 exp(s))); absent: none.
    g_s = 0.5 - losses / (2 * np.exp(s0))
    s1 = np.asarray(new.weighting.params["log_var"])
    np.testing.assert_allclose(s1[:2], s0[:2] - 1e-3 * np.sign(g_s[:2]), rtol=1e-5)
    assert s1[2] == s0[2]
    # Every task mix (incl. a single-task batch) runs the same executable without NaN.
    for ids, seed in ((ALL, 2), (ONLY_TOK, 3), (NO_TOK, 4)):
        prev = np.asarray(new.weighting.params["log_var"])
        new, m = step(new, make(ids, seed=seed))
        absent = np.setdiff1d(np.arange(3), ids)
        assert np.all(np.isfinite(m["task_loss"])) and np.isfinite(float(m["loss"]))
        assert np.all(np.asarray(m["task_weight"])[absent] == 0)
        np.testing.assert_array_equal(np.asarray(new.weighting.params["log_var"])[absent],
                                      prev[absent])
    assert S.count_compilations(step) == 1

    # Checkpoint round trip: the weighting state and its optimizer state come back, and the
    # next step from the restored state is identical.
    with Checkpointer(tmp_path, tasks=TASKS, model_signature={}, async_save=False) as ckpt:
        ckpt.save(4, new, data_state={})
        restored = ckpt.restore_latest(new_state(model, params, tx, uw)).state
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(new)
    b = make(ALL, seed=5)
    x, y = step(restored, b)[0], step(new, b)[0]
    for a, c in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_famo_next_losses_are_the_same_batch_after_the_update(tiny):
    model, params = tiny
    tx = optax.sgd(0.5)
    famo = W.get_strategy("famo", after="same_batch")
    state = new_state(model, params, tx, famo)
    batch = make(NO_TOK, seed=6)
    new, m = jax.jit(S.make_train_step(model, tx, weighting=famo))(state, batch)
    after = H.task_losses(model.apply({"params": new.params}, batch), batch, TASKS)[0]
    want = famo.update(state.weighting, m["task_loss"], np.array([True, True, False]), 0,
                       next_losses=after)
    np.testing.assert_allclose(new.weighting.stats["w"], want.stats["w"], rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(new.weighting.stats["w"])[:2] != 0)
    assert np.asarray(new.weighting.stats["w"])[2] == 0


def test_famo_next_batch_runs_one_forward_and_uses_the_next_steps_losses(tiny):
    model, params = tiny
    tx = optax.sgd(0.5)
    famo = W.get_strategy("famo", after="next_batch")
    assert not famo.needs_next_losses
    assert W.get_strategy("famo", after="same_batch").needs_next_losses
    state = new_state(model, params, tx, famo)
    step = jax.jit(S.make_train_step(model, tx, weighting=famo))
    b1, b2 = make(NO_TOK, seed=6), make(NO_TOK, seed=7)
    s1, m1 = step(state, b1)
    np.testing.assert_array_equal(s1.weighting.stats["w"], 0.0)   # no pair yet
    s2, m2 = step(s1, b2)
    want = famo.update(s1.weighting, m2["task_loss"], np.array([True, True, False]), 1)
    np.testing.assert_allclose(s2.weighting.stats["w"], want.stats["w"], rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(s2.weighting.stats["w"])[:2] != 0)
    # One forward: the compiled step has no second evaluation of the encoder.
    def dots(strategy):
        fn = jax.jit(S.make_train_step(model, tx, weighting=strategy))
        st = new_state(model, params, tx, strategy)
        return fn.lower(st, b1).as_text().count("dot_general")
    assert dots(famo) < dots(W.get_strategy("famo", after="same_batch"))
    assert dots(famo) == dots(W.get_strategy("ew"))


def test_exact_accumulation_list_is_right():
    """ACCUMULATION_EXACT holds the 1x strategies whose d total / d L does not depend on L."""
    rng = np.random.default_rng(0)
    present = jnp.array([True, True, False, True])
    exact = set()
    for name, cls in W.STRATEGIES.items():
        if cls.needs_task_grads:
            continue
        s = W.get_strategy(name, **({"weights": (1.0, 2.0, 3.0, 4.0)} if name == "static" else
                                    {"steps_per_epoch": 1} if name == "dwa" else {}))
        st = s.init(4)
        if name == "famo":
            st = st.replace(stats={**st.stats, "w": jnp.asarray(rng.normal(size=4), jnp.float32)})
        grads = [jax.grad(lambda l: s.loss(l, present, st, jax.random.key(0), 0)[0])(
            jnp.asarray(rng.uniform(0.1, 3.0, 4), jnp.float32)) for _ in range(2)]
        if np.allclose(grads[0], grads[1], rtol=1e-6):
            exact.add(name)
    assert exact == set(S.ACCUMULATION_EXACT)


@pytest.mark.heavy
def test_accumulation_matches_full_batch_for_uw_and_mgda(tiny):
    model, params = tiny
    tx = optax.sgd(0.1)
    batch = make(ALL, seed=7)
    for name in ("uw", "mgda"):
        s = W.get_strategy(name)
        full = jax.jit(S.make_train_step(model, tx, weighting=s))(
            new_state(model, params, tx, s), batch)
        acc = jax.jit(S.make_train_step(model, tx, weighting=s, accum_steps=2))(
            new_state(model, params, tx, s), batch)
        np.testing.assert_allclose(full[1]["task_weight"], acc[1]["task_weight"], rtol=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(full[0]), jax.tree_util.tree_leaves(acc[0])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- per-task

def test_pcgrad_and_mgda_on_parameter_gradients(tiny):
    model, params = tiny
    tx = optax.sgd(1.0)
    batch = make(NO_TOK, seed=8)  # two present tasks: PCGrad's random order cannot matter
    losses, grads = per_task_grads(model, params, batch)
    shared = [split_flat(g)[0] for g in grads]
    keys = sorted(shared[0])
    G = np.stack([np.concatenate([s[k].ravel() for k in keys]) for s in shared])   # [3, D]
    assert np.all(G[2] == 0)
    heads = {k: sum(split_flat(g)[1][k] for g in grads) for k in split_flat(grads[0])[1]}

    # PCGrad (Yu et al. 2020), two tasks: each projected off the other if they conflict.
    g1, g2 = G[0], G[1]
    dot = g1 @ g2
    p1 = g1 - min(dot, 0) / (g2 @ g2) * g2
    p2 = g2 - min(dot, 0) / (g1 @ g1) * g1
    # MGDA (Sener & Koltun 2018), two tasks: closed-form min-norm point of the segment.
    gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    for name, update in (("pcgrad", p1 + p2), ("mgda", gamma * g1 + (1 - gamma) * g2)):
        s = W.get_strategy(name)
        step = jax.jit(S.make_train_step(model, tx, weighting=s))
        new, m = step(new_state(model, params, tx, s), batch)
        got_shared, got_heads = split_flat(tu.unflatten_dict(delta(params, new.params)))
        got = np.concatenate([got_shared[k].ravel() for k in keys])
        np.testing.assert_allclose(got, -update, rtol=2e-4, atol=2e-5 * np.abs(update).max())
        assert_tree_close(got_heads, {k: -v for k, v in heads.items()})  # own loss, weight 1
        assert np.asarray(m["task_weight"])[2] == 0
        cos = (g1 @ g2) / np.linalg.norm(g1) / np.linalg.norm(g2)
        np.testing.assert_allclose(m["task_cosine"][0, 1], cos, rtol=1e-4)
        for ids, seed in ((ONLY_TOK, 9), (ALL, 10)):
            new, m = step(new, make(ids, seed=seed))
            assert all(np.all(np.isfinite(np.asarray(v))) for v in m.values())
        assert S.count_compilations(step) == 1


def reference_rep_losses(params, batch, h):
    """The three heads written out on the encoder's last hidden state h [B, L, d]."""
    p = params["heads"]
    pool = params["backbone"]["pooler"]["dense"]
    pooled = jnp.tanh(h[:, 0] @ pool["kernel"] + pool["bias"])
    ids = batch.task_ids
    logp = jax.nn.log_softmax(pooled @ p["cls2"]["kernel"] + p["cls2"]["bias"])
    m0 = ids == 0
    l0 = -jnp.sum(jnp.where(m0, jnp.take_along_axis(
        logp, jnp.clip(batch.labels, 0)[:, None], 1)[:, 0], 0)) / jnp.maximum(m0.sum(), 1)
    m1 = ids == 1
    err = (pooled @ p["reg"]["kernel"] + p["reg"]["bias"])[:, 0] - batch.label_values
    l1 = jnp.sum(jnp.where(m1, err ** 2, 0)) / jnp.maximum(m1.sum(), 1)
    tl = batch.token_labels
    ok = (tl >= 0) & (ids == 2)[:, None]
    tlogp = jax.nn.log_softmax(h @ p["tok"]["kernel"] + p["tok"]["bias"])
    nll = -jnp.take_along_axis(tlogp, jnp.clip(tl, 0)[..., None], -1)[..., 0]
    l2 = jnp.sum(jnp.where(ok, nll, 0)) / jnp.maximum(ok.sum(), 1)
    return jnp.stack([l0, l1, l2])


def test_mgda_on_representation_gradients(tiny):
    """grads_wrt='representation': weights from the per-task gradients w.r.t. the encoder's last
    hidden state (summed over the batch, LibMTL rep_grad); shared update = their weighted
    backward; heads get their own loss's gradient."""
    model, params = tiny
    tx = optax.sgd(1.0)
    batch = make(ALL, seed=11)
    encoder = BertEncoder(model.backbone_config)
    h = encoder.apply({"params": params["backbone"]}, batch.input_ids, batch.attention_mask,
                      batch.token_type_ids).last_hidden_state
    losses = reference_rep_losses(params, batch, h)
    rep = jax.jacrev(lambda x: reference_rep_losses(params, batch, x))(h)        # [T, B, L, d]
    np.testing.assert_array_equal(np.asarray(rep[0])[np.asarray(batch.task_ids) != 0], 0)
    G = np.asarray(rep, np.float64).sum(1).reshape(3, -1)
    mgda = W.get_strategy("mgda", solver="fista", max_iter=2000)
    want_w, _, _ = mgda.combine(jnp.asarray(G, jnp.float32), losses, jnp.ones(3, bool),
                                mgda.init(3), jax.random.key(0), 0)

    step = jax.jit(S.make_train_step(model, tx, weighting=mgda, grads_wrt="representation"))
    new, m = step(new_state(model, params, tx, mgda), batch)
    np.testing.assert_allclose(m["task_loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(m["task_weight"], want_w, rtol=1e-3, atol=1e-5)
    cos = G @ G.T / np.outer(np.linalg.norm(G, axis=1), np.linalg.norm(G, axis=1))
    np.testing.assert_allclose(m["task_cosine"], cos, rtol=1e-4, atol=1e-6)

    w = np.asarray(m["task_weight"], np.float64)
    _, grads = per_task_grads(model, params, batch)
    flat = [tu.flatten_dict(g) for g in grads]
    want = {k: -sum((1.0 if is_head(k) else w[i]) * np.asarray(flat[i][k], np.float64)
                    for i in range(3)) for k in flat[0]}
    assert_tree_close(delta(params, new.params), want)
    for ids, seed in ((ONLY_TOK, 12), (NO_TOK, 13)):
        new, m = step(new, make(ids, seed=seed))
        assert all(np.all(np.isfinite(np.asarray(v))) for v in m.values())
        assert np.all(np.asarray(m["task_weight"])[np.setdiff1d(np.arange(3), ids)] == 0)
    assert S.count_compilations(step) == 1


def test_pooled_representation_and_frozen_parameters():
    """representation='pooled' (sequence-level tasks only), with a trainable mask: frozen
    parameters stay bit-identical and are not part of the balanced gradients."""
    model, params = build(SEQ_TASKS)
    mask = optim.trainable_mask(params, [r"^heads/", r"pooler", r"layer_0/ffn"])
    tx = optim.make_optimizer(__import__("ml_collections").ConfigDict(dict(
        optimizer="sgd", learning_rate=1.0, warmup_steps=0, num_train_steps=10,
        schedule="constant", weight_decay=0.0, grad_clip_norm=None)), params, mask)
    batch = make(NO_TOK, seed=14, num_tasks=2)
    encoder = BertEncoder(model.backbone_config)
    pooled = encoder.apply({"params": params["backbone"]}, batch.input_ids, batch.attention_mask,
                           batch.token_type_ids).pooled_output

    def heads_on_pooled(x):
        p = params["heads"]
        logp = jax.nn.log_softmax(x @ p["cls2"]["kernel"] + p["cls2"]["bias"])
        m0, m1 = batch.task_ids == 0, batch.task_ids == 1
        l0 = -jnp.sum(jnp.where(m0, jnp.take_along_axis(
            logp, jnp.clip(batch.labels, 0)[:, None], 1)[:, 0], 0)) / m0.sum()
        err = (x @ p["reg"]["kernel"] + p["reg"]["bias"])[:, 0] - batch.label_values
        return jnp.stack([l0, jnp.sum(jnp.where(m1, err ** 2, 0)) / m1.sum()])

    G = np.asarray(jax.jacrev(heads_on_pooled)(pooled), np.float64).sum(1)       # [2, d]
    g1, g2 = G
    gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)

    mgda = W.get_strategy("mgda")
    step = jax.jit(S.make_train_step(model, tx, weighting=mgda, grads_wrt="representation",
                                     representation="pooled", trainable=mask))
    new, m = step(new_state(model, params, tx, mgda, mask), batch)
    np.testing.assert_allclose(m["task_weight"], [gamma, 1 - gamma], rtol=1e-3)
    flat_mask = tu.flatten_dict(mask)
    moved = delta(params, new.params)
    assert any(np.any(v != 0) for k, v in moved.items() if flat_mask[k])
    for k, v in moved.items():
        if not flat_mask[k]:
            assert np.all(v == 0), k

    # DB-MTL's EMA spans exactly the shared trainable parameters (pooler + layer_0/ffn).
    db = W.get_strategy("db_mtl")
    d = sum(int(np.prod(v.shape)) for k, v in tu.flatten_dict(params).items()
            if flat_mask[k] and not is_head(k))
    assert S.init_weighting(db, model, params, mask).stats["grad_ema"].shape == (2, d)


# ----------------------------------------------------------------------------- bad input

def test_bad_weighting_configuration_names_the_key(tiny):
    model, params = tiny
    tx = optax.sgd(0.1)
    import ml_collections as mlc

    with pytest.raises(ValueError, match=r"config.weighting.strategy.*unknown weighting strategy "
                                         r"'uncertainty'; known: \[.*'uw'"):
        S.strategy_from_config(mlc.ConfigDict({"strategy": "uncertainty", "kwargs": {}}))
    with pytest.raises(ValueError, match=r"config.weighting.*'cagrad'.*'calpha' must be >= 0"):
        S.strategy_from_config(mlc.ConfigDict({"strategy": "cagrad", "kwargs": {"calpha": -1.0}}))
    with pytest.raises(ValueError, match=r"config.weighting.*unknown hyperparameter.*'alpah'"):
        S.strategy_from_config(mlc.ConfigDict({"strategy": "gradnorm", "kwargs": {"alpah": 1.0}}))
    assert S.strategy_from_config(mlc.ConfigDict({"strategy": None})) is None
    static = S.strategy_from_config(mlc.ConfigDict({"strategy": "static", "kwargs": {}}),
                                    task_weights=(1, 2, 3))
    assert static.weights == (1.0, 2.0, 3.0)

    cases = [
        (dict(weighting="pcgrad", grads_wrt="representation"),
         r"config.weighting.grads_wrt='representation': strategy 'pcgrad'.*can: \[.*'mgda'"),
        (dict(weighting="db_mtl", grads_wrt="representation"), r"grads_wrt.*'db_mtl'"),
        (dict(weighting="uw", grads_wrt="representation"), r"grads_wrt='representation'.*'uw'"),
        (dict(weighting="mgda", grads_wrt="rep"), r"config.weighting.grads_wrt: unknown value"),
        (dict(weighting="mgda", grads_wrt="representation", representation="pooled"),
         r"config.weighting.representation='pooled': tasks \['tok'\]"),
        (dict(weighting="mgda", grads_wrt="representation", representation="cls"),
         r"config.weighting.representation: unknown representation 'cls'"),
        (dict(weighting="gls", accum_steps=2), r"config.optim.accum_steps=2 with strategy 'gls'"),
        (dict(weighting="famo", accum_steps=2), r"accum_steps=2 with strategy 'famo'"),
        (dict(weighting="mgda", grads_wrt="representation", accum_steps=2),
         r"config.optim.accum_steps=2 with config.weighting.grads_wrt='representation'"),
        (dict(weighting="uw", task_weights=[1, 2, 3]),
         r"config.task_weights is set but config.weighting.strategy is 'uw'"),
        (dict(task_weights=[1.0]), r"config.task_weights has 1 entries"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            S.make_train_step(model, tx, **kwargs)
    # A state without the strategy's state, or without its optimizer, is refused at trace time.
    step = S.make_train_step(model, tx, weighting="uw")
    with pytest.raises(ValueError, match="weighting slot does not match"):
        jax.eval_shape(step, S.create_state(params, tx, jax.random.key(0)), make(ALL))


# ----------------------------------------------------------------------------- the run

@pytest.mark.heavy
def test_run_logs_weights_and_affinity_and_writes_the_report(tmp_path):
    from mtlx.train.config import apply_overrides
    from tests.test_train_loop import local_cfg
    from mtlx.train.loop import train_and_evaluate
    import json

    cfg = apply_overrides(local_cfg(), ["--config.weighting.strategy=uw",
                                        "--config.weighting.learning_rate=0.05"])
    _, state = train_and_evaluate(cfg, tmp_path, progress=False, return_state=True)
    assert np.all(np.asarray(state.weighting.params["log_var"]) != -0.5)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert evals and any(k.startswith("weighting/weight/") for k in evals[-1])
    assert any(k.startswith("affinity/lookahead/") for k in evals[-1])
    assert {p.name for p in (tmp_path / "affinity").iterdir()} >= {
        "affinity.json", "affinity.md", "affinity.png", "intervals.jsonl"}
    report = json.loads((tmp_path / "affinity" / "affinity.json").read_text())
    assert report["tasks"] == ["cola", "stsb", "ud_pos"] and report["intervals"] >= 1

    bad = apply_overrides(local_cfg(), ["--config.weighting.strategy=pcgrad",
                                        "--config.weighting.grads_wrt=representation"])
    with pytest.raises(ValueError, match="config.weighting.grads_wrt='representation'"):
        train_and_evaluate(bad, tmp_path / "bad", progress=False)


@pytest.mark.heavy
def test_t5_representation_hooks():
    """T5: 'hidden' is the encoder output (the decoder and the pooled mean read it); 'pooled' the
    masked mean. Representation gradients of a classification task cover exactly its rows' real
    tokens; the seq2seq task's representation gradient is non-zero too."""
    from tests.peft_common import T5_TASKS, batch_for, tiny_t5

    model = MultiTaskModel(tiny_t5(num_layers=1), T5_TASKS, head_dropout=0.0)
    batch = batch_for([0, 1, 2, 3, 4, 4, 0, 2], t5=True)
    params = init_params(model, jax.random.key(0), batch)
    for rep in ("hidden", "pooled"):
        if rep == "pooled":
            model = MultiTaskModel(tiny_t5(num_layers=1), T5_TASKS[:4], head_dropout=0.0)
            batch = batch_for([0, 1, 2, 3, 3, 1, 0, 2], t5=False)
            params = init_params(model, jax.random.key(0), batch)
        struct = S.representation_struct(model, params, batch, rep)
        d0 = jnp.zeros(struct.shape, struct.dtype)

        def sums(dlt):
            seen = []
            with S.representation_hook(model, rep, dlt, seen):
                out = model.apply({"params": params}, batch)
            assert seen == (["encoder_output"] if rep == "hidden" else ["pooled_output"])
            return H.task_losses(out, batch, model.tasks)[0]

        g = np.asarray(jax.jacrev(sums)(d0))
        rows = np.asarray(batch.task_ids) == 0
        if rep == "hidden":
            real = np.asarray(batch.attention_mask, bool)
            nonzero = np.any(g[0] != 0, axis=-1)
            np.testing.assert_array_equal(nonzero, real & rows[:, None])
            assert np.any(g[4] != 0)
        else:
            np.testing.assert_array_equal(np.any(g[0] != 0, axis=-1), rows)
        tx = optax.sgd(0.1)
        s = W.get_strategy("imtl_g")
        step = jax.jit(S.make_train_step(model, tx, weighting=s, grads_wrt="representation",
                                         representation=rep))
        _, m = step(new_state(model, params, tx, s), batch)
        assert all(np.all(np.isfinite(np.asarray(v))) for v in m.values())
        np.testing.assert_allclose(np.sum(m["task_weight"]), 1.0, rtol=1e-4)  # IMTL-G: sum 1
