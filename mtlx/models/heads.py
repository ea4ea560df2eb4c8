"""Task heads, routed per example, and the per-task losses of a mixed-task batch.

Every task owns a small head keyed by its NAME (``params['heads'][task_name]``). Inside the
forward pass, the heads of one kind (say all classification tasks) are stacked and each example
gathers its own task's weights, so one batch can hold examples of every task and the compiled
computation does not depend on the task mix (MT-DNN, Liu et al. 2019, keys heads by position;
mtlx keys them by name so adding or reordering tasks keeps checkpoints loadable).

Head kinds and what they read from the encoder:
  classification         pooled [B, d] -> logits [B, C]            (C = the task's num_labels)
  multilabel             pooled [B, d] -> logits [B, C] (sigmoid)
  regression             pooled [B, d] -> value [B]
  token_classification   hidden [B, L, d] -> logits [B, L, C]
  span                   hidden [B, L, d] -> start/end logits [B, L]
  multiple_choice        pooled [B, d] -> score [B] (one row per (question, choice); softmax
                         over the rows sharing a group id)
  seq2seq                the T5 decoder and LM head (shared; the task is named in the input
                         text, T5-style) -> logits [B, Lt, V]
Tasks with fewer classes than the widest task of their kind see their extra logits masked to
NEG_INF (finite, so nothing turns NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtlx.batch import IGNORE_INDEX

HEAD_KINDS = ("classification", "multilabel", "regression", "token_classification", "span",
              "multiple_choice", "seq2seq")
NEG_INF = -1e9
# Names a task may not take: they would collide with the parameter tree's own keys.
RESERVED_NAMES = frozenset({"backbone", "heads", "kernel", "bias", "encoder", "decoder",
                            "embeddings", "shared", "params"})


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """What the model needs to know about a task: its name, head kind and output width."""
    name: str
    kind: str
    num_labels: int = 0

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if self.name in RESERVED_NAMES or "/" in self.name:
            raise ValueError(f"task name {self.name!r} is reserved or contains '/'; "
                             f"reserved: {sorted(RESERVED_NAMES)}")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"task {self.name!r}: unknown head kind {self.kind!r}; known: {list(HEAD_KINDS)}")
        if self.kind in ("classification", "multilabel", "token_classification") and self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: head {self.kind!r} needs num_labels >= 1, got {self.num_labels}")

    @property
    def out_features(self) -> int:
        """Width of the head's output layer."""
        if self.kind in ("classification", "multilabel", "token_classification"):
            return self.num_labels
        if self.kind == "span":
            return 2
        if self.kind in ("regression", "multiple_choice"):
            return 1
        return 0  # seq2seq: no task-specific head


def check_tasks(tasks: Sequence[TaskHead]) -> None:
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"task names must be unique; repeated: {dupes}")
    if not tasks:
        raise ValueError("a multi-task model needs at least one task")


@dataclasses.dataclass(frozen=True)
class KindRouting:
    """Static routing tables for one head kind, built from the task tuple (numpy, not traced)."""
    kind: str
    tasks: tuple            # names of the tasks of this kind, in model order
    local_index: np.ndarray  # [T] task id -> index among this kind's tasks (0 if another kind)
    is_kind: np.ndarray      # [T] bool
    width: int               # widest output among this kind's tasks
    valid_out: np.ndarray    # [m, width] bool: which outputs each task really has


def kind_routing(tasks: Sequence[TaskHead], kind: str) -> KindRouting:
    members = [t for t in tasks if t.kind == kind]
    width = max([t.out_features for t in members], default=0)
    local = np.zeros(len(tasks), np.int32)
    is_kind = np.zeros(len(tasks), bool)
    for j, t in enumerate(members):
        i = tasks.index(t)
        local[i], is_kind[i] = j, True
    valid = np.zeros((len(members), width), bool)
    for j, t in enumerate(members):
        valid[j, : t.out_features] = True
    return KindRouting(kind, tuple(t.name for t in members), local, is_kind, width, valid)


