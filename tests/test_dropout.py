"""mtlx.models.dropout: the kept fraction, unbiasedness, independence of the four draws a hash
makes, keys of both implementations, determinism, and the Flax module's interface."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mtlx.models import dropout as D


def _sigmas(count, n, p):
    return abs(count - n * p) / np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("shape", [(64, 12, 128, 128), (3, 77, 769), (100003,)])
def test_kept_fraction_and_neighbours_are_binomial(impl, shape):
    rate = 0.1
    keep = np.asarray(D.keep_mask(jax.random.key(3, impl=impl), shape, rate))
    assert keep.shape == shape and keep.dtype == bool
    p = 1 - round(rate * 65536) / 65536
    assert _sigmas(keep.sum(), keep.size, p) < 5
    # The four draws of one hash (and the hashes next to each other) are independent: pairs
    # of neighbours along the last axis are both kept with probability p^2.
    flat = keep.reshape(-1, shape[-1])
    for lag in (1, 2, 3, 4):
        both = (flat[:, lag:] & flat[:, :-lag]).sum()
        assert _sigmas(both, flat[:, lag:].size, p * p) < 5, lag


def test_dropout_is_unbiased_and_scaled_exactly():
    x = jnp.full((256, 1024), 3.0, jnp.bfloat16)
    y = np.asarray(D.dropout(x, 0.1, jax.random.key(0)).astype(jnp.float32))
    kept = y != 0
    scale = 65536 / (65536 - 6554)
    # each kept value is 3 * scale rounded once to bf16 (scaled in float32)
    assert np.all(y[kept] == np.float32(jnp.asarray(3.0 * scale, jnp.bfloat16).astype(jnp.float32)))
    assert D.keep_scale(0.1) == pytest.approx(scale, rel=1e-12)
    xs = jnp.ones((512, 2048), jnp.float32)
    mean = float(jnp.mean(D.dropout(xs, 0.3, jax.random.key(1))))
    assert abs(mean - 1.0) < 5 * np.sqrt(0.3 / 0.7 / xs.size)


def test_masks_depend_on_the_key_only():
    a = D.keep_mask(jax.random.key(0), (8, 64), 0.5)
    assert np.array_equal(a, D.keep_mask(jax.random.key(0), (8, 64), 0.5))
    assert not np.array_equal(a, D.keep_mask(jax.random.key(1), (8, 64), 0.5))
    raw = jax.random.key_data(jax.random.key(0))      # a raw uint32[2] threefry key
    assert np.array_equal(a, D.keep_mask(raw, (8, 64), 0.5))
    # under jit and with a sharded input the same bits (counters are positions)
    assert np.array_equal(a, jax.jit(lambda k: D.keep_mask(k, (8, 64), 0.5))(jax.random.key(0)))


def test_rate_edges_and_module():
    x = jnp.arange(12.0).reshape(3, 4)
    assert D.dropout(x, 0.0, jax.random.key(0)) is x
    assert np.all(np.asarray(D.dropout(x, 1.0, jax.random.key(0))) == 0)
    assert bool(jnp.all(D.keep_mask(jax.random.key(0), (), 1e-9)))
    # a rate below 2^-17 rounds to 0: nothing dropped, nothing rescaled (T5's keep-all test)
    assert D.dropout(x, 1e-9, jax.random.key(0)) is x and D.keep_scale(1e-9) == 1.0
    # one level of 2^-16 is the smallest rate that drops
    assert D.keep_scale(2.0 ** -16) == 65536 / 65535
    with pytest.raises(ValueError, match="keeps nothing"):
        D.keep_scale(1.0)
    m = D.Dropout(0.5)
    assert m.apply({}, x, deterministic=True) is x
    y = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert y.shape == x.shape and set(np.unique(np.asarray(y))) <= set(np.asarray(x * 2).ravel()) | {0.0}
    with pytest.raises(Exception):                     # no 'dropout' rng given
        m.apply({}, x, deterministic=False)


def test_bernoulli_policy_traces_flax_formula():
    x = jnp.ones((64, 256), jnp.float32)
    key = jax.random.key(5)
    with D.policy("bernoulli"):
        y = D.dropout(x, 0.25, key)
    want = np.where(np.asarray(jax.random.bernoulli(key, 0.75, x.shape)), 1 / 0.75, 0.0)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6)
    assert not np.array_equal(np.asarray(D.dropout(x, 0.25, key)), np.asarray(y))
    with pytest.raises(ValueError, match="policy must be one of"):
        with D.policy("philox"):
            pass


def test_draws_are_the_hash_words_16_bits_at_a_time():
    # Element j of a row uses group j // 4 (its position in the array is the hash counter) and
    # 16 bits of its two output words: low half of the first, high half, then the second's.
    from jax.extend.random import threefry2x32_p
    key = jax.random.key(11)
    shape, rate = (3, 10), 0.5
    data = jax.random.key_data(key)
    groups = np.arange(3 * 3, dtype=np.uint32).reshape(3, 3)
    hi, lo = threefry2x32_p.bind(data[0], data[1], jnp.zeros((3, 3), jnp.uint32), jnp.asarray(groups))
    hi, lo = np.asarray(hi), np.asarray(lo)
    want = np.zeros(shape, bool)
    for r in range(3):
        for j in range(10):
            g, k = divmod(j, 4)
            word = hi[r, g] if k < 2 else lo[r, g]
            want[r, j] = ((int(word) >> (16 * (k % 2))) & 0xFFFF) >= 32768
    np.testing.assert_array_equal(np.asarray(D.keep_mask(key, shape, rate)), want)
