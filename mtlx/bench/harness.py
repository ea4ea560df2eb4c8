"""Timing, compile counting and memory for benchmark cells; everything as one JSON-able dict.

How a number is taken (the same for every runner, mtlx or PyTorch):
  * warm-up excluded: the first step (which compiles, for mtlx) and `warmup` more steps run
    before any timing;
  * synchronised: a timed block of `steps` steps ends by waiting for the device
    (jax.block_until_ready on the new train state; torch.cuda.synchronize on GPU; CPU torch is
    synchronous);
  * interleaved: the runners of a group (mtlx and the baseline, and every number of tasks of
    the same configuration) take turns, repeat after repeat, in ABBA order (A B C, C B A, ...),
    so drift from a shared, noisy machine falls on all of them alike;
  * medians of the per-step times of the `repeats` blocks; every repeat is kept in the JSON.
Compile time: the durations JAX reports through jax.monitoring during the first call (tracing,
lowering to MLIR, XLA compilation). Number of compilations: XLA compilations seen during all of
a runner's calls (its steps cycle through batches with different task mixes) and the size of
the jitted function's cache.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtlx.bench import memory as MEM
from mtlx.bench import workload as W
from mtlx.train.step import count_compilations, unpack_batch

# --------------------------------------------------------------------------- compile events

_EVENTS: List[tuple] = []
_LISTENING = False
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _listen():
    global _LISTENING
    if _LISTENING:
        return
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: _EVENTS.append((name, float(secs))))
    monitoring.register_event_listener(lambda name, **kw: _EVENTS.append((name, None)))
    _LISTENING = True


class CompileWindow:
    """Collects JAX's compile events while the block runs."""

    def __enter__(self):
        _listen()
        self._start = len(_EVENTS)
        return self

    def __exit__(self, *exc):
        self.events = list(_EVENTS[self._start:])
        return False

    @property
    def compile_seconds(self) -> float:
        return sum(s for n, s in self.events if n in COMPILE_EVENTS and s is not None)

    @property
    def backend_compiles(self) -> int:
        return sum(1 for n, _ in self.events if n == "/jax/core/compile/backend_compile_duration")

    @property
    def cache_hits(self) -> int:
        return sum(1 for n, _ in self.events if n == "/jax/compilation_cache/cache_hits")


# --------------------------------------------------------------------------- runners

class MtlxRunner:
    """One cell's mtlx train step, cycling through its batches (different task mixes)."""
    framework = "mtlx"

    def __init__(self, setup: W.MtlxSetup, name: str = "mtlx"):
        self.setup, self.name = setup, name
        self.state = setup.state
        setup.state = None  # donated by the first step: keep no stale reference
        self.metrics = None
        self.i = 0
        cell = setup.cell
        self.examples_per_step = cell.batch_size
        self.tokens_per_step = cell.batch_size * cell.seq_len

    def step(self):
        b = self.setup.batches[self.i % len(self.setup.batches)]
        self.state, self.metrics = self.setup.step(self.state, b)
        self.i += 1

    def sync(self):
        import jax
        jax.block_until_ready((self.state, self.metrics))

    def compiled(self):
        """The step's executable (from the jit cache: no new compilation)."""
        return self.setup.step.lower(self.state, self.setup.batches[0]).compile()

    def loss(self) -> float:
        return float(self.metrics["loss"])


class TorchRunner:
    """A PyTorch baseline; `threads` (torch.set_num_threads, process-wide) is set before each
    step when given, so runners with different thread counts can take turns."""
    framework = "torch"

    def __init__(self, baseline, cell: W.Cell, name: str, threads: Optional[int] = None):
        self.baseline, self.name, self.threads = baseline, name, threads
        self.examples_per_step = cell.batch_size
        self.tokens_per_step = cell.batch_size * cell.seq_len

    def step(self):
        if self.threads:
            import torch
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
        self.baseline.step()

    def sync(self):
        self.baseline.sync()

    def loss(self) -> float:
        return float(self.baseline.last_loss)


def timed(runner, steps: int, rewarm: bool = False) -> float:
    """Seconds per step over `steps` steps, device synchronised at the end.

    rewarm: one untimed step first. Switching frameworks in one process costs the first step
    after the switch (measured here: a torch step after mtlx's took up to several times its
    usual time on a 2-core CPU), a cost no single-framework user pays."""
    if rewarm:
        runner.step()
    runner.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - t0) / steps