def stack_head_params(head_params: dict, routing: KindRouting, dtype):
    """Stacks the per-task kernels/biases of one kind, zero-padded to the kind's width.

    Returns kernel [m, d, width] and bias [m, width]. The padding is never read for a real
    output: padded logits are masked afterwards.
    """
    kernels, biases = [], []
    for name in routing.tasks:
        k, b = head_params[name]["kernel"], head_params[name]["bias"]
        pad = routing.width - k.shape[-1]
        kernels.append(jnp.pad(k, ((0, 0), (0, pad))))
        biases.append(jnp.pad(b, ((0, pad),)))
    return jnp.stack(kernels).astype(dtype), jnp.stack(biases).astype(dtype)


def route(task_ids, routing: KindRouting):
    """Per example: index into this kind's stack and whether the example is of this kind."""
    safe = jnp.clip(task_ids, 0, len(routing.local_index) - 1)
    local = jnp.asarray(routing.local_index)[safe]
    member = jnp.asarray(routing.is_kind)[safe] & (task_ids >= 0)
    return local, member


def apply_kind(features, kernel, bias, local):
    """Each example multiplies by its own task's kernel (gathered per example).

    features [B, d] or [B, L, d]; kernel [m, d, c]; bias [m, c]; local [B] -> [B, c] / [B, L, c].
    Per token (rows mixing tasks): local [B, L]; every kind's kernel is applied to every token
    and each token keeps its own (m is the few tasks of one head kind; a kernel per token would
    be B L d c numbers).
    """
    if local.ndim == 2:
        every = jnp.einsum("bld,mdc->blmc", features, kernel)
        own = jnp.take_along_axis(every, local[:, :, None, None], axis=2)[:, :, 0]
        return own + bias[local]
    w, b = kernel[local], bias[local]
    if features.ndim == 2:
        return jnp.einsum("bd,bdc->bc", features, w) + b
    return jnp.einsum("bld,bdc->blc", features, w) + b[:, None, :]


# ----------------------------------------------------------------------------- losses

def _log_softmax_masked(logits, valid):
    logits = jnp.where(valid, logits, NEG_INF)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


SEQUENCE_KINDS = ("classification", "multilabel", "regression", "multiple_choice")
TOKEN_KINDS = ("token_classification", "span", "seq2seq")


