"""Matrix products in a low-precision compute dtype, accumulated and emitted the fast way.

XLA:CPU computes a bfloat16 x bfloat16 -> bfloat16 product at float32 speed (it widens the
operands: ~180 GFLOP/s on the 2-core AVX-512-BF16 dev machine), but a bfloat16 x bfloat16 ->
float32 product with its native bf16 dot-product kernels (~380 GFLOP/s there; torch's oneDNN
bf16 matmul ~410). Autodiff of ``dot(..., preferred_element_type=float32).astype(bf16)`` would
still give the backward pass float32 x bfloat16 products (the cotangent is float32), which run
at float32 speed. So `dot` and `einsum` here are custom-VJP products whose forward and both
backward products take bfloat16 operands and accumulate into float32, then round to the
compute dtype: the values are those of the plain bf16 product (XLA accumulates either in
float32), only the kernels differ. What XLA:CPU (jax 0.10.2) then does with them, found by
trying (`_product` lays the operands out accordingly):
  - forward products and input gradients (x W^T) run on the bf16 kernels;
  - XLA decides whether a bf16 product runs on them from its operands' layouts, early (its
    operand upcaster, before layout assignment): a left operand held column-major, as a
    transpose's free layout is, even behind an optimization barrier, makes it widen the
    product to float32 (weight gradients x^T g and two of attention's backward products ran
    at float32 speed so, until the eighth session);
  - a batched product whose transposed left operand XLA folds into it is handed to XLA's
    fallback dot, which cannot run bf16 x bf16 -> f32 at all (a run-time error);
  so a left operand that must move is transposed into a row-major array of its own
  (`_materialized_transpose`), and every product of the forward and backward passes runs on
  the bf16 kernels (tests/test_precision.py checks the compiled programs).

The policy, `set_policy`:
  'auto'       this path for low-precision operands on a CPU backend; the plain product
               elsewhere (GPUs' and TPUs' bf16 GEMMs already accumulate in float32 and emit
               bf16 in their epilogue; not measured otherwise, so left as it was)
  'f32_accumulate'  this path on every backend
  'native'     always the plain product (jnp.dot / jnp.einsum)
float32 operands always take the plain product (the HLO of float32 models is unchanged).
The policy is read at trace time: set it before a step is compiled.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from mtlx.models.policy import TracePolicy

POLICIES = ("auto", "f32_accumulate", "native")
_POLICY = TracePolicy("mtlx.models.precision", POLICIES, "auto")
set_policy = _POLICY.set      # (name) -> the previous policy
get_policy = _POLICY.get
policy = _POLICY.scope        # ``with policy('native'): ...`` traces the products inside under it


def f32_accumulate(*operands) -> bool:
    """Whether products of these operands take the float32-accumulating path now."""
    if _POLICY.value == "native":
        return False
    dtype = jnp.dtype(operands[0].dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if any(jnp.dtype(x.dtype) != dtype for x in operands):
        return False
    return _POLICY.value == "f32_accumulate" or jax.default_backend() == "cpu"


def _product(spec: str, a, b):
    """einsum(spec, a, b) as ONE lax.dot_general accumulated in float32, laid out the way
    XLA:CPU's fast bf16 kernels take it (found by trying; jax 0.10.2's XLA:CPU):
      - the LEFT operand in the order [batch, free, contracted]. Otherwise XLA either widens
        both operands to float32 (a 2-D x^T g: float32 speed) or, for a batched product, hands
        it to its fallback dot, which cannot run bf16 x bf16 -> f32 at all (e.g. the vmapped
        backward of attention in the per-task gradients). A left operand that must move is
        transposed into a row-major array of its own (`_materialized_transpose`).
      - the RIGHT operand as it is, read through the dimension numbers: a transposed right
        operand (x W^T in every input gradient) is taken as is, while an explicit transpose
        of it makes XLA widen the product to float32."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    batch = [c for c in out if c in sa and c in sb]
    contract = [c for c in sa if c in sb and c not in out]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    perm = [sa.index(c) for c in batch + free_a + contract]
    if perm != list(range(a.ndim)):
        a = _materialized_transpose(a, perm)
    nb = len(batch)
    dims = ((tuple(range(nb + len(free_a), a.ndim)), tuple(sb.index(c) for c in contract)),
            (tuple(range(nb)), tuple(sb.index(c) for c in batch)))
    y = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    order = batch + free_a + free_b          # dot_general's output: batch, lhs free, rhs free
    perm_out = [order.index(c) for c in out]
    return y if perm_out == list(range(y.ndim)) else jnp.transpose(y, perm_out)


