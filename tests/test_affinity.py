"""Task-affinity report: TAG lookahead affinity, gradient cosines, groupings, files written."""

import itertools
import json

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx import paths
from mtlx.models import heads as H
from mtlx.models.multitask import MultiTaskModel
from mtlx.train import step as S
from mtlx.weighting import affinity as A

from tests.test_multitask import tiny_bert
from tests.test_train_weighting import NO_TOK, TASKS, build, make


def brute_force_best(a, k):
    """Max over ALL k^T labelings that use every group: TAG's objective written out directly."""
    t = a.shape[0]
    best, arg = -np.inf, None
    for labels in itertools.product(range(k), repeat=t):
        if len(set(labels)) != k:
            continue
        total = 0.0
        for j in range(t):
            mates = [i for i in range(t) if i != j and labels[i] == labels[j]]
            if mates:
                total += np.mean([a[i, j] for i in mates])
        if total > best + 1e-12:
            best, arg = total, labels
    return best, arg


def test_lookahead_affinity_formula_and_absent_tasks():
    before = jnp.array([2.0, 1.0, 0.5, 3.0])
    after = jnp.array([[1.5, 1.2, 0.5, 2.0], [1.0, 0.5, 0.4, 3.3], [2.0, 1.0, 0.25, 3.0],
                       [9.0, 9.0, 9.0, 9.0]])
    present = jnp.array([True, True, True, False])
    z = np.asarray(A.lookahead_affinity(before, after, present))
    want = 1 - np.asarray(after) / np.asarray(before)[None, :]
    np.testing.assert_allclose(z[:3, :3], want[:3, :3], rtol=1e-6)
    assert np.all(np.isnan(z[3])) and np.all(np.isnan(z[:, 3]))
    z0 = A.lookahead_affinity(jnp.array([0.0, 1.0]), jnp.ones((2, 2)), jnp.array([True, True]))
    assert np.all(np.isnan(np.asarray(z0)[:, 0])) and np.all(np.isfinite(np.asarray(z0)[:, 1]))


def test_partitions_and_groupings_against_brute_force():
    for n, k in ((5, 2), (6, 3), (4, 4), (5, 1)):
        parts = {A._canonical(l) for l in A.set_partitions(n, k)}
        assert len(parts) == A.stirling2(n, k) == sum(1 for _ in A.set_partitions(n, k))
    rng = np.random.default_rng(0)
    for t, k in ((5, 2), (6, 2), (6, 3), (7, 3)):
        a = rng.normal(size=(t, t))
        a[rng.random((t, t)) < 0.1] = np.nan          # a pair never observed counts 0
        g = A.group_tasks(a, k)
        want, labels = brute_force_best(np.nan_to_num(a), k)
        assert g.method == "exhaustive"
        np.testing.assert_allclose(g.score, want, rtol=1e-9)
        np.testing.assert_allclose(A.grouping_score(a, g.groups), want, rtol=1e-9)
        greedy = A.group_tasks(a, k, max_exhaustive=0)
        assert greedy.method == "greedy" and len(greedy.groups) == k
        assert greedy.score <= want + 1e-9
        np.testing.assert_allclose(A.grouping_score(a, greedy.groups), greedy.score, rtol=1e-9)


def test_block_structure_is_recovered_by_both_searches():
    rng = np.random.default_rng(1)
    blocks = [(0, 3, 5), (1, 4), (2, 6, 7)]
    t = 8
    a = rng.normal(0, 0.05, (t, t)) - 0.5
    for b in blocks:
        for i in b:
            for j in b:
                a[i, j] = 1.0 + rng.normal(0, 0.05)
    for limit in (10 ** 6, 0):
        g = A.group_tasks(a, 3, max_exhaustive=limit)
        assert g.groups == tuple(sorted(blocks)), (limit, g)


def test_grouping_errors():
    with pytest.raises(ValueError, match=r"config.weighting.report.num_groups: 4 groups for 3"):
        A.group_tasks(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match="square"):
        A.group_tasks(np.zeros((3, 2)), 2)
    with pytest.raises(ValueError, match=r"config.weighting.report.num_groups: \[0\]"):
        A.AffinityReport(["a", "b"], "/tmp/unused", num_groups=(0,), enabled=False)
    model = MultiTaskModel(tiny_bert(num_layers=1), TASKS)  # no parameters needed
    with pytest.raises(ValueError, match="config.weighting.report.lookahead_lr must be > 0"):
        S.make_affinity_probe(model, lookahead_lr=0.0)


