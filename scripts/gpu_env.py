"""A lent GPU machine's environment, for scripts/gpu_check.sh and scripts/gpu_profile.sh:
the Python packages mtlx's benchmark needs, JAX's and torch's devices, and on a GPU the bf16
matmul rate JAX reaches (8192^3, random data), beside the datasheet peak that MFU divides by.
Exit 1 when something is missing (MTLX_GPU_CHECK_CPU=1: a CPU will do)."""
import importlib, os, sys
missing = []
for name in ("jax", "flax", "optax", "numpy", "torch", "transformers", "peft", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except ImportError as e:
        missing.append(f"{name} ({e})")
import jax
print("jax devices:", jax.devices())
print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
if os.environ.get("MTLX_GPU_CHECK_CPU") != "1" and jax.devices()[0].platform != "gpu":
    missing.append("a GPU for JAX (jax.devices() has none; install jax[cuda])")
try:
    import torch
    print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError:
    pass
if jax.devices()[0].platform == "gpu":
    # What this card's matmul reaches through JAX (bf16, 8192^3), beside the datasheet peak
    # that MFU divides by.
    import time
    import jax.numpy as jnp
    n = 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)  # random: zeros run faster
    f = jax.jit(lambda x: (x @ x) * 0.01)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter(); f(a).block_until_ready(); best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    print(f"measured bf16 matmul {n}^3 through jax: {best / 1e12:.0f} TFLOP/s (best of 5)")
if missing:
    print("MISSING:", "; ".join(missing), "-- carry wheels (see .library/device/README.md) or set PYTHON")
    sys.exit(1)
