"""Task mixtures: which task each batch slot draws from, as a pure function of (seed, step).

Sampling strategies (probability p_i of task i; n_i its training size; REFERENCE.md section 2):

  proportional   p_i = n_i / sum_j n_j                          (MT-DNN, Liu et al. 2019)
  uniform        p_i = 1 / T
  temperature    p_i ∝ min(n_i, K)^(1/T)                          (T5, Raffel et al. 2020,
                 section 3.5.2; seqio mixing_rate_num_examples; HyperFormer uses T=10, no cap)
  annealed       p_i ∝ n_i^alpha, alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch e = 1..E
                 (Stickland & Murray 2019, "BERT and PALs", section 4)
  round_robin    task = slot mod T (mixed batches) or step mod T (single-task batches)
  schedule       p_i(t) ∝ w_i(t), any unnormalised weights as a function of the step (jiant's
                 time-dependent sampling); renormalised here

Every strategy is a frozen dataclass with `probabilities(sizes, steps) -> [len(steps), T]`.
The draws: the uniforms of step s come from a Philox counter-based generator keyed by the seed,
in blocks of `BLOCK` steps; slot j of step s takes task searchsorted(cumsum p(s), u[s, j]).
Uniforms are made from Philox's raw 64-bit output (stable across NumPy versions, unlike
Generator methods), so a run resumes bit-exactly on another machine. With single-task batches
(`mixed=False`) the first uniform of the step picks the task for the whole batch.

A mixture can therefore answer "what are the task ids of step s" in O(1) for any s, which is
what exact resume needs (REFERENCE.md: tf.data's sample_from_datasets cannot).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

BLOCK = 256  # steps per Philox stream; any value works, it only trades memory for calls


def philox(seed: int, domain: int, *ids: int) -> np.random.Philox:
    """A Philox bit generator for (seed, domain, ids...): independent streams per purpose.

    key = (seed, domain); the counter's upper three words hold up to three ids (block number,
    task hash, epoch, process...). Counter word 0 advances as numbers are drawn, so streams with
    different ids never overlap (each would need 2^64 draws to reach the next).
    """
    if len(ids) > 3:
        raise ValueError("at most 3 stream ids")
    mask = (1 << 64) - 1
    counter = [0] + [int(i) & mask for i in ids] + [0] * (3 - len(ids))
    return np.random.Philox(key=[int(seed) & mask, int(domain) & mask], counter=counter)


def uniforms(bitgen: np.random.Philox, n: int) -> np.ndarray:
    """n uniforms in [0, 1) from the top 53 bits of Philox's raw output (version-stable)."""
    raw = bitgen.random_raw(n)
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def stable_hash(name: str) -> int:
    """A task name's 32-bit id for RNG streams: adding a task leaves the others' streams alone."""
    return zlib.crc32(name.encode("utf-8"))


# ----------------------------------------------------------------------------- strategies

def _normalise(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w, np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{what}: task weights must be finite and >= 0, got {w}")
    total = w.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"{what}: task weights sum to 0 (every task would have probability 0)")
    return w / total


@dataclasses.dataclass(frozen=True)
class Proportional:
    name = "proportional"

    def probabilities(self, sizes, steps) -> np.ndarray:
        return np.broadcast_to(_normalise(sizes, self.name), (len(steps), len(sizes)))


@dataclasses.dataclass(frozen=True)
class Uniform:
    name = "uniform"

    def probabilities(self, sizes, steps) -> np.ndarray:
        return np.full((len(steps), len(sizes)), 1.0 / len(sizes))


@dataclasses.dataclass(frozen=True)
class Temperature:
    """p_i ∝ min(n_i, cap)^(1/temperature); cap=None means no cap."""
    temperature: float = 1.0
    cap: Optional[float] = None
    name = "temperature"

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cap is not None and not self.cap > 0:
            raise ValueError(f"cap must be > 0, got {self.cap}")

    def probabilities(self, sizes, steps) -> np.ndarray:
        n = np.asarray(sizes, np.float64)
        if self.cap is not None:
            n = np.minimum(n, self.cap)
        # Scale by the largest size first: the same ratios, no overflow for large T^-1 powers.
        w = (n / n.max()) ** (1.0 / self.temperature)
        return np.broadcast_to(_normalise(w, self.name), (len(steps), len(sizes)))


