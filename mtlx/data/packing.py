"""Sequence packing: several short examples in one row, attention kept block diagonal.

Short inputs (SST-2's median is ~13 tokens against rows of 128) waste most of a padded batch.
Packing places several tokenized examples ("segments") one after another in a row, as T5 and
seqio do (Raffel et al. 2020, section 3.1.1 "packing"; Krell et al. 2021, "Efficient Sequence
Packing without Cross-contamination"):

  segment_ids   [B, L]  1..k for the k-th segment of the row, 0 on padding. The encoder's
                        attention uses it to stay block diagonal (mtlx.models.attention).
  position_ids  [B, L]  restart at `position_offset` for every segment (0 for BERT; RoBERTa
                        uses pad_id + 1, as its `create_position_ids_from_input_ids`).
  token_labels  [B, L]  token classification: each segment's labels in place.

Segment-level fields (`PackedSegments`, [B, S] for at most S segments a row): each segment's
task id, class label, regression value, first-token position (its [CLS]) and a mask.
Sequence-level heads pool each segment at its first token and take their targets from
`PackedSegments` (`mtlx.models.heads.packed_task_sums`), so `Batch.labels` is IGNORE_INDEX on
packed rows; token classification reads its labels in place.

Two layouts:
  one task a row (default)  `Batch.task_ids` stays per row, so the task-specific modules and
                        token-level heads route per row, exactly as on unpacked rows.
  mixed rows (`mix_tasks=True`, config.data.packing_mix_tasks)  any segment may go to any row,
                        so rows fill better (a task's last short examples no longer leave a
                        row part-empty). Each TOKEN then carries its segment's task
                        (`mtlx.models.heads.token_task_ids`); adapters, LoRA, hypernetworks
                        and token-level heads route per token (mtlx.peft.routing), and
                        `Batch.task_ids` is -1 (a row has no single task).
                        `PackedSegments.mixed` (static) tells the model. Prompt and prefix
                        tuning, which give a whole row its task's virtual tokens, refuse
                        mixed rows.

Placement is first fit in draw order (`first_fit`): a segment that fits no row is left out with
its task's later segments of the step, and the other tasks go on filling the rows. Which
segments a step holds is a pure function of (seed, step) and the data, like unpacked batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import numpy as np

from mtlx.batch import IGNORE_INDEX, Batch, make_batch
from mtlx.data.pipeline import BatchLayout, DataIterator

# Multilabel is not: PackedSegments carries one class label and one value per segment, no label
# vector (heads.packed_task_sums refuses it as well).
PACKABLE = ("classification", "regression", "token_classification")


@flax.struct.dataclass
class PackedSegments:
    """Per-segment fields of a packed batch, [B, S] each (S = max segments per row)."""
    task_ids: Any      # int32, -1 where no segment
    labels: Any        # int32 class index, IGNORE_INDEX where none
    label_values: Any  # float32 regression target, 0 where none
    starts: Any        # int32 position of the segment's first token, 0 where none
    mask: Any          # float32 1 for a real segment
    # Static: rows may mix tasks, so task-specific modules route per token (token_task_ids).
    mixed: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class PackedBatch:
    batch: Batch
    segments: PackedSegments


def first_fit(lengths: Sequence[int], tasks: Sequence[int], num_rows: int, row_len: int,
              max_segments: int, mix_tasks: bool = False) -> list:
    """(index, row, offset) of the segments placed, in draw order.

    A segment goes to the first row with enough room, the same task (or no task yet; any task
    with `mix_tasks`) and fewer than `max_segments` segments. A segment that fits no row is
    left out, and so is every later segment of its task, so each task's examples are still
    taken in order (the iterator draws what was left out again); the other tasks' segments go
    on filling the rows.
    """
    used = [0] * num_rows
    task = [-1] * num_rows
    count = [0] * num_rows
    blocked = set()
    out = []
    for i, (n, t) in enumerate(zip(lengths, tasks)):
        if t in blocked:
            continue
        for r in range(num_rows):
            if (used[r] + n <= row_len and (mix_tasks or task[r] in (-1, t))
                    and count[r] < max_segments):
                out.append((i, r, used[r]))
                used[r] += n
                task[r] = t
                count[r] += 1
                break
        else:
            blocked.add(t)
            if all(u == row_len or c == max_segments or not mix_tasks and k != -1 and k in blocked
                   for u, c, k in zip(used, count, task)):
                break  # no row can take anything more
    return out


def pack(segments: Sequence[tuple], placements: Sequence[tuple], num_rows: int, row_len: int,
         max_segments: int, layout: BatchLayout, pad_id: int = 0,
         position_offset: int = 0, mix_tasks: bool = False) -> PackedBatch:
    """Builds a PackedBatch from (split, row, task id) segments and their (row, offset).

    Without `mix_tasks` every row's segments must share a task (ValueError otherwise); with it
    `Batch.task_ids` is -1 and the segments say each token's task."""
    b, l, s = num_rows, row_len, max_segments
    input_ids = np.full((b, l), pad_id, np.int32)
    type_ids = np.zeros((b, l), np.int32)
    attention = np.zeros((b, l), np.int32)
    segment_ids = np.zeros((b, l), np.int32)
    position_ids = np.zeros((b, l), np.int32)
    token_labels = np.full((b, l), IGNORE_INDEX, np.int32) if layout.token_labels else None
    task_ids = np.full(b, -1, np.int32)
    seg = {"task_ids": np.full((b, s), -1, np.int32), "labels": np.full((b, s), IGNORE_INDEX, np.int32),
           "label_values": np.zeros((b, s), np.float32), "starts": np.zeros((b, s), np.int32),
           "mask": np.zeros((b, s), np.float32)}
    count = np.zeros(b, np.int64)
    for (split, r, t), (row, off) in zip(segments, placements):
        a, e = split.row_starts[r], split.row_starts[r + 1]
        n = e - a
        k = count[row]
        input_ids[row, off: off + n] = split.input_ids[a:e]
        type_ids[row, off: off + n] = split.type_ids[a:e]
        attention[row, off: off + n] = 1
        segment_ids[row, off: off + n] = k + 1
        position_ids[row, off: off + n] = position_offset + np.arange(n)
        if token_labels is not None and split.token_labels is not None:
            token_labels[row, off: off + n] = split.token_labels[a:e]
        if not mix_tasks and task_ids[row] not in (-1, t):
            raise ValueError(f"row {row} would hold segments of tasks {int(task_ids[row])} and "
                             f"{t}; pass mix_tasks=True to mix tasks in a row")
        task_ids[row] = -1 if mix_tasks else t
        seg["task_ids"][row, k] = t
        seg["labels"][row, k] = split.labels[r]
        seg["label_values"][row, k] = split.label_values[r]
        seg["starts"][row, k] = off
        seg["mask"][row, k] = 1.0
        count[row] += 1
    extra = {"token_labels": token_labels} if token_labels is not None else {}
    batch = make_batch(input_ids=input_ids, attention_mask=attention, token_type_ids=type_ids,
                       task_ids=task_ids, example_mask=(count > 0).astype(np.float32),
                       segment_ids=segment_ids, position_ids=position_ids, **extra)
    return PackedBatch(batch, PackedSegments(**seg, mixed=bool(mix_tasks)))


