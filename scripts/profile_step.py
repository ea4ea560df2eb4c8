"""Where the time of one benchmark cell's compiled train step goes, on this machine.

    python scripts/profile_step.py --cell adapters/base/128/8/4          # op kinds of the step
    python scripts/profile_step.py --matmul                              # jnp.dot vs torch.mm
    python scripts/profile_step.py --cell shared/base/128/1/128 --dtype bfloat16 --attention cudnn
                                                                  # a GPU cell (gpu_check.sh)
    python scripts/profile_step.py --dtype bfloat16 --attention cudnn \
        --cell shared/base/128/1/128 --cell shared/base/128/1/128:prng=rbg   # variants, summarised

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


# GPU kernels by what they do, from their names (cuBLAS/cuBLASLt/Triton products, cuDNN's
# fused attention, XLA's own fusions): a coarse view of where a GPU step's time goes.
GPU_CATEGORIES = (
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|sm90_|sm80_|wgmma|triton_dot|__triton"),
    ("attention (cuDNN)", r"cudnn|fmha|sdpa|flash"),
    ("copy / transpose", r"^copy|transpose|memcpy|memset|^wrapped_copy|^dynamic_update"),
    ("reduction fusions", r"reduce|^input_|row_reduction|softmax"),
    ("elementwise fusions", r"fusion|^loop_|^wrapped_"),
)


def categorize(name: str) -> str:
    for cat, pattern in GPU_CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def profile_cell(text: str, steps: int, top: int, dtype: str = "float32",
                 attention: str = "default", frozen_dtype=None, hlo_dir=None) -> dict:
    """Builds the cell (with its ':field=value' Features overrides), times untraced steps,
    then traces `steps` steps and sums the traced ops by kind (and on a GPU by category, with
    the share of the untraced step its kernels cover). Returns the figures."""
    import jax
    import numpy as np
    from jax._src.lib import _profile_data
    from mtlx.bench import peaks as PK
    from mtlx.bench import workload as W
    cell, _ = W.parse_variant(text, W.features_for(dtype, attention, frozen_dtype=frozen_dtype),
                              "scripts/profile_step.py")
    features = cell.features
    setup = W.build_mtlx(cell, num_batches=2)
    state = setup.state
    setup.state = None
    t0 = time.perf_counter()
    state, m = setup.step(state, setup.batches[0])
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    if hlo_dir:
        import gzip
        text_hlo = setup.step.lower(state, setup.batches[0]).compile().as_text()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") + ".hlo.txt.gz"
        os.makedirs(hlo_dir, exist_ok=True)
        with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
            f.write(text_hlo)
    state, m = setup.step(state, setup.batches[1])
    jax.block_until_ready(m)
    # Untraced step time: blocks of steps (at least 0.5 s each), median of 3.
    n = 1
    while True:
        t0 = time.perf_counter()
        for i in range(n):
            state, m = setup.step(state, setup.batches[i % 2])
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
        if dt >= 0.5 or n >= 256:
            break
        n *= 2
    blocks = [dt / n]
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(n):
            state, m = setup.step(state, setup.batches[i % 2])
        jax.block_until_ready(m)
        blocks.append((time.perf_counter() - t0) / n)
    step_s = float(np.median(blocks))
    flops = float(setup.flops.train)
    peak = PK.datasheet_peak(jax.devices()[0].device_kind, features.dtype)
    mfu = flops / step_s / peak.flops_per_s if peak else None
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
    cats = collections.Counter()
    intervals = []
    gpu = jax.devices()[0].platform == "gpu"
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
                if gpu:
                    cats[categorize(k)] += ev.duration_ns
                    intervals.append((ev.start_ns, ev.end_ns))
    total = sum(kinds.values())
    busy = None
    if intervals:
        intervals.sort()
        covered, (lo, hi) = 0, intervals[0]
        for a, e in intervals[1:]:
            if a > hi:
                covered, lo, hi = covered + hi - lo, a, e
            else:
                hi = max(hi, e)
        covered += hi - lo
        # Kernel time (union over streams) against the UNTRACED step: tracing slows the host,
        # so the traced wall time says little about idle gaps in a normal run.
        busy = covered / 1e9 / steps / step_s
    print(f"\n{text} ({features.describe()})")
    print(f"  first call (compile + step) {first_s:.1f} s; step {1e3 * step_s:.2f} ms untraced "
          f"(median of 3 blocks of {n}); {cell.batch_size / step_s:,.0f} ex/s; model FLOPs "
          f"{flops / 1e12:.2f} T/step" + (f"; MFU {100 * mfu:.1f}% of {peak.flops_per_s / 1e12:.0f} "
                                         f"TFLOP/s ({peak.source})" if mfu else ""))
    print(f"  {steps} traced steps: {1e3 * wall:.1f} ms/step wall, op time {total / 1e6 / steps:.1f} "
          f"ms/step over all worker threads (on a GPU: its streams' kernels)"
          + (f"; kernels cover {100 * busy:.0f}% of the untraced step" if busy is not None else ""))
    if cats:
        print(f"  {'category':28s} {'ms/step':>9s} {'share':>7s}")
        for k, v in cats.most_common():
            print(f"  {k:28s} {v / 1e6 / steps:9.2f} {100 * v / max(total, 1):6.1f}%")
    print(f"  {'op kind':60s} {'ms/step':>9s} {'share':>7s} {'ops/step':>9s}")
    for k, v in kinds.most_common(top):
        print(f"  {k[:60]:60s} {v / 1e6 / steps:9.3f} {100 * v / max(total, 1):6.1f}% "
              f"{counts[k] / steps:9.0f}")
    del state, m, setup
    return {"variant": text, "step_ms": 1e3 * step_s, "mfu": mfu, "first_s": first_s,
            "busy": busy, "categories_ms": {k: v / 1e6 / steps for k, v in cats.items()}}


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
    p.add_argument("--cell", action="append", default=None,
                   help="config/size/L/T/B[:field=value,...] (Features overrides, e.g. "
                        "shared/base/128/1/128:prng=rbg,hidden_dropout=0); repeatable: the "
                        "variants are built one after another in this process and summarised")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="default", choices=("default", "xla", "cudnn"))
    p.add_argument("--frozen-dtype", default=None, choices=("bfloat16",),
                   help="store frozen kernels in this dtype (= --dtype; config.model.frozen_dtype)")
    p.add_argument("--matmul", action="store_true")
    p.add_argument("--hlo-dir", default=None,
                   help="write each variant's compiled step (HLO text, gzipped) into this folder")
    args = p.parse_args(argv)
    if not args.cell and not args.matmul:
        p.error("give --cell and/or --matmul")
    if args.matmul:
        matmul()
    rows = []
    for cell in args.cell or ():
        try:
            rows.append(profile_cell(cell, args.steps, args.top, args.dtype, args.attention,
                                     args.frozen_dtype, args.hlo_dir))
        except Exception as e:  # noqa: BLE001 - one variant's failure leaves the others
            import traceback
            traceback.print_exc()
            rows.append({"variant": cell, "error": f"{type(e).__name__}: {e}"[:300]})
        sys.stdout.flush()
    if len(rows) > 1:
        print("\nsummary (step time untraced; ratio = first variant's step / this one's)")
        ref = rows[0].get("step_ms")
        for r in rows:
            if "error" in r:
                print(f"  {r['variant']:55s} FAILED {r['error']}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            busy = f"{100 * r['busy']:.0f}%" if r["busy"] is not None else "n/a"
            ratio = f"{ref / r['step_ms']:.3f}x" if ref else "n/a"
            print(f"  {r['variant']:55s} {r['step_ms']:8.2f} ms  MFU {mfu:>6s}  busy {busy:>4s}  "
                  f"{ratio}  first call {r['first_s']:.0f} s")
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
