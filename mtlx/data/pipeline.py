"""The deterministic, resumable input pipeline: (seed, step) -> the Batch of that step.

What a step holds is a pure function of (seed, step) and the process layout:
  1. the mixture draws a task for every slot of the global batch (`Mixture.sample`,
     counter-based Philox: O(1) for any step);
  2. process p of P fills its own B/P rows from its slots in order, whole units at a time
     (a multiple-choice question's k rows stay together; the first unit that no longer fits
     ends the step's fill, the remaining rows are padding with example_mask 0);
  3. the c-th unit process p draws from task t is position c mod n of the permutation of its
     shard for epoch c // n, a permutation drawn from Philox(seed, task name, epoch, process):
     every epoch visits each unit of the shard exactly once.
The only state is the step: `counts` (units drawn per task so far) are recomputed from the task
draws of the earlier steps (cheap, vectorised, no data touched), so `make_iterator(...,
start_step=s)` and `restore({"step": s})` resume with exactly the same batches.

Each process holds and tokenizes only its shard (every P-th example from p, see
`tokenize.shard_indices`): shards are disjoint and together cover the data. The order therefore
depends on the process count: resuming with another process count is a different (valid) order.

Rows are padded to the smallest length bucket that fits the longest row of the batch, so a run
compiles one step per bucket (a few static shapes). With several processes every process must
pick the same shape without seeing the others' rows, so multi-process runs take one bucket.

Why plain NumPy and not grain: the sampler is already random access in O(1) per step, which is
what grain's index sampler would give; grain's `MapDataset.mix` interleaves with fixed weights,
so annealed and time-dependent schedules would have to be rebuilt on top anyway; and batching
is a gather and a pad (about 1 ms for 32 rows of 128 tokens on a busy 2-core host, over 30k
examples/s, thousands of times what a BERT-base step consumes there; scripts/bench_pipeline.py),
so worker processes would cost more than they save. A background thread (`prefetch`) overlaps
batching and device transfer with the step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from mtlx.batch import IGNORE_INDEX, Batch, make_batch
from mtlx.data.mixtures import Mixture, philox, stable_hash
from mtlx.data.tokenize import ABSENT_CHOICE, TokenizedSplit

REPLAY_CHUNK = 4096  # steps per vectorised chunk when recomputing counts


# ----------------------------------------------------------------------------- batch layout

@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which optional Batch fields a run carries: fixed by its task set, never by a step's mix."""
    token_labels: bool = False
    spans: bool = False
    groups: bool = False
    multi_label_width: int = 0
    target_length: int = 0   # seq2seq: decoder fields [B, target_length] when > 0

    @staticmethod
    def for_heads(heads: Sequence[tuple]) -> "BatchLayout":
        """From (head kind, number of labels[, max target length]) of every task of the run."""
        kinds = {h[0] for h in heads}
        return BatchLayout(
            token_labels="token_classification" in kinds, spans="span" in kinds,
            groups="multiple_choice" in kinds,
            multi_label_width=max([h[1] for h in heads if h[0] == "multilabel"], default=0),
            target_length=max([h[2] if len(h) > 2 else 16 for h in heads if h[0] == "seq2seq"],
                              default=0))

    @staticmethod
    def for_data(data: Sequence[TokenizedSplit]) -> "BatchLayout":
        return BatchLayout.for_heads([(d.head, d.num_labels, d.max_target_length) for d in data])


