"""mtlx against PyTorch Hugging Face + PEFT: throughput, MFU, compile time and count, memory,
task scaling and throughput features, in one process (mtlx.bench).

    python scripts/bench.py --quick --json /tmp/bench_quick.json     # < 5 min on 2 CPU cores
    python scripts/bench.py --quick --json out.json --markdown out.md --plot out.png
    python scripts/bench.py --quick --json scripts/results/bench_quick.json \
        --plot scripts/results/bench_quick_tasks.png --notes BUILD_NOTES.md   # the committed results
    python scripts/bench.py --sizes tiny,base --seq-lens 128,512 --tasks 1,8,64 --batch 8 \
        --json full.json                                               # the whole grid
    python scripts/bench.py --sizes base --seq-lens 128 --dtype bfloat16 --attention cudnn \
        --batch 64 --json gpu.json                                     # a GPU run (gpu_check.sh)
    python scripts/bench.py --cells none --features none --compile-cache-check none \
        --real-lengths adapters/base/32/8 --json real.json               # real GLUE lengths only

Every cell (configuration x size x sequence length x number of tasks) runs the library's own
compiled step (mtlx.train.step) and, in the same process, the PyTorch baseline (HF BertModel,
PEFT LoRA, a Houlsby adapter, HyperFormer++, one task per batch; mtlx.bench.torch_baseline).
The runners of cells that differ only in their number of tasks are timed together, taking turns
(ABBA), after warm-up; figures are medians over repeats. Threads: JAX's default CPU client
(all CPUs); on a CPU the baseline runs with torch.set_num_threads(all CPUs) AND with 1 thread
(--torch-threads), and the faster is compared (both are in the JSON; --quick times one step of
each after building it and times only the faster, the probe's seconds in the JSON).

The real-length cell (--real-lengths; tiny in --quick) trains on real GLUE inputs of the
embedded sample instead of full-length synthetic rows: one pass over the same examples, mtlx
packing them (mtlx.data.packing) against torch per-task batches padded to the batch's longest
input (DataCollatorWithPadding) and to 128 (run_glue.py's default).

Prints the tables (and Markdown with --markdown) and writes every figure with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUICK = {
    # (config, size, seq_len, num_tasks, batch): tiny everywhere, BERT-base once; 1/8/64 tasks
    # for the shared encoder, 1/64 for HyperFormer++, adapters and LoRA (the time budget). The
    # 64-task adapters and LoRA cells compile in seconds since the twelfth session (their
    # thousands of per-task leaves stay on stacks through the update: mtlx.train.stacking);
    # before, minutes on 2 cores kept them out. Adapters at BERT-base (8 tasks) for the CPU
    # goal and in the real-length cell below.
    # BERT-base first: the CPU goal's cell is the last the time budget should skip.
    "cells": [("adapters", "base", 128, 8, 4)]
             + [("shared", "tiny", 128, t, 16) for t in (1, 8, 64)]
             + [(c, "tiny", 128, t, 16) for c in ("hyperformer++", "adapters", "lora")
                for t in (1, 64)],
    "features": ("shared", "tiny", 128, 1, 16),
    # Synthetic packing (config, size, L, examples, tasks): left to full runs, the real-length
    # cell below packs real GLUE inputs.
    "packing": None,
    # Real GLUE lengths: config, size, examples per task, packed rows per step.
    "real_lengths": ("adapters", "tiny", 32, 8),
    "real_lengths_sides": ("mtlx[packed]", "mtlx[mixed]", "torch[longest]", "torch[128]"),
    "repeats": 5,   # medians of 5 (shared tiny 64 vs 1 task: 1.112x with 3, 1.067x with 7 x 1 s)
    "block_seconds": 0.3,
    # Seconds after which phases and cell groups not yet started are skipped (recorded as
    # skipped): the run took 245 s on the dev CPU (twelfth session), its last phase starting at
    # ~234 s; the phases after the cells take 10-25 s each.
    "time_budget": 250.0,
}


def time_budget(given, quick):
    """--time-budget if given, else --quick's own (its 5 minutes kept on a slow day: what
    would start after it is skipped and recorded), else none."""
    if given is not None:
        return given
    return quick["time_budget"] if quick else None


NOTES_BEGIN, NOTES_END = "<!-- bench.py --notes: begin -->", "<!-- bench.py --notes: end -->"


def check_notes(path: str) -> str:
    """The text of `path`; SystemExit naming the file unless it has the two marker lines."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"scripts/bench.py --notes: cannot read {path}: {e}") from None
    if text.count(NOTES_BEGIN) != 1 or text.count(NOTES_END) != 1 or \
            text.index(NOTES_BEGIN) > text.index(NOTES_END):
        raise SystemExit(f"scripts/bench.py --notes: {path} needs exactly one line "
                         f"'{NOTES_BEGIN}' followed by one line '{NOTES_END}'")
    return text


