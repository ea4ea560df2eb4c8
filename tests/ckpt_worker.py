"""A tiny deterministic training run that checkpoints and resumes (driven by test_checkpoint.py).

    python tests/ckpt_worker.py WORKDIR --steps 30 --out final.npz [--slow-io 0.05]

A 2-layer MLP (sharded over the visible devices) trained with Adam on data that is a pure
function of (seed, step) (``np.random.default_rng([seed, step])``), with dropout drawn from a
typed RNG key carried in the state, and a loss EMA standing in for a weighting strategy's
state. On start it resumes from the latest checkpoint in WORKDIR; it saves after every
``--save-every`` steps and on SIGTERM (then exits 0), and at the end writes every state leaf
to ``--out``. So an interrupted-and-resumed run must end bit-identical to an uninterrupted one.

Markers on stdout (one per line, flushed) let the test time its kills:
  FRESH | RESUMED <step>, STEP <step>, SAVING <step>, SAVED <step>, PREEMPTED <step>, DONE.
``--slow-io S`` sleeps S seconds in each file write and rename of the (background) checkpoint
writer, so that a kill lands mid-save. ``--check-only`` prints the latest step and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mtlx.train.checkpoint import Checkpointer, install_preemption_handler  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

D_IN, BATCH = 8, 32
TASKS = [{"name": "regress", "kind": "regression", "num_labels": 0}]


def say(*parts):
    print(*parts, flush=True)


def slow_down_io(seconds: float) -> None:
    """Make orbax's file writes and its final rename slow (simulates a slow disk)."""
    from etils.epath import gpath
    cls = gpath.PosixGPath
    write_text, rename = cls.write_text, cls.rename

    def slow_write_text(self, *a, **k):
        time.sleep(seconds)
        return write_text(self, *a, **k)

    def slow_rename(self, *a, **k):
        time.sleep(seconds)
        return rename(self, *a, **k)

    cls.write_text, cls.rename = slow_write_text, slow_rename


def batch(seed: int, step: int):
    rng = np.random.default_rng([seed, step])
    x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
    w_true = np.random.default_rng([seed, 10**6]).standard_normal((D_IN, 1)).astype(np.float32)
    y = np.tanh(x @ w_true) + 0.1 * rng.standard_normal((BATCH, 1)).astype(np.float32)
    return x, y


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--slow-io", type=float, default=0.0)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    if args.slow_io:
        slow_down_io(args.slow_io)

    mesh = Mesh(np.array(jax.devices()), ("model",))
    shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    width = args.width
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    params = {
        "w1": jax.device_put(jax.random.normal(k1, (D_IN, width)) * 0.3, shard(P(None, "model"))),
        "b1": jax.device_put(jnp.zeros((width,)), shard(P("model"))),
        "w2": jax.device_put(jax.random.normal(k2, (width, 1)) * 0.3, shard(P("model", None))),
        "b2": jax.device_put(jnp.zeros((1,)), shard(P())),
    }
    tx = optax.adam(1e-2)
    state = {"params": params, "opt_state": tx.init(params),
             "step": jax.device_put(jnp.zeros((), jnp.int32), shard(P())),
             "rng": jax.device_put(jax.random.key(args.seed + 1), shard(P())),
             "weighting": {"loss_ema": jax.device_put(jnp.zeros((), jnp.float32), shard(P()))}}
    # Everything not sharded above (e.g. Adam's count) is replicated over the mesh.
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else shard(P()), state)
    state = jax.device_put(state, shardings)

    def train_step(state, x, y):
        rng, sub = jax.random.split(state["rng"])
        keep = jax.random.bernoulli(sub, 0.9, (BATCH, width)).astype(jnp.float32) / 0.9

        def loss_fn(p):
            h = jnp.tanh(x @ p["w1"] + p["b1"]) * keep
            return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        ema = 0.9 * state["weighting"]["loss_ema"] + 0.1 * loss
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "rng": rng, "weighting": {"loss_ema": ema}}

    # Fixed in/out shardings: the resumed run compiles exactly the uninterrupted run's program.
    step_fn = jax.jit(train_step, in_shardings=(shardings, None, None),
                      out_shardings=shardings, donate_argnums=0)

    ckpt = Checkpointer(args.workdir, tasks=TASKS, model_signature={"d_in": D_IN, "width": width},
                        run_config=vars(args), keep_last=args.keep_last)
    if args.check_only:
        restored = ckpt.restore_latest(state)
        say("LATEST", None if restored is None else restored.step)
        if restored is not None:
            say("STATE_STEP", int(restored.state["step"]))
        ckpt.close()
        return 0

    restored = ckpt.restore_latest(state)
    if restored is None:
        step = 0
        say("FRESH")
    else:
        state, step = restored.state, restored.data_state["next_step"]
        assert int(state["step"]) == step == restored.step, (int(state["step"]), step, restored.step)
        say("RESUMED", step)
    preempted = install_preemption_handler()

    while step < args.steps:
        x, y = batch(args.seed, step)
        state = step_fn(state, x, y)
        step += 1
        say("STEP", step)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % args.save_every == 0 or preempted.is_set():
            say("SAVING", step)
            ckpt.save(step, state, data_state={"next_step": step})
            say("SAVED", step)
        if preempted.is_set():
            ckpt.close()
            say("PREEMPTED", step)
            return 0
    ckpt.close()
    if args.out:
        flat = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
        np.savez(args.out, **flat)
    say("DONE", step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
