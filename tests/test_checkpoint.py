"""Checkpoints: round trip, retention, atomicity, compatibility, disk full, preemption, SIGKILL.

The acceptance core is `test_sigkill_resume_is_bit_identical`: a real training run
(tests/ckpt_worker.py) is SIGKILLed at arbitrary points, including in the middle of an
asynchronous save, restarted each time, and must end with parameters and optimizer state
bit-identical to an uninterrupted run.
"""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from etils.epath import gpath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtlx.train.checkpoint import (CheckpointMismatchError, Checkpointer, CheckpointSaveError,
                                   compare_model_spec, install_preemption_handler,
                                   normalize_tasks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "ckpt_worker.py")
SIG = {"hidden_size": 8, "num_layers": 1}
TASKS = [{"name": "a", "kind": "classification", "num_labels": 2},
         {"name": "b", "kind": "regression", "num_labels": 0}]


@flax.struct.dataclass
class State:  # the shape of mtlx.train.step.TrainState, kept local so this file stands alone
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array
    weighting: dict
    unused: object = None  # e.g. TrainState.weighting when no strategy has state


def make_state(seed, tasks=("a", "b"), d=8):
    """A model-like state: shared backbone, heads and adapters keyed by task name, Adam."""
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
    params = {"backbone": {"dense": {"kernel": normal(d, d), "bias": normal(d)}},
              "heads": {t: {"kernel": normal(d, 2), "bias": normal(2)} for t in tasks},
              "adapters": {"layer_0": {t: {"down": normal(d, 2)} for t in tasks}}}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # A few optimizer steps so mu/nu/count are not trivially zero.
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.cos(p), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return State(step=jnp.asarray(seed + 2, jnp.int32), params=params, opt_state=opt_state,
                 rng=jax.random.key(seed + 100),
                 weighting={"log_vars": jnp.arange(len(tasks), dtype=jnp.float32) + seed,
                            "raw_key": jax.random.key_data(jax.random.key(seed)),
                            "epoch": 3 + seed, "host": np.arange(3.0) + seed})


def ckpt(path, tasks=TASKS, sig=SIG, **kw):
    return Checkpointer(path, tasks=tasks, model_signature=sig, **kw)


def leaves_equal(a, b):
    """Bitwise equality of two pytrees, typed keys compared by their key data."""
    unkey = lambda x: (jax.random.key_data(x)  # noqa: E731
                       if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
                       else x)
    la, lb = jax.tree.leaves(jax.tree.map(unkey, a)), jax.tree.leaves(jax.tree.map(unkey, b))
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


def test_ignored_signature_keys_are_not_compared_on_either_side(tmp_path):
    state = make_state(0)
    with ckpt(tmp_path / "c", sig={**SIG, "dtype": "float32", "remat": "none"}) as c:
        assert c.save(1, state, data_state={"step": 1})
    # Another dtype, no 'remat' key at all, a new 'scan_layers' key: all ignored.
    c = ckpt(tmp_path / "c", sig={**SIG, "dtype": "bfloat16", "scan_layers": True},
             ignore_signature_keys=("dtype", "remat", "scan_layers"))
    assert c.restore_latest(make_state(1)).step == 1
    # Without ignoring them, and for a parameter-shaping key, the restore is refused.
    with pytest.raises(CheckpointMismatchError, match="dtype"):
        ckpt(tmp_path / "c", sig={**SIG, "dtype": "bfloat16", "remat": "none"}).restore_latest(
            make_state(1))
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        ckpt(tmp_path / "c", sig={**SIG, "hidden_size": 16}, ignore_signature_keys=(
            "dtype", "remat")).restore_latest(make_state(1))


# ----------------------------------------------------------------------------- round trip