def interleave(runners: Sequence, repeats: int, steps: int = 0,
               block_seconds: float = 1.0, rewarm: bool = True) -> Dict[str, List[float]]:
    """Per-step seconds of each runner for each repeat, runners taking turns in ABBA order,
    each block after one untimed step (`timed`'s rewarm) when there are several runners.

    steps <= 0: each runner's block is as many steps as fill `block_seconds` (at least 1),
    from one step timed beforehand and not reported."""
    rewarm = rewarm and len(runners) > 1
    counts = {}
    for r in runners:
        counts[r.name] = steps if steps > 0 else max(1, int(round(block_seconds / timed(r, 1, rewarm))))
    out: Dict[str, List[float]] = {r.name: [] for r in runners}
    for k in range(repeats):
        order = runners if k % 2 == 0 else list(reversed(runners))
        for r in order:
            out[r.name].append(timed(r, counts[r.name], rewarm))
    return out


# --------------------------------------------------------------------------- options

@dataclasses.dataclass
class Options:
    repeats: int = 5
    steps: int = 0                 # steps per timed block (0: fill block_seconds)
    block_seconds: float = 1.0
    warmup: int = 1                # steps after the first (compiling) one, before timing
    baseline_modes: tuple = ("per_task",)  # () = no baseline
    torch_device: str = "cpu"
    # CPU: each baseline runs once per thread count; the table compares with the fastest (on a
    # shared, oversubscribed CPU, torch's OpenMP barriers made 2 threads up to 10x slower
    # than 1 for small models). () = torch's default.
    torch_threads: tuple = ()
    # With several torch_threads: time one rewarmed step of each setting after building it and
    # keep only the fastest for the interleaved timing (--quick: the slower setting's steps
    # were a sixth of its 5 minutes). The probe's seconds are kept in the results.
    torch_threads_probe: bool = False
    seed: int = 0
    verbose: bool = True
    # time.perf_counter() after which no further runner is built (scripts/bench.py
    # --time-budget): a group keeps the cells already built, a features phase the variants
    # already built; the rest are recorded as skipped. None = no limit.
    deadline: Optional[float] = None


def past_deadline(opts: Options) -> bool:
    return opts.deadline is not None and time.perf_counter() > opts.deadline


_T0 = time.perf_counter()


def log(opts: Options, msg: str) -> None:
    """Prints `msg` to stderr; '[bench]' becomes '[bench  123s]' (seconds since import)."""
    if opts.verbose:
        if msg.startswith("[bench]"):
            msg = f"[bench {time.perf_counter() - _T0:4.0f}s]" + msg[len("[bench]"):]
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- figures

def figures(runner, times: List[float], flops_per_step: float, peak: Optional[float]) -> dict:
    med = float(np.median(times))
    out = {"step_s": med, "step_s_repeats": [float(t) for t in times],
           "steps_per_s": 1.0 / med,
           "examples_per_s": runner.examples_per_step / med,
           "tokens_per_s": runner.tokens_per_step / med,
           "model_flops_per_step": flops_per_step,
           "model_flops_per_s": flops_per_step / med,
           "mfu": (flops_per_step / med / peak) if peak else None,
           "spread": float((max(times) - min(times)) / med) if len(times) > 1 else 0.0}
    return out


def _first_step(runner) -> Tuple[CompileWindow, float]:
    """Runs the runner's first (compiling) step; returns its compile window and wall seconds."""
    with CompileWindow() as window:
        t0 = time.perf_counter()
        runner.step()
        runner.sync()
        seconds = time.perf_counter() - t0
    return window, seconds


def _build_mtlx_runner(cell: W.Cell, opts: Options, name: str = "mtlx"):
    """Builds, compiles (first call) and warms up an mtlx runner; returns (runner, info)."""
    import jax
    MEM.release_free_memory()
    rss0 = MEM.rss_bytes()
    t0 = time.perf_counter()
    setup = W.build_mtlx(cell, seed=opts.seed)
    build_s = time.perf_counter() - t0
    runner = MtlxRunner(setup, name)
    first, first_s = _first_step(runner)
    MEM.release_free_memory()  # the compiler's scratch memory is not the step's
    with CompileWindow() as warm, MEM.PeakRSS() as rss:
        for _ in range(opts.warmup):
            runner.step()
        runner.sync()
    device = jax.devices()[0]
    compiled = runner.compiled()
    cost = compiled.cost_analysis() or {}
    info = {
        "build_s": build_s,
        "first_step_s": first_s,
        "compile_s": first.compile_seconds,
        "compilations_first_call": first.backend_compiles,
        "compilations_after_first": warm.backend_compiles,
        "memory": {"compiled": MEM.compiled_bytes(compiled),
                   "rss_delta": (rss.peak - rss0) if device.platform == "cpu" else None,
                   "device_peak_process": MEM.jax_device_peak(device)},
        "xla_cost_flops": float(cost["flops"]) if "flops" in cost else None,
        "params": setup.param_count,
        "trainable_params": setup.trainable_count,
        "flops_breakdown": setup.flops.by_name(),
        "loss_after_warmup": runner.loss(),
    }
    return runner, info


