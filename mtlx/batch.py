"""The batch that flows from the data pipeline into the compiled step.

One `Batch` holds examples of *different* tasks side by side (`task_ids[i]` says which task
example `i` belongs to). Its pytree structure and shapes never depend on the task mix: every
label field that any task of the run needs is always present, and rows of other tasks carry an
"ignore" value there. That is what lets one compiled step train every task.

Field conventions (B = batch rows, L = input length, Lt = target length, C = multi-label width):

==================  =========  ============  =================================================
field               dtype      shape         meaning
==================  =========  ============  =================================================
input_ids           int32      [B, L]        token ids, padded with the tokenizer's pad id
attention_mask      int32      [B, L]        1 for real tokens, 0 for padding
token_type_ids      int32      [B, L]        segment A/B (BERT); zeros where unused
task_ids            int32      [B]           index into the model's task tuple (by name order
                                             of `MultiTaskModel.tasks`); -1 = padding row
example_mask        float32    [B]           1.0 real example, 0.0 padding row (end of data)
labels              int32      [B]           class index (classification); 1/0 "is the right
                                             choice" (multiple choice); IGNORE_INDEX elsewhere
label_values        float32    [B]           regression target; 0.0 elsewhere
multi_labels        float32    [B, C]        multi-hot targets (multi-label tasks), or None
token_labels        int32      [B, L]        per-token class, IGNORE_INDEX on non-first
                                             subwords, specials and padding; or None
start_positions     int32      [B]           answer start token (span tasks), or None
end_positions       int32      [B]           answer end token (span tasks), or None
group_ids           int32      [B]           multiple choice: rows of one question share an id,
                                             unique within the batch; -1 elsewhere; or None
decoder_input_ids   int32      [B, Lt]       T5 teacher-forcing inputs (shifted targets), or None
decoder_attention_mask int32   [B, Lt]       1 for real target tokens, or None
target_ids          int32      [B, Lt]       T5 targets, IGNORE_INDEX on padding, or None
segment_ids         int32      [B, L]        packing: 1..k for the k-th packed example, 0 pad;
                                             None when rows are not packed
position_ids        int32      [B, L]        packing: positions restarting per segment, or None
==================  =========  ============  =================================================

Multiple choice is laid out one row per (question, choice) pair so shapes stay static in a
mixed batch: the head scores each row, and the loss is a softmax over the rows that share a
`group_ids` value.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100

_REQUIRED = ("input_ids", "attention_mask", "task_ids")
_INT_FIELDS = (
    "input_ids", "attention_mask", "token_type_ids", "task_ids", "labels", "token_labels",
    "start_positions", "end_positions", "group_ids", "decoder_input_ids",
    "decoder_attention_mask", "target_ids", "segment_ids", "position_ids",
)
_FLOAT_FIELDS = ("example_mask", "label_values", "multi_labels")


@flax.struct.dataclass
class Batch:
    input_ids: Any
    attention_mask: Any
    token_type_ids: Any
    task_ids: Any
    example_mask: Any
    labels: Any
    label_values: Any
    multi_labels: Optional[Any] = None
    token_labels: Optional[Any] = None
    start_positions: Optional[Any] = None
    end_positions: Optional[Any] = None
    group_ids: Optional[Any] = None
    decoder_input_ids: Optional[Any] = None
    decoder_attention_mask: Optional[Any] = None
    target_ids: Optional[Any] = None
    segment_ids: Optional[Any] = None
    position_ids: Optional[Any] = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def to_numpy(self) -> "Batch":
        return jax.tree_util.tree_map(np.asarray, self)

    def select(self, rows) -> "Batch":
        """The batch restricted to `rows` (indices or boolean mask), e.g. one task's examples."""
        return jax.tree_util.tree_map(lambda x: x[rows], self)


def make_batch(**fields: Any) -> Batch:
    """Builds a `Batch` from arrays, filling the always-present fields with their defaults.

    `input_ids`, `attention_mask` and `task_ids` are required. Missing `token_type_ids` become
    zeros, `example_mask` ones, `labels` IGNORE_INDEX, `label_values` zeros. Optional fields stay
    None unless given. Dtypes are normalised (int32 / float32).
    """
    unknown = set(fields) - set(Batch.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown Batch field(s) {sorted(unknown)}; known: {sorted(Batch.__dataclass_fields__)}")
    for name in _REQUIRED:
        if fields.get(name) is None:
            raise ValueError(f"Batch field {name!r} is required")
    xp = jnp if any(isinstance(v, jax.Array) for v in fields.values()) else np
    input_ids = fields["input_ids"]
    b, l = np.shape(input_ids)
    defaults = {
        "token_type_ids": lambda: xp.zeros((b, l), xp.int32),
        "example_mask": lambda: xp.ones((b,), xp.float32),
        "labels": lambda: xp.full((b,), IGNORE_INDEX, xp.int32),
        "label_values": lambda: xp.zeros((b,), xp.float32),
    }
    out = {}
    for name in Batch.__dataclass_fields__:
        value = fields.get(name)
        if value is None and name in defaults:
            value = defaults[name]()
        if value is not None:
            dtype = xp.int32 if name in _INT_FIELDS else xp.float32
            value = xp.asarray(value, dtype=dtype)
        out[name] = value
    batch = Batch(**out)
    check_shapes(batch)
    return batch


def check_shapes(batch: Batch) -> None:
    """Raises ValueError naming the field whose shape disagrees with the batch layout."""
    b, l = np.shape(batch.input_ids)
    expect = {
        "attention_mask": (b, l), "token_type_ids": (b, l), "task_ids": (b,),
        "example_mask": (b,), "labels": (b,), "label_values": (b,), "token_labels": (b, l),
        "start_positions": (b,), "end_positions": (b,), "group_ids": (b,),
        "segment_ids": (b, l), "position_ids": (b, l),
    }
    for name, shape in expect.items():
        value = getattr(batch, name)
        if value is not None and tuple(np.shape(value)) != shape:
            raise ValueError(
                f"Batch field {name!r} has shape {tuple(np.shape(value))}, expected {shape} "
                f"(from input_ids {b}x{l})")
    if batch.multi_labels is not None and np.shape(batch.multi_labels)[0] != b:
        raise ValueError(f"Batch field 'multi_labels' has {np.shape(batch.multi_labels)[0]} rows, expected {b}")
    dec = [batch.decoder_input_ids, batch.decoder_attention_mask, batch.target_ids]
    shapes = {tuple(np.shape(x)) for x in dec if x is not None}
    if len(shapes) > 1:
        raise ValueError(f"decoder_input_ids, decoder_attention_mask and target_ids disagree in shape: {shapes}")
    if shapes and next(iter(shapes))[0] != b:
        raise ValueError(f"decoder fields have {next(iter(shapes))[0]} rows, expected {b}")


def check_task_ids(task_ids, num_tasks: int, task_names: Optional[tuple] = None) -> None:
    """Host-side check that every task id is a valid index (-1 marks padding rows)."""
    ids = np.asarray(task_ids)
    bad = ids[(ids < -1) | (ids >= num_tasks)]
    if bad.size:
        names = f" (tasks: {list(task_names)})" if task_names else ""
        raise ValueError(
            f"task id {int(bad[0])} is out of range: the model has {num_tasks} tasks, "
            f"valid ids are 0..{num_tasks - 1} and -1 for padding rows{names}")


def from_mapping(d: Mapping[str, Any]) -> Batch:
    return make_batch(**dict(d))