def example_losses(outputs: dict, batch, tasks: Sequence[TaskHead], kinds=None):
    """Per-example (loss sum, weight) over the whole batch, every kind merged.

    A task's loss is sum(loss_sum) / sum(weight) over its examples: a mean over examples for
    sequence-level heads, over labelled tokens for token-level heads (as Hugging Face computes
    a single-task loss). Rows of other kinds, padding rows and ignored labels contribute 0.
    """
    b = batch.input_ids.shape[0]
    loss_sum = jnp.zeros((b,), jnp.float32)
    weight = jnp.zeros((b,), jnp.float32)
    row_ok = batch.example_mask.astype(jnp.float32)
    kinds = {t.kind for t in tasks} & set(kinds if kinds is not None else HEAD_KINDS)

    def add(member, ls, w):
        nonlocal loss_sum, weight
        w = jnp.where(member, w * row_ok, 0.0)
        loss_sum = loss_sum + jnp.where(w > 0, ls, 0.0)
        weight = weight + w

    if "classification" in kinds:
        r = kind_routing(tasks, "classification")
        local, member = route(batch.task_ids, r)
        valid = jnp.asarray(r.valid_out)[local]
        logp = _log_softmax_masked(outputs["classification"], valid)
        labels = batch.labels
        ok = (labels >= 0) & (labels < r.width)
        nll = -jnp.take_along_axis(logp, jnp.clip(labels, 0, r.width - 1)[:, None], axis=-1)[:, 0]
        add(member & ok, nll, jnp.ones((b,)))
    if "multilabel" in kinds:
        r = kind_routing(tasks, "multilabel")
        local, member = route(batch.task_ids, r)
        valid = jnp.asarray(r.valid_out)[local].astype(jnp.float32)
        logits = outputs["multilabel"].astype(jnp.float32)
        targets = batch.multi_labels[:, : r.width] if batch.multi_labels is not None else jnp.zeros_like(logits)
        bce = optax_sigmoid_bce(logits, targets) * valid
        per_ex = bce.sum(-1) / jnp.maximum(valid.sum(-1), 1.0)
        add(member, per_ex, jnp.ones((b,)))
    if "regression" in kinds:
        r = kind_routing(tasks, "regression")
        _, member = route(batch.task_ids, r)
        err = outputs["regression"].astype(jnp.float32) - batch.label_values
        add(member, err * err, jnp.ones((b,)))
    if "token_classification" in kinds:
        r = kind_routing(tasks, "token_classification")
        local, member = route(batch.task_ids, r)
        valid = jnp.asarray(r.valid_out)[local][:, None, :]
        logp = _log_softmax_masked(outputs["token_classification"], valid)
        labels = batch.token_labels if batch.token_labels is not None else jnp.full(batch.input_ids.shape, IGNORE_INDEX)
        ok = (labels >= 0) & (labels < r.width)
        nll = -jnp.take_along_axis(logp, jnp.clip(labels, 0, r.width - 1)[..., None], axis=-1)[..., 0]
        add(member, jnp.where(ok, nll, 0.0).sum(-1), ok.sum(-1).astype(jnp.float32))
    if "span" in kinds:
        r = kind_routing(tasks, "span")
        _, member = route(batch.task_ids, r)
        tok_ok = batch.attention_mask.astype(bool)
        l = batch.input_ids.shape[1]
        total = 0.0
        ok = jnp.ones((b,), bool)
        for key, pos in (("span_start", batch.start_positions), ("span_end", batch.end_positions)):
            pos = pos if pos is not None else jnp.full((b,), IGNORE_INDEX)
            logp = _log_softmax_masked(outputs[key], tok_ok)
            ok = ok & (pos >= 0) & (pos < l)
            total = total - jnp.take_along_axis(logp, jnp.clip(pos, 0, l - 1)[:, None], axis=-1)[:, 0]
        add(member & ok, total / 2.0, jnp.ones((b,)))  # HF: (start CE + end CE) / 2
    if "multiple_choice" in kinds:
        r = kind_routing(tasks, "multiple_choice")
        _, member = route(batch.task_ids, r)
        groups = batch.group_ids if batch.group_ids is not None else jnp.full((b,), -1)
        in_group = member & (groups >= 0) & (row_ok > 0)
        # Each row's segment: the first row of this batch in its group. A group id is its
        # first row's index in the whole batch (the pipeline's), which a microbatch of a
        # later part of it (gradient accumulation) would hold beyond its own b rows.
        same = (groups[:, None] == groups[None, :]) & in_group[None, :]
        seg = jnp.where(in_group, jnp.argmax(same, axis=1), b)  # outside any group: spare
        scores = jnp.where(in_group, outputs["multiple_choice"].astype(jnp.float32), NEG_INF)
        gmax = jax.ops.segment_max(scores, seg, num_segments=b + 1)
        shifted = jnp.where(in_group, scores - gmax[seg], NEG_INF)
        lse = jnp.log(jax.ops.segment_sum(jnp.exp(shifted), seg, num_segments=b + 1))
        nll = -(shifted - lse[seg])
        correct = in_group & (batch.labels == 1)
        add(correct, nll, jnp.ones((b,)))
    if "seq2seq" in kinds:
        r = kind_routing(tasks, "seq2seq")
        _, member = route(batch.task_ids, r)
        logp = jax.nn.log_softmax(outputs["seq2seq"].astype(jnp.float32), axis=-1)
        tgt = batch.target_ids
        ok = tgt >= 0
        nll = -jnp.take_along_axis(logp, jnp.clip(tgt, 0, logp.shape[-1] - 1)[..., None], axis=-1)[..., 0]
        add(member, jnp.where(ok, nll, 0.0).sum(-1), ok.sum(-1).astype(jnp.float32))
    return loss_sum, weight