def test_round_trip_restores_structure_types_and_json_items(tmp_path):
    state = make_state(0)
    config = ml_collections.ConfigDict({"lr": 1e-3, "mixture": {"temperature": 10.0},
                                        "tasks": ["a", "b"]})
    data_state = {"step": 7, "epoch": np.int64(1), "order": [3, 1, 2], "name": "glue"}
    with ckpt(tmp_path / "c", run_config=config) as c:
        assert c.restore_latest(state) is None  # fresh workdir
        assert c.save(7, state, data_state=data_state)
        assert not c.save(7, state, data_state=data_state)  # already saved: no-op
    c = ckpt(tmp_path / "c")
    target = make_state(1)  # same structure, other values
    r = c.restore_latest(target)
    assert r.step == 7 and r.fresh_paths == ()
    assert jax.tree.structure(r.state) == jax.tree.structure(state)
    assert leaves_equal(r.state, state)
    assert jax.dtypes.issubdtype(r.state.rng.dtype, jax.dtypes.prng_key)
    assert isinstance(r.state.weighting["epoch"], int) and r.state.weighting["epoch"] == 3
    assert isinstance(r.state.weighting["host"], np.ndarray)
    assert isinstance(r.state.opt_state[0], optax.ScaleByAdamState)
    assert r.data_state == {"step": 7, "epoch": 1, "order": [3, 1, 2], "name": "glue"}
    assert r.run_config == {"lr": 1e-3, "mixture": {"temperature": 10.0}, "tasks": ["a", "b"]}
    assert r.tasks == TASKS and r.model_signature == SIG
    # An abstract target (what jax.eval_shape gives) restores the same values.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                            if isinstance(x, jax.Array) else x, target)
    assert leaves_equal(c.restore(7, abstract).state, state)
    c.close()


def test_sharded_state_restores_into_the_target_shardings(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    w = jnp.arange(64.0 * 8).reshape(64, 8)
    state = {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
             "b": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("model")))}
    with ckpt(tmp_path / "c") as c:
        c.save(1, state, data_state={})
    # Restore into the same sharding, and into another one (a resharded resume).
    for spec in (P("data", "model"), P(None, "data")):
        target = {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32,
                                            sharding=NamedSharding(mesh, spec)),
                  "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P()))}
        with ckpt(tmp_path / "c") as c:
            got = c.restore_latest(target).state
        assert got["w"].sharding == target["w"].sharding
        assert got["b"].sharding == target["b"].sharding
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(w))


def test_async_save_does_not_race_the_caller_mutating_or_donating(tmp_path):
    state = make_state(0)
    expect = jax.tree.map(np.array, state.replace(rng=jax.random.key_data(state.rng)))
    c = ckpt(tmp_path / "c")
    c.save(1, state, data_state={})
    # Right after save returns: mutate host buffers in place, free every device buffer
    # (what donation does), and run a donating step on a copy.
    state.weighting["host"][:] = -1.0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            leaf.delete()
    c.wait_until_finished()
    got = c.restore_latest(make_state(5)).state
    assert leaves_equal(got, expect)
    c.close()


# ----------------------------------------------------------------------------- retention

def test_keep_last_n_plus_best_by_metric_survives_a_restart(tmp_path):
    state = make_state(0)
    acc = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6}
    c = ckpt(tmp_path / "c", keep_last=2, best_metric="acc", best_mode="max")
    for step in range(1, 7):
        c.save(step, state, data_state={"step": step},
               metrics={"acc": acc[step], "loss": 1.0} if step in acc else None)
    c.wait_until_finished()
    assert c.all_steps() == [4, 5, 6] and c.best_step() == 4
    c.close()
    # A new process sees the metrics on disk and keeps protecting the best.
    c = ckpt(tmp_path / "c", keep_last=2, best_metric="acc", best_mode="max")
    for step in (7, 8, 9):
        c.save(step, state, data_state={"step": step},
               metrics={"acc": acc[step]} if step in acc else None)
    c.wait_until_finished()
    assert c.all_steps() == [4, 8, 9] and c.best_step() == 4
    assert c.restore_best(state).step == 4
    assert sorted(os.listdir(tmp_path / "c")) == ["4", "8", "9"]
    c.close()


