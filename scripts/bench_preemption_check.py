"""What the multi-process preemption check costs a step: two-process runs of the demo config
(gloo collectives, one CPU device a process, tests/mh_loop_worker.py) with JAX's preemption
sync manager (mtlx.train.checkpoint.PreemptionWatch 'sync_manager', the default) against the
all-gather of a flag after every step (JAX_ENABLE_PREEMPTION_SERVICE=false), alternated
(ABBAAB); a run's steps/s is the median of metrics.jsonl's logged intervals after the first
(which holds the compilation).

    python scripts/bench_preemption_check.py [STEPS]      # default 200 steps a run
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(service: bool, steps: int, tmp: Path) -> float:
    """One two-process run; its median steps/s."""
    from tests.test_remote_paths import _two_process_config
    cfg = Path(_two_process_config(tmp, steps, every=10_000))
    cfg.write_text(cfg.read_text().replace("    return c\n", "    c.log_every = 25\n    return c\n"))
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               JAX_ENABLE_PREEMPTION_SERVICE="true" if service else "false")
    env.pop("XLA_FLAGS", None)
    wd, port = tmp / "run", str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "mh_loop_worker.py"), port,
                               str(i), str(cfg), str(wd), str(tmp / "results.json")],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("a worker failed (run tests/test_remote_paths.py -k preempted for its log)")
    lines = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(wd)
    return statistics.median([x["perf/steps_per_s"] for x in lines if "perf/steps_per_s" in x][1:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    steps = int(argv[0]) if argv else 200
    res = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        for service in (True, False, False, True, True, False):
            res[service].append(run(service, steps, Path(d)))
            print(f"{'sync manager' if service else 'all-gather':12s} {res[service][-1]:.2f} steps/s",
                  flush=True)
    on, off = statistics.median(res[True]), statistics.median(res[False])
    print(f"median steps/s: sync manager {on:.2f}, all-gather {off:.2f}: {on / off:.3f}x")


if __name__ == "__main__":
    main()