@dataclasses.dataclass(frozen=True)
class Annealed:
    """p_i ∝ n_i^alpha(e), alpha = 1 - 0.8 (e-1)/(E-1), e = 1 + step // steps_per_epoch, capped at E."""
    num_epochs: int
    steps_per_epoch: int
    name = "annealed"

    def __post_init__(self):
        if self.num_epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"annealed sampling needs num_epochs >= 1 and steps_per_epoch >= 1, "
                             f"got {self.num_epochs}, {self.steps_per_epoch}")

    def alpha(self, steps) -> np.ndarray:
        e = np.minimum(1 + np.asarray(steps) // self.steps_per_epoch, self.num_epochs)
        if self.num_epochs == 1:
            return np.ones_like(e, np.float64)
        return 1.0 - 0.8 * (e - 1) / (self.num_epochs - 1)

    def probabilities(self, sizes, steps) -> np.ndarray:
        n = np.asarray(sizes, np.float64)
        w = (n / n.max())[None, :] ** self.alpha(steps)[:, None]
        return _normalise(w, self.name)


@dataclasses.dataclass(frozen=True)
class RoundRobin:
    """Deterministic cycling over tasks: no probabilities are sampled."""
    name = "round_robin"

    def probabilities(self, sizes, steps) -> np.ndarray:
        return np.full((len(steps), len(sizes)), 1.0 / len(sizes))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Time-dependent sampling: `weights(step) -> [T]` unnormalised weights (jiant).

    `weights` must be a pure function of the step (the data order depends on it). For configs,
    `Schedule.linear(start, end, steps)` interpolates between two weight vectors.
    """
    weights: Callable[[int], Sequence[float]]
    name = "schedule"

    def probabilities(self, sizes, steps) -> np.ndarray:
        w = np.stack([np.asarray(self.weights(int(s)), np.float64) for s in steps]) if len(steps) \
            else np.zeros((0, len(sizes)))
        if w.shape[1:] != (len(sizes),):
            raise ValueError(f"schedule weights must have one entry per task ({len(sizes)}), "
                             f"got shape {w.shape[1:]}")
        return _normalise(w, self.name)

    @staticmethod
    def linear(start: Sequence[float], end: Sequence[float], num_steps: int) -> "Schedule":
        return Schedule(_Linear(tuple(map(float, start)), tuple(map(float, end)), int(num_steps)))


@dataclasses.dataclass(frozen=True)
class _Linear:
    start: tuple
    end: tuple
    num_steps: int

    def __call__(self, step: int):
        f = min(max(step / max(self.num_steps, 1), 0.0), 1.0)
        return [(1 - f) * a + f * b for a, b in zip(self.start, self.end)]


STRATEGIES = {"proportional": Proportional, "uniform": Uniform, "temperature": Temperature,
              "annealed": Annealed, "round_robin": RoundRobin, "schedule": Schedule}


def make_strategy(name: str, **kwargs: Any):
    """A strategy by name (from a config): make_strategy("temperature", temperature=10)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {name!r}; known: {sorted(STRATEGIES)}")
    if name == "schedule" and "start" in kwargs:
        return Schedule.linear(kwargs["start"], kwargs["end"], kwargs["num_steps"])
    try:
        return STRATEGIES[name](**kwargs)
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(STRATEGIES[name])]
        raise ValueError(f"sampling strategy {name!r}: {e}; its parameters: {fields}") from None


# ----------------------------------------------------------------------------- the mixture

