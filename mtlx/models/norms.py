"""BERT's residual LayerNorm, ``LayerNorm(x + sublayer_out)``, with a gradient that keeps only
its inputs.

The encoder sums the residual in float32 and normalises in float32 whatever the compute dtype
(as HF under autocast does). Written as flax's LayerNorm over that float32 sum, autodiff keeps
float32 intermediates for the backward pass (the centred sum) and writes float32 gradients that
are then converted for each branch: on the H100 the compiled BERT-base bf16 step moved ~17 GB a
step through the layer norms, the residual adds and those conversions, a quarter of its memory
traffic (scripts/hlo_traffic.py over scripts/results/gpu_h100_1/hlo.tar; BUILD_NOTES.md).
`residual_layer_norm` is a `jax.custom_vjp` that saves its two inputs in their own dtype
(bf16 in a bf16 model) and the rows' float32 mean and 1/std, and recomputes the normalised sum
in the backward pass:

    h = x + s (float32),  xhat = (h - mean) * rstd,  y = xhat * scale + bias
    dh = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * scale
    dscale = sum over rows of dy * xhat,  dbias = sum over rows of dy

dh is the gradient of both x and s (each converted to its dtype once). Forward values are flax's
(two-pass variance, ``(h - mean) * (rsqrt(var + eps) * scale) + bias``).

Which one a trace takes is a policy (trace time, as mtlx.models.activations'):
  'saved_inputs'  the custom VJP (the default);
  'autodiff'      flax.linen.LayerNorm's formula over the float32 sum, differentiated by JAX.
Measured on the dev CPU (Zen 5; BUILD_NOTES.md, `scripts/ab_features.py layer_norm_vjp autodiff
saved_inputs`): the BERT-base adapters step 1.03-1.07x faster in float32 (two runs), 1.02x
in bf16, the shared encoder's float32 step 1.03x; on a GPU it is the next lease's A/B.
`ResidualLayerNorm` is the module (parameters 'scale' and 'bias' as flax's LayerNorm, so
checkpoints and Hugging Face conversion are unchanged). The benchmark's A/B switch is
mtlx.bench.workload.Features.layer_norm_vjp.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mtlx.models.policy import TracePolicy

POLICIES = ("saved_inputs", "autodiff")
_POLICY = TracePolicy("mtlx.models.norms", POLICIES, "saved_inputs")
set_policy = _POLICY.set      # (name) -> the previous policy
policy = _POLICY.scope        # ``with policy('autodiff'): ...``


def saves_inputs_only() -> bool:
    """Whether residual_layer_norm traced now takes the saved-inputs VJP."""
    return _POLICY.value == "saved_inputs"


def _stats(h, eps: float):
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return mean, lax.rsqrt(var + eps)


def _forward(x, s, scale, bias, eps: float, out_dtype):
    """(y in out_dtype, the rows' mean, 1/std): flax's formula over the float32 sum."""
    h = x.astype(jnp.float32) + s.astype(jnp.float32)
    mean, rstd = _stats(h, eps)
    y = (h - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(out_dtype), mean, rstd


def _residual_layer_norm_ref(x, s, scale, bias, eps: float, out_dtype):
    """Autodiff's version: the same formula as the custom VJP's forward."""
    return _forward(x, s, scale, bias, eps, out_dtype)[0]


def residual_layer_norm(x, s, scale, bias, eps: float, out_dtype: Any = jnp.float32):
    """LayerNorm(x + s) over the last axis with float32 statistics, in out_dtype; scale and
    bias [d]. The gradient per the module's policy (module doc)."""
    if not saves_inputs_only():
        return _residual_layer_norm_ref(x, s, scale, bias, eps, out_dtype)
    return _fused(x, s, scale, bias, float(eps), jnp.dtype(out_dtype))


def _fused(x, s, scale, bias, eps, out_dtype):
    @jax.custom_vjp
    def norm(x, s, scale, bias):
        return _residual_layer_norm_ref(x, s, scale, bias, eps, out_dtype)

    def fwd(x, s, scale, bias):
        y, mean, rstd = _forward(x, s, scale, bias, eps, out_dtype)
        return y, (x, s, scale, bias, mean, rstd)

    def bwd(res, dy):
        x, s, scale, bias, mean, rstd = res
        h = x.astype(jnp.float32) + s.astype(jnp.float32)
        xhat = (h - mean) * rstd
        dy = dy.astype(jnp.float32)
        g = dy * scale.astype(jnp.float32)
        dh = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                     - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
        rows = tuple(range(dy.ndim - 1))
        dscale = jnp.sum(dy * xhat, axis=rows)
        dbias = jnp.sum(dy, axis=rows)
        return (dh.astype(x.dtype), dh.astype(s.dtype), dscale.astype(scale.dtype),
                dbias.astype(bias.dtype))

    norm.defvjp(fwd, bwd)
    return norm(x, s, scale, bias)


class ResidualLayerNorm(nn.Module):
    """``LayerNorm(x + s)`` (flax.linen.LayerNorm's parameters 'scale' and 'bias', ones and
    zeros at init) returning out_dtype; float32 statistics and sum."""
    epsilon: float = 1e-6
    param_dtype: Any = jnp.float32
    out_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, s):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        return residual_layer_norm(x, s, scale, bias, self.epsilon, self.out_dtype)