def _build_torch_runner(cell: W.Cell, mode: str, opts: Options, threads: Optional[int] = None):
    from mtlx.bench import torch_baseline as TB
    MEM.release_free_memory()
    rss0 = MEM.rss_bytes()
    cfg = W.backbone_config(cell)
    methods = W.CONFIGS[cell.config]
    arrays, ids = [], []
    vocab = W.SIZES[cell.size]["vocab_size"]
    for s in range(4):
        arrays.append(W.synthetic_arrays(cell.batch_size, cell.seq_len, vocab, opts.seed + s))
        ids.append(W.step_task_ids(s, cell.batch_size, cell.num_tasks))
    t0 = time.perf_counter()
    base = TB.TorchBaseline(cfg, W.task_heads(cell.num_tasks), cell.config,
                            methods[0] if methods else {}, arrays, ids, device=opts.torch_device,
                            dtype=cell.features.dtype, mode=mode,
                            attention_dropout=cell.features.attention_dropout,
                            head_dropout=W.HEAD_DROPOUT, seed=opts.seed,
                            lr=W.LEARNING_RATE, weight_decay=W.WEIGHT_DECAY, clip_norm=W.CLIP_NORM)
    build_s = time.perf_counter() - t0
    runner = TorchRunner(base, cell, f"torch[{mode}]", threads)
    TB.reset_device_peak(opts.torch_device)
    runner.step()
    runner.sync()
    with MEM.PeakRSS() as rss:
        for _ in range(opts.warmup):
            runner.step()
        runner.sync()
    n_params = sum(p.numel() for p in base.model.parameters())
    n_train = sum(p.numel() for p in base.params)
    info = {"build_s": build_s, "compile_s": None, "compilations": 0,
            "memory": {"rss_delta": (rss.peak - rss0) if opts.torch_device == "cpu" else None,
                       "device_peak": TB.device_peak_bytes(opts.torch_device)},
            "params": int(n_params), "trainable_params_in_optimizer": int(n_train),
            "mode": mode, "torch_threads": threads, "loss_after_warmup": runner.loss()}
    return runner, info


def measure_group(cells: Sequence[W.Cell], opts: Options, peaks: Dict[str, Any]) -> List[dict]:
    """Cells that differ only in the number of tasks: every mtlx and baseline runner of the
    group is built, then all are timed interleaved. Returns one result dict per cell."""
    runners, infos, cell_flops = [], {}, {}
    for i, cell in enumerate(cells):
        if i and past_deadline(opts):
            log(opts, f"[bench] skipped {cell.label} (time budget)")
            continue
        log(opts, f"[bench] build {cell.label} mtlx")
        r, info = _build_mtlx_runner(cell, opts, f"mtlx {cell.label}")
        runners.append(r)
        infos[r.name] = (cell, info)
        cell_flops[cell] = info_flops(info)
        for mode in opts.baseline_modes:
            built = []
            for threads in (opts.torch_threads or (None,)):
                log(opts, f"[bench] build {cell.label} torch[{mode}] threads={threads or 'default'}")
                r, info = _build_torch_runner(cell, mode, opts, threads)
                r.name = f"torch[{mode},threads={threads}] {cell.label}"
                built.append((r, info))
            if opts.torch_threads_probe and len(built) > 1:
                probe = {str(i["torch_threads"]): timed(r, 1, rewarm=True) for r, i in built}
                built = [min(built, key=lambda ri: probe[str(ri[1]["torch_threads"])])]
                built[0][1]["threads_probe_step_s"] = probe
                log(opts, f"[bench] {cell.label} torch[{mode}]: probe step s by threads {probe}, "
                          f"timing threads={built[0][1]['torch_threads']}")
            for r, info in built:
                runners.append(r)
                infos[r.name] = (cell, info)
    log(opts, f"[bench] timing {len(runners)} runners x {opts.repeats} repeats")
    with CompileWindow() as during:
        times = interleave(runners, opts.repeats, opts.steps, opts.block_seconds)
    results = []
    for cell in cells:
        if cell not in cell_flops:       # skipped (time budget)
            continue
        res = {"cell": cell.label, "config": cell.config, "size": cell.size,
               "seq_len": cell.seq_len, "num_tasks": cell.num_tasks,
               "batch_size": cell.batch_size, "features": dataclasses.asdict(cell.features)}
        peak = peaks[cell.features.dtype]
        for r in runners:
            c, info = infos[r.name]
            if c != cell:
                continue
            # The same model FLOPs for both sides: the same model, tasks and examples.
            fig = figures(r, times[r.name], cell_flops[cell], peak.flops_per_s)
            fig.update(info)
            if r.framework == "mtlx":
                fig["compilations"] = info["compilations_first_call"] + info["compilations_after_first"]
                fig["jit_cache_size"] = count_compilations(r.setup.step)
                res["mtlx"] = fig
            else:
                # The fastest thread setting of each mode is the baseline; all are kept.
                res.setdefault("baseline_by_threads", {}).setdefault(info["mode"], {})[
                    str(info["torch_threads"])] = fig["examples_per_s"]
                best = res.setdefault("baseline", {}).get(info["mode"])
                if best is None or fig["examples_per_s"] > best["examples_per_s"]:
                    res["baseline"][info["mode"]] = fig
        res["ratio"] = {mode: res["mtlx"]["examples_per_s"] / b["examples_per_s"]
                        for mode, b in res.get("baseline", {}).items()}
        # XLA compilations while the group was timed (steps cycle through task mixes): 0 when
        # every step reused its executable.
        res["compilations_during_timing"] = during.backend_compiles
        results.append(res)
    return results


