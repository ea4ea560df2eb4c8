"""scripts/gpu_check.sh's own logic, run on the CPU (MTLX_GPU_CHECK_CPU=1: tiny sizes, the same
steps): every step runs and writes its files; a run stopped at GPU_CHECK_LIMIT_S ends on time
with what it finished. Heavy: minutes of CPU (`.ci/run --heavy`)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.heavy


def _run(out: Path, **env):
    e = dict(os.environ, MTLX_GPU_CHECK_CPU="1", **env)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=e,
                          capture_output=True, text=True, timeout=900)
    return proc, time.monotonic() - t0


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    proc, _ = _run(tmp_path, GPU_CHECK_CELLS="shared/tiny/32/1/4;shared/tiny/32/4/4",
                   GPU_CHECK_FEATURES="none", GPU_CHECK_PROFILE_S="60")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("env.txt", "checks.json", "bench.json", "bench.md", "bench_tasks.png",
                 "profile.txt", "log.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert [c["status"] for c in checks] == ["pass", "pass", "skipped"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert "partial" not in bench and len(bench["cells"]) == 2
    assert bench["task_scaling"] and "real_lengths" in bench and "packing" in bench
    assert "op kind" in (tmp_path / "profile.txt").read_text()
    assert "profile exit 0" in (tmp_path / "log.txt").read_text()


def test_gpu_check_stopped_at_its_limit_ends_on_time(tmp_path):
    limit = 70
    proc, wall = _run(tmp_path, GPU_CHECK_LIMIT_S=str(limit), GPU_CHECK_PROFILE_S="0")
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 124, log[-3000:]
    assert "benchmark stopped at the time limit" in log
    assert wall < limit + 45          # the limit, plus rendering what finished
    if (tmp_path / "bench.json").exists():   # a phase finished before the stop
        bench = json.loads((tmp_path / "bench.json").read_text())
        assert bench["partial"] is True
        assert "PARTIAL" in (tmp_path / "bench.md").read_text()


def test_gpu_profile_runs_its_variants_on_cpu(tmp_path):
    """scripts/gpu_profile.sh (the lease's profile of switch variants) in its CPU logic-test
    mode: XLA's attention and float32 there, each variant's Features overrides parsed, the
    summary and the HLO archive written."""
    import tarfile
    e = dict(os.environ, MTLX_GPU_CHECK_CPU="1",
             GPU_PROFILE_VARIANTS="shared/tiny/32/1/4;adapters/tiny/32/4/4:stack_state=on")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_profile.sh"), str(tmp_path)], env=e,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-3000:]
    summary = log.split("\nsummary")[1]
    assert "shared/tiny/32/1/4 " in summary and "adapters/tiny/32/4/4:stack_state=on" in summary
    assert "FAILED" not in summary and "stack_state=on)" in log
    with tarfile.open(tmp_path / "hlo.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith(".hlo.txt.gz")]) == 2
