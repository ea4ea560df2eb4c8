"""Where the time of one benchmark cell's compiled train step goes, on this machine.

    python scripts/profile_step.py --cell adapters/base/128/8/4          # op kinds of the step
    python scripts/profile_step.py --matmul                              # jnp.dot vs torch.mm
    python scripts/profile_step.py --cell shared/base/128/1/128 --dtype bfloat16 --attention cudnn
                                                                  # a GPU cell (gpu_check.sh)

--cell: builds the cell's step exactly as scripts/bench.py does (mtlx.bench.workload), warms it
up, traces `--steps` steps with `jax.profiler`, and sums the traced XLA ops by kind (the op name
without its numeric suffix: 'ynn_fusion' = dot fusions on XLA:CPU, 'copy', 'while', ...), as a
share of all op time. Op time is summed over the runtime's worker threads, so it can exceed wall
time.

--matmul: float32 products of BERT-base shapes (tokens x 768 x 768, x 3072, ...) with jax.jit
(jnp.dot) and torch.mm at the same thread count, best of 10: is a gap in the kernels or around
them?
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_cell(text: str, steps: int, top: int, dtype: str = "float32",
                 attention: str = "default", frozen_dtype=None) -> None:
    import jax
    from jax._src.lib import _profile_data
    from mtlx.bench import workload as W
    parts = text.split("/")
    if len(parts) != 5:
        raise SystemExit(f"scripts/profile_step.py: --cell {text!r} must be config/size/L/T/B")
    c, s, l, t, b = parts
    features = W.features_for(dtype, attention, frozen_dtype=frozen_dtype)
    setup = W.build_mtlx(W.Cell(c, s, int(l), int(t), int(b), features), num_batches=2)
    state = setup.state
    for i in range(2):
        state, m = setup.step(state, setup.batches[i % 2])
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        jax.profiler.start_trace(d)
        for i in range(steps):
            state, m = setup.step(state, setup.batches[i % 2])
        jax.block_until_ready(m)
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - t0) / steps
        trace = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
        data = _profile_data.ProfileData.from_file(trace)
    kinds, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            # XLA's worker threads (tf_XLAEigen on CPU; a GPU's stream lines elsewhere).
            if not (line.name.startswith("tf_XLAEigen") or "Stream" in line.name):
                continue
            for ev in line.events:
                if "ThunkExecutor" in ev.name or ev.name.startswith("end: "):
                    continue
                k = re.sub(r"\.\d+$", "", ev.name)
                kinds[k] += ev.duration_ns
                counts[k] += 1
    total = sum(kinds.values())
    print(f"{text} ({features.describe()}): {steps} traced steps, {1e3 * wall:.1f} ms/step "
          f"wall (traced), op time {total / 1e6 / steps:.1f} ms/step over all worker threads "
          f"(on a GPU: its streams' kernels)")
    print(f"{'op kind':40s} {'ms/step':>9s} {'share':>7s} {'ops/step':>9s}")
    for k, v in kinds.most_common(top):
        print(f"{k[:40]:40s} {v / 1e6 / steps:9.1f} {100 * v / max(total, 1):6.1f}% "
              f"{counts[k] / steps:9.0f}")


def matmul() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    def best(fn, n=10):
        fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    dot = jax.jit(jnp.dot)
    print(f"float32 products, best of 10; torch threads {threads}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    for m, k, n in ((512, 768, 768), (512, 768, 3072), (512, 3072, 768), (768, 512, 768),
                    (2048, 2048, 2048)):
        a = np.random.rand(m, k).astype(np.float32)
        b = np.random.rand(k, n).astype(np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        g = 2 * m * k * n / 1e9
        tj = best(lambda: dot(ja, jb).block_until_ready())
        tt = best(lambda: torch.mm(ta, tb))
        print(f"{m}x{k}x{n}: jax {g / tj:6.0f} GFLOP/s   torch {g / tt:6.0f} GFLOP/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default=None, help="config/size/L/T/B, e.g. adapters/base/128/8/4")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="default", choices=("default", "xla", "cudnn"))
    p.add_argument("--frozen-dtype", default=None, choices=("bfloat16",),
                   help="store frozen kernels in this dtype (= --dtype; config.model.frozen_dtype)")
    p.add_argument("--matmul", action="store_true")
    args = p.parse_args(argv)
    if not args.cell and not args.matmul:
        p.error("give --cell and/or --matmul")
    if args.matmul:
        matmul()
    if args.cell:
        profile_cell(args.cell, args.steps, args.top, args.dtype, args.attention,
                     args.frozen_dtype)


if __name__ == "__main__":
    main()