# --------------------------------------------------------------------------- features

def feature_variants(base: W.Features, platform_name: str, short: bool = False,
                     routed: bool = False, frozen: bool = False) -> Dict[str, Any]:
    """{variant name: Features, or a string saying why it is not available}, each to be timed
    against 'reference' (= base). short (--quick, --short-features): one remat policy ('dots'),
    no PRNG variant, and attention_dropout=0 (the XLA counterpart of cuDNN attention, which
    cannot drop probabilities) only where cuDNN attention is available; on a CPU no remat,
    donation or scan variant either. routed (a PEFT cell with several tasks): the other routing
    implementations first (short: 'onehot' only), as a time budget may stop the phase early.
    frozen (a cell whose backbone does not train) in bf16: its frozen kernels stored in bf16."""
    from mtlx.peft.routing import DEFAULT_IMPL, IMPLEMENTATIONS as ROUTINGS
    rep = dataclasses.replace
    other_dtype = "bfloat16" if base.dtype == "float32" else "float32"
    # cuDNN attention takes bf16/fp16 only: a float32 variant of a cuDNN reference uses XLA's.
    other_attention = "xla" if (base.attention == "cudnn" and other_dtype == "float32") else base.attention
    out: Dict[str, Any] = {"reference": base}
    if routed:
        own = base.routing or DEFAULT_IMPL
        for impl in (("onehot",) if short else ROUTINGS):
            if impl != own:
                out[f"routing={impl}"] = rep(base, routing=impl)
        # The gather's gradient (mtlx.peft.routing.take_rows): 'auto' is the one-hot contraction
        # on accelerators and the scatter-add on a CPU; the other choice against it.
        if own == "gather" and base.gather_grad == "auto" and (not short or platform_name == "gpu"):
            other_grad = "onehot" if platform_name == "cpu" else "scatter"
            out[f"gather_grad={other_grad}"] = rep(base, gather_grad=other_grad)
    # Order = priority under a time budget: attention and dropout's random bits (the likely
    # costs on a GPU) before the dtype, remat, donation and scan.
    if base.attention != "cudnn":
        if not short or platform_name == "gpu":
            out["attention_dropout=0"] = rep(base, attention_dropout=0.0, attention="xla")
        if platform_name == "gpu":
            out["attention=cudnn (attention_dropout=0)"] = rep(base, attention="cudnn",
                                                              attention_dropout=0.0)
        else:
            out["attention=cudnn (attention_dropout=0)"] = (
                f"not available on {platform_name}: cuDNN fused attention needs an NVIDIA GPU")
    else:
        out["attention=xla"] = rep(base, attention="xla")
    # GELU's gradient: 'auto' (mtlx.models.activations: the saved input) against autodiff of
    # jax.nn.gelu; a GPU question of memory traffic (the tiny --quick CPU cell would not show it).
    if base.activation_vjp == "auto" and (not short or platform_name == "gpu"):
        out["activation_vjp=autodiff"] = rep(base, activation_vjp="autodiff")
    # BERT's residual LayerNorm gradient (mtlx.models.norms): saved inputs (the default)
    # against autodiff of the formula.
    if base.layer_norm_vjp == "saved_inputs" and (not short or platform_name == "gpu"):
        out["layer_norm_vjp=autodiff"] = rep(base, layer_norm_vjp="autodiff")
    # The global gradient norm over chunks of leaves (mtlx.train.optim) against optax's
    # reduction a leaf: a kernel count question in routed cells (many per-task leaves).
    if base.grad_norm == "grouped" and (not short or (platform_name == "gpu" and routed)):
        out["grad_norm=per_leaf"] = rep(base, grad_norm="per_leaf")
    # Threefry bits for dropout are costly on accelerators (rbg is the usual answer there; on
    # this CPU it was slower: BUILD_NOTES.md): in the short list on a GPU only.
    if base.prng == "threefry2x32" and (not short or platform_name == "gpu"):
        out["prng=rbg (dropout random bits)"] = rep(base, prng="rbg")
    # Dropout's draws: four 16-bit draws a threefry hash (mtlx.models.dropout) or flax's float
    # draw per element.
    if base.dropout_draws == "hash16" and (not short or platform_name == "gpu"):
        out["dropout_draws=bernoulli"] = rep(base, dropout_draws="bernoulli")
    out[f"dtype={other_dtype}"] = rep(base, dtype=other_dtype, attention=other_attention,
                                      frozen_dtype=None)
    # bf16 products (mtlx.models.precision): on a CPU the default ('auto') accumulates into
    # float32 in custom-VJP products, XLA:CPU's fast bf16 kernel; elsewhere XLA's own products.
    # The other choice, timed in bf16, shows what the policy is worth on this platform.
    other_dots = "native" if platform_name == "cpu" else "f32_accumulate"
    if frozen and base.dtype == "bfloat16" and base.frozen_dtype is None:
        out["frozen kernels bfloat16"] = rep(base, frozen_dtype="bfloat16")
    if base.dots == "auto":
        if base.dtype == "bfloat16":
            out[f"dots={other_dots}"] = rep(base, dots=other_dots)
        else:
            out[f"dtype=bfloat16, dots={other_dots}"] = rep(base, dtype="bfloat16", dots=other_dots,
                                                          attention=other_attention)
    if short and platform_name != "gpu":
        # --quick on a CPU (5 minutes): remat and donation are an accelerator's memory
        # questions (remat on this CPU: 0.78-0.92x, BUILD_NOTES.md) and scan a deep model's
        # compile-time question; none shows on the 2-layer tiny CPU cell.
        return out
    for policy in (("dots",) if short else ("full", "dots", "dots_no_batch")):
        if base.remat != policy:
            out[f"remat={policy}"] = rep(base, remat=policy)
    out[f"donate={'off' if base.donate else 'on'}"] = rep(base, donate=not base.donate)
    # BertConfig.scan_layers: one traced layer body in a lax.scan (compile time vs the per-step
    # stacking copy of the layers' weights)
    out[f"scan_layers={'off' if base.scan_layers else 'on'}"] = rep(base, scan_layers=not base.scan_layers)
    return out


