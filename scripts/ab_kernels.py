"""Interleaved A/Bs of alternative formulations of a few BERT-base pieces, fwd+bwd, alone (not
the whole step): what the step would gain if it took the alternative, on this machine.

    python scripts/ab_kernels.py                   # all three
    python scripts/ab_kernels.py --only qkv --repeats 21

  qkv        the query/key/value projections as three [768, 768] products (mtlx's) against one
             product over their kernels stacked [768, 3, 768] or concatenated [768, 2304]
             (what a fused-QKV layout would do), input gradient only (frozen backbone: the
             adapters configuration) and input + kernel gradients (shared encoder)
  attention  self-attention as mtlx writes it (heads split after the projection, logits
             'bqhd,bkhd->bhqk') against jax.nn.dot_product_attention's XLA path and a
             head-major layout (projections emit [B, H, L, Dh] directly)
  threefry   dropout masks of mtlx.models.dropout from JAX's threefry2x32 primitive (on a CPU
             its rolled-loop lowering) against the same hash written out unrolled in jnp (the
             bits are checked equal first)

Shapes are the benchmark's BERT-base adapters cell: B=4, L=128, d=768, 12 heads, float32.
Each variant is jitted once, then all are timed in turn, `--repeats` times (blocks of 10 calls);
prints each variant's median ms and its ratio to the first (mtlx's) variant: < 1 is faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

B, L, D, H = 4, 128, 768, 12
DH = D // H


def _timed(fns: dict, args: tuple, repeats: int) -> dict:
    import jax
    import numpy as np
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(10):
                out = f(*args)
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / 10)
    return {n: float(np.median(v)) * 1e3 for n, v in times.items()}


def _report(title: str, med: dict) -> None:
    first = next(iter(med.values()))
    print(title)
    for n, v in med.items():
        print(f"  {n:<28s} {v:8.3f} ms  {v / first:6.3f}x")


def ab_qkv(repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (B, L, D))
    ws = [jax.random.normal(jax.random.key(i), (D, D)) * 0.02 for i in range(1, 4)]
    bs = [jnp.zeros(D) for _ in range(3)]

    def separate(x, ws, bs):
        return [x @ w + b for w, b in zip(ws, bs)]

    def stacked(x, ws, bs):
        y = jnp.einsum("bld,dtn->bltn", x, jnp.stack(ws, 1)) + jnp.stack(bs, 0)
        return [y[:, :, i] for i in range(3)]

    def concatenated(x, ws, bs):
        y = x @ jnp.concatenate(ws, 1) + jnp.concatenate(bs, 0)
        return jnp.split(y, 3, axis=-1)

    def loss(f):
        def l(x, ws, bs):
            q, k, v = f(x, ws, bs)
            return jnp.sum(jnp.tanh(q) * k + v * v)
        return l

    variants = (("separate (mtlx)", separate), ("stacked [768,3,768]", stacked),
                ("concatenated [768,2304]", concatenated))
    for argnums, what in (((0,), "input gradient only"), ((0, 1, 2), "input + kernel gradients")):
        fns = {n: jax.jit(jax.grad(loss(f), argnums=argnums)) for n, f in variants}
        _report(f"qkv projections, fwd+bwd, {what}", _timed(fns, (x, ws, bs), repeats))


def ab_attention(repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (B, L, D))
    ws = [jax.random.normal(k, (D, D)) * 0.02 for k in ks[1:]]
    mask = jnp.ones((B, 1, 1, L), bool).at[0, 0, 0, 100:].set(False)
    low = jnp.finfo(jnp.float32).min

    def mtlx_layout(x, ws):
        q, k, v = [(x @ w).reshape(B, L, H, DH) for w in ws[:3]]
        logits = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * DH ** -0.5, low)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
        return ctx.reshape(B, L, D) @ ws[3]

    def sdpa(x, ws):
        q, k, v = [(x @ w).reshape(B, L, H, DH) for w in ws[:3]]
        ctx = jax.nn.dot_product_attention(q, k, v, mask=jnp.broadcast_to(mask, (B, H, L, L)))
        return ctx.reshape(B, L, D) @ ws[3]

    def head_major(x, ws):
        q, k, v = [jnp.einsum("bld,dhk->bhlk", x, w.reshape(D, H, DH)) for w in ws[:3]]
        logits = jnp.where(mask, jnp.einsum("bhqd,bhkd->bhqk", q, k) * DH ** -0.5, low)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1), v)
        return jnp.einsum("bhqd,hdo->bqo", ctx, ws[3].reshape(H, DH, D))

    variants = (("mtlx (bqhd)", mtlx_layout), ("jax.nn.dot_product_attention", sdpa),
                ("head-major (bhld)", head_major))
    outs = [jax.jit(f)(x, ws) for _, f in variants]
    for (n, _), o in zip(variants[1:], outs[1:]):
        err = float(jnp.max(jnp.abs(o - outs[0])))
        if err > 1e-4:
            raise SystemExit(f"ab_kernels: attention variant {n!r} differs from mtlx's by {err}")
    fns = {n: jax.jit(jax.grad(lambda x, ws, f=f: jnp.sum(jnp.tanh(f(x, ws))))) for n, f in variants}
    _report("self-attention sublayer (4 projections + attention), fwd+bwd", _timed(fns, (x, ws), repeats))


def _threefry_unrolled(k1, k2, x1, x2):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011; JAX's threefry2x32 lowering unrolled)."""
    import jax.numpy as jnp
    from jax import lax

    def rotl(v, r):
        return lax.shift_left(v, jnp.uint32(r)) | lax.shift_right_logical(v, jnp.uint32(32 - r))

    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            a = a + b
            b = a ^ rotl(b, r)
        a, b = a + ks[(i + 1) % 3], b + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return a, b