@dataclasses.dataclass(frozen=True)
class Mixture:
    """An ordered tuple of tasks, their training sizes, and how to sample among them.

    `tasks` order is the task-id order: task_ids in batches index this tuple, so it must equal
    the model's task tuple. `mixed=True` (default) draws a task per slot (heterogeneous
    batches); `mixed=False` gives each batch a single task.
    """
    tasks: tuple
    sizes: tuple
    strategy: Any = Proportional()
    mixed: bool = True

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a mixture needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"repeated task names in the mixture: {list(self.tasks)}")
        if len(self.sizes) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.sizes)} sizes")
        empty = [t for t, n in zip(self.tasks, self.sizes) if n <= 0]
        if empty:
            raise ValueError(f"task(s) {empty} have no training examples (a task with no examples "
                             f"is an error)")

    @staticmethod
    def from_sizes(sizes: Mapping[str, int], strategy: Any = None, mixed: bool = True) -> "Mixture":
        return Mixture(tuple(sizes), tuple(int(n) for n in sizes.values()),
                       strategy if strategy is not None else Proportional(), mixed)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, name: str) -> int:
        if name not in self.tasks:
            raise KeyError(f"task {name!r} is not in the mixture; its tasks: {list(self.tasks)}")
        return self.tasks.index(name)

    def probabilities(self, steps) -> np.ndarray:
        """[len(steps), T] sampling probabilities at each step."""
        steps = np.atleast_1d(np.asarray(steps, np.int64))
        return np.asarray(self.strategy.probabilities(np.asarray(self.sizes, np.float64), steps))

    def sample(self, seed: int, start: int, num_steps: int, slots: int) -> np.ndarray:
        """Task ids [num_steps, slots] for steps start..start+num_steps-1: pure in (seed, step)."""
        steps = np.arange(start, start + num_steps, dtype=np.int64)
        t = self.num_tasks
        if isinstance(self.strategy, RoundRobin):
            if self.mixed:
                return ((steps[:, None] * slots + np.arange(slots)[None, :]) % t).astype(np.int32)
            return np.repeat((steps % t)[:, None], slots, axis=1).astype(np.int32)
        u = step_uniforms(seed, start, num_steps, slots)
        if not self.mixed:
            u = np.repeat(u[:, :1], slots, axis=1)
        cdf = np.cumsum(self.probabilities(steps), axis=1)
        cdf[:, -1] = 1.0  # guard against rounding: every uniform < 1 finds a task
        ids = np.empty((num_steps, slots), np.int32)
        # Steps sharing probabilities (all of them for static strategies, an epoch's worth for
        # annealed sampling) take one vectorised searchsorted per distinct distribution.
        if np.all(cdf == cdf[:1]):
            ids[:] = np.searchsorted(cdf[0], u, side="right")
            return np.minimum(ids, t - 1)
        distinct, which = np.unique(cdf, axis=0, return_inverse=True)
        which = which.reshape(-1)
        if len(distinct) <= 64:
            for k in range(len(distinct)):
                rows = which == k
                ids[rows] = np.searchsorted(distinct[k], u[rows], side="right")
        else:
            for i in range(num_steps):
                ids[i] = np.searchsorted(cdf[i], u[i], side="right")
        return np.minimum(ids, t - 1)


def step_uniforms(seed: int, start: int, num_steps: int, slots: int) -> np.ndarray:
    """The uniforms [num_steps, slots] of steps start..start+num_steps-1.

    Steps are grouped in blocks of BLOCK; each block is one Philox stream (seed, block, slots),
    so any step's uniforms are found without drawing the steps before its block.
    """
    out = np.empty((num_steps, slots), np.float64)
    step, row = start, 0
    while row < num_steps:
        block, offset = divmod(step, BLOCK)
        take = min(BLOCK - offset, num_steps - row)
        out[row: row + take] = _block_uniforms(seed, block, slots)[offset: offset + take]
        row += take
        step += take
    return out


@functools.lru_cache(maxsize=8)
def _block_uniforms(seed: int, block: int, slots: int) -> np.ndarray:
    u = uniforms(philox(seed, 1, block, slots), BLOCK * slots).reshape(BLOCK, slots)
    u.flags.writeable = False
    return u