def update_notes(path: str, markdown: str, plot: str = None) -> None:
    """Replaces the block between NOTES_BEGIN and NOTES_END in `path` (written in place, via a
    temporary file); raises SystemExit naming the file when a marker is missing."""
    text = check_notes(path)
    head, rest = text.split(NOTES_BEGIN, 1)
    _, tail = rest.split(NOTES_END, 1)
    body = markdown.rstrip() + "\n"
    if plot:
        body += f"\nThroughput against the number of tasks: `{plot}`\n"
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(f"{head}{NOTES_BEGIN}\n{body}{NOTES_END}{tail}")
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the < 5 minute CPU preset (see QUICK)")
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--configs", default="shared,adapters,lora,hyperformer++")
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--tasks", default="1,8,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cells", default=None,
                   help="explicit cells 'config/size/L/T/B;...' instead of the grid")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="default", choices=("default", "xla", "cudnn"))
    p.add_argument("--remat", default="none")
    p.add_argument("--frozen-dtype", default=None, choices=("bfloat16",),
                   help="store the frozen backbone's kernels in this dtype (= --dtype; "
                        "config.model.frozen_dtype): adapters/LoRA/HyperFormer++ cells")
    p.add_argument("--no-donate", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=0,
                   help="steps per timed block (0: enough for --block-seconds)")
    p.add_argument("--block-seconds", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--baseline-modes", default="per_task",
                   help="per_task, split, both comma-separated, or 'none'")
    p.add_argument("--torch-threads", default=None,
                   help="comma-separated torch thread counts, each run as a baseline, the "
                        "fastest compared (CPU default: all CPUs and 1; GPU: torch's default)")
    p.add_argument("--torch-device", default=None, help="cpu | cuda (default: cuda if JAX runs on a GPU)")
    p.add_argument("--features", default=None,
                   help="cell 'config/size/L/T/B' whose features are switched on/off; 'none' to skip")
    p.add_argument("--packing", default=None,
                   help="'config/size/L/examples/tasks' for padded vs packed; 'none' to skip")
    p.add_argument("--real-lengths", default=None,
                   help="'config/size/per_task/rows': real GLUE inputs (embedded sample), mtlx "
                        "packed vs torch per-task batches padded to the longest and to 128; "
                        "'none' to skip")
    p.add_argument("--real-lengths-sides", default=None,
                   help="comma-separated sides of the real-length cell (default all: "
                        "mtlx[packed],mtlx[mixed],mtlx[128],torch[longest],torch[128]; --quick leaves out "
                        "mtlx[128], whose per-example cost the synthetic L=128 cells show)")
    p.add_argument("--compile-cache-check", default=None,
                   help="cell 'config/size/L/T/B' compiled with a cold then warm persistent cache; 'none' to skip")
    p.add_argument("--compile-cache", default=None,
                   help="use this persistent compilation cache directory for every compilation")
    p.add_argument("--checks", action="store_true", help="run the correctness checks first")
    p.add_argument("--checks-only", action="store_true",
                   help="run the correctness checks, write --json, exit 1 if one failed")
    p.add_argument("--features-after-groups", type=int, default=None,
                   help="measure the features after this many cell groups (default: after all)")
    p.add_argument("--short-features", action="store_true",
                   help="fewer feature variants (one remat policy)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: phases and cell groups that would start after it are skipped "
                        "(recorded as skipped); order --cells by priority")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--notes", default=None,
                   help="a Markdown file (BUILD_NOTES.md) whose block between the lines "
                        f"'{NOTES_BEGIN}' and '{NOTES_END}' is replaced by the results table")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _cell(text, features):
    from mtlx.bench import workload as W
    parts = text.split("/")
    if len(parts) != 5:
        raise SystemExit(f"scripts/bench.py: cell {text!r} must be config/size/L/T/B")
    c, s, l, t, b = parts
    return W.Cell(c, s, int(l), int(t), int(b), features)