def measure_features(cell: W.Cell, opts: Options, peaks: Dict[str, Any], short: bool = False) -> dict:
    """Each feature switched against the cell's own features, all variants timed interleaved
    (mtlx only). Per variant: step time, ratio to the reference, compile time and the
    compiled step's memory."""
    import jax
    platform_name = jax.devices()[0].platform
    variants = feature_variants(cell.features, platform_name, short,
                                routed=bool(W.CONFIGS[cell.config]) and cell.num_tasks > 1,
                                frozen=not W.BACKBONE_TRAINS[cell.config])
    runners, infos, out = [], {}, {}
    for name, feat in variants.items():
        if isinstance(feat, str):
            out[name] = {"available": False, "reason": feat}
            continue
        if runners and past_deadline(opts):
            out[name] = {"available": False, "reason": "skipped: time budget spent"}
            log(opts, f"[bench] feature {name}: skipped (time budget)")
            continue
        c = dataclasses.replace(cell, features=feat)
        log(opts, f"[bench] feature {name}: build {c.label}")
        try:
            r, info = _build_mtlx_runner(c, opts, name)
        except Exception as e:  # noqa: BLE001 - a feature that fails to build is a result
            out[name] = {"available": False, "reason": f"failed: {type(e).__name__}: {e}"[:400]}
            continue
        runners.append(r)
        infos[name] = (c, info)
    times = interleave(runners, opts.repeats, opts.steps, opts.block_seconds)
    ref = float(np.median(times["reference"])) if "reference" in times else None
    for r in runners:
        c, info = infos[r.name]
        fig = figures(r, times[r.name], info_flops(info), peaks[c.features.dtype].flops_per_s)
        fig.update({k: info[k] for k in ("compile_s", "memory", "loss_after_warmup")})
        fig["available"] = True
        fig["features"] = dataclasses.asdict(c.features)
        fig["speedup_vs_reference"] = (ref / fig["step_s"]) if ref else None
        out[r.name] = fig
    return {"cell": cell.label, "variants": out}


def info_flops(info: dict) -> float:
    return float(sum(info["flops_breakdown"].values()))


