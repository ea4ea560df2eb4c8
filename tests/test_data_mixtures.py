"""Mixtures: realised task frequencies against the formulas of REFERENCE.md section 2.

Bound used throughout: over N independent slot draws the count of task i is Binomial(N, p_i),
so |freq_i - p_i| <= 5 * sqrt(p_i (1 - p_i) / N) for every task (a 5-sigma band: a correct
sampler fails it with probability < 1e-5 per task); and scipy's chi-square goodness-of-fit test
must not reject at p < 1e-4. The expected p_i are computed here from the papers' formulas,
not with the module's code.
"""

import numpy as np
import pytest
from scipy import stats

from mtlx.data.mixtures import (BLOCK, Annealed, Mixture, Proportional, RoundRobin, Schedule,
                                Temperature, Uniform, make_strategy, step_uniforms)

SIZES = (8551, 67349, 3668, 5749, 2490, 635)  # CoLA SST-2 MRPC STS-B RTE WNLI train sizes
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")


def _check_frequencies(ids, p, num_tasks):
    counts = np.bincount(np.asarray(ids).ravel(), minlength=num_tasks)
    n = counts.sum()
    freq = counts / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-12), (freq, p)
    nonzero = p > 0
    assert counts[~nonzero].sum() == 0
    assert stats.chisquare(counts[nonzero], n * p[nonzero]).pvalue > 1e-4


def _mixture(strategy, mixed=True):
    return Mixture(TASKS, SIZES, strategy, mixed)


def test_proportional():
    n = np.array(SIZES, float)
    _check_frequencies(_mixture(Proportional()).sample(0, 0, 2000, 32), n / n.sum(), 6)


def test_uniform():
    _check_frequencies(_mixture(Uniform()).sample(1, 0, 2000, 32), np.full(6, 1 / 6), 6)


@pytest.mark.parametrize("temperature,cap", [(2.0, None), (10.0, None), (3.0, 4000), (1.0, 5000)])
def test_temperature_with_cap(temperature, cap):
    n = np.array(SIZES, float)
    w = np.minimum(n, cap if cap else np.inf) ** (1 / temperature)
    p = w / w.sum()
    m = _mixture(Temperature(temperature, cap))
    np.testing.assert_allclose(m.probabilities([0])[0], p, rtol=1e-12)
    _check_frequencies(m.sample(2, 0, 2000, 32), p, 6)


def test_temperature_limits_and_hyperformer_form():
    n = np.array(SIZES, float)
    np.testing.assert_allclose(_mixture(Temperature(1.0)).probabilities([0])[0], n / n.sum())
    np.testing.assert_allclose(_mixture(Temperature(1e9)).probabilities([0])[0], np.full(6, 1 / 6), atol=1e-6)
    # HyperFormer: p_i ∝ (n_i / N)^(1/T), T = 10: the same distribution.
    w = (n / n.sum()) ** 0.1
    np.testing.assert_allclose(_mixture(Temperature(10.0)).probabilities([0])[0], w / w.sum())


def test_annealed_per_epoch():
    epochs, per_epoch = 4, 600
    m = _mixture(Annealed(epochs, per_epoch))
    ids = m.sample(3, 0, epochs * per_epoch, 32)
    n = np.array(SIZES, float)
    for e in range(1, epochs + 1):
        alpha = 1 - 0.8 * (e - 1) / (epochs - 1)  # Stickland & Murray 2019
        p = n ** alpha / (n ** alpha).sum()
        steps = slice((e - 1) * per_epoch, e * per_epoch)
        np.testing.assert_allclose(m.probabilities([(e - 1) * per_epoch])[0], p, rtol=1e-12)
        _check_frequencies(ids[steps], p, 6)
    assert m.strategy.alpha([0])[0] == 1.0 and m.strategy.alpha([10 ** 6])[0] == pytest.approx(0.2)


def test_round_robin():
    ids = _mixture(RoundRobin()).sample(0, 5, 3, 8)
    assert ids.tolist() == [[(s * 8 + j) % 6 for j in range(8)] for s in (5, 6, 7)]
    single = _mixture(RoundRobin(), mixed=False).sample(0, 5, 3, 8)
    assert single.tolist() == [[s % 6] * 8 for s in (5, 6, 7)]


def test_single_task_batches():
    m = _mixture(Temperature(2.0), mixed=False)
    ids = m.sample(4, 0, 20000, 16)
    assert (ids == ids[:, :1]).all()  # one task per batch
    n = np.array(SIZES, float)
    p = n ** 0.5 / (n ** 0.5).sum()
    _check_frequencies(ids[:, 0], p, 6)  # the batches' tasks are the independent draws


def test_time_dependent_schedule():
    m = Mixture(("a", "b"), (1, 1), Schedule.linear([1.0, 0.0], [0.0, 1.0], 1000))
    ids = m.sample(5, 0, 1000, 64)
    for lo in (0, 250, 500, 750):
        t = np.arange(lo, lo + 250) / 1000
        # p_b(t) = t varies inside the window: the count is a sum of independent Bernoullis
        # with mean p_b = mean(t), whose variance is at most the binomial one: the band holds.
        p_b = t.mean()
        _check_frequencies(ids[lo: lo + 250], np.array([1 - p_b, p_b]), 2)
    custom = Mixture(("a", "b", "c"), (1, 1, 1), Schedule(lambda s: [1, 0, 3] if s % 2 else [0, 1, 0]))
    ids = custom.sample(6, 0, 400, 32)
    assert (ids[0::2] == 1).all()
    _check_frequencies(ids[1::2], np.array([0.25, 0.0, 0.75]), 3)


def test_draws_are_pure_in_seed_and_step():
    m = _mixture(Proportional())
    full = m.sample(7, 0, 3 * BLOCK + 10, 32)
    for start, n in [(0, 5), (BLOCK - 2, 5), (2 * BLOCK + 3, BLOCK), (3 * BLOCK, 10)]:
        assert (m.sample(7, start, n, 32) == full[start: start + n]).all()
    assert not (m.sample(8, 0, 50, 32) == full[:50]).all()
    u = step_uniforms(7, 0, 1000, 32)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)


def test_strategy_and_mixture_errors():
    assert make_strategy("temperature", temperature=10) == Temperature(10)
    with pytest.raises(ValueError, match=r"unknown sampling strategy 'temp'; known: \["):
        make_strategy("temp")
    with pytest.raises(ValueError, match="its parameters: \\['temperature', 'cap'\\]"):
        make_strategy("temperature", tau=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Temperature(0)
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] have no training examples"):
        Mixture(("a", "b"), (3, 0))
    with pytest.raises(ValueError, match="repeated task names"):
        Mixture(("a", "a"), (3, 3))
    with pytest.raises(ValueError, match="one entry per task"):
        Mixture(("a", "b"), (1, 1), Schedule(lambda s: [1.0])).sample(0, 0, 1, 4)
    with pytest.raises(ValueError, match="sum to 0"):
        Mixture(("a", "b"), (1, 1), Schedule(lambda s: [0.0, 0.0])).sample(0, 0, 1, 4)
    sched = make_strategy("schedule", start=[1, 0], end=[0, 1], num_steps=10)
    assert Mixture(("a", "b"), (1, 1), sched).probabilities([5])[0].tolist() == [0.5, 0.5]
