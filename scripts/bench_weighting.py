"""Step time of every task-balancing strategy as a ratio to EW: same model, same batch.

    python scripts/bench_weighting.py                      # small BERT on whatever device JAX has
    python scripts/bench_weighting.py --hidden 768 --layers 12 --heads 12 --seq 128 --batch 32
    python scripts/bench_weighting.py --memory             # BERT-base, T=8: compiled memory only

Timing: every configuration is compiled first, then timed in interleaved rounds (each round runs
`--steps` steps of every configuration in turn) so that load changes on a shared machine hit
them alike; the ratio to EW is the median over rounds of the ratio within a round. XLA's FLOP
count of each compiled step is printed too: unlike times, it does not depend on the load. 'reference' is a plain `jax.grad` step with static
weights (the step before task balancing existed) to show what EW costs over it. One-backward
strategies should be within 1.05x of EW; 'famo' is mtlx's default FAMO (the next step's losses
give the loss change), 'famo:same_batch' LibMTL's, which needs one more forward of the batch
after the update. Per-task strategies run with grads_wrt='params' (T backward passes
through the whole model, vmap) and, where the strategy allows it, 'representation' (T backward
passes through the heads only, then one weighted backward).

--memory compiles (never runs) the step for BERT-base with T = 8 classification tasks and
reports XLA's buffer assignment (arguments, outputs, temporaries) for EW and the per-task
options: the cost of G [T, D] versus the representation gradients [T, B, L, d] / [T, B, d].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mtlx import weighting as W  # noqa: E402
from mtlx.batch import IGNORE_INDEX, make_batch  # noqa: E402
from mtlx.models import heads as H  # noqa: E402
from mtlx.models.bert import BertConfig  # noqa: E402
from mtlx.models.heads import TaskHead  # noqa: E402
from mtlx.models.multitask import MultiTaskModel, init_params  # noqa: E402
from mtlx.train import step as S  # noqa: E402

ONE_BACKWARD = ("static", "ew", "uw", "dwa", "rlw", "gls", "famo")
PER_TASK = ("gradnorm", "mgda", "pcgrad", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "db_mtl")
HPARAMS = {"dwa": {"steps_per_epoch": 100}}


def make_tasks(t: int, token_tasks: bool) -> tuple:
    kinds = [("classification", 3), ("regression", 0)] + (
        [("token_classification", 5)] if token_tasks else [])
    return tuple(TaskHead(f"task{i}", *kinds[i % len(kinds)]) for i in range(t))


def make_data(tasks, b: int, l: int, vocab: int, seed: int = 0):
    r = np.random.default_rng(seed)
    ids = np.arange(b) % len(tasks)          # every task present, as in a mixed batch
    mask = np.ones((b, l), np.int32)
    kinds = np.array([tasks[i].kind for i in ids])
    labels = np.where(kinds == "classification", r.integers(0, 3, b), IGNORE_INDEX)
    tok = np.where((kinds == "token_classification")[:, None], r.integers(0, 5, (b, l)),
                   IGNORE_INDEX)
    return make_batch(input_ids=r.integers(1, vocab, (b, l)), attention_mask=mask, task_ids=ids,
                      labels=labels, label_values=r.normal(size=b), token_labels=tok)


def reference_step(model, tx, weights):
    """The step before task balancing: jax.grad of sum_i w_i sums_i / count_i."""
    tasks, t = model.tasks, len(model.tasks)

    def loss(params, batch, rng, scale):
        out = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        loss_sum, weight = H.example_losses(out, batch, tasks)
        seg = jnp.clip(batch.task_ids, 0, t - 1)
        valid = (batch.task_ids >= 0) & (weight > 0)
        sums = jax.ops.segment_sum(jnp.where(valid, loss_sum, 0.0), seg, num_segments=t)
        return jnp.sum(scale * sums), sums

    def step(state, batch):
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        counts = S.task_counts(batch, tasks)
        scale = jnp.where(counts > 0, weights / jnp.maximum(counts, 1e-9), 0.0)
        grads, sums = jax.grad(loss, has_aux=True)(state.params, batch, step_rng, scale)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             rng=jax.random.key_data(rng)), {"loss": jnp.sum(sums)}

    return step


def configurations(model, names):
    """(label, strategy or None, make_train_step kwargs)."""
    out = [("reference", None, None)]
    for name in names:
        if name not in W.STRATEGIES:
            raise SystemExit(f"unknown strategy {name!r}; known: {sorted(W.STRATEGIES)}")
        kw = dict(HPARAMS.get(name, {}))
        if name == "static":
            kw["weights"] = tuple(1.0 + i for i in range(len(model.tasks)))
        s = W.get_strategy(name, **kw)
        if not s.needs_task_grads:
            out.append((name, s, {}))
            if name == "famo":   # LibMTL's update: a second forward of the batch (FAMO docstring)
                out.append(("famo:same_batch", W.get_strategy(name, **kw, after="same_batch"), {}))
            continue
        out.append((f"{name}/params", s, {"grads_wrt": "params"}))
        if s.supports_rep_grad:
            out.append((f"{name}/representation", s, {"grads_wrt": "representation"}))
    return out


def bench(args):
    tasks = make_tasks(args.tasks, token_tasks=True)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                     num_heads=args.heads, intermediate_size=4 * args.hidden,
                     max_position_embeddings=max(512, args.seq), type_vocab_size=2)
    model = MultiTaskModel(cfg, tasks)
    batch = jax.device_put(make_data(tasks, args.batch, args.seq, args.vocab))
    params = init_params(model, jax.random.key(0), batch)
    tx = optax.adamw(1e-4)
    names = args.strategies.split(",") if args.strategies else ONE_BACKWARD + PER_TASK
    compiled, flops = [], {}
    for label, strategy, kw in configurations(model, names):
        t0 = time.perf_counter()
        if strategy is None:
            fn = reference_step(model, tx, jnp.ones((len(tasks),)))
            state = S.create_state(params, tx, jax.random.key(1))
        else:
            fn = S.make_train_step(model, tx, weighting=strategy, **kw)
            state = S.create_state(params, tx, jax.random.key(1),
                                   S.init_weighting(strategy, model, params))
        state = jax.tree_util.tree_map(jnp.copy, state)   # donated: params must not be shared
        step = jax.jit(fn, donate_argnums=0).lower(state, batch).compile()
        state, m = step(state, batch)          # warm-up
        jax.block_until_ready(m)
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[label] = float((cost or {}).get("flops", float("nan")))
        compiled.append([label, step, state, []])
        print(f"compiled {label:28s} {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    for r in range(args.rounds):
        for entry in compiled:
            _, step, state, times = entry
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = step(state, batch)
            jax.block_until_ready((state, m))
            times.append((time.perf_counter() - t0) / args.steps)
            entry[2] = state
    ref = "ew" if any(e[0] == "ew" for e in compiled) else "reference"
    ref_times = next(e[3] for e in compiled if e[0] == ref)
    device = jax.devices()[0]
    print(f"\nBERT hidden={args.hidden} layers={args.layers} seq={args.seq} batch={args.batch} "
          f"T={args.tasks} fp32, {device.platform} ({device.device_kind}); {args.rounds} rounds "
          f"x {args.steps} steps")
    print("ms/step: median round; x EW: median over rounds of (this round's time / EW's time in "
          "the same round); GFLOP: XLA's cost analysis of the compiled step")
    print(f"{'strategy':30s} {'ms/step':>9s} {'x EW':>7s} {'GFLOP':>9s} {'x EW':>7s}")
    for label, _, _, times in compiled:
        paired = statistics.median(a / b for a, b in zip(times, ref_times))
        print(f"{label:30s} {1e3 * statistics.median(times):9.2f} {paired:7.3f} "
              f"{flops[label] / 1e9:9.3f} {flops[label] / flops[ref]:7.3f}")


def memory(args):
    """Compiled memory of the step for BERT-base, T classification tasks (no execution)."""
    t = args.tasks
    tasks = tuple(TaskHead(f"task{i}", "classification", 3) for i in range(t))
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                     intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    model = MultiTaskModel(cfg, tasks)
    batch = make_data(tasks, args.batch, args.seq, 30522)
    params = jax.eval_shape(lambda b: init_params(model, jax.random.key(0), b), batch)
    d = S.shared_grad_dim(params, [x.name for x in tasks])
    tx = optax.adamw(1e-4)
    print(f"BERT-base, T={t}, batch {args.batch} x {args.seq}, fp32: D = {d / 1e6:.1f}M shared "
          f"parameters; G = T x D = {t * d * 4 / 2 ** 30:.2f} GiB; hidden representation "
          f"T x B x L x d = {t * args.batch * args.seq * 768 * 4 / 2 ** 20:.1f} MiB; pooled "
          f"T x B x d = {t * args.batch * 768 * 4 / 2 ** 20:.2f} MiB")
    rows = [("ew", "ew", {}), ("mgda/params (vmap)", "mgda", {}),
            ("mgda/params (sequential)", "mgda", {"sequential": True}),
            ("mgda/representation hidden", "mgda", {"grads_wrt": "representation"}),
            ("mgda/representation pooled", "mgda", {"grads_wrt": "representation",
                                                    "representation": "pooled"})]
    print(f"{'configuration':32s} {'args GiB':>9s} {'temp GiB':>9s} {'out GiB':>8s}")
    for label, name, kw in rows:
        s = W.get_strategy(name)
        state = jax.eval_shape(lambda p: S.create_state(p, tx, jax.random.key(1),
                                                        S.init_weighting(s, model, p)), params)
        fn = S.make_train_step(model, tx, weighting=s, **kw)
        t0 = time.perf_counter()
        mem = jax.jit(fn, donate_argnums=0).lower(state, batch).compile().memory_analysis()
        print(f"{label:32s} {mem.argument_size_in_bytes / 2 ** 30:9.2f} "
              f"{mem.temp_size_in_bytes / 2 ** 30:9.2f} {mem.output_size_in_bytes / 2 ** 30:8.2f}"
              f"   (compiled in {time.perf_counter() - t0:.0f}s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=None, help="default 64 (128 with --memory)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, default=None,
                   help="T, tasks of 3 head kinds, all present (default 4; 8 with --memory)")
    p.add_argument("--steps", type=int, default=5, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--strategies", default="", help="comma-separated names (default: all)")
    p.add_argument("--memory", action="store_true", help="BERT-base compiled memory, no run")
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = 128 if args.memory else 64
    if args.tasks is None:
        args.tasks = 8 if args.memory else 4
    memory(args) if args.memory else bench(args)


if __name__ == "__main__":
    main()