def measure_packing(config: str, size: str, seq_len: int, num_examples: int, num_tasks: int,
                    features: W.Features, opts: Options, peaks: Dict[str, Any]) -> dict:
    """The same short token-classification examples padded (one a row) and packed, timed
    interleaved: examples/s, and real (non-padding) tokens/s."""
    vocab = W.SIZES[size]["vocab_size"]
    tasks, padded, packed = W.packing_batches(num_examples, num_tasks, seq_len, vocab, opts.seed)
    cell = W.Cell(config, size, seq_len, num_tasks, num_examples, features)
    runners, out = [], {}
    for name, batch in (("padded", padded), ("packed", packed)):
        setup = W.build_mtlx(cell, seed=opts.seed, heads=tasks, batches=[batch])
        rows = int(batch.input_ids.shape[0])
        flops = setup.flops
        r = MtlxRunner(setup, name)
        first, _ = _first_step(r)
        for _ in range(opts.warmup):
            r.step()
        r.sync()
        r.examples_per_step = num_examples  # both hold the same examples
        runners.append(r)
        out[name] = {"rows": rows, "compile_s": first.compile_seconds,
                     "real_tokens": int(np.asarray(batch.attention_mask).sum()),
                     "flops": flops.train}
    times = interleave(runners, opts.repeats, opts.steps, opts.block_seconds)
    for r in runners:
        fig = figures(r, times[r.name], out[r.name]["flops"], peaks[features.dtype].flops_per_s)
        out[r.name].update(fig)
        out[r.name]["real_tokens_per_s"] = out[r.name]["real_tokens"] / fig["step_s"]
    out["speedup_examples_per_s"] = out["packed"]["examples_per_s"] / out["padded"]["examples_per_s"]
    out["dtype"] = features.dtype
    out["workload"] = (f"{num_examples} token-classification examples of {num_tasks} tasks, "
                       f"lengths log-normal median 20 (clipped to [4, {seq_len}]), rows of "
                       f"{seq_len}: padded {out['padded']['rows']} rows, packed "
                       f"{out['packed']['rows']} rows; {config}/{size}")
    return out


REAL_LENGTH_SIDES = ("mtlx[packed]", "mtlx[mixed]", "mtlx[128]", "torch[longest]", "torch[128]")


class EpochRunner:
    """Runs `inner` through all of its batches once per `step()`: one pass over a fixed set of
    examples, however each side splits it into steps."""

    def __init__(self, inner, steps: int, examples: int, tokens: int, name: str):
        self.inner, self.steps, self.name = inner, steps, name
        self.framework = inner.framework
        self.examples_per_step, self.tokens_per_step = examples, tokens

    def step(self):
        for _ in range(self.steps):
            self.inner.step()

    def sync(self):
        self.inner.sync()


