"""Benchmark: forward+backward time with 8 tasks routed per example vs 1 task.

Same backbone, same batch size, same PEFT method; the only difference is that the 8-task model
holds 8 sets of task weights and every batch mixes all 8 tasks (each example gathers its own
task's weights), while the 1-task model has one set (routing short-circuits to one plain
matmul). The step is value_and_grad of the summed task losses with respect to what trains in
PEFT (the method's parameters, heads, layer norms: `registry.trainable_patterns`); the frozen
backbone is an input, as in training. Also compares the two routing implementations
(mtlx.peft.routing: 'gather' vs 'ragged' = jax.lax.ragged_dot over examples sorted by task).

    python scripts/bench_routing.py                         # defaults below, CPU
    python scripts/bench_routing.py --methods adapter,lora --impls gather,ragged \
        --hidden 256 --layers 4 --seq 128 --batch 32 --rounds 5 --iters 5

Target: ratio (8 tasks / 1 task) <= 1.15 for adapters and LoRA. Timings are medians over
`rounds` x `iters` steps, the configurations interleaved round by round so that load from
other processes hits them alike; "control" is a second, separately compiled 1-task step timed
last in each round, so its ratio shows how far apart two identical configurations land.

Measured by the author (CPU: 2 cores shared with other jobs, load average 5-9 during the runs,
jax 0.10.2, float32, Houlsby adapters rf 16 / LoRA r 8 on query+value, 8 GLUE-like tasks):

  python scripts/bench_routing.py --hidden 128 --layers 2 --seq 64 --batch 32 --rounds 7 --iters 5
    adapter: gather 0.983, ragged 1.604, control 1.024   (1 task: 203.5 ms/step)
    lora:    gather 0.967, ragged 1.445, control 0.986   (1 task: 196.0 ms/step)
  python scripts/bench_routing.py --rounds 5 --iters 3          (d=256, 4 layers, seq 128, batch 32)
    adapter: gather 1.003, ragged 1.285, control 0.960   (1 task: 2006 ms/step)
    lora:    gather 0.894, ragged 1.223, control 1.119   (1 task: 1908 ms/step)

Three earlier runs without the control gave gather 0.90-1.04 and ragged 1.18-1.61. With
'gather' the 8-task cost is within the noise of the 1-task cost (the per-example weights are
[B, d, d/rf] or [B, d, r]: small next to the activations); `jax.lax.ragged_dot` is 1.2-1.6x
slower on CPU (it sorts and unsorts the activations and XLA:CPU has no grouped-GEMM kernel),
so 'gather' is the default (mtlx.peft.routing.DEFAULT_IMPL). Not measured on GPU (no device
was available to this task).

Methods are entries of `METHODS` (name -> method configs); another method (e.g. HyperFormer++)
is one more entry.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.traverse_util as tu  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtlx.batch import make_batch  # noqa: E402
from mtlx.models import heads as H  # noqa: E402
from mtlx.models.bert import BertConfig  # noqa: E402
from mtlx.models.heads import TaskHead  # noqa: E402
from mtlx.models.multitask import MultiTaskModel, init_params  # noqa: E402
from mtlx.peft import registry  # noqa: E402
from mtlx.train import optim  # noqa: E402

METHODS = {
    "adapter": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 16}],
    "lora": [{"method": "lora", "rank": 8, "alpha": 16,
              "targets": ["attention.query", "attention.value"]}],
    "hyperformer++": [{"method": "hyperformer++", "reduction_factor": 16}],
}


def backbone(args) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.heads, intermediate_size=4 * args.hidden,
                      max_position_embeddings=max(512, args.seq), hidden_dropout=0.0,
                      attention_dropout=0.0)


def batch_of(num_tasks: int, args, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, l = args.batch, args.seq
    task_ids = np.resize(np.arange(num_tasks), b)
    rng.shuffle(task_ids)  # tasks interleaved, not sorted: the general mixed batch
    return make_batch(input_ids=rng.integers(1000, 30000, (b, l)),
                      attention_mask=np.ones((b, l), np.int32), task_ids=task_ids,
                      labels=rng.integers(0, 2, b))


def make_step(method: str, num_tasks: int, impl: str, args):
    names = tuple(f"task{i}" for i in range(num_tasks))
    tasks = tuple(TaskHead(n, "classification", 2) for n in names)
    cfgs = [dict(c, impl=impl) for c in METHODS[method]]
    cfg = registry.attach(backbone(args), cfgs, names)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    batch = batch_of(num_tasks, args)
    params = jax.jit(lambda b: init_params(model, jax.random.key(0), b))(batch)
    mask = tu.flatten_dict(optim.trainable_mask(params, registry.trainable_patterns(cfg)), sep="/")
    flat = tu.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if mask[k]}
    frozen = {k: v for k, v in flat.items() if not mask[k]}

    def loss(train, frozen, batch):
        p = tu.unflatten_dict({**frozen, **train}, sep="/")
        out = model.apply({"params": p}, batch)
        return H.task_losses(out, batch, tasks)[0].sum()

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(train, frozen, batch))  # compile
    return lambda: jax.block_until_ready(step(train, frozen, batch))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="adapter,lora,hyperformer++")
    ap.add_argument("--impls", default="gather,ragged,onehot")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-control", action="store_true",
                    help="skip the control: a second, separately compiled 1-task step timed last "
                         "in each round (its ratio shows the noise and order bias)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    impls = args.impls.split(",")
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"d={args.hidden} layers={args.layers} seq={args.seq} batch={args.batch}, float32, "
          f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    steps = {}
    for m in methods:
        steps[(m, "-", 1)] = make_step(m, 1, impls[0], args)  # one task: no routing at all
        for impl in impls:
            steps[(m, impl, args.tasks)] = make_step(m, args.tasks, impl, args)
        if not args.no_control:
            steps[(m, "control", 1)] = make_step(m, 1, impls[0], args)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, fn in steps.items():
            for _ in range(args.iters):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    print(f"{'method':<10}{'routing':<9}{'tasks':>6}{'ms/step':>10}{'ratio':>8}")
    for (m, impl, t), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        base = 1e3 * statistics.median(times[(m, "-", 1)])
        print(f"{m:<10}{impl:<9}{t:>6}{ms:>10.1f}{ms / base:>8.3f}")
    print(f"# load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
