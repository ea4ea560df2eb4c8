#!/usr/bin/env python
"""Evaluate a trained run on every task's evaluation split.

    python scripts/evaluate.py --config configs/demo.py --workdir DIR [--checkpoint latest|best|STEP]

Restores the checkpoint (read-only: safe beside a live run), prints the per-task table and
writes DIR/eval_results.json (or --output).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlx.train.config import parse_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="latest", help="latest | best | a step number")
    parser.add_argument("--output", default=None, help="default: WORKDIR/eval_results.json")
    args, cfg = parse_cli(parser, argv)
    import jax
    from mtlx.train import evaluate as E
    from mtlx import paths
    from mtlx.train.loop import print_results, restore_state, setup, text_generation
    from mtlx.train.step import make_eval_step

    s = setup(cfg, train=False)
    restored = restore_state(s, args.workdir, args.checkpoint)
    eval_step = jax.jit(make_eval_step(s.model))
    generate, decode = text_generation(s)
    results = E.evaluate_tasks(eval_step, restored.state.params, s.run.specs, s.run.eval,
                               s.eval_batches, max_batches=cfg.get("eval_max_batches", None),
                               references=s.run.eval_refs, generate=generate, decode=decode)
    print_results(results, restored.step)
    out = paths.as_path(args.output) if args.output else paths.as_path(args.workdir) / "eval_results.json"
    paths.write_atomic(out, json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