def measure_real_lengths(config: str, size: str, per_task: int, rows: int, features: W.Features,
                         opts: Options, sides: Sequence[str] = REAL_LENGTH_SIDES,
                         max_segments: int = 16) -> dict:
    """Examples/s on real GLUE inputs (the embedded sample: CoLA, SST-2, MRPC, QNLI, RTE, WNLI,
    `per_task` examples each, bert-base-uncased word pieces, rows of 128) instead of full-length
    synthetic rows: the same examples, one pass, each side as its users would feed them.

      torch[longest]  per-task batches of `per_task`, padded to the batch's longest input
                      (transformers' DataCollatorWithPadding);
      torch[128]      the same batches padded to 128 (run_glue.py's default pad_to_max_length);
      mtlx[packed]    the mixed stream packed into steps of `rows` rows of 128, one task a
                      row (mtlx.data.packing, as config.data.packing trains);
      mtlx[mixed]     the same, rows mixing tasks (config.data.packing_mix_tasks: fuller
                      rows, task-specific modules routed per token);
      mtlx[128]       the mixed stream in steps of `per_task` rows padded to 128.

    `sides`: which to run (mtlx[packed] always runs). Ratios: every mtlx side against every
    torch side.
    Timed in ABBA turns, one untimed step before each pass; figures are per pass
    (examples_per_s: examples of the pass / its seconds)."""
    from mtlx.bench import torch_baseline as TB
    w = W.glue_workload(per_task, 128, opts.seed)
    n, real = w.num_examples, w.real_tokens
    cell = W.Cell(config, size, 128, len(w.tasks), per_task, features)
    log(opts, f"[bench] real lengths: {n} GLUE examples ({real} word pieces) of {len(w.tasks)} "
              f"tasks, {config}/{size}")
    unknown = sorted(set(sides) - set(REAL_LENGTH_SIDES))
    if unknown:
        raise ValueError(f"mtlx/bench/harness.py: unknown real-length sides {unknown}; known: "
                         f"{list(REAL_LENGTH_SIDES)}")
    mtlx_sides = {"mtlx[packed]": W.glue_packed_batches(w, rows, max_segments)}
    if "mtlx[mixed]" in sides:
        mtlx_sides["mtlx[mixed]"] = W.glue_packed_batches(w, rows, max_segments, mix_tasks=True)
    if "mtlx[128]" in sides:
        mtlx_sides["mtlx[128]"] = W.glue_padded_batches(w, per_task)
    out = {"workload": {"tasks": [t.name for t in w.tasks], "per_task": per_task,
                        "examples": n, "real_tokens": real, "packed_rows": rows,
                        "max_segments": max_segments}}
    runners = []
    for name, batches in mtlx_sides.items():
        setup = W.build_mtlx(cell, seed=opts.seed, heads=w.tasks, batches=batches)
        inner = MtlxRunner(setup, name)
        first, _ = _first_step(inner)
        shape = tuple(unpack_batch(batches[0])[0].input_ids.shape)
        r = EpochRunner(inner, len(batches), n, real, name)
        out[name] = {"steps_per_pass": len(batches), "batch_shape": shape,
                     "tokens_computed": len(batches) * shape[0] * shape[1],
                     "compile_s": first.compile_seconds}
        runners.append(r)
        log(opts, f"[bench]   {name}: {len(batches)} steps of {shape[0]}x{shape[1]}, compiled in "
                  f"{first.compile_seconds:.1f} s")
    methods = W.CONFIGS[config]
    threads = opts.torch_threads or (None,)
    for name, pad in (("torch[longest]", "longest"), ("torch[128]", "max_length")):
        if name not in sides:
            continue
        arrays = W.glue_torch_arrays(w, pad)
        cfg = W.backbone_config(cell, [t.name for t in w.tasks])
        base = TB.TorchBaseline(cfg, w.tasks, config, methods[0] if methods else {}, arrays,
                                [np.full(per_task, t, np.int32) for t in range(len(w.tasks))],
                                device=opts.torch_device, dtype=features.dtype, mode="per_task",
                                attention_dropout=features.attention_dropout,
                                head_dropout=W.HEAD_DROPOUT, seed=opts.seed, lr=W.LEARNING_RATE,
                                weight_decay=W.WEIGHT_DECAY, clip_norm=W.CLIP_NORM)
        # The fastest of opts.torch_threads over one pass each (after one untimed step).
        best = None
        for th in threads:
            tr = TorchRunner(base, cell, name, th)
            tr.step()
            tr.sync()
            t = timed(tr, len(w.tasks))
            if best is None or t < best[0]:
                best = (t, th)
        inner = TorchRunner(base, cell, name, best[1])
        r = EpochRunner(inner, len(w.tasks), n, real, name)
        log(opts, f"[bench]   {name}: {len(w.tasks)} steps, {best[1] or 'default'} thread(s)")
        out[name] = {"steps_per_pass": len(w.tasks), "torch_threads": best[1],
                     "batch_shapes": [tuple(a["input_ids"].shape) for a in arrays],
                     "tokens_computed": int(sum(a["input_ids"].size for a in arrays))}
        runners.append(r)
    for r in runners:  # one warm pass each (the mtlx step is compiled already)
        r.step()
        r.sync()
    log(opts, f"[bench]   warm passes done; timing {opts.repeats} repeats")
    times = {r.name: [] for r in runners}
    for k in range(opts.repeats):
        for r in runners if k % 2 == 0 else list(reversed(runners)):
            r.inner.step()  # after another framework's turn (see `timed`)
            r.sync()
            t0 = time.perf_counter()
            r.step()
            r.sync()
            times[r.name].append(time.perf_counter() - t0)
    for r in runners:
        med = float(np.median(times[r.name]))
        out[r.name].update({"pass_s": med, "pass_s_repeats": times[r.name],
                            "examples_per_s": n / med, "real_tokens_per_s": real / med,
                            "padding_fraction": 1.0 - real / out[r.name]["tokens_computed"]})
    out["ratios"] = {f"{m}/{k}": out[m]["examples_per_s"] / out[k]["examples_per_s"]
                     for m in mtlx_sides for k in out if k.startswith("torch[")}
    out["config"], out["size"], out["dtype"] = config, size, features.dtype
    return out