def _materialized_transpose(a, perm):
    """jnp.transpose(a, perm) as a row-major array of its own. XLA:CPU gives a transpose the
    layout that makes it free (the input's bytes, read column-major) and decides from the
    operands' layouts, before its layout assignment, whether a bf16 product runs on its bf16
    kernel: with a column-major left operand it widens the product to float32, even behind an
    optimization barrier (the barrier takes its operand's layout). A flat vector has one
    layout only: the barrier holds the transposed values flattened, so the product's operand
    is a reshape of them, row-major."""
    t = jnp.transpose(a, perm)
    return lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _accumulate(a, b, spec):
    """The float32 accumulator of einsum(spec, a, b); the backward products take the
    cotangent rounded to the operands' dtype (as a bf16 product's cotangent would be)."""
    return _product(spec, a, b)


def _accumulate_fwd(a, b, spec):
    return _accumulate(a, b, spec), (a, b)


def _accumulate_bwd(spec, res, g):
    a, b = res
    g = g.astype(a.dtype)
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    da = _product(f"{out},{sb}->{sa}", g, b).astype(a.dtype)
    db = _product(f"{sa},{out}->{sb}", a, g).astype(b.dtype)
    return da, db


_accumulate.defvjp(_accumulate_fwd, _accumulate_bwd)


def _check_spec(spec: str) -> None:
    """The transposed products in the backward pass need every index of each operand to occur
    in the other operand or the output (no index summed within one operand), and no
    ellipsis or repeated index."""
    ins, _, out = spec.partition("->")
    sa, _, sb = ins.partition(",")
    if not out or "." in spec or not sa or not sb or any(len(set(s)) != len(s) for s in (sa, sb, out)):
        raise ValueError(f"mtlx.models.precision.einsum: spec {spec!r} must be explicit "
                         f"'ab,bc->ac'-style with two operands, no ellipsis, no repeated index")
    for mine, other in ((sa, sb), (sb, sa)):
        lonely = [c for c in mine if c not in other and c not in out]
        if lonely:
            raise ValueError(f"mtlx.models.precision.einsum: spec {spec!r} sums index "
                             f"{lonely[0]!r} within one operand")


def einsum(spec: str, a, b, *, out_dtype: Optional[jnp.dtype] = None):
    """``jnp.einsum(spec, a, b)`` in a's dtype (then cast to `out_dtype`, if given).

    Low-precision operands under the policy take the float32-accumulating custom-VJP path.
    `out_dtype=float32` on that path returns the float32 accumulator itself; its cotangent is
    rounded to the operands' dtype for the backward products, as a bf16 matmul's would be.
    """
    if not f32_accumulate(a, b):
        if out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(a.dtype):
            return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
        return jnp.einsum(spec, a, b)
    _check_spec(spec)
    return _accumulate(a, b, spec).astype(a.dtype if out_dtype is None else out_dtype)


def dot(x, w, dtype=None):
    """``x [..., k] @ w [k, n]`` in `dtype` (default: x's dtype), both operands cast to it."""
    dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    if w.ndim != 2 or x.ndim < 1 or not f32_accumulate(x, w):
        return jnp.dot(x, w)
    y = _accumulate(x.reshape(-1, x.shape[-1]), w, "mk,kn->mn")
    return y.astype(dtype).reshape(x.shape[:-1] + w.shape[-1:])
