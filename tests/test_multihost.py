"""Two local processes (gloo CPU collectives) train like one process."""
import os
import socket
import subprocess
import sys
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


def test_two_processes_match_single_process(tmp_path):
    from tests.test_sharding import run
    ref_params, _, _ = run(None)
    out = tmp_path / "params.npz"
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "mh_worker.py"), port, str(i), str(out)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode()[-3000:])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)
    got = np.load(out)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ref_params)}
    assert set(got.files) == set(flat)
    for k, v in flat.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5, err_msg=k)


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
