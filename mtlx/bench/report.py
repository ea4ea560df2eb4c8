"""The benchmark's results as tables (plain text for the terminal, Markdown for BUILD_NOTES.md)
and as a plot of throughput against the number of tasks."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence


def _si(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _mb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mem(side: dict) -> Optional[float]:
    """A side's memory figure: the device allocator's peak for the cell (torch on a GPU), else
    the growth of the process's RSS (CPU), else the compiled step's planned bytes (mtlx on a
    GPU, whose allocator peak is process-wide, not per cell). MEMORY_NOTE says so in tables."""
    m = side.get("memory") or {}
    for key in ("device_peak", "rss_delta"):
        if m.get(key) is not None:
            return m[key]
    return (m.get("compiled") or {}).get("total")


MEMORY_NOTE = ("memory: torch on a GPU = torch.cuda.max_memory_allocated over the cell; on a CPU "
               "= RSS growth while building and running; mtlx on a GPU = the compiled step's "
               "planned bytes (arguments + outputs + temporaries - donated)")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


def main_table(results: Dict[str, Any], markdown: bool = False, mode: str = "per_task") -> str:
    header = ["config", "size", "L", "T", "B", "dtype", "mtlx ex/s", "torch ex/s", "thr", "mtlx/torch",
              "mtlx tok/s", "mtlx FLOP/s", "MFU mtlx", "MFU torch", "compile s", "compiles",
              "mem mtlx MiB", "mem torch MiB"]
    rows = []
    for r in results.get("cells", []):
        m = r["mtlx"]
        b = r.get("baseline", {}).get(mode)
        rows.append([r["config"], r["size"], str(r["seq_len"]), str(r["num_tasks"]),
                     str(r["batch_size"]), {"float32": "fp32", "bfloat16": "bf16"}[r["features"]["dtype"]],
                     f"{m['examples_per_s']:.3g}", f"{b['examples_per_s']:.3g}" if b else "n/a",
                     str(b.get("torch_threads") or "dflt") if b else "",
                     f"{r['ratio'][mode]:.2f}x" if b else "n/a",
                     _si(m["tokens_per_s"]), _si(m["model_flops_per_s"]),
                     _pct(m["mfu"]), _pct(b["mfu"]) if b else "n/a",
                     f"{m['compile_s']:.1f}", str(m["compilations"]),
                     _mb(_mem(m)), _mb(_mem(b)) if b else "n/a"])
    return _table(header, rows, markdown)


def split_table(results: Dict[str, Any], markdown: bool = False) -> Optional[str]:
    rows = []
    for r in results.get("cells", []):
        if "split" in r.get("baseline", {}):
            b = r["baseline"]["split"]
            rows.append([r["config"], r["size"], str(r["seq_len"]), str(r["num_tasks"]),
                         str(r["batch_size"]), f"{r['mtlx']['examples_per_s']:.3g}",
                         f"{b['examples_per_s']:.3g}", f"{r['ratio']['split']:.2f}x"])
    if not rows:
        return None
    return _table(["config", "size", "L", "T", "B", "mtlx ex/s", "torch split ex/s",
                   "mtlx/torch"], rows, markdown)


def scaling_table(results: Dict[str, Any], markdown: bool = False) -> Optional[str]:
    rows = []
    for s in results.get("task_scaling", []):
        for t, v in sorted(s["mtlx"].items(), key=lambda kv: int(kv[0])):
            base = s["baseline"].get("per_task", {}).get(t)
            rows.append([s["config"], s["size"], str(s["seq_len"]), str(s["batch_size"]),
                         f"{t} vs {s['reference_tasks']}", f"{v:.3f}x",
                         f"{base:.3f}x" if base is not None else "n/a"])
    if not rows:
        return None
    return _table(["config", "size", "L", "B", "tasks", "mtlx step time", "torch step time"],
                  rows, markdown)


def features_table(results: Dict[str, Any], markdown: bool = False) -> Optional[str]:
    f = results.get("features")
    if not f:
        return None
    rows = []
    for name, v in f["variants"].items():
        if not v.get("available"):
            rows.append([name, "n/a", "n/a", "n/a", "n/a", v.get("reason", "")[:90]])
            continue
        mem = (v.get("memory") or {}).get("compiled") or {}
        rows.append([name, f"{1e3 * v['step_s']:.1f}", f"{v['speedup_vs_reference']:.2f}x",
                     f"{v['compile_s']:.1f}", _mb(mem.get("total")), ""])
    return _table(["variant", "step ms", "speedup", "compile s", "step memory MiB", "note"],
                  rows, markdown)


def real_lengths_table(results: Dict[str, Any], markdown: bool = False) -> Optional[str]:
    r = results.get("real_lengths")
    if not r:
        return None
    ref = r["mtlx[packed]"]["examples_per_s"]
    mixed = (r.get("mtlx[mixed]") or {}).get("examples_per_s")
    rows = []
    for name in ("mtlx[packed]", "mtlx[mixed]", "mtlx[128]", "torch[longest]", "torch[128]"):
        v = r.get(name)
        if not v:
            continue
        shape = v.get("batch_shape")
        shape = f"{shape[0]}x{shape[1]}" if shape else "per task: " + ", ".join(
            str(s[1]) for s in v["batch_shapes"])
        rows.append([name, str(v["steps_per_pass"]), shape, f"{v['tokens_computed']}",
                     f"{100 * v['padding_fraction']:.0f}%", f"{v['examples_per_s']:.3g}",
                     _si(v["real_tokens_per_s"]), f"{ref / v['examples_per_s']:.2f}x"]
                    + ([f"{mixed / v['examples_per_s']:.2f}x"] if mixed else []))
    return _table(["side", "steps", "batch (rows x length)", "tokens computed", "padding",
                   "ex/s", "real tok/s", "mtlx[packed] / side"]
                  + (["mtlx[mixed] / side"] if mixed else []), rows, markdown)


def extras(results: Dict[str, Any]) -> List[str]:
    out = []
    p = results.get("packing")
    if p:
        out.append(f"packing: {p['workload']}: padded {p['padded']['examples_per_s']:.3g} ex/s, "
                   f"packed {p['packed']['examples_per_s']:.3g} ex/s "
                   f"({p['speedup_examples_per_s']:.2f}x)")
    c = results.get("compile_cache")
    if c:
        out.append(f"persistent compilation cache ({c['cell']}): cold {c['cold']['compile_s']:.1f} s, "
                   f"warm {c['warm']['compile_s']:.1f} s ({c['speedup_compile']:.1f}x, "
                   f"{c['warm']['cache_hits']} cache hit(s))")
    return out


# Issue #7's goals (to measure against, not asserted): (name, target, test).
GOAL_CPU = ("CPU: BERT-base adapters, mtlx/torch examples/s", 1.6)
GOAL_SCALING = ("task scaling: 64-task step / 1-task step, same batch", 1.10)
GOAL_MFU = ("GPU: MFU, BERT-base, L=128, bf16", 0.50)
GOAL_EAGER = ("GPU: mtlx/torch eager, BERT-base, L=128, bf16", 2.0)


def _status(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _label(r: dict) -> str:
    dt = {"float32": "fp32", "bfloat16": "bf16"}.get(r["features"]["dtype"], r["features"]["dtype"])
    return f"{r['config']}/{r['size']}/L{r['seq_len']}/T{r['num_tasks']}/B{r['batch_size']}/{dt}"


def goals_table(results: Dict[str, Any], markdown: bool = False) -> Optional[str]:
    """The run's figures against issue #7's goals, one row a goal and cell that measures it
    (a single run: this machine's run-to-run noise applies); GPU goals say so on a CPU."""
    backend = results.get("environment", {}).get("jax_backend")
    cells = results.get("cells", [])
    rows = []
    if backend == "cpu":
        for r in cells:
            ratio = r.get("ratio", {}).get("per_task")
            if r["config"] == "adapters" and r["size"] == "base" and ratio is not None:
                rows.append([GOAL_CPU[0], _label(r), f"{ratio:.3f}x", f">= {GOAL_CPU[1]:.2f}x",
                             _status(ratio >= GOAL_CPU[1])])
    for sc in results.get("task_scaling", []):
        for t, v in sorted(sc["mtlx"].items(), key=lambda kv: int(kv[0])):
            if int(t) == 64 and sc["reference_tasks"] == 1:
                rows.append([GOAL_SCALING[0], f"{sc['config']}/{sc['size']}/L{sc['seq_len']}/"
                             f"B{sc['batch_size']}", f"{v:.3f}x", f"<= {GOAL_SCALING[1]:.2f}x",
                             _status(v <= GOAL_SCALING[1])])
    if backend == "gpu":
        for r in cells:
            if not (r["config"] == "shared" and r["size"] == "base" and r["seq_len"] == 128
                    and r["features"]["dtype"] == "bfloat16"):
                continue
            mfu, ratio = r["mtlx"].get("mfu"), r.get("ratio", {}).get("per_task")
            if mfu is not None:
                rows.append([GOAL_MFU[0], _label(r), _pct(mfu), f">= {_pct(GOAL_MFU[1])}",
                             _status(mfu >= GOAL_MFU[1])])
            if ratio is not None:
                rows.append([GOAL_EAGER[0], _label(r), f"{ratio:.2f}x", f">= {GOAL_EAGER[1]:.2f}x",
                             _status(ratio >= GOAL_EAGER[1])])
    else:
        for name, target in ((GOAL_MFU[0], f">= {_pct(GOAL_MFU[1])}"),
                             (GOAL_EAGER[0], f">= {GOAL_EAGER[1]:.2f}x")):
            rows.append([name, "", "n/a", target, f"not measurable on {backend or 'this machine'}"])
    if not rows:
        return None
    return _table(["goal", "cell", "measured", "target", "this run"], rows, markdown)


def _real_lengths_title(results: Dict[str, Any]) -> str:
    r = results.get("real_lengths")
    if not r:
        return ""
    w = r["workload"]
    return (f"real GLUE lengths ({r['config']}/{r['size']}, {r['dtype']}): {w['examples']} examples "
            f"({w['per_task']} each of {', '.join(w['tasks'])}; embedded sample, bert-base-uncased "
            f"word pieces, {w['real_tokens']} in all), one pass each side; torch per-task batches "
            f"of {w['per_task']} padded to the longest (DataCollatorWithPadding) or to 128 "
            f"(run_glue.py's default); mtlx mixed, packed into steps of {w['packed_rows']} rows "
            f"of 128 (one task a row" + ("; mtlx[mixed]: rows mixing tasks" if "mtlx[mixed]" in r
                                         else "") + ")"
            + (f", or in steps of {w['per_task']} rows padded to 128" if "mtlx[128]" in r
               else "") + ":")


def render(results: Dict[str, Any], markdown: bool = False) -> str:
    env = results.get("environment", {})
    peaks = results.get("peaks", {})
    parts = []
    head = (f"machine: {env.get('device_kind')} ({env.get('jax_backend')}), {env.get('cpu_count')} "
            f"CPUs, load average {env.get('load_average')}; jax {env.get('jax')}, torch "
            f"{env.get('torch')} (threads {env.get('torch_thread_settings')}, the faster "
            f"compared{': chosen by a one-step probe' if env.get('torch_threads_probe') else ''}"
            f"), transformers "
            f"{env.get('transformers')}, peft {env.get('peft')}")
    parts.append(head)
    for dt, p in peaks.items():
        parts.append(f"peak {dt}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['source']})")
    if results.get("command"):
        parts.append(("command: `" + results["command"] + "`") if markdown else
                     "command: " + results["command"])
    if results.get("partial"):
        parts.append("PARTIAL: the run stopped before its end (a time limit); finished phases: "
                     + ", ".join(results.get("phase_seconds", {})))
    if results.get("cells"):
        parts.append("")
        parts.append(main_table(results, markdown))
        parts.append(MEMORY_NOTE)
    for title, t in (("baseline training the mixed batch (per-task forward/backward, one optimizer step):",
                      split_table(results, markdown)),
                     ("task scaling (step time relative to the fewest tasks, same batch):",
                      scaling_table(results, markdown)),
                     ("goals (issue #7, measured against, not asserted; one run, so within this "
                      "machine's run-to-run noise):", goals_table(results, markdown)
                      if results.get("cells") else None),
                     ("features (mtlx only, interleaved against the reference):",
                      features_table(results, markdown)),
                     (_real_lengths_title(results), real_lengths_table(results, markdown))):
        if t:
            parts += ["", title, t]
    ex = extras(results)
    if ex:
        parts += [""] + ex
    for c in results.get("checks", []):
        parts.append(f"check {c['status']}: {c['name']}" + (f" ({c['reason']})" if c.get("reason") else ""))
    for s in results.get("skipped", []):
        parts.append(f"skipped: {s}")
    for s in results.get("failed", []):
        parts.append(f"FAILED: {s}")
    return "\n".join(parts) + "\n"


def plot_tasks(results: Dict[str, Any], path: str, mode: str = "per_task") -> Optional[str]:
    """Examples/s against the number of tasks (log scale), one panel per (size, L): mtlx solid,
    the PyTorch baseline dashed, one colour per configuration. Returns the path, or None when
    no configuration was measured at two or more task counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: Dict[tuple, Dict[str, Dict[str, list]]] = {}
    for r in results.get("cells", []):
        panel = (r["size"], r["seq_len"], r["batch_size"], r["features"]["dtype"])
        s = series.setdefault(panel, {}).setdefault(r["config"], {"T": [], "mtlx": [], "torch": []})
        s["T"].append(r["num_tasks"])
        s["mtlx"].append(r["mtlx"]["examples_per_s"])
        b = r.get("baseline", {}).get(mode)
        s["torch"].append(b["examples_per_s"] if b else float("nan"))
    panels = {k: v for k, v in series.items() if any(len(c["T"]) > 1 for c in v.values())}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, configs) in zip(axes[0], sorted(panels.items())):
        for i, (config, s) in enumerate(sorted(configs.items())):
            order = sorted(range(len(s["T"])), key=lambda k: s["T"][k])
            t = [s["T"][k] for k in order]
            col = colours[i % len(colours)]
            ax.plot(t, [s["mtlx"][k] for k in order], "-o", color=col, label=f"{config} mtlx")
            ax.plot(t, [s["torch"][k] for k in order], "--s", color=col, alpha=0.7,
                    label=f"{config} torch")
        ax.set_xscale("log", base=2)
        ticks = sorted({t for s in configs.values() for t in s["T"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("number of tasks")
        ax.set_ylabel("examples / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{panel[0]}, L={panel[1]}, B={panel[2]}, {panel[3]}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    env = results.get("environment", {})
    fig.suptitle(f"mtlx vs PyTorch HF/PEFT ({mode} batches) on {env.get('device_kind')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
