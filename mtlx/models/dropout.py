"""Dropout whose random bits cost a quarter of a hash per element.

`flax.linen.Dropout` (and `jax.random.bernoulli`) draws a float32 uniform per element, and with
JAX's default partitionable threefry each 32-bit word is a whole threefry2x32 hash (its two
output words XORed). Here each hash's 64 output bits make four 16-bit draws, each element kept
when its draw is >= t, t = round(rate * 2**16): four elements per hash, a quarter of the words
to hold. The kept values are scaled (in float32) by 2**16 / (2**16 - t), the exact inverse of
the kept probability, so E[dropout(x)] = x as with the float draw; the dropped fraction is the rate
rounded to a multiple of 2**-16 (0.1 -> 0.100006; a rate under 2**-17 drops nothing).

The hash counters are each element group's position in the array (an iota per dimension, as
JAX's partitionable threefry does), so a batch sharded over devices draws the same bits as one
device would, each device computing its own part. Keys of another implementation ('rbg',
'unsafe_rbg': XLA's RngBitGenerator) draw 32-bit words through `jax.random.bits`, two draws a
word.

Measured (dev CPU, BUILD_NOTES.md): the BERT-base adapters bf16 step (B=4, L=128) 1.15x faster
than with bernoulli draws (interleaved A/B); one [4, 12, 128, 128] attention-probability mask applied
1.75x faster than bernoulli's, a [4, 128, 768] one 1.7x. `policy('bernoulli')` (trace time)
traces flax's formula instead (jax.random.bernoulli, x / keep in x's dtype): the benchmark's
A/B (mtlx.bench.workload.Features.dropout_draws).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from mtlx.models.policy import TracePolicy

_LEVELS = 1 << 16
POLICIES = ("hash16", "bernoulli")
_POLICY = TracePolicy("mtlx.models.dropout", POLICIES, "hash16")
policy = _POLICY.scope        # ``with policy('bernoulli'): ...`` traces flax's formula


def _threshold(rate: float) -> int:
    # The rate rounded to a multiple of 2^-16: below 2^-17 it is 0 (nothing dropped).
    return min(_LEVELS, max(0, round(float(rate) * _LEVELS)))


def keep_scale(rate: float) -> float:
    """The factor kept values are multiplied by: the inverse of the kept probability."""
    t = _threshold(rate)
    if t == _LEVELS:
        raise ValueError(f"mtlx.models.dropout: rate {rate} keeps nothing: no scale for kept values")
    return _LEVELS / (_LEVELS - t)


def _counters(shape):
    """uint32 [*shape]: each position's row-major index (partitionable: one iota per axis)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return idx


def _key_parts(rng):
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(rng)), jax.random.key_data(rng)
    return "threefry2x32", rng  # a raw uint32[2] key is threefry's


def keep_mask(rng, shape, rate: float):
    """bool [*shape]: True where an element is kept (probability 1 - t / 2**16)."""
    shape = tuple(int(d) for d in shape)
    t = _threshold(rate)
    lead, d = (shape or (1,))[:-1], (shape or (1,))[-1]
    impl, data = _key_parts(rng)
    if impl == "threefry2x32" and math.prod(lead) * -(-d // 4) < 2 ** 32:
        groups = lead + (-(-d // 4),)
        hi, lo = threefry2x32_p.bind(data[0], data[1], jnp.zeros(groups, jnp.uint32),
                                     _counters(groups))
        words = (hi, lo)                                   # 2 words = 4 draws a group
    else:
        groups = lead + (-(-d // 2),)
        words = (jax.random.bits(rng, groups, jnp.uint32),)  # 1 word = 2 draws a group
    # Draw k of a group: 16 bits of word k // 2. Written with broadcasts and an iota (no stack:
    # XLA:CPU materialised a stacked copy of every mask), so it fuses into the consumer.
    per = 2 * len(words)
    wide = groups + (per,)
    k = lax.broadcasted_iota(jnp.uint32, wide, len(groups))
    word = jnp.broadcast_to(words[0][..., None], wide)
    if len(words) == 2:
        word = jnp.where(k < 2, word, jnp.broadcast_to(words[1][..., None], wide))
    draws = ((word >> ((k & 1) * 16)) & 0xFFFF).reshape(lead + (-1,))[..., :d]
    return (draws >= t).reshape(shape)


def dropout(x, rate: float, rng):
    """x with each element zeroed with probability ~rate (see module doc), the rest scaled by
    keep_scale(rate); x itself when the rate rounds to 0 (below 2^-17), zeros when to 1."""
    if _threshold(rate) == 0:
        return x
    if _threshold(rate) == _LEVELS:
        return jnp.zeros_like(x)
    if _POLICY.value == "bernoulli":
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))
    keep = keep_mask(rng, x.shape, rate)
    # Scaled in float32 (at least): a bf16 scale constant would be off by up to 0.4%, a bias
    # every kept value shares.
    wide = jnp.promote_types(x.dtype, jnp.float32)
    scaled = (x.astype(wide) * keep_scale(rate)).astype(x.dtype)
    return lax.select(keep, scaled, jnp.zeros_like(x))


class Dropout(nn.Module):
    """flax.linen.Dropout's interface (the 'dropout' rng stream) with the mask above."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))