def optax_sigmoid_bce(logits, targets):
    """Binary cross-entropy with logits, numerically stable (as optax.sigmoid_binary_cross_entropy)."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def task_losses(outputs: dict, batch, tasks: Sequence[TaskHead]):
    """Per-task mean losses [T] and per-task weights [T] (examples or labelled tokens).

    A task with no example in the batch gets loss exactly 0.0 and weight 0 (never NaN), so a
    weighting strategy can tell absent tasks apart with ``weight > 0``.
    """
    loss_sum, weight = example_losses(outputs, batch, tasks)
    sums, counts = per_task_sums(loss_sum, weight, batch.task_ids, len(tasks))
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1e-9), 0.0), counts


def per_task_sums(loss_sum, weight, task_ids, num_tasks: int):
    """(sum of losses [T], sum of weights [T]) over rows; rows with task id -1 are dropped."""
    seg = jnp.clip(task_ids, 0, num_tasks - 1)
    weight = jnp.where(task_ids >= 0, weight, 0.0)
    sums = jax.ops.segment_sum(jnp.where(weight > 0, loss_sum, 0.0), seg, num_segments=num_tasks)
    return sums, jax.ops.segment_sum(weight, seg, num_segments=num_tasks)


def token_task_ids(segment_ids, segment_task_ids):
    """[B, L]: each token's task on packed rows (its segment's), -1 on padding."""
    s = segment_task_ids.shape[1]
    tasks = jnp.take_along_axis(segment_task_ids, jnp.clip(segment_ids - 1, 0, s - 1), axis=1)
    return jnp.where(segment_ids > 0, tasks, -1).astype(jnp.int32)


def token_rows(outputs: dict, batch, segments):
    """Rows that mix tasks as (outputs, batch) of B*L one-token pseudo-rows, each with its
    token's task, for token-level losses (only the fields those read are real)."""
    from mtlx.batch import Batch
    b, l = batch.input_ids.shape
    n = b * l
    tasks = token_task_ids(batch.segment_ids, segments.task_ids).reshape(n)
    labels = batch.token_labels if batch.token_labels is not None else jnp.full((b, l), IGNORE_INDEX)
    # token classification is the one token-level kind packed rows allow (packed_task_sums)
    outs = {k: outputs[k].reshape((n, 1) + outputs[k].shape[2:])
            for k in ("token_classification",) if k in outputs}
    one = jnp.ones((n, 1), jnp.int32)
    rows = Batch(input_ids=one, attention_mask=one, token_type_ids=0 * one, task_ids=tasks,
                 example_mask=(tasks >= 0).astype(jnp.float32),
                 labels=jnp.full((n,), IGNORE_INDEX, jnp.int32),
                 label_values=jnp.zeros((n,), jnp.float32),
                 token_labels=labels.reshape(n, 1))
    return outs, rows


def segment_rows(batch, segments):
    """Packed rows' segments as a batch of B*S pseudo-rows for sequence-level heads.

    Only the fields sequence-level losses read are real (task ids, labels, values, masks);
    `segments` is mtlx.data.packing.PackedSegments ([B, S] each).
    """
    from mtlx.batch import Batch
    n = segments.task_ids.size
    flat = lambda x: jnp.reshape(x, (n,))  # noqa: E731
    return Batch(input_ids=jnp.zeros((n, 1), jnp.int32), attention_mask=jnp.ones((n, 1), jnp.int32),
                 token_type_ids=jnp.zeros((n, 1), jnp.int32), task_ids=flat(segments.task_ids),
                 example_mask=flat(segments.mask).astype(jnp.float32), labels=flat(segments.labels),
                 label_values=flat(segments.label_values))