def test_best_mode_min_and_plain_keep_last(tmp_path):
    state = make_state(0)
    with ckpt(tmp_path / "m", keep_last=1, best_metric="loss", best_mode="min", keep_best=2) as c:
        for step, loss in zip(range(1, 6), (0.9, 0.3, 0.5, 0.2, 0.8)):
            c.save(step, state, data_state={}, metrics={"loss": loss})
        c.wait_until_finished()
        assert c.all_steps() == [2, 4, 5] and c.best_step() == 4
    with ckpt(tmp_path / "l", keep_last=2) as c:
        for step in range(1, 5):
            c.save(step, state, data_state={}, metrics={"acc": 1.0})
        c.wait_until_finished()
        assert c.all_steps() == [3, 4] and c.best_step() is None


# ----------------------------------------------------------------------------- atomicity

def test_incomplete_step_directory_is_never_restored(tmp_path):
    state = make_state(0)
    with ckpt(tmp_path / "c") as c:
        c.save(3, state, data_state={"step": 3})
    # What a save killed before its final rename leaves behind: a complete-looking step
    # in a temporary directory (here a copy of step 3, relabelled 9).
    tmp = tmp_path / "c" / "9.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "c" / "3", tmp)
    os.remove(tmp / "commit_success.txt")
    # A read-only reader (an evaluator next to a live run) must not touch it.
    reader = ckpt(tmp_path / "c", read_only=True)
    assert reader.restore_latest(state).step == 3
    with pytest.raises(RuntimeError, match="read_only=True"):
        reader.save(10, state, data_state={})
    reader.close()
    assert tmp.exists()
    c = ckpt(tmp_path / "c")
    assert c.latest_step() == 3 and c.restore_latest(state).step == 3
    c.save(4, state, data_state={"step": 4})  # the next save waits for the clean-up ...
    c.close()
    assert not tmp.exists()  # ... that opening the directory started


# ----------------------------------------------------------------------------- disk full

