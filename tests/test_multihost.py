"""Two local processes (gloo CPU collectives) train like one process."""
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtlx.train import distributed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_workers(script: str, argv, timeout: float):
    """Runs tests/<script> as processes 0 and 1 of a 2-process run (argv(port, i) -> its
    arguments), one host device each; fails with both logs unless both exit 0."""
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    # Logs go to files, not pipes: a pipe read after the other process's would fill up and
    # block that process's writes while its peer waits for it in a collective.
    logs = [tempfile.TemporaryFile() for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / script)] + argv(port, i),
                              env=env, cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise
    finally:
        text = []
        for f in logs:
            f.seek(0)
            text.append(f.read().decode(errors="replace")[-3000:])
            f.close()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(text)


@pytest.mark.parametrize("stack", [False, True], ids=["leaves", "stacked"])
def test_two_processes_match_single_process(tmp_path, stack):
    """stacked: the state's small leaves cross the jit boundary stacked (mtlx.train.stacking),
    the stacks sharded over the global mesh like their leaves."""
    from tests.test_sharding import run
    ref_params, _, _ = run(None)
    out = tmp_path / "params.npz"
    run_two_workers("mh_worker.py", lambda port, i: [port, str(i), str(out)] + (["stack"] if stack else []),
                    timeout=300)
    got = np.load(out)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ref_params)}
    assert set(got.files) == set(flat)
    for k, v in flat.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.mark.heavy
def test_two_process_run_evaluates_text_to_text_tasks_like_one(tmp_path, t5_tok_dir):
    """The whole loop on two processes: a T5 run with text-to-text tasks (config.text_to_text)
    trains, generates each process's rows of every eval batch, gathers them and scores the
    texts as the single-process run does."""
    import json
    from mtlx.train.config import load_config
    from mtlx.train.loop import train_and_evaluate
    from tests.conftest import write_t5_text_to_text_config
    # Several processes need one length bucket (mtlx.data.pipeline): both runs get it. A zero
    # learning rate keeps both runs' parameters equal through the steps (Adam turns the
    # all-reduce's rounding into 1e-3 differences otherwise), so the evaluations must agree
    # to float rounding: the same rows generated, gathered and scored.
    config = write_t5_text_to_text_config(tmp_path / "config.py", t5_tok_dir,
                                          extra=["c.data.buckets = (c.data.max_length,)",
                                                 "c.optim.learning_rate = 0.0",
                                                 "c.weighting.report.lookahead_lr = 1e-3"])
    single = train_and_evaluate(load_config(str(config)), tmp_path / "one", progress=False)
    out = tmp_path / "two.json"
    run_two_workers("mh_loop_worker.py",
                    lambda port, i: [port, str(i), str(config), str(tmp_path / "two"), str(out)],
                    timeout=900)
    two = json.loads(out.read_text())
    assert set(two) == set(single) == {"rte", "stsb"}
    for task, metrics in single.items():
        assert set(two[task]) == set(metrics)
        for name, value in metrics.items():
            # (an untrained tiny T5 may generate one constant text for STS-B: its correlations
            # are NaN on both sides)
            assert two[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), \
                (task, name, two[task][name], value)
    # the runs generated and scored text: RTE's accuracy is a share of its dev examples
    assert 0.0 <= single["rte"]["accuracy"] <= 1.0 and np.isfinite(single["rte"]["loss"])


def test_process_slices_are_disjoint_and_cover():
    rows = [np.arange(32)[distributed.process_slice(32, p, 4)] for p in range(4)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(32))
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by the 4 processes"):
        distributed.process_slice(30, 0, 4)


def test_coordinator_without_process_count_is_an_error(monkeypatch):
    import ml_collections
    for k in ("MTLX_NUM_PROCESSES", "MTLX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="config.num_processes"):
        distributed.initialize(ml_collections.ConfigDict({"coordinator_address": "127.0.0.1:1"}))
    with pytest.raises(ValueError, match="config.distributed must be"):
        distributed.initialize(ml_collections.ConfigDict({"distributed": "yes"}))