def measure_compile_cache(cell: W.Cell, opts: Options) -> dict:
    """Compile time of the cell's step with a fresh persistent compilation cache (cold: the
    executable is written) and again after clearing JAX's in-memory caches (warm: read back).
    Clears every in-memory jit cache: run it after the other measurements."""
    import jax
    directory = tempfile.mkdtemp(prefix="mtlx-bench-cache-")
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    out = {"cell": cell.label, "directory": "temporary (deleted afterwards)"}
    try:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        for phase in ("cold", "warm"):
            jax.clear_caches()
            setup = W.build_mtlx(cell, seed=opts.seed)
            r = MtlxRunner(setup, phase)
            w, first = _first_step(r)
            out[phase] = {"compile_s": w.compile_seconds, "first_step_s": first,
                          "cache_hits": w.cache_hits}
            del r, setup
        out["speedup_compile"] = out["cold"]["compile_s"] / max(out["warm"]["compile_s"], 1e-9)
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        jax.clear_caches()
        shutil.rmtree(directory, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- environment

def environment(opts: Options) -> dict:
    import jax
    dev = jax.devices()[0]
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "jax": jax.__version__, "jax_backend": dev.platform, "device_kind": dev.device_kind,
           "jax_devices": len(jax.devices()),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "matmul_precision": str(jax.config.jax_default_matmul_precision),
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import torch
        env.update(torch=torch.__version__, torch_default_threads=torch.get_num_threads(),
                   torch_thread_settings=list(opts.torch_threads) or "default",
                   torch_threads_probe=opts.torch_threads_probe,
                   torch_device=opts.torch_device)
        import transformers
        env["transformers"] = transformers.__version__
        import peft
        env["peft"] = peft.__version__
    except ImportError as e:
        env["torch"] = f"unavailable ({e})"
    return env


class Peaks(dict):
    """{dtype: mtlx.bench.peaks.Peak}, measured (or looked up) the first time a dtype is used."""

    def __init__(self, opts: Options):
        super().__init__()
        self.opts = opts

    def __missing__(self, dtype: str):
        import jax
        from mtlx.bench.peaks import device_peak
        prec = jax.config.jax_default_matmul_precision
        peak = device_peak(dtype, matmul_precision=str(prec) if prec else None)
        log(self.opts, f"[bench] peak {dtype}: {peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source})")
        self[dtype] = peak
        return peak


def remeasure_peaks(peaks: Peaks) -> None:
    """Measures each CPU peak again and keeps the larger figure: on a shared machine one
    measurement can catch a busy moment (an accelerator's datasheet figure stays)."""
    import jax.numpy as jnp
    from mtlx.bench.peaks import Peak, measure_matmul_peak, product_form
    for dtype, old in list(peaks.items()):
        if not old.source.startswith("measured"):
            continue
        new = measure_matmul_peak(dtype=dtype)
        best = max(old.flops_per_s, new.flops_per_s)
        how = product_form(jnp.zeros((), dtype))
        peaks[dtype] = Peak(best, f"measured: best 2048^3 {dtype} products ({how}) over two rounds "
                                  f"(start {old.flops_per_s / 1e9:.1f}, end {new.flops_per_s / 1e9:.1f} "
                                  f"GFLOP/s)", old.device_kind, dtype)


def recompute_mfu(results: dict, peaks: Peaks) -> None:
    """Every 'mfu' in the results from its model FLOP/s and the (final) peak of its dtype."""
    def fix(fig, dtype):
        if isinstance(fig, dict) and "model_flops_per_s" in fig:
            fig["mfu"] = fig["model_flops_per_s"] / peaks[dtype].flops_per_s
    for r in results.get("cells", []):
        dt = r["features"]["dtype"]
        fix(r.get("mtlx"), dt)
        for b in r.get("baseline", {}).values():
            fix(b, dt)
    for v in (results.get("features") or {}).get("variants", {}).values():
        if v.get("available"):
            fix(v, v["features"]["dtype"])
    pk = results.get("packing")
    if pk:
        for k in ("padded", "packed"):
            fix(pk[k], pk.get("dtype", "float32"))


def measure_peaks(dtypes: Sequence[str], opts: Options) -> Peaks:
    peaks = Peaks(opts)
    for dt in dtypes:
        peaks[dt]  # noqa: B018 - measured on first access
    return peaks


def group_by_tasks(cells: Sequence[W.Cell]) -> List[List[W.Cell]]:
    """Cells grouped by everything but the number of tasks (order kept)."""
    groups: Dict[tuple, List[W.Cell]] = {}
    for c in cells:
        key = (c.config, c.size, c.seq_len, c.batch_size, c.features)
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def task_scaling(results: Sequence[dict]) -> List[dict]:
    """Per group: step time with T tasks over step time with the fewest tasks (same batch)."""
    out = []
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        key = (r["config"], r["size"], r["seq_len"], r["batch_size"], str(r["features"]))
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["num_tasks"])
        base = rs[0]
        row = {"config": key[0], "size": key[1], "seq_len": key[2], "batch_size": key[3],
               "reference_tasks": base["num_tasks"], "mtlx": {}, "baseline": {}}
        for r in rs[1:]:
            row["mtlx"][r["num_tasks"]] = r["mtlx"]["step_s"] / base["mtlx"]["step_s"]
            for mode, b in r.get("baseline", {}).items():
                row["baseline"].setdefault(mode, {})[r["num_tasks"]] = (
                    b["step_s"] / base["baseline"][mode]["step_s"])
        out.append(row)
    return out