def packed_task_sums(outputs: dict, batch, segments, tasks: Sequence[TaskHead]):
    """(per-task loss sums [T], weights [T]) for packed rows: sequence-level heads per segment,
    token-level heads per row (per token on rows that mix tasks)."""
    unpackable = sorted({t.kind for t in tasks} & {"multilabel", "multiple_choice", "span", "seq2seq"})
    if unpackable:
        raise ValueError(f"packed rows do not support head kinds {unpackable}; "
                         f"set packing off for these tasks")
    t = len(tasks)
    seg_batch = segment_rows(batch, segments)
    ls, w = example_losses(outputs, seg_batch, tasks, kinds=SEQUENCE_KINDS)
    s1, c1 = per_task_sums(ls, w, seg_batch.task_ids, t)
    if segments.mixed:
        outputs, batch = token_rows(outputs, batch, segments)
    ls, w = example_losses(outputs, batch, tasks, kinds=TOKEN_KINDS)
    s2, c2 = per_task_sums(ls, w, batch.task_ids, t)
    return s1 + s2, c1 + c2


def packed_task_losses(outputs: dict, batch, segments, tasks: Sequence[TaskHead]):
    """task_losses for packed rows: sequence-level heads per segment, token-level per row."""
    sums, counts = packed_task_sums(outputs, batch, segments, tasks)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1e-9), 0.0), counts


# Start and end candidates per window kept for decoding span answers (Hugging Face run_qa.py's
# n_best_size).
SPAN_N_BEST = 20


def predictions(outputs: dict, batch, tasks: Sequence[TaskHead]) -> dict:
    """Per-kind predictions for evaluation (argmax classes, values, spans, chosen rows)."""
    preds = {}
    kinds = {t.kind for t in tasks}
    if "classification" in kinds:
        r = kind_routing(tasks, "classification")
        local, _ = route(batch.task_ids, r)
        valid = jnp.asarray(r.valid_out)[local]
        preds["classification"] = jnp.argmax(jnp.where(valid, outputs["classification"], NEG_INF), -1)
    if "multilabel" in kinds:
        preds["multilabel"] = (outputs["multilabel"] > 0).astype(jnp.int32)
    if "regression" in kinds:
        preds["regression"] = outputs["regression"]
    if "token_classification" in kinds:
        r = kind_routing(tasks, "token_classification")
        local, _ = route(batch.task_ids, r)
        valid = jnp.asarray(r.valid_out)[local][:, None, :]
        preds["token_classification"] = jnp.argmax(
            jnp.where(valid, outputs["token_classification"], NEG_INF), -1)
    if "span" in kinds:
        tok_ok = batch.attention_mask.astype(bool)
        start = jnp.where(tok_ok, outputs["span_start"], NEG_INF)
        end = jnp.where(tok_ok, outputs["span_end"], NEG_INF)
        preds["span_start"] = jnp.argmax(start, -1)
        preds["span_end"] = jnp.argmax(end, -1)
        # The n-best candidates that text answers are decoded from (mtlx.train.spans).
        k = min(SPAN_N_BEST, start.shape[-1])
        preds["span_start_top_logits"], preds["span_start_top"] = jax.lax.top_k(start, k)
        preds["span_end_top_logits"], preds["span_end_top"] = jax.lax.top_k(end, k)
        # [CLS]'s start + end logit: the window's null ("no answer") score (SQuAD 2.0).
        preds["span_null_score"] = (outputs["span_start"][:, 0].astype(jnp.float32)
                                    + outputs["span_end"][:, 0].astype(jnp.float32))
    if "multiple_choice" in kinds:
        preds["multiple_choice"] = outputs["multiple_choice"]
    if "seq2seq" in kinds:
        preds["seq2seq"] = jnp.argmax(outputs["seq2seq"], -1)
    return preds
