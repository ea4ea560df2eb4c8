"""GELU activations whose gradient can keep only their input.

Autodiff of ``x * (erf(x / sqrt 2) + 1) / 2`` saves the intermediates of the formula for the
backward pass (on the H100, BERT-base's compiled step kept three [tokens, 3072] tensors per layer
where the input alone is enough, and its backward read four), and a feed-forward layer's
activation is the largest tensor of a transformer layer. These versions are `jax.custom_vjp`
functions that save only `x` and recompute the derivative from it:

    exact:  d/dx x Phi(x) = Phi(x) + x phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2,
                                                phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    tanh:   g(x) = x (1 + tanh u) / 2 = x s,  u = sqrt(2 / pi) (x + 0.044715 x^3),
            s = sigmoid(2u) (= (1 + tanh u) / 2, without its cancellation in the left tail)
            g'(x) = s + 2 x s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)

Both directions compute in float32 and return the input's dtype (as PyTorch's CUDA kernels do
for bf16 tensors under autocast: "opmath" float32). The formulas are HF's `gelu` (exact) and
`gelu_new` / `gelu_pytorch_tanh` (tanh); tests/test_activations.py checks values and gradients
against jax.nn.gelu in float64 and against torch.

Which one a trace takes is a policy (trace time, like mtlx.models.precision's):
  'auto'         the saved-input VJP (the default; the same on every platform);
  'saved_input'  the custom VJP;
  'autodiff'     jax.nn.gelu (autodiff keeps the formula's intermediates; computed in the
                 input's dtype).
Measured (BUILD_NOTES.md): on an H100 the saved-input VJP makes BERT-base's bf16 step 1.06x
faster (33.8 -> 31.8 ms: the memory traffic it saves). On the 2-core CPU it was once slower
(0.87-0.89x, at the ninth session's code, so 'auto' took autodiff there); at the fifteenth
session's code it is faster there too (BERT-base adapters 0.972x the step time in float32,
0.955x in bf16; the shared encoder 0.992x; tiny 0.946x): jax.nn.gelu's erfc is two
polynomials and an exp with each branch computed, erf one polynomial. `policy()` switches it for
the benchmark's A/B (mtlx.bench.workload.Features.activation_vjp) and for tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mtlx.models.policy import TracePolicy

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715
POLICIES = ("auto", "saved_input", "autodiff")
_POLICY = TracePolicy("mtlx.models.activations", POLICIES, "auto")
set_policy = _POLICY.set      # (name) -> the previous policy
policy = _POLICY.scope        # ``with policy('autodiff'): ...``


def saves_input_only() -> bool:
    """Whether gelu / gelu_tanh traced now take the saved-input VJP ('auto' does)."""
    return _POLICY.get() != "autodiff"


def _f32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _saving_input_only(value, derivative):
    """A custom-VJP activation: value(y) forward and derivative(y) * g backward, both on the
    input in float32 (y) and returned in its dtype; the input is all the backward keeps."""
    @jax.custom_vjp
    def act(x):
        return value(_f32(x)).astype(x.dtype)

    def fwd(x):
        return value(_f32(x)).astype(x.dtype), x

    def bwd(x, g):
        return (derivative(_f32(x)) * _f32(g)).astype(x.dtype),

    act.defvjp(fwd, bwd)
    return act


def _normal_cdf(y):
    return 0.5 * (1.0 + lax.erf(y * _SQRT_HALF))


def _tanh_gate(y):
    # (1 + tanh u) / 2 = sigmoid(2u): no 1 + (-1 + tiny) where u is very negative.
    return jax.nn.sigmoid(2.0 * _SQRT_2_OVER_PI * (y + _TANH_C * y * y * y))


def _tanh_derivative(y):
    s = _tanh_gate(y)
    return s + 2.0 * y * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * y * y)


_gelu_exact = _saving_input_only(
    lambda y: y * _normal_cdf(y),
    lambda y: _normal_cdf(y) + y * (jnp.exp(-0.5 * y * y) * _INV_SQRT_2PI))
_gelu_tanh = _saving_input_only(lambda y: y * _tanh_gate(y), _tanh_derivative)


def gelu(x):
    """HF's `gelu`: x Phi(x) with the exact erf (gradient: see the module's policy)."""
    if not saves_input_only():
        return jax.nn.gelu(x, approximate=False)
    return _gelu_exact(x)


def gelu_tanh(x):
    """HF's `gelu_new` / `gelu_pytorch_tanh` (T5 v1.1's gated GELU; gradient: the policy)."""
    if not saves_input_only():
        return jax.nn.gelu(x, approximate=True)
    return _gelu_tanh(x)