@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Every file written under tmp_path/'c' fails with ENOSPC while `on` is set."""
    on = {"value": False}
    write_text = gpath.PosixGPath.write_text

    def failing(self, *a, **k):
        if on["value"] and str(tmp_path / "c") in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *a, **k)

    monkeypatch.setattr(gpath.PosixGPath, "write_text", failing)
    return on


# orbax's failed background writers leave a callback on a closed event loop behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_raises_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, full_disk):
    state, later = make_state(0), make_state(1)
    c = ckpt(tmp_path / "c", keep_last=1)
    c.save(1, state, data_state={"step": 1})
    c.wait_until_finished()
    full_disk["value"] = True
    c.save(2, later, data_state={"step": 2})  # async: the write fails in the background
    with pytest.raises(CheckpointSaveError) as err:
        c.wait_until_finished()
    msg = str(err.value)
    assert err.value.disk_full and err.value.step == 2
    assert str(tmp_path / "c") in msg and "disk is full" in msg and "step 2" in msg
    assert "previous checkpoint (step 1) is intact" in msg
    full_disk["value"] = False
    assert c.all_steps() == [1]
    assert leaves_equal(c.restore_latest(later).state, state)
    # The failure of an async write also surfaces at the next save, naming the failed step.
    full_disk["value"] = True
    c.save(3, later, data_state={"step": 3})
    with pytest.raises(CheckpointSaveError, match="step 3"):
        c.save(4, later, data_state={"step": 4})
    full_disk["value"] = False
    assert c.latest_step() == 1
    # Once space is back, saving works again and the failed step's debris is ignored.
    assert c.save(5, later, data_state={"step": 5})
    c.close()
    assert ckpt(tmp_path / "c").restore_latest(state).step == 5


def _can_mount_tmpfs(where):
    os.makedirs(where, exist_ok=True)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True, text=True)
    return probe.returncode == 0, probe.stderr.strip()


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    """A real ENOSPC: the run trains on a 768 KiB tmpfs whose second checkpoint cannot fit."""
    mnt = str(tmp_path / "mnt")
    ok, why = _can_mount_tmpfs(mnt)
    if not ok:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {why}")
    work = f"{mnt}/run"
    # width 4096: params + Adam moments ~0.5 MiB per checkpoint; two never fit in 768 KiB.
    run = (f"mount -t tmpfs -o size=768k tmpfs {mnt} && "
           f"{sys.executable} {WORKER} {work} --steps 3 --width 4096 --keep-last 1 "
           f"2>{tmp_path}/err.txt; echo RC=$?; "
           f"{sys.executable} {WORKER} {work} --width 4096 --check-only 2>{tmp_path}/err2.txt")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", run],
                         capture_output=True, text=True, timeout=120, env=_worker_env())
    err = open(f"{tmp_path}/err.txt").read()
    assert "RC=1" in out.stdout, out.stdout + err[-3000:]
    assert "CheckpointSaveError" in err and "disk is full" in err and work in err, err[-3000:]
    assert "SAVED 1" in out.stdout and "LATEST 1" in out.stdout and "STATE_STEP 1" in out.stdout


# ----------------------------------------------------------------------------- compatibility

def test_mismatch_lists_every_difference(tmp_path):
    with ckpt(tmp_path / "c") as c:
        c.save(1, make_state(0), data_state={})
    tasks = [{"name": "a", "kind": "classification", "num_labels": 3},
             {"name": "c", "kind": "regression", "num_labels": 0}]
    c = ckpt(tmp_path / "c", tasks=tasks, sig={"hidden_size": 16, "num_layers": 1, "act": "gelu"})
    with pytest.raises(CheckpointMismatchError) as err:
        c.restore_latest(make_state(0, tasks=("a", "c")))
    msg = str(err.value)
    assert str(tmp_path / "c" / "1") in msg
    assert "hidden_size: checkpoint 8, this run 16" in msg
    assert "act: checkpoint <absent>, this run gelu" in msg
    assert "tasks added (in this run, not in the checkpoint): ['c']" in msg
    assert "tasks removed (in the checkpoint, not in this run): ['b']" in msg
    assert "task 'a' changed head: num_labels checkpoint 2, this run 3" in msg
    c.close()


def test_reordered_tasks_are_refused(tmp_path):
    saved = {"tasks": normalize_tasks(TASKS), "signature": SIG}
    current = {"tasks": normalize_tasks(TASKS[::-1]), "signature": SIG}
    diff = compare_model_spec(saved, current)
    assert diff.reordered == (("a", "b"), ("b", "a")) and not diff.added and not diff.removed
    assert not compare_model_spec(saved, saved)
    with ckpt(tmp_path / "c") as c:
        c.save(1, make_state(0), data_state={})
    with ckpt(tmp_path / "c", tasks=TASKS[::-1]) as c:
        for kw in ({}, {"allow_new_tasks": True, "allow_removed_tasks": True}):
            with pytest.raises(CheckpointMismatchError,
                               match=r"task order changed .* checkpoint \['a', 'b'\], this run \['b', 'a'\]"):
                c.restore_latest(make_state(0), **kw)


def test_a_checkpoint_not_written_by_mtlx_is_refused(tmp_path):
    import orbax.checkpoint as ocp
    items = ("state", "data_state", "run_config", "model")
    with ocp.CheckpointManager(tmp_path / "c", item_names=items) as mgr:
        mgr.save(1, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": jnp.ones(2)}), data_state=ocp.args.JsonSave({}),
            run_config=ocp.args.JsonSave({}), model=ocp.args.JsonSave({"other": 1})))
    with ckpt(tmp_path / "c") as c, pytest.raises(CheckpointMismatchError, match="not a checkpoint written by mtlx"):
        c.restore_latest({"w": jnp.ones(2)})


def test_allow_new_tasks_restores_old_params_and_initialises_new_ones(tmp_path):
    old = make_state(0, tasks=("a", "b"))
    with ckpt(tmp_path / "c") as c:
        c.save(5, old, data_state={"step": 5})
    tasks = TASKS + [{"name": "c", "kind": "classification", "num_labels": 2}]
    fresh = make_state(7, tasks=("a", "b", "c"))
    c = ckpt(tmp_path / "c", tasks=tasks)
    with pytest.raises(CheckpointMismatchError, match="allow_new_tasks=True"):
        c.restore_latest(fresh)
    r = c.restore_latest(fresh, allow_new_tasks=True)
    got = r.state
    for t in ("a", "b"):  # old tasks: the checkpoint's values, in params and Adam moments
        assert leaves_equal(got.params["heads"][t], old.params["heads"][t])
        assert leaves_equal(got.params["adapters"]["layer_0"][t], old.params["adapters"]["layer_0"][t])
        assert leaves_equal(got.opt_state[0].mu["heads"][t], old.opt_state[0].mu["heads"][t])
    assert leaves_equal(got.params["backbone"], old.params["backbone"])
    assert leaves_equal((got.step, got.rng, got.opt_state[0].count),
                        (old.step, old.rng, old.opt_state[0].count))
    # New task: the fresh init, everywhere its name appears.
    assert leaves_equal(got.params["heads"]["c"], fresh.params["heads"]["c"])
    assert leaves_equal(got.params["adapters"]["layer_0"]["c"], fresh.params["adapters"]["layer_0"]["c"])
    assert leaves_equal(got.opt_state[0].nu["heads"]["c"], fresh.opt_state[0].nu["heads"]["c"])
    # A per-task vector of the weighting state changed shape [2] -> [3]: re-initialised, reported.
    assert leaves_equal(got.weighting["log_vars"], fresh.weighting["log_vars"])
    assert "weighting.log_vars" in r.fresh_paths and "params.heads.c.kernel" in r.fresh_paths
    assert not any(".a." in p or ".b." in p for p in r.fresh_paths)
    assert jax.tree.structure(got) == jax.tree.structure(fresh)
    # New tasks need concrete initial values: an abstract target is refused there.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                            if isinstance(x, jax.Array) else x, fresh)
    with pytest.raises(CheckpointMismatchError, match="target is abstract"):
        c.restore_latest(abstract, allow_new_tasks=True)
    c.close()


def test_removed_tasks_need_their_own_flag(tmp_path):
    old = make_state(0, tasks=("a", "b"))
    with ckpt(tmp_path / "c") as c:
        c.save(5, old, data_state={})
    c = ckpt(tmp_path / "c", tasks=TASKS[:1])
    target = make_state(3, tasks=("a",))
    for kw in ({}, {"allow_new_tasks": True}):
        with pytest.raises(CheckpointMismatchError, match="allow_removed_tasks=True"):
            c.restore_latest(target, **kw)
    r = c.restore_latest(target, allow_removed_tasks=True)
    got = r.state
    assert "b" not in got.params["heads"] and "b" not in got.opt_state[0].mu["heads"]
    assert leaves_equal(got.params["heads"]["a"], old.params["heads"]["a"])
    assert list(got.opt_state[0].nu["adapters"]["layer_0"]) == ["a"]
    assert leaves_equal(got.opt_state[0].nu["adapters"]["layer_0"]["a"],
                        old.opt_state[0].nu["adapters"]["layer_0"]["a"])
    # log_vars [2] -> [1]: which position survives is unknowable, so it starts fresh.
    assert r.fresh_paths == ("weighting.log_vars",)
    assert leaves_equal(got.weighting["log_vars"], target.weighting["log_vars"])
    c.close()


def test_state_structure_change_is_named(tmp_path):
    with ckpt(tmp_path / "c") as c:
        c.save(1, {"w": jnp.ones(3), "gone": jnp.ones(1)}, data_state={})
    with ckpt(tmp_path / "c") as c, pytest.raises(CheckpointMismatchError, match="structure"):
        c.restore_latest({"w": jnp.ones(3), "extra": jnp.ones(2)})
    # The same when tasks are added: leaves outside any new task must match by name.
    with ckpt(tmp_path / "c", tasks=TASKS + ["c"]) as c:
        with pytest.raises(CheckpointMismatchError) as err:
            c.restore_latest({"w": jnp.ones(3), "extra": jnp.ones(2),
                              "heads": {"c": jnp.ones(2)}}, allow_new_tasks=True)
    msg = str(err.value)
    assert "not in the checkpoint: ['extra']" in msg and "in the checkpoint only: ['gone']" in msg


# ----------------------------------------------------------------------------- bad input

def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        ckpt(tmp_path / "x", keep_last=0)
    with pytest.raises(ValueError, match="best_mode"):
        ckpt(tmp_path / "x", best_mode="largest")
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        ckpt(tmp_path / "x", tasks=["a", "a"])
    with pytest.raises(ValueError, match="keep_best"):
        ckpt(tmp_path / "x", best_metric="acc", keep_best=0)
    with pytest.raises(TypeError, match="model_signature.act"):
        ckpt(tmp_path / "x", sig={"act": jnp.tanh})
    with pytest.raises(TypeError, match="model_signature.layers: key 0 is a int"):
        ckpt(tmp_path / "x", sig={"layers": {0: "dense"}})
    with pytest.raises(TypeError, match=r"tasks\[1\]: expected a TaskHead"):
        ckpt(tmp_path / "x", tasks=["a", 3])
    with pytest.raises(ValueError, match=r"tasks\[0\]: a task needs a non-empty str 'name'"):
        ckpt(tmp_path / "x", tasks=[{"kind": "regression"}])
    c = ckpt(tmp_path / "x", best_metric="acc")
    state = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="state leaf opt.name: a str cannot be checkpointed"):
        c.save(1, {"w": jnp.ones(2), "opt": {"name": "adam"}}, data_state={})
    with pytest.raises(TypeError, match=r"data_state.order.*ndarray"):
        c.save(1, state, data_state={"order": np.arange(3)})
    with pytest.raises(KeyError, match="best_metric 'acc'"):
        c.save(1, state, data_state={}, metrics={"loss": 1.0})
    with pytest.raises(ValueError, match="not a finite number"):
        c.save(1, state, data_state={}, metrics={"acc": float("nan")})
    assert c.all_steps() == []
    c.close()


# ----------------------------------------------------------------------------- preemption

def test_preemption_handler_sets_the_flag_and_uninstalls():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    flag = install_preemption_handler(callback=seen.append)
    try:
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if flag.is_set():
                break
            time.sleep(0.01)
        assert flag.is_set() and flag.signum == signal.SIGTERM and seen == [signal.SIGTERM]
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_handler_outside_the_main_thread_is_refused():
    import threading
    errors = []
    t = threading.Thread(target=lambda: errors.append(_raises(install_preemption_handler)))
    t.start()
    t.join()
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


# ----------------------------------------------------------------------------- subprocess runs

STEPS = 16


def _worker_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(workdir, *extra, timeout=120):
    out = subprocess.run([sys.executable, WORKER, str(workdir), "--steps", str(STEPS), *extra],
                         capture_output=True, text=True, timeout=timeout, env=_worker_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    stdout = _run(d / "work", "--out", str(d / "final.npz"))
    assert "FRESH" in stdout and f"DONE {STEPS}" in stdout
    return dict(np.load(d / "final.npz"))


def _assert_same_final(npz_path, reference):
    got = dict(np.load(npz_path))
    assert sorted(got) == sorted(reference)
    assert any("mu" in k for k in got) and any("nu" in k for k in got)  # Adam moments compared
    for k in reference:
        assert got[k].dtype == reference[k].dtype, k
        assert np.array_equal(got[k], reference[k]), f"{k} differs after resume"


def _finalized_and_tmp(workdir):
    names = os.listdir(workdir) if os.path.isdir(workdir) else []
    return (sorted(int(n) for n in names if n.isdigit()),
            [n for n in names if "orbax-checkpoint-tmp" in n])


def _kill_at(workdir, marker, count, delay, slow_io):
    """Starts the worker, SIGKILLs it `delay` s after the `count`-th `marker` line."""
    err = open(os.path.join(os.path.dirname(workdir), "stderr.txt"), "a")
    p = subprocess.Popen([sys.executable, WORKER, workdir, "--steps", str(STEPS),
                          "--slow-io", str(slow_io)],
                         stdout=subprocess.PIPE, stderr=err, text=True, env=_worker_env())
    lines, seen, deadline = [], 0, time.time() + 90
    try:
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith(marker):
                seen += 1
                if seen == count:
                    time.sleep(delay)
                    break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        err.close()
    assert seen == count and not any(l.startswith("DONE") for l in lines), lines
    return lines


def test_sigkill_resume_is_bit_identical(tmp_path, reference):
    workdir = str(tmp_path / "work")
    rnd = random.Random(20240611)
    slow_io = 0.02
    # (marker, how many, delay after it): right after an async save returned (its files are
    # being written), around the start of a save, at an arbitrary time, at random.
    plan = [("SAVED", rnd.randint(2, 4), 0.0), ("SAVING", rnd.randint(2, 4), rnd.uniform(0, 0.05)),
            ("STEP", 1, rnd.uniform(0.3, 0.8)), ("SAVED", rnd.randint(1, 3), rnd.uniform(0, 0.1))]
    killed_mid_save, expect = 0, None
    for marker, count, delay in plan:
        lines = _kill_at(workdir, marker, count, delay, slow_io)
        assert lines[0] == ("FRESH" if expect is None else f"RESUMED {expect}"), lines[:2]
        finalized, tmp = _finalized_and_tmp(workdir)
        killed_mid_save += bool(tmp)
        expect = finalized[-1] if finalized else None
    assert killed_mid_save >= 1, "no kill landed during a save; the test lost its point"
    stdout = _run(workdir, "--out", str(tmp_path / "final.npz"), "--slow-io", str(slow_io))
    assert stdout.splitlines()[0] == f"RESUMED {expect}"
    _assert_same_final(tmp_path / "final.npz", reference)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, reference):
    workdir = str(tmp_path / "work")
    p = subprocess.Popen([sys.executable, WORKER, workdir, "--steps", str(STEPS),
                          "--save-every", "1000", "--step-sleep", "0.05"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_worker_env())
    for line in p.stdout:
        if line.startswith("STEP 5"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    preempted = [l for l in out.splitlines() if l.startswith("PREEMPTED")]
    assert preempted, out
    k = int(preempted[0].split()[1])
    assert 5 <= k < STEPS and _finalized_and_tmp(workdir) == ([k], [])
    stdout = _run(workdir, "--out", str(tmp_path / "final.npz"), "--save-every", "1000")
    assert stdout.splitlines()[0] == f"RESUMED {k}"
    _assert_same_final(tmp_path / "final.npz", reference)


def test_an_extensions_copy_of_the_task_list_is_not_part_of_the_signature():
    """A PEFT extension's repr held the model's task names, so adding a task changed the
    signature and every PEFT run refused `allow_new_tasks`; older checkpoints stored it."""
    old = {"tasks": normalize_tasks(TASKS), "signature": {"extensions": [
        "Adapter(task_names=('a', 'b'), tasks=None, reduction_factor=4)"]}}
    new = {"tasks": normalize_tasks(TASKS + [{"name": "c", "kind": "classification", "num_labels": 2}]), "signature": {
        "extensions": ["Adapter(tasks=None, reduction_factor=4)"]}}
    diff = compare_model_spec(old, new)
    assert not diff.signature and diff.added == ("c",)
    other = {"tasks": new["tasks"], "signature": {"extensions": ["Adapter(tasks=None, reduction_factor=8)"]}}
    assert compare_model_spec(old, other).signature  # a real difference still counts


def test_scores_taken_under_another_task_set_do_not_compete(tmp_path):
    """Before tasks were added, 'avg' averaged other tasks (and the untrained new task lowers
    it after): such a checkpoint neither counts as 'best' nor is kept as one."""
    with ckpt(tmp_path / "c", keep_last=1, best_metric="avg") as c:
        c.save(1, make_state(0), data_state={}, metrics={"avg": 0.9})
    more = TASKS + [{"name": "c", "kind": "classification", "num_labels": 2}]
    with ckpt(tmp_path / "c", tasks=more, keep_last=1, best_metric="avg") as c:
        assert c.best_step() is None  # the only ranked step was taken with tasks a, b
        c.save(2, make_state(1), data_state={}, metrics={"avg": 0.5})
        c.wait_until_finished()
        assert c.best_step() == 2 and c.all_steps() == [2]
        assert c.metrics(2)["_tasks"] == ["a", "b", "c"]
