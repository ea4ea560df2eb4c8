"""Peak FLOP/s by device kind (datasheet, dense), the denominator of MFU.

Accelerators: the vendor's dense (no sparsity) peak for the matmul units at the compute dtype.
For float32 on NVIDIA Ampere/Hopper the figure is TF32 tensor-core throughput, because XLA runs
float32 matmuls at default precision on TF32 there; a run with
``jax_default_matmul_precision='highest'`` uses the plain FP32 units (the 'fp32' column).
Sources: NVIDIA H100 datasheet (SXM5: 989 TFLOP/s bf16, 494.7 tf32, 66.9 fp32; PCIe: 756,
378, 51.2), H200 datasheet (same chip and clocks as H100 SXM), A100 datasheet (312, 156,
19.5); Google Cloud TPU system architecture pages (v4 275, v5e 197, v5p 459, v6e 918 bf16 per
chip; float32 matmuls run as several bf16 passes, so the bf16 figure is the ceiling).

CPUs have no datasheet figure that means anything for XLA's code: the 'peak' of a CPU is
MEASURED here, as the best float32 FLOP/s of a large square matmul through jax.numpy on the
same device and threads the benchmark uses (`measure_matmul_peak`), and is always labelled as
measured. MFU on a CPU therefore reads "fraction of what this machine's own matmul reaches".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

# (substring of jax's device_kind, lower case) -> peaks in FLOP/s. First match wins: the more
# specific names come first.
PEAKS = (
    ("h100 pcie", {"bfloat16": 756e12, "tf32": 378e12, "float32": 51.2e12}),
    ("h100", {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("h200", {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("a100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v6", {"bfloat16": 918e12, "float32": 918e12}),
)


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: str  # 'datasheet: ...' or 'measured: ...'
    device_kind: str
    dtype: str


def datasheet_peak(device_kind: str, dtype: str, matmul_precision: Optional[str] = None) -> Optional[Peak]:
    """The table's peak for a device kind and compute dtype, or None for an unknown device.

    dtype 'float32' on NVIDIA reads the TF32 figure unless matmul_precision is 'highest'
    (or 'float32'), which runs on the FP32 units."""
    kind = device_kind.lower()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"mtlx/bench/peaks.py: peaks are tabled for float32 and bfloat16, got {dtype!r}")
    for key, peaks in PEAKS:
        if key in kind:
            column = dtype
            if dtype == "float32" and "tf32" in peaks and matmul_precision not in ("highest", "float32"):
                column = "tf32"
            return Peak(peaks[column], f"datasheet: {key} dense {column}", device_kind, dtype)
    return None


def product_form(x) -> str:
    """How the models multiply operands like x now (mtlx.models.precision's policy)."""
    from mtlx.models import precision
    return "accumulating in float32" if precision.f32_accumulate(x, x) else "plain jnp.dot"


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32", device=None) -> Peak:
    """Best FLOP/s of an n x n x n matmul through jax (compile and a warm-up excluded), the
    product the models run (mtlx.models.precision.dot under its current policy: on a CPU,
    bfloat16 operands accumulate into float32, XLA:CPU's fast bf16 kernel)."""
    import jax
    from mtlx.models import precision
    device = device or jax.devices()[0]
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype), device)
    f = jax.jit(precision.dot)
    how = product_form(a)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return Peak(2.0 * n ** 3 / best, f"measured: best of {repeats} {n}x{n}x{n} {dtype} products ({how})",
                device.device_kind, dtype)


def device_peak(dtype: str = "float32", device=None, matmul_precision: Optional[str] = None,
                measure_n: int = 2048) -> Peak:
    """The datasheet peak of an accelerator, or the measured matmul peak of a CPU / unknown
    device (labelled 'measured')."""
    import jax
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        found = datasheet_peak(device.device_kind, dtype, matmul_precision)
        if found is not None:
            return found
    return measure_matmul_peak(measure_n, dtype=dtype, device=device)