def collate(rows: Sequence[tuple], num_rows: int, seq_len: int, layout: BatchLayout,
            pad_id: int = 0) -> Batch:
    """Builds a Batch of `num_rows` x `seq_len` from (split, row, task id, group id) tuples.

    Rows beyond len(rows) are padding (task id -1, example_mask 0), and so are the rows of a
    multiple-choice example's absent candidates (label ABSENT_CHOICE: its unit keeps its
    place). Fields of the layout that a row's task does not use get their ignore value: labels
    IGNORE_INDEX, label_values 0, token_labels IGNORE_INDEX, start/end IGNORE_INDEX, group_ids
    -1, multi_labels 0.
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    b, l = num_rows, seq_len
    input_ids = np.full((b, l), pad_id, np.int32)
    type_ids = np.zeros((b, l), np.int32)
    attention = np.zeros((b, l), np.int32)
    task_ids = np.full(b, -1, np.int32)
    example_mask = np.zeros(b, np.float32)
    labels = np.full(b, IGNORE_INDEX, np.int32)
    values = np.zeros(b, np.float32)
    extra = {}
    if layout.token_labels:
        extra["token_labels"] = token_labels = np.full((b, l), IGNORE_INDEX, np.int32)
    if layout.spans:
        extra["start_positions"] = starts = np.full(b, IGNORE_INDEX, np.int32)
        extra["end_positions"] = ends = np.full(b, IGNORE_INDEX, np.int32)
    if layout.groups:
        extra["group_ids"] = groups = np.full(b, -1, np.int32)
    if layout.multi_label_width:
        extra["multi_labels"] = multi = np.zeros((b, layout.multi_label_width), np.float32)
    if layout.target_length:
        lt = layout.target_length
        # T5 teacher forcing: decoder inputs are the targets shifted right behind the decoder
        # start token, which is the pad token for T5 (HF `_shift_right`).
        extra["decoder_input_ids"] = dec_in = np.full((b, lt), pad_id, np.int32)
        extra["decoder_attention_mask"] = dec_mask = np.zeros((b, lt), np.int32)
        extra["target_ids"] = targets = np.full((b, lt), IGNORE_INDEX, np.int32)
    for i, (split, r, task_id, group) in enumerate(rows):
        if group >= 0 and split.labels[r] == ABSENT_CHOICE:
            continue
        a, e = split.row_starts[r], split.row_starts[r + 1]
        n = e - a
        if n > l:
            raise ValueError(f"task {split.task!r} row {r} has {n} tokens, more than the batch "
                             f"length {l}")
        input_ids[i, :n] = split.input_ids[a:e]
        type_ids[i, :n] = split.type_ids[a:e]
        attention[i, :n] = 1
        task_ids[i] = task_id
        example_mask[i] = 1.0
        labels[i] = split.labels[r]
        values[i] = split.label_values[r]
        if split.token_labels is not None:
            token_labels[i, :n] = split.token_labels[a:e]
        if split.start_positions is not None:
            starts[i], ends[i] = split.start_positions[r], split.end_positions[r]
        if split.multi_labels is not None:
            multi[i, : split.multi_labels.shape[1]] = split.multi_labels[r]
        if layout.groups and group >= 0:
            groups[i] = group
        if split.target_ids is not None:
            ta, te = split.target_starts[r], split.target_starts[r + 1]
            m = te - ta
            if m > layout.target_length:
                raise ValueError(f"task {split.task!r} row {r} has a target of {m} tokens, more "
                                 f"than the batch's target length {layout.target_length}")
            targets[i, :m] = split.target_ids[ta:te]
            k = min(m, layout.target_length - 1)  # as HF's _shift_right on the padded targets
            dec_in[i, 1:k + 1] = split.target_ids[ta:ta + k]
            dec_mask[i, :m] = 1
    return make_batch(input_ids=input_ids, attention_mask=attention, token_type_ids=type_ids,
                      task_ids=task_ids, example_mask=example_mask, labels=labels,
                      label_values=values, **extra)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= longest (buckets sorted ascending)."""
    for b in buckets:
        if longest <= b:
            return b
    raise ValueError(f"a row of {longest} tokens is longer than the largest bucket {buckets[-1]}")


# ----------------------------------------------------------------------------- unit order

