"""The collectives of a sharded train step, without a device: the step of a benchmark cell
compiled for a mesh of host CPU devices, its collectives summed by kind (bytes out of each, per
device), the largest listed. XLA partitions a program the same way for any backend, so the
communication a mesh layout costs (FSDP's weight gathers, gradient reductions, an activation
gathered whole) can be read on the dev CPU. The SPMD partitioner's choices (what is gathered
whole, what moves by all-to-all) are the same on every backend; the passes after it are not:
GPU and TPU pipelines also reassociate sums of all-reduces, turn all-reduce + slice into
reduce-scatter and combine small collectives, so their byte counts per kind can be lower than
XLA:CPU's.

    python scripts/collectives.py --cell shared/base/128/4/128 --layers 2 --mesh data=2,fsdp=4
    python scripts/collectives.py ... --embed-route off   # jnp.take's own partitioning (A/B)
    python scripts/collectives.py ... --grad-constraint off   # gradients left to XLA (A/B)

--embed-route off: the embeddings as `jnp.take` (mtlx.models.embed's route off).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compiled_step(cell, mesh_shape, **config):
    """(compiled module text, backbone config, mesh) of the cell's train step on the mesh;
    `config`: BertConfig fields replaced (num_layers, hidden_size, vocab_size, ...)."""
    import jax
    from mtlx.bench import workload as W
    from mtlx.models.multitask import MultiTaskModel, init_params
    from mtlx.peft import registry
    from mtlx.train import optim, sharding
    from mtlx.train.step import create_state, make_train_step
    mesh = sharding.make_mesh(mesh_shape)
    heads = W.task_heads(cell.num_tasks)
    cfg = dataclasses.replace(W.backbone_config(cell, [h.name for h in heads]), **config)
    model = MultiTaskModel(cfg, heads, head_dropout=0.0)
    batch = W.mixed_batches(cell, 1, 0)[0]
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), batch))
    trainable = None  # as the benchmark and the loop: a frozen backbone is not differentiated
    if not W.BACKBONE_TRAINS[cell.config]:
        trainable = optim.trainable_mask(params, registry.trainable_patterns(cfg))
    tx = optim.make_optimizer(W.optim_config(cell.features.optimizer), params, trainable)
    state = jax.eval_shape(lambda: create_state(init_params(model, jax.random.key(0), batch), tx,
                                                jax.random.key(1)))
    jitted, _ = sharding.jit_train_step(make_train_step(model, tx, trainable=trainable), mesh,
                                        state, batch)
    return jitted.lower(state, jax.eval_shape(lambda x: x, batch)).compile().as_text(), cfg, mesh


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="shared/base/128/4/128",
                   help="config/size/L/T/B[:field=value,...] (mtlx.bench.workload)")
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: the size's)")
    p.add_argument("--mesh", default="data=2,fsdp=4", help="axis=size,... (data, fsdp, tensor)")
    p.add_argument("--embed-route", choices=("auto", "off"), default="auto")
    p.add_argument("--grad-constraint", choices=("on", "off"), default="on",
                   help="off: the gradients not pinned to the parameters' shardings "
                        "(mtlx.train.sharding.constrain; the A/B)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    mesh_shape = {}
    for item in filter(None, args.mesh.split(",")):
        axis, _, size = item.partition("=")
        if not size.strip().isdigit() or int(size) < 1:
            raise SystemExit(f"scripts/collectives.py: --mesh {args.mesh!r}: {item!r} must be axis=size (a size >= 1)")
        mesh_shape[axis.strip()] = int(size)
    devices = 1
    for n in mesh_shape.values():
        devices *= max(n, 1)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")

    from hlo_traffic import collectives
    from mtlx.bench import workload as W
    from mtlx.models import embed
    from mtlx.train import sharding

    cell, _ = W.parse_variant(args.cell, W.Features(), "scripts/collectives.py")
    with embed.route_policy(args.embed_route), sharding.grad_constraint_policy(args.grad_constraint):
        text, cfg, mesh = compiled_step(cell, mesh_shape,
                                        **({"num_layers": args.layers} if args.layers else {}))
    ops = collectives(text)
    by_kind = collections.defaultdict(lambda: [0, 0])
    for kind, nbytes, _, _ in ops:
        by_kind[kind][0] += 1
        by_kind[kind][1] += nbytes
    total = sum(b for _, b in by_kind.values())
    print(f"{args.cell}, {cfg.num_layers} layers, mesh {dict(mesh.shape)}, embed route "
          f"{args.embed_route}, grad constraint {args.grad_constraint}: {len(ops)} collectives, "
          f"{total / 1e6:.1f} MB out per device")
    for kind, (n, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:20s} {n:4d}  {b / 1e6:9.1f} MB")
    print(f"  largest {args.top}:")
    for kind, nbytes, shape, op_name in sorted(ops, key=lambda o: -o[1])[:args.top]:
        print(f"  {nbytes / 1e6:8.1f} MB  {kind:14s} {shape[:48]:48s} {op_name[-70:]}")
    return {kind: b for kind, (_, b) in by_kind.items()}


if __name__ == "__main__":
    main()