def ab_threefry(repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    from mtlx.models import dropout as DR
    primitive = DR.threefry2x32_p

    class Unrolled:
        bind = staticmethod(_threefry_unrolled)

    data = jax.random.key_data(jax.random.key(3))
    counters = DR._counters((B, L, D // 4))
    a = jax.jit(lambda d, c: primitive.bind(d[0], d[1], jnp.zeros_like(c), c))(data, counters)
    b = jax.jit(lambda d, c: _threefry_unrolled(d[0], d[1], jnp.zeros_like(c), c))(data, counters)
    if not all(bool(jnp.all(u == v)) for u, v in zip(a, b)):
        raise SystemExit("ab_kernels: the unrolled threefry's bits differ from JAX's")

    x = jax.random.normal(jax.random.key(1), (B, L, D))
    probs = jax.random.normal(jax.random.key(2), (B, H, L, L))
    key = jax.random.key(4)

    def step(x, p, key):
        def g(x, p):
            k1, k2 = jax.random.split(key)
            return (jnp.sum(jnp.tanh(DR.dropout(x, 0.1, k1)))
                    + jnp.sum(DR.dropout(p, 0.1, k2) ** 2))
        return jax.grad(g, argnums=(0, 1))(x, p)

    fns = {}
    for name, impl in (("threefry2x32_p (mtlx)", primitive), ("unrolled jnp", Unrolled)):
        DR.threefry2x32_p = impl          # read while tracing: each jit keeps its own
        try:
            f = jax.jit(step)
            jax.block_until_ready(f(x, probs, key))
        finally:
            DR.threefry2x32_p = primitive
        fns[name] = f
    _report("dropout masks [4,128,768] + [4,12,128,128], fwd+bwd (bits equal)",
            _timed(fns, (x, probs, key), repeats))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("qkv", "attention", "threefry"), action="append")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    import jax
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, B={B} L={L} d={D} heads={H}")
    for name, fn in (("qkv", ab_qkv), ("attention", ab_attention), ("threefry", ab_threefry)):
        if not args.only or name in args.only:
            fn(args.repeats)


if __name__ == "__main__":
    main()