class UnitOrder:
    """Per-task epoch-wise permutations of one process's shard, pure in (seed, task, epoch, shard)."""

    def __init__(self, seed: int, data: Sequence[TokenizedSplit]):
        self.seed = seed
        self.data = list(data)
        self._cache: dict = {}

    def permutation(self, t: int, epoch: int) -> np.ndarray:
        key = (t, epoch)
        perm = self._cache.get(key)
        if perm is None:
            d = self.data[t]
            p, count = d.shard
            bitgen = philox(self.seed, 2, stable_hash(d.task), epoch, (count << 32) | p)
            perm = np.argsort(bitgen.random_raw(d.num_units), kind="stable").astype(np.int64)
            # Keep this epoch and the one before per task: enough for reading in step order.
            for old in [k for k in self._cache if k[0] == t and k[1] < epoch - 1]:
                del self._cache[old]
            self._cache[key] = perm
        return perm

    def unit(self, t: int, count: int) -> int:
        n = self.data[t].num_units
        return int(self.permutation(t, count // n)[count % n])


# ----------------------------------------------------------------------------- iterator

class DataIterator:
    """Mixed-task batches for training: next() gives the Batch of the current step.

    `batch_size` is the GLOBAL batch; this process yields its B/P rows. `batch_at(step)` is the
    pure function; next() walks it with counts kept incrementally.
    """

    def __init__(self, data: Sequence[TokenizedSplit], mixture: Mixture, *, batch_size: int,
                 seed: int, start_step: int = 0, buckets: Optional[Sequence[int]] = None):
        by_name = {d.task: d for d in data}
        missing = [t for t in mixture.tasks if t not in by_name]
        if missing:
            raise ValueError(f"no tokenized data for mixture task(s) {missing}; have {sorted(by_name)}")
        self.data = [by_name[t] for t in mixture.tasks]
        shards = {d.shard for d in self.data}
        if len(shards) != 1:
            raise ValueError(f"tasks were tokenized for different process shards: "
                             f"{ {d.task: d.shard for d in self.data} }")
        self.process_index, self.process_count = shards.pop()
        if batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count "
                             f"{self.process_count}")
        self.mixture, self.seed, self.batch_size = mixture, int(seed), int(batch_size)
        self.local_rows = batch_size // self.process_count
        self.rows_per_unit = np.array([d.rows_per_unit for d in self.data], np.int64)
        too_wide = [d.task for d, k in zip(self.data, self.rows_per_unit) if k > self.local_rows]
        if too_wide:
            raise ValueError(f"task(s) {too_wide} need more rows per example than the "
                             f"{self.local_rows} rows each process holds")
        pads = {d.pad_id for d in self.data}
        if len(pads) != 1:
            raise ValueError(f"tasks were tokenized with different pad ids {pads}: use one tokenizer")
        self.pad_id = pads.pop()
        longest = max(int(d.row_lengths.max()) for d in self.data)
        if self.process_count > 1 and not buckets:
            raise ValueError(f"{self.process_count} processes need one length bucket given "
                             f"(e.g. the tokenization max_length): without one, each process "
                             f"would pad to the longest row of its own shard ({longest} here), "
                             f"and the global batch has one shape")
        self.buckets = tuple(sorted(buckets)) if buckets else (longest,)
        if longest > self.buckets[-1]:
            raise ValueError(f"rows of up to {longest} tokens do not fit the largest bucket "
                             f"{self.buckets[-1]}: raise it or lower the tasks' max_length")
        if self.process_count > 1 and len(self.buckets) > 1:
            raise ValueError("length bucketing with several processes would let processes pick "
                             "different shapes for one global batch; give one bucket")
        self.layout = BatchLayout.for_data(self.data)
        self.order = UnitOrder(self.seed, self.data)
        # Mixed batches with multi-row units (multiple choice): a draw whose unit does not fit
        # the rows left opens the next step instead of being dropped (see `draws_at`).
        self.carries = bool(mixture.mixed and (self.rows_per_unit > 1).any())
        self.step = int(start_step)
        self.counts, self.cursor = self.replay(self.step)

    # -- pure parts ------------------------------------------------------------------------
    def local_tasks(self, start: int, num_steps: int) -> np.ndarray:
        """This process's slot tasks [num_steps, B/P] (a slice of the global draws)."""
        ids = self.mixture.sample(self.seed, start, num_steps, self.batch_size)
        a = self.process_index * self.local_rows
        return ids[:, a: a + self.local_rows]

    def _used(self, tasks: np.ndarray) -> np.ndarray:
        """Which slots' units fit: whole units in slot order until the first that does not."""
        return np.cumsum(self.rows_per_unit[tasks], axis=-1) <= self.local_rows

    @property
    def slots(self) -> int:
        """Draws a step offers this process (its slice of `local_tasks`)."""
        return self.local_rows

    def _stream(self, begin: int, end: int) -> np.ndarray:
        """This process's draws at positions [begin, end) of its stream: step s's slots are
        positions s*slots .. (s+1)*slots - 1."""
        if end <= begin:
            return np.zeros(0, np.int32)
        n = self.slots
        first, last = begin // n, -(-end // n)
        flat = self.local_tasks(first, last - first).reshape(-1)
        return flat[begin - first * n: end - first * n]

    def _fitting(self, draws: np.ndarray) -> int:
        """How many of `draws` (in order) fill the rows: whole units until the first that
        does not fit (at least one: no unit is wider than the rows)."""
        return int(np.searchsorted(np.cumsum(self.rows_per_unit[draws]), self.local_rows,
                                   side="right"))

    def replay(self, step: int) -> tuple:
        """(units drawn per task by this process in steps 0..step-1, the stream position of
        `step`'s first draw): replays task draws only."""
        if not self.carries:
            return self.counts_before(step), step * self.slots
        counts = np.zeros(len(self.data), np.int64)
        rows, cursor, buf, buf_start = self.local_rows, 0, np.zeros(0, np.int32), 0
        for _ in range(step):
            if cursor + rows > buf_start + len(buf):
                buf_start, buf = cursor, self._stream(cursor, cursor + REPLAY_CHUNK * rows)
            draws = buf[cursor - buf_start: cursor - buf_start + rows]
            n = self._fitting(draws)
            counts += np.bincount(draws[:n], minlength=len(self.data))
            cursor += n
        return counts, cursor

    def counts_before(self, step: int) -> np.ndarray:
        """Units drawn per task by this process in steps 0..step-1."""
        if self.carries:
            return self.replay(step)[0]
        counts = np.zeros(len(self.data), np.int64)
        for start in range(0, step, REPLAY_CHUNK):
            n = min(REPLAY_CHUNK, step - start)
            tasks = self.local_tasks(start, n)
            used = self._used(tasks)
            counts += np.bincount(tasks[used], minlength=len(self.data))
        return counts

    def draws_at(self, step: int, cursor: Optional[int] = None) -> np.ndarray:
        """The tasks of `step`'s units in row order; `cursor` = replay(step)[1].

        Mixed batches fill the rows with whole units in draw order. Where every unit is one
        row, a step takes its own B/P draws. With multi-row units (multiple choice), the draw
        whose unit no longer fits would be dropped, and it is more often a wide one: the
        realised mix would favour one-row tasks (0.566 / 0.434 instead of 0.5 / 0.5 for a
        3-choice task beside a one-row one, 8 rows). So the draws form one stream per process,
        each step taking the units that fit from where the last stopped: every draw is used,
        in order, and the mix is the strategy's. Still a pure function of (seed, step),
        through a replay of the draws before it."""
        if not self.carries:
            tasks = self.local_tasks(step, 1)[0]
            return tasks[self._used(tasks)]
        cursor = self.replay(step)[1] if cursor is None else cursor
        draws = self._stream(cursor, cursor + self.local_rows)
        return draws[: self._fitting(draws)]

    def units_at(self, step: int, counts: Optional[np.ndarray] = None,
                 cursor: Optional[int] = None) -> list:
        """[(task index, unit index)] of `step` in row order; `counts`, `cursor` =
        replay(step) (found when not given)."""
        if counts is None or (cursor is None and self.carries):
            counts, cursor = self.replay(step)
        counts = counts.copy()
        out = []
        for t in self.draws_at(step, cursor):
            out.append((int(t), self.order.unit(int(t), int(counts[t]))))
            counts[t] += 1
        return out

    def collate_units(self, units: Sequence[tuple]) -> Batch:
        rows, offset = [], self.process_index * self.local_rows
        for t, u in units:
            d = self.data[t]
            first = len(rows)
            for r in range(d.unit_starts[u], d.unit_starts[u + 1]):
                rows.append((d, int(r), t, offset + first if d.head == "multiple_choice" else -1))
        longest = max(int(d.row_starts[r + 1] - d.row_starts[r]) for d, r, _, _ in rows)
        return collate(rows, self.local_rows, bucket_length(longest, self.buckets), self.layout,
                       self.pad_id)

    def batch_at(self, step: int) -> Batch:
        """The batch of `step` (this process's rows): a pure function of (seed, step)."""
        return self.collate_units(self.units_at(step))

    # -- iteration and state ---------------------------------------------------------------
    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        units = self.units_at(self.step, self.counts, self.cursor)
        for t, _ in units:
            self.counts[t] += 1
        self.step += 1
        self.cursor = self.cursor + len(units) if self.carries else self.step * self.slots
        return self.collate_units(units)

    def state(self) -> dict:
        """Checkpointable state: the next step, and the seed to check a restore against."""
        return {"step": self.step, "seed": self.seed}

    def restore(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data iterator state was saved with seed {state['seed']}, this "
                             f"iterator has seed {self.seed}")
        self.step = int(state["step"])
        self.counts, self.cursor = self.replay(self.step)

    def epochs(self) -> dict:
        """Task -> fractional epochs this process has drawn so far."""
        return {d.task: float(c) / d.num_units for d, c in zip(self.data, self.counts)}


def make_iterator(data: Sequence[TokenizedSplit] | Mapping[str, TokenizedSplit], mixture: Mixture,
                  *, batch_size: int, seed: int, start_step: int = 0,
                  buckets: Optional[Sequence[int]] = None) -> DataIterator:
    """A training iterator over `mixture`; `start_step=s` resumes exactly at step s."""
    if isinstance(data, Mapping):
        data = list(data.values())
    return DataIterator(data, mixture, batch_size=batch_size, seed=seed, start_step=start_step,
                        buckets=buckets)


def mixture_for(data: Sequence[TokenizedSplit] | Mapping[str, TokenizedSplit], strategy=None,
                mixed: bool = True, tasks: Optional[Sequence[str]] = None) -> Mixture:
    """The mixture of `data` (sizes = whole-split example counts, the same on every process)."""
    if isinstance(data, Mapping):
        data = list(data.values())
    by_name = {d.task: d for d in data}
    order = tuple(tasks) if tasks is not None else tuple(d.task for d in data)
    return Mixture.from_sizes({t: by_name[t].num_examples for t in order}, strategy, mixed)


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class EvalBatch:
    """An evaluation batch and where each row came from (-1 on padding rows)."""
    batch: Batch
    example_index: np.ndarray  # [B/P] index of the row's example in the whole split
    row_index: np.ndarray      # [B/P] row in the TokenizedSplit (e.g. for char_offsets)


def eval_batches(data: TokenizedSplit, task_id: int, *, batch_size: int,
                 layout: Optional[BatchLayout] = None, buckets: Optional[Sequence[int]] = None,
                 num_batches: Optional[int] = None) -> Iterator[EvalBatch]:
    """Every unit of `data` exactly once, in order, `batch_size` (global) rows a step.

    Each process yields the same number of batches (padding rows have example_mask 0), as a
    collective eval step needs. That number is derived from the whole split's size; for tasks
    cut into windows (span tasks, tagging with a stride: windows per example vary by process)
    pass `num_batches` when P > 1.
    """
    p, count = data.shard
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the process count {count}")
    local = batch_size // count
    k = data.rows_per_unit
    if k > local:
        raise ValueError(f"task {data.task!r} needs {k} rows per example, more than {local}")
    per_batch = local // k
    if num_batches is None:
        if count > 1 and (data.head == "span" or "windows" in data.stats):
            raise ValueError(f"task {data.task!r}: its examples are cut into windows (a number "
                             f"per example): pass num_batches when evaluating on several processes")
        most_units = -(-data.num_examples // count) if count > 1 else data.num_units
        num_batches = -(-most_units // per_batch)
    layout = layout or BatchLayout.for_data([data])
    if count > 1 and (not buckets or len(buckets) > 1):
        raise ValueError(f"task {data.task!r}: evaluating a shard on {count} processes needs "
                         f"one length bucket (got {tuple(buckets or ())}): each process would "
                         f"otherwise pick its batch's length from its own rows, and a global "
                         f"batch has one shape")
    buckets = tuple(sorted(buckets)) if buckets else (int(data.row_lengths.max()),)
    offset = p * local
    for i in range(num_batches):
        units = range(i * per_batch, min((i + 1) * per_batch, data.num_units))
        rows = []
        for u in units:
            first = len(rows)
            for r in range(data.unit_starts[u], data.unit_starts[u + 1]):
                rows.append((data, int(r), task_id,
                             offset + first if data.head == "multiple_choice" else -1))
        longest = max([int(data.row_starts[r + 1] - data.row_starts[r]) for _, r, _, _ in rows],
                      default=1)
        batch = collate(rows, local, bucket_length(longest, buckets), layout, data.pad_id)
        ex = np.full(local, -1, np.int32)
        rix = np.full(local, -1, np.int32)
        for j, (_, r, _, _) in enumerate(rows):
            rix[j] = r
        unit_of_row = np.repeat(np.arange(len(units)), k)
        ex[: len(rows)] = data.unit_example[np.asarray(list(units), np.int64)][unit_of_row] if rows else []
        ex[np.asarray(batch.task_ids) < 0] = -1   # absent candidates' rows are padding
        yield EvalBatch(batch, ex, rix)


# ----------------------------------------------------------------------------- prefetch

class Prefetch:
    """Runs an iterator in a background thread, `size` items ahead, optionally moving each
    batch to devices (`transform`, e.g. `device_put_batch`). `state()` is the state of the
    consumer's position (items handed out), not of the producer's, so a checkpoint taken while
    batches are queued resumes at the right step."""

    def __init__(self, iterator: DataIterator, size: int = 2, transform=None):
        self._it, self._transform = iterator, transform
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._start_state = iterator.state()
        self._consumed = 0
        self._thread = threading.Thread(target=self._run, name="mtlx-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for item in self._it:
                if self._transform is not None:
                    item = self._transform(item)
                while not self._stop.is_set():
                    try:
                        self._queue.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._queue.put(("error", e))
            return
        self._queue.put(("end", None))

    def __iter__(self):
        return self

    def __next__(self):
        kind, item = self._queue.get()
        if kind == "error":
            self.close()
            raise item
        if kind == "end":
            raise StopIteration
        self._consumed += 1
        return item

    def state(self) -> dict:
        state = dict(self._start_state)
        state["step"] = int(state["step"]) + self._consumed
        return state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prefetch(iterator: DataIterator, size: int = 2, transform=None) -> Prefetch:
    return Prefetch(iterator, size, transform)


def device_put_batch(batch: Batch, sharding=None) -> Batch:
    """Moves a host batch to devices. With a `sharding` over a multi-process mesh, each
    process's rows become its part of one global array (jax.make_array_from_process_local_data)."""
    import jax

    if sharding is None:
        return jax.device_put(batch)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
