"""Interleaved A/B of one throughput switch on one benchmark cell: the mtlx step built twice,
differing only in one `mtlx.bench.workload.Features` field, timed in ABBA blocks in one process
(scripts/bench.py's features phase times every switch at once; this times the one in question
with more repeats).

    python scripts/ab_features.py dropout_draws hash16 bernoulli
    python scripts/ab_features.py activation_vjp saved_input autodiff --cell shared/base/128/1/8
    python scripts/ab_features.py prng threefry2x32 rbg --dtype float32 --repeats 9

Prints each side's per-step times, their medians, and B's median over A's (> 1: A is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("field", help="a Features field (dropout_draws, activation_vjp, prng, ...)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--cell", default="adapters/base/128/8/4",
                   help="config/size/L/T/B[:field=value,...] (other Features fields, the same on "
                        "both sides, e.g. adapters/tiny/128/64/16:optimizer=adafactor)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="default", choices=("default", "xla", "cudnn"))
    p.add_argument("--frozen-dtype", default="auto",
                   help="'auto': the compute dtype when it is bf16 and the backbone is frozen")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--block-seconds", type=float, default=2.0)
    args = p.parse_args(argv)

    import numpy as np
    from mtlx.bench import harness as HR
    from mtlx.bench import workload as W
    c = args.cell.partition("/")[0]
    frozen = args.frozen_dtype
    if frozen == "auto":
        frozen = "bfloat16" if args.dtype == "bfloat16" and not W.BACKBONE_TRAINS.get(c, True) else None
    base_cell, _ = W.parse_variant(args.cell, W.features_for(args.dtype, args.attention,
                                                             frozen_dtype=frozen or None),
                                   "scripts/ab_features.py")
    base = base_cell.features
    fields = {f.name: f for f in dataclasses.fields(base)}
    if args.field not in fields:
        raise SystemExit(f"scripts/ab_features.py: unknown Features field {args.field!r}; "
                         f"known: {sorted(fields)}")

    opts = HR.Options(repeats=args.repeats, steps=0, block_seconds=args.block_seconds, warmup=1,
                      baseline_modes=(), verbose=False)
    runners, compile_s = [], {}
    for side in (args.a, args.b):
        cell = dataclasses.replace(base_cell, features=dataclasses.replace(
            base, **{args.field: W.feature_value(base, args.field, side)}))
        runner, info = HR._build_mtlx_runner(cell, opts, side)
        runners.append(runner)
        compile_s[side] = info["compile_s"]
    times = HR.interleave(runners, opts.repeats, opts.steps, opts.block_seconds)
    print(f"{args.cell} ({base.describe()}); {args.field}: {args.a} vs {args.b}, "
          f"{opts.repeats} ABBA repeats of ~{args.block_seconds:g} s blocks")
    for side, ts in times.items():
        print(f"  {side:14s} ms/step: {' '.join(f'{1e3 * x:.1f}' for x in ts)}; "
              f"median {1e3 * np.median(ts):.1f}; compiled in {compile_s[side]:.1f} s")
    ratio = float(np.median(times[args.b]) / np.median(times[args.a]))
    print(f"  {args.b} / {args.a} (median step time): {ratio:.3f}x")
    return ratio


if __name__ == "__main__":
    main()
