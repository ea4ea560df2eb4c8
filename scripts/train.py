#!/usr/bin/env python
"""Train (and evaluate) a multi-task model from a config file.

    python scripts/train.py --config configs/demo.py[:variant] --workdir DIR [--config.key=value ...]

DIR is a local directory or a bucket URL (gs://BUCKET/run: mtlx.paths). Resumes from the
latest checkpoint in DIR if there is one. Prints the per-task table at the end
and writes DIR/eval_results.json.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlx.train.config import parse_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args, cfg = parse_cli(parser, argv)
    from mtlx.train.loop import train_and_evaluate
    train_and_evaluate(cfg, args.workdir, progress=not args.no_progress)


if __name__ == "__main__":
    main()