class PackedIterator(DataIterator):
    """Like DataIterator, but each row holds several examples: of one task, or of any tasks
    with `mix_tasks`.

    Each process considers `max_segments` x its rows draws a step from the mixture and places
    them by first fit into rows of `row_len` tokens. With a mixed mixture, the draws a step
    cannot place (an example longer than the room left, and its task's later draws) open the
    next step's draws instead of being dropped: dropping them favoured tasks of short examples
    (0.61 / 0.39 for CoLA beside RTE under uniform sampling), while carried over every draw is
    placed, in order, and the mix is the strategy's. Because how many draws a step consumes
    depends on the examples' lengths, the state of a step (units per task, carried draws,
    stream position) is found by replaying the placements step by step (Python, about 0.1 ms
    a step); the iterator keeps its latest state so walking forward never replays.
    """

    def __init__(self, data, mixture, *, batch_size: int, seed: int, row_len: int,
                 max_segments: int = 8, start_step: int = 0, position_offset: int = 0,
                 mix_tasks: bool = False):
        bad = [d.task for d in data if d.head not in PACKABLE]
        if bad:
            raise ValueError(f"task(s) {bad} cannot be packed (heads {PACKABLE} can): multiple "
                             f"choice and span rows are whole inputs of their own")
        if max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments}")
        self.max_segments, self.position_offset = int(max_segments), int(position_offset)
        self.mix_tasks = bool(mix_tasks)
        self._anchor = None  # (step, its _State): the latest state found, to replay from
        self._state = None
        super().__init__(data, mixture, batch_size=batch_size, seed=seed, start_step=start_step,
                         buckets=(row_len,))
        self.row_len = row_len
        self._state = self._state_at(self.step)

    @property
    def slots(self) -> int:
        return self.local_rows * self.max_segments

    def local_tasks(self, start: int, num_steps: int) -> np.ndarray:
        slots = self.slots
        ids = self.mixture.sample(self.seed, start, num_steps, self.batch_size * self.max_segments)
        a = self.process_index * slots
        return ids[:, a: a + slots]

    def _draws(self, step: int, state: "_State") -> tuple:
        """(the draws `step` considers, the stream position after them): the carried ones
        first, then fresh ones from the stream (mixed mixtures); the step's own slots
        otherwise."""
        end = state.cursor + self.slots - len(state.carried)
        if not self.mixture.mixed:
            return self.local_tasks(step, 1)[0], end
        fresh = self._stream(state.cursor, end)
        return np.concatenate([np.asarray(state.carried, np.int32), fresh.astype(np.int32)]), end

    def _place(self, step: int, state: "_State") -> tuple:
        """(units placed, their (row, offset), the state after `step`)."""
        tasks, cursor = self._draws(step, state)
        units, lengths, c = [], [], state.counts.copy()
        for t in tasks:
            u = self.order.unit(int(t), int(c[t]))
            d = self.data[t]
            lengths.append(int(d.row_starts[u + 1] - d.row_starts[u]))
            units.append((int(t), u))
            c[t] += 1
        placed = first_fit(lengths, tasks, self.local_rows, self.buckets[-1], self.max_segments,
                           self.mix_tasks)
        counts = state.counts.copy()
        for i, _, _ in placed:
            counts[tasks[i]] += 1
        taken = {i for i, _, _ in placed}
        carried = tuple(int(t) for i, t in enumerate(tasks) if i not in taken) \
            if self.mixture.mixed else ()
        after = _State(counts, carried, cursor)
        return [units[i] for i, _, _ in placed], [(r, o) for _, r, o in placed], after

    def _state_at(self, step: int) -> "_State":
        if self._anchor is None or step < self._anchor[0]:
            self._anchor = (0, _State(np.zeros(len(self.data), np.int64), (), 0))
        at, state = self._anchor
        for s in range(at, step):
            state = self._place(s, state)[2]
        self._anchor = (step, state)
        return state

    def replay(self, step: int) -> tuple:
        state = self._state_at(step)
        return state.counts.copy(), state.cursor

    def counts_before(self, step: int) -> np.ndarray:
        return self._state_at(step).counts.copy()

    def batch_at(self, step: int) -> PackedBatch:
        return self._collate(*self._place(step, self._state_at(step))[:2])

    def _collate(self, units, placements) -> PackedBatch:
        segments = [(self.data[t], int(self.data[t].unit_starts[u]), t) for t, u in units]
        return pack(segments, placements, self.local_rows, self.buckets[-1], self.max_segments,
                    self.layout, self.pad_id, self.position_offset, self.mix_tasks)

    def __next__(self) -> PackedBatch:
        units, placements, self._state = self._place(self.step, self._state)
        self.step += 1
        self.counts, self.cursor = self._state.counts.copy(), self._state.cursor
        self._anchor = (self.step, self._state)
        return self._collate(units, placements)

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        self._state = self._state_at(self.step)

    def units_at(self, step: int, counts: Optional[np.ndarray] = None, cursor=None) -> list:
        """The units `step` places (its state replayed; `counts`/`cursor` are not needed)."""
        return self._place(step, self._state_at(step))[0]


@dataclasses.dataclass(frozen=True)
class _State:
    """A packed iterator's position: units taken per task, the draws carried into the next
    step (mixed mixtures), and the stream position of its first fresh draw."""
    counts: np.ndarray
    carried: tuple
    cursor: int


def make_packed_iterator(data, mixture, *, batch_size: int, seed: int, row_len: int,
                         max_segments: int = 8, start_step: int = 0,
                         position_offset: int = 0, mix_tasks: bool = False) -> PackedIterator:
    if isinstance(data, dict):
        data = list(data.values())
    return PackedIterator(data, mixture, batch_size=batch_size, seed=seed, row_len=row_len,
                          max_segments=max_segments, start_step=start_step,
                          position_offset=position_offset, mix_tasks=mix_tasks)
