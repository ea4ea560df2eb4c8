"""Input-pipeline throughput against what a BERT-base training step consumes, on this machine.

    python scripts/bench_pipeline.py                      # full data in ../shared/data if present
    python scripts/bench_pipeline.py --data-root SAMPLE   # the embedded sample
    python scripts/bench_pipeline.py --skip-bert          # pipeline only

Measures, with batch 32 and rows of 128 tokens, tasks mixed by temperature sampling (T=2):
  1. preprocessing: reading + tokenizing every train split (done once; cacheable);
  2. the steady-state pipeline: tokenized, batched examples/s out of `DataIterator`
     (after warm-up), and the same through `prefetch` with `device_put` to the default device;
  3. a BERT-base training step (12 layers, hidden 768, `mtlx.models.bert.BertEncoder` + a
     linear head; jitted forward + backward, compile excluded), examples/s;
and prints the ratio pipeline / step (the requirement is >= 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtlx import data as D  # noqa: E402

TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli", "ud_pos")


def _shared_root() -> Path:
    env = os.environ.get("MTLX_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def prepare(data_root, seq_len):
    tok = D.load_tokenizer(D.sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    t0 = time.perf_counter()
    raw = {t: D.load_split(t, "train", data_root=data_root) for t in TASKS}
    t1 = time.perf_counter()
    data = {t: D.tokenize_split(raw[t], tok, max_length=seq_len) for t in TASKS}
    t2 = time.perf_counter()
    n = sum(len(r) for r in raw.values())
    return data, {"examples": n, "read_s": t1 - t0, "tokenize_s": t2 - t1,
                  "tokenize_examples_per_s": n / (t2 - t1)}


def bench_pipeline(data, batch_size, seq_len, steps, warmup=20):
    mix = D.mixture_for(data, D.Temperature(2.0))
    it = D.make_iterator(data, mix, batch_size=batch_size, seed=0, buckets=(seq_len,))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    rows = 0
    for _ in range(steps):
        rows += int(next(it).example_mask.sum())
    host = rows / (time.perf_counter() - t0)

    import jax
    it = D.make_iterator(data, mix, batch_size=batch_size, seed=0, buckets=(seq_len,))
    with D.prefetch(it, size=4, transform=D.device_put_batch) as pf:
        for _ in range(warmup):
            next(pf)
        t0 = time.perf_counter()
        rows = 0
        for _ in range(steps):
            b = next(pf)
            rows += batch_size
        jax.block_until_ready(b)
        dev = rows / (time.perf_counter() - t0)
    resume_t0 = time.perf_counter()
    D.make_iterator(data, mix, batch_size=batch_size, seed=0, buckets=(seq_len,), start_step=100_000)
    resume_s = time.perf_counter() - resume_t0
    return {"host_examples_per_s": host, "prefetch_device_examples_per_s": dev,
            "resume_at_step_100000_s": resume_s}


def bench_bert(batch_size, seq_len, steps):
    try:
        from mtlx.models.bert import BertConfig, BertEncoder
    except ImportError as e:
        return {"error": f"mtlx.models.bert not available: {e}"}
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                     intermediate_size=3072)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids, mask, types, train: bool):
            out = BertEncoder(cfg, name="encoder")(ids, mask, types, deterministic=not train)
            return nn.Dense(2, name="head")(out.pooled_output)

    model = Model()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (batch_size, seq_len)), jnp.int32)
    mask = jnp.ones_like(ids)
    types = jnp.zeros_like(ids)
    labels = jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32)
    params = jax.jit(lambda k: model.init({"params": k}, ids, mask, types, False))(jax.random.PRNGKey(0))
    opt = optax.adamw(1e-4)
    opt_state = jax.jit(opt.init)(params)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            logits = model.apply(p, ids, mask, types, True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(1))
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(2 + i))
    jax.block_until_ready(loss)
    per_step = (time.perf_counter() - t0) / steps
    return {"first_step_incl_compile_s": compile_s, "step_s": per_step,
            "examples_per_s": batch_size / per_step, "device": str(jax.devices()[0])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None,
                   help="data root (default: ../shared/data if present, else the embedded sample); "
                        "SAMPLE for the embedded sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000, help="pipeline steps timed")
    p.add_argument("--bert-steps", type=int, default=3, help="BERT-base steps timed")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    if args.data_root == "SAMPLE":
        root = D.sample_root()
    elif args.data_root:
        root = Path(args.data_root)
    else:
        root = _shared_root() if _shared_root().is_dir() else D.sample_root()
    import jax
    result = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "jax_devices": [str(d) for d in jax.devices()], "data_root": str(root),
              "batch_size": args.batch_size, "seq_len": args.seq_len}
    data, prep = prepare(root, args.seq_len)
    result["preprocessing"] = prep
    print(f"preprocessing: {prep['examples']} examples read in {prep['read_s']:.1f}s, "
          f"tokenized in {prep['tokenize_s']:.1f}s ({prep['tokenize_examples_per_s']:.0f}/s)")
    pipe = bench_pipeline(data, args.batch_size, args.seq_len, args.steps)
    result["pipeline"] = pipe
    print(f"pipeline: {pipe['host_examples_per_s']:.0f} examples/s (host batches), "
          f"{pipe['prefetch_device_examples_per_s']:.0f} examples/s (prefetch + device_put); "
          f"resume at step 100000 took {pipe['resume_at_step_100000_s']:.2f}s")
    if not args.skip_bert:
        bert = bench_bert(args.batch_size, args.seq_len, args.bert_steps)
        result["bert_base_step"] = bert
        if "error" in bert:
            print(bert["error"])
        else:
            ratio = min(pipe["host_examples_per_s"], pipe["prefetch_device_examples_per_s"]) / bert["examples_per_s"]
            result["ratio_pipeline_over_step"] = ratio
            print(f"BERT-base train step: {bert['step_s']:.2f}s/step = {bert['examples_per_s']:.1f} "
                  f"examples/s on {bert['device']} (first step incl. compile "
                  f"{bert['first_step_incl_compile_s']:.0f}s)")
            print(f"ratio pipeline / step: {ratio:.0f}x (requirement: >= 5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