def _split(text):
    return [x for x in text.split(",") if x]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.notes:
        check_notes(args.notes)      # before minutes of measuring, not after
    t_start = time.perf_counter()
    import jax
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from mtlx.bench import harness as HR
    from mtlx.bench import report as R
    from mtlx.bench import workload as W

    platform_name = jax.devices()[0].platform
    torch_device = args.torch_device or ("cuda" if platform_name == "gpu" else "cpu")
    modes = () if args.baseline_modes == "none" else tuple(_split(args.baseline_modes))
    if args.torch_threads:
        threads = tuple(int(x) for x in _split(args.torch_threads))
    elif torch_device == "cpu":
        threads = tuple(dict.fromkeys((os.cpu_count() or 1, 1)))
    else:
        threads = ()
    features = W.features_for(args.dtype, args.attention, remat=args.remat,
                              donate=not args.no_donate, frozen_dtype=args.frozen_dtype)
    quick = QUICK if args.quick else None
    budget = time_budget(args.time_budget, quick)
    if args.cells == "none":
        cells = []
    elif args.cells:
        cells = [_cell(x, features) for x in args.cells.split(";") if x]
    elif quick:
        cells = W.grid(quick["cells"], features)
    else:
        cells = W.default_cells(_split(args.sizes), _split(args.configs),
                                [int(x) for x in _split(args.seq_lens)],
                                [int(x) for x in _split(args.tasks)], args.batch, features)
    opts = HR.Options(repeats=quick["repeats"] if quick else args.repeats, steps=args.steps,
                      block_seconds=quick["block_seconds"] if quick else args.block_seconds,
                      warmup=args.warmup, baseline_modes=modes, torch_device=torch_device,
                      torch_threads=threads, torch_threads_probe=bool(quick),
                      verbose=not args.quiet,
                      deadline=None if budget is None else t_start + budget)

    results = {"command": "python scripts/bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
               "environment": HR.environment(opts)}
    if args.checks or args.checks_only:
        from mtlx.bench import checks
        results["checks"] = checks.run_checks(torch_device=torch_device)
        summary = checks.summary(results["checks"])
        HR.log(opts, f"[bench] checks: {summary}")
        for c in results["checks"]:
            HR.log(opts, f"[bench]   {c['status']:7s} {c['name']}: "
                         + ", ".join(f"{k}={v:.3g}" for k, v in c.items() if isinstance(v, float)))
        if args.checks_only:
            _write_outputs(results, args.json)
            failed = [c for c in results["checks"] if c["status"] == "fail"]
            only_cudnn = failed and all("cudnn" in c["name"] for c in failed)
            # 4: only cuDNN attention is wrong (benchmark with XLA attention); 1: anything else.
            raise SystemExit(0 if not failed else (4 if only_cudnn else 1))

    peaks = HR.measure_peaks(sorted({c.features.dtype for c in cells}), opts)
    results["cells"], results["skipped"] = [], []

    def in_budget(what):
        spent = time.perf_counter() - t_start
        if budget is not None and spent > budget:
            results["skipped"].append(f"{what}: time budget {budget:.0f} s spent ({spent:.0f} s)")
            HR.log(opts, f"[bench] skipped {what} (time budget)")
            return False
        return True

    def chosen(flag, default):
        if flag == "none":
            return None
        return flag or default

    fcell = chosen(args.features, "/".join(map(str, quick["features"])) if quick else None)

    def run_features():
        if fcell and in_budget("features"):
            try:
                results["features"] = HR.measure_features(_cell(fcell, features), opts, peaks,
                                                          short=bool(quick) or args.short_features)
            except Exception as e:  # noqa: BLE001
                _failed(results, "features", e, opts)

    phases = results["phase_seconds"] = {}

    def save_partial():
        # An unattended run (a GPU lease) killed at its time limit still leaves every finished
        # phase's figures in --json / --markdown / --plot, marked partial; the end of main
        # overwrites them whole.
        _write_outputs(dict(results, partial=True, task_scaling=HR.task_scaling(results["cells"])),
                       args.json, args.markdown, args.plot)

    def timed_phase(name, fn, key=None):
        """Runs fn, records its seconds; its value goes to results[key] (a list extends it)
        before the partial --json is written."""
        t0 = time.perf_counter()
        try:
            value = fn()
            if key is not None:
                if isinstance(results.get(key), list):
                    results[key] += value
                else:
                    results[key] = value
            return value
        finally:
            phases[name] = round(time.perf_counter() - t0, 1)
            try:
                save_partial()
            except Exception as e:  # noqa: BLE001 - never lose the run over the partial file
                HR.log(opts, f"[bench] could not write the partial results: {e}")

    groups = HR.group_by_tasks(cells)
    for i, group in enumerate(groups):
        if i == args.features_after_groups:
            timed_phase("features", run_features)
        if not in_budget(" ".join(c.label for c in group)):
            continue
        try:
            n_before = len(results["cells"])
            timed_phase(" ".join(c.label for c in group),
                        lambda: HR.measure_group(group, opts, peaks), key="cells")
            done = {r["cell"] for r in results["cells"][n_before:]}
            results["skipped"] += [f"{c.label}: time budget {budget:.0f} s spent"
                                   for c in group if c.label not in done]
        except Exception as e:  # noqa: BLE001 - an unattended run records the failure, goes on
            _failed(results, " ".join(c.label for c in group), e, opts)
            continue
        _print_last(results["cells"][n_before:], opts)
    if args.features_after_groups is None or args.features_after_groups >= len(groups):
        timed_phase("features", run_features)
    results["task_scaling"] = HR.task_scaling(results["cells"])
    pk = chosen(args.packing, "/".join(map(str, quick["packing"])) if quick and quick["packing"] else None)
    if pk and in_budget("packing"):
        c, s, l, n, t = pk.split("/")
        try:
            timed_phase("packing", lambda: HR.measure_packing(
                c, s, int(l), int(n), int(t), features, opts, peaks), key="packing")
        except Exception as e:  # noqa: BLE001
            _failed(results, "packing", e, opts)
    rl = chosen(args.real_lengths, "/".join(map(str, quick["real_lengths"])) if quick else None)
    if rl and in_budget("real lengths"):
        parts = rl.split("/")
        if len(parts) != 4:
            raise SystemExit(f"scripts/bench.py: --real-lengths {rl!r} must be config/size/per_task/rows")
        c, s, n, r = parts
        if args.real_lengths_sides:
            sides = tuple(_split(args.real_lengths_sides))
        else:
            sides = quick["real_lengths_sides"] if quick else HR.REAL_LENGTH_SIDES
        try:
            timed_phase("real lengths", lambda: HR.measure_real_lengths(
                c, s, int(n), int(r), features, opts, sides=sides), key="real_lengths")
        except Exception as e:  # noqa: BLE001
            _failed(results, "real lengths", e, opts)
    cc = chosen(args.compile_cache_check, "/".join(map(str, quick["features"])) if quick else None)
    if cc and in_budget("compile cache"):
        try:
            timed_phase("compile cache", lambda: HR.measure_compile_cache(_cell(cc, features), opts),
                        key="compile_cache")
        except Exception as e:  # noqa: BLE001
            _failed(results, "compile cache", e, opts)
    HR.remeasure_peaks(peaks)
    HR.recompute_mfu(results, peaks)
    results["peaks"] = {k: dataclasses.asdict(v) for k, v in peaks.items()}
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start

    print(R.render(results))
    where = _write_outputs(results, args.json, args.markdown, args.plot)
    if args.plot:
        HR.log(opts, f"[bench] plot: {where or 'not written (no configuration at several task counts)'}")
    if args.notes:
        update_notes(args.notes, R.render(results, markdown=True),
                     os.path.relpath(where, Path(args.notes).parent) if where else None)
        HR.log(opts, f"[bench] results table written into {args.notes}")
    HR.log(opts, f"[bench] done in {results['wall_s']:.0f} s; phases (s): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    if results.get("failed"):
        raise SystemExit(5)
    return results


def _write_outputs(results, json_path=None, markdown_path=None, plot_path=None):
    """Writes the results as JSON, the Markdown report and the task-scaling plot (each where a
    path is given); returns the plot's path, or None when none was drawn."""
    from mtlx.bench import report as R
    for path, write in ((json_path, lambda p: p.write_text(
                            json.dumps(results, indent=1, default=_json_default))),
                        (markdown_path, lambda p: p.write_text(R.render(results, markdown=True)))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(Path(path))
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        return R.plot_tasks(results, plot_path)
    return None


def _failed(results, what, err, opts):
    import traceback
    msg = f"{what}: {type(err).__name__}: {err}"[:600]
    results.setdefault("failed", []).append(msg)
    from mtlx.bench import harness as HR
    HR.log(opts, f"[bench] FAILED {msg}\n{traceback.format_exc()[-1500:]}")


def _print_last(rows, opts):
    for r in rows:
        ratio = ", ".join(f"{m} {v:.2f}x" for m, v in r["ratio"].items()) or "no baseline"
        print(f"[bench] {r['cell']}: mtlx {r['mtlx']['examples_per_s']:.3g} ex/s "
              f"({1e3 * r['mtlx']['step_s']:.1f} ms/step); mtlx/torch {ratio}",
              file=sys.stderr, flush=True)


def _json_default(x):
    import numpy as np
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


if __name__ == "__main__":
    main()