def test_probe_against_independent_computation():
    """Cosines of the shared-parameter task gradients and Z[i, j] from an SGD step of the shared
    parameters on task i alone, both recomputed here with plain jax.grad / apply."""
    model, params = build()
    lr = 0.5
    batch = make(NO_TOK, seed=3)
    out = jax.device_get(jax.jit(S.make_affinity_probe(model, lookahead_lr=lr))(params, batch))

    def losses(p):
        return H.task_losses(model.apply({"params": p}, batch), batch, model.tasks)[0]

    flat = tu.flatten_dict(params)
    shared_keys = sorted(k for k in flat if k[0] != "heads")
    l0 = np.asarray(losses(params), np.float64)
    grads = jax.jit(jax.jacrev(losses))(params)
    gflat = tu.flatten_dict(grads)
    G = np.stack([np.concatenate([np.asarray(gflat[k][i], np.float64).ravel()
                                  for k in shared_keys]) for i in range(3)])
    n = np.linalg.norm(G, axis=1)
    cos = np.where(np.outer(n, n) > 0, G @ G.T / np.maximum(np.outer(n, n), 1e-30), 0)
    np.testing.assert_allclose(out["cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["task_loss"], l0, rtol=1e-5)
    np.testing.assert_array_equal(out["present"], [True, True, False])
    f = jax.jit(losses)
    for i in range(2):
        stepped = dict(flat)
        for k in shared_keys:
            stepped[k] = flat[k] - lr * gflat[k][i]
        after = np.asarray(f(tu.unflatten_dict(stepped)), np.float64)
        np.testing.assert_allclose(out["lookahead"][i, :2], 1 - after[:2] / l0[:2], rtol=1e-3,
                                   atol=1e-6)
    assert np.all(np.isnan(out["lookahead"][2])) and np.all(np.isnan(out["lookahead"][:, 2]))
    # Each task's own step lowers its own loss.
    assert out["lookahead"][0, 0] > 0 and out["lookahead"][1, 1] > 0


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_report_averages_writes_files_and_survives_resume(where, tmp_path, request):
    """The report in a local directory, and in a bucket (gs://, conftest's emulator)."""
    if where == "bucket":
        tmp_path = paths.as_path(request.getfixturevalue("bucket")) / "affinity_test"
    names = ["a", "b", "c"]
    nan = np.nan
    p1 = {"cosine": np.array([[1, .5, .1], [.5, 1, -.2], [.1, -.2, 1]]),
          "lookahead": np.array([[.1, .2, -.1], [.3, .1, .0], [-.2, .0, .1]]),
          "present": np.array([True, True, True])}
    p2 = {"cosine": np.array([[1, .1, 0], [.1, 1, 0], [0, 0, 0]]),
          "lookahead": np.array([[.3, .4, nan], [.1, .1, nan], [nan, nan, nan]]),
          "present": np.array([True, True, False])}
    rep = A.AffinityReport(names, tmp_path / "affinity", num_groups=(2, 5))
    scalars = rep.add(10, p1)
    assert scalars["affinity/cosine/a~b"] == 0.5 and scalars["affinity/lookahead/c->a"] == -0.2
    assert "affinity/cosine/a~c" not in rep.add(20, p2)           # c absent: not logged
    s = rep.summary()
    np.testing.assert_allclose(A._from_json(s["cosine"])[0, 1], 0.3)
    np.testing.assert_allclose(A._from_json(s["cosine"])[0, 2], 0.1)  # only the first interval
    np.testing.assert_allclose(A._from_json(s["lookahead"])[0, 1], 0.3)
    assert s["lookahead_count"][0][2] == 1 and s["lookahead_count"][0][1] == 2
    assert list(s["groupings"]) == ["2"]                             # 5 > 3 tasks: skipped
    written = rep.write()
    assert {p.name for p in written} == {"affinity.json", "affinity.md", "affinity.png"}
    assert len((tmp_path / "affinity" / "affinity.png").read_bytes()) > 1000
    md = (tmp_path / "affinity" / "affinity.md").read_text()
    assert "2 groups (exhaustive" in md and "| a |" in md
    assert json.loads((tmp_path / "affinity" / "affinity.json").read_text())["intervals"] == 2
    # A run resumed from step 10 forgets the interval logged at step 20 (it will redo it).
    again = A.AffinityReport(names, tmp_path / "affinity", resume_step=10)
    assert [r["step"] for r in again.intervals] == [10]
    assert A.weight_scalars([0.5, 0.0, 2.0], [3, 0, 1], names) == {
        "weighting/weight/a": 0.5, "weighting/weight/c": 2.0}
