"""Per-task evaluation with each task's own metrics, from a jitted forward pass.

Predictions come out of the compiled eval step per head kind (mtlx.models.heads.predictions);
this module picks each task's rows, turns them into what its metrics read (mtlx.metrics
registry `inputs`), and streams them into a `MetricAccumulator`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from mtlx import metrics as M
from mtlx.batch import IGNORE_INDEX
from mtlx.metrics.registry import SUPPORTING_KEYS


def _gather(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)


def _choice_predictions(scores, labels, groups, rows):
    """Multiple choice: per question, the argmax row vs the row labelled 1 (as choice indices)."""
    preds, refs = [], []
    for g in np.unique(groups[rows]):
        if g < 0:
            continue
        members = rows[groups[rows] == g]
        preds.append(int(np.argmax(scores[members])))
        refs.append(int(np.argmax(labels[members] == 1)))
    return np.asarray(preds, np.int64), np.asarray(refs, np.int64)


class WordTags:
    """Tagging in windows (TaskSpec.stride > 0): collects each word's predicted and gold tag
    from the one window that tags it (TokenizedSplit.word_index), batch by batch (`add`), and
    gives whole sentences back (`sentences`), so sentence-level metrics (entity F1) see each
    sentence whole, as if it had fit one row."""

    def __init__(self, data):
        if data.word_index is None:
            raise ValueError(f"task {data.task!r}: reassembling tagged words needs "
                             f"TokenizedSplit.word_index")
        self.data = data
        self.words: dict = {}  # example -> {word: (predicted tag, gold tag)}

    def add(self, predicted: np.ndarray, example_index: np.ndarray, row_index: np.ndarray,
            rows: np.ndarray) -> None:
        """predicted [B, L]: the batch's predicted tag per token; rows: the batch rows to take."""
        d = self.data
        for j in rows.tolist():
            ex, r = int(example_index[j]), int(row_index[j])
            a, b = int(d.row_starts[r]), int(d.row_starts[r + 1])
            words = d.word_index[a:b]
            gold = (d.token_labels[a:b] if d.token_labels is not None
                    else np.full(b - a, IGNORE_INDEX))
            got = self.words.setdefault(ex, {})
            for t in np.flatnonzero(words >= 0).tolist():
                got[int(words[t])] = (int(predicted[j][t]), int(gold[t]))

    def tags(self) -> dict:
        """{example: [predicted tag or None per word, up to its last tagged word]}."""
        out = {}
        for ex in sorted(self.words):
            got = self.words[ex]
            out[ex] = [got[w][0] if w in got else None for w in range(max(got, default=-1) + 1)]
        return out

    def sentences(self) -> tuple:
        """(predicted, gold) int arrays [sentences, words], padded with IGNORE_INDEX (gold) where
        a sentence has no more words or a word has no tag."""
        exs = sorted(self.words)
        width = max([max(self.words[e], default=-1) + 1 for e in exs] + [1])
        pred = np.zeros((len(exs), width), np.int64)
        gold = np.full((len(exs), width), IGNORE_INDEX, np.int64)
        for i, e in enumerate(exs):
            for w, (p, g) in self.words[e].items():
                pred[i, w], gold[i, w] = p, g
        return pred, gold


def task_inputs(spec, preds: Mapping[str, Any], batch, rows: np.ndarray):
    """(predictions, references) of one task's rows in the form its metrics read."""
    kind = spec.head
    if kind == "classification":
        return preds["classification"][rows], np.asarray(batch.labels)[rows]
    if kind == "regression":
        return preds["regression"][rows], np.asarray(batch.label_values)[rows]
    if kind == "token_classification":
        return preds["token_classification"][rows], np.asarray(batch.token_labels)[rows]
    if kind == "multilabel":
        width = len(spec.labels)
        return preds["multilabel"][rows][:, :width], np.asarray(batch.multi_labels)[rows][:, :width]
    if kind == "multiple_choice":
        return _choice_predictions(np.asarray(preds["multiple_choice"]), np.asarray(batch.labels),
                                   np.asarray(batch.group_ids), rows)
    if kind == "span":
        # Token-level exact span match: the fallback when no SpanReferences (context text and
        # gold answers) are given; with them evaluate_tasks scores SQuAD's text EM/F1.
        hit = ((preds["span_start"][rows] == np.asarray(batch.start_positions)[rows])
               & (preds["span_end"][rows] == np.asarray(batch.end_positions)[rows]))
        return hit.astype(np.int64), np.ones_like(hit, np.int64)
    raise ValueError(f"task {spec.name!r}: evaluation of head kind {kind!r} is not supported")


# Metrics that read 0/1 predictions: a generated text that is no label name is counted wrong
# for them the way T5 does (t5.evaluation.metrics.f1_score_with_invalid: 1 - the reference).
_BINARY_METRICS = ("f1", "acc_and_f1")


def text_prediction(spec, text: str):
    """A generated text as a text-to-text task's metrics read it (T5's postprocessors): the
    class index of a label name, -1 when the text is none (always wrong); the number of a
    "score" target, -1.0 when it does not parse (t5.data.postprocessors.string_to_float);
    else the text itself."""
    text = text.strip()
    if spec.labels:
        return spec.labels.index(text) if text in spec.labels else -1
    if spec.target == "score":
        try:
            value = float(text)
        except ValueError:
            return -1.0
        return value if np.isfinite(value) else -1.0
    return text


def seq2seq_inputs(spec, texts: Sequence[str], batch, rows: np.ndarray, decode: Callable):
    """(predictions, references) of a text-to-text task's rows from their generated texts:
    class indices against the gold labels, numbers against the unrounded gold scores, or
    (free text) exact match of the text with the gold target text, as 1/0 against 1."""
    preds = [text_prediction(spec, t) for t in texts]
    if spec.labels:
        p = np.asarray(preds, np.int64)
        r = np.asarray(batch.labels)[rows].astype(np.int64)
        if any(m in _BINARY_METRICS for m in metric_names(spec)):
            p = np.where(p < 0, 1 - r, p)
        return p, r
    if spec.target == "score":
        return np.asarray(preds, np.float64), np.asarray(batch.label_values)[rows].astype(np.float64)
    targets = np.asarray(batch.target_ids)[rows]
    gold = [decode([int(t) for t in row if t >= 0]).strip() for row in targets]
    return (np.asarray([int(a == b) for a, b in zip(preds, gold)], np.int64),
            np.ones(len(rows), np.int64))


def metric_names(spec, text_answers: bool = False) -> tuple:
    """The metrics a task is scored with. Span tasks: SQuAD's ('exact_match', 'f1') when its
    answers are decoded to text (`text_answers`), else token-level exact span match."""
    if spec.head == "span":
        return ("exact_match", "f1") if text_answers else ("accuracy",)
    if spec.head == "multiple_choice":
        return ("accuracy",)
    return tuple(spec.metrics) or ("accuracy",)


def evaluate_tasks(eval_fn: Callable, params: Any, specs: Sequence, eval_data: Mapping[str, Any],
                   make_batches: Callable, place: Callable = lambda b: b,
                   max_batches: Optional[int] = None,
                   references: Optional[Mapping[str, Any]] = None,
                   generate: Optional[Callable] = None,
                   decode: Optional[Callable] = None) -> dict:
    """{task: {metric: value, 'loss': mean loss}} over each task's evaluation split.

    make_batches(task_name, task_id) yields mtlx.data EvalBatch objects; place(batch) puts a
    batch on the mesh; eval_fn(params, batch) -> (predictions, losses [T], counts [T]).
    references: {span task: mtlx.train.spans.SpanReferences}: those tasks' answers are decoded
    to text and scored with SQuAD's exact match and F1 (mtlx.train.spans); a task with
    null_answers (SQuAD 2.0) also reports 'has_answer.*', 'no_answer.*' and 'best.*'
    breakdowns (mtlx.metrics.squad_v2), which `headline` leaves out.
    generate(params, batch) -> token ids [B, T] and decode(ids) -> text: text-to-text
    (seq2seq) tasks are scored on the texts the model generates (greedy or beam search:
    config.generation), mapped to the task's labels or scores as T5 does (`text_prediction`),
    with the task's own metrics.
    """
    from mtlx.train.spans import SpanDecoder
    references = references or {}
    results = {}
    for task_id, spec in enumerate(specs):
        if spec.name not in eval_data:
            continue
        options = {}
        decoder = None
        if spec.head == "span" and spec.name in references:
            decoder = SpanDecoder.for_task(spec, eval_data[spec.name], references[spec.name])
        names = metric_names(spec, text_answers=decoder is not None)
        if "entity_f1" in names:
            options["label_names"] = list(spec.labels)
        acc = M.MetricAccumulator(names, **options) if decoder is None else None
        words = None
        if spec.head == "token_classification" and spec.stride > 0:
            words = WordTags(eval_data[spec.name])
        loss_sum = weight = 0.0
        for i, eb in enumerate(make_batches(spec.name, task_id)):
            if max_batches is not None and i >= max_batches:
                break
            preds, losses, counts = eval_fn(params, place(eb.batch))
            preds, losses, counts = _gather((preds, losses, counts))
            batch = eb.batch
            rows = np.flatnonzero(np.asarray(eb.example_index) >= 0)
            if rows.size == 0:
                continue
            if spec.head == "seq2seq":
                if generate is None or decode is None:
                    raise ValueError(f"task {spec.name!r}: a text-to-text task is scored on "
                                     f"generated text: pass generate and decode")
                ids = _gather(generate(params, place(eb.batch)))
                texts = [decode([int(t) for t in ids[j]]) for j in rows]
                acc.update(*seq2seq_inputs(spec, texts, batch, rows, decode))
            elif decoder is not None:
                decoder.add(preds, np.asarray(eb.example_index), np.asarray(eb.row_index), rows)
            elif words is not None:
                words.add(np.asarray(preds["token_classification"]), np.asarray(eb.example_index),
                          np.asarray(eb.row_index), rows)
            else:
                p, r = task_inputs(spec, preds, batch, rows)
                acc.update(p, r)
            loss_sum += float(losses[task_id]) * float(counts[task_id])
            weight += float(counts[task_id])
        if decoder is not None:
            res = decoder.scores()
            if not res:
                continue
        elif words is not None:
            if not words.words:
                continue
            acc.update(*words.sentences())
            res = acc.compute()
        elif acc.num_examples == 0:
            continue
        else:
            res = acc.compute()
        res["loss"] = loss_sum / max(weight, 1e-9)
        results[spec.name] = res
    return results


def _in_headline(key: str) -> bool:
    """Whether a task's result `key` is one its headline averages."""
    return key != "loss" and "." not in key and key not in SUPPORTING_KEYS


def headline(task_results: Mapping[str, float]) -> float:
    """One number per task: the mean of its metrics (GLUE's convention), leaving out the loss,
    breakdowns ('group.metric' keys, e.g. SQuAD 2.0's 'has_answer.f1') and figures reported
    beside a score (entity precision and recall next to entity F1:
    mtlx.metrics.registry.SUPPORTING_KEYS). NaN when one of the metrics it averages is
    undefined (a correlation of constant predictions is NaN): the task's other metrics do not
    stand in for it."""
    vals = [v for k, v in task_results.items() if _in_headline(k)]
    if not vals or not all(np.isfinite(v) for v in vals):
        return float("nan")
    return float(np.mean(vals))


def summary_score(results: Mapping[str, Mapping[str, float]]) -> float:
    """Mean of the tasks' headline numbers: the run's model-selection metric ('avg'). NaN when
    a task's headline is undefined (`undefined_scores` names them): averaging the other tasks
    alone would rank a model whose regression head collapsed to a constant above one whose
    head is merely weak."""
    vals = [headline(r) for r in results.values()]
    return float(np.mean(vals)) if vals and all(np.isfinite(v) for v in vals) else float("nan")


def undefined_scores(results: Mapping[str, Mapping[str, float]]) -> list:
    """'task/metric' of every non-finite metric that a task's headline averages."""
    return [f"{t}/{k}" for t, r in results.items() for k, v in r.items()
            if _in_headline(k) and not np.isfinite(v)]


def selection_metrics(results: Mapping[str, Mapping[str, float]], key: str) -> Optional[dict]:
    """{'avg': ..., 'task/metric': ...} for ranking checkpoints, or None if `key` is not finite.

    `key` is config.checkpoint.best_metric: 'avg' (mean of the tasks' headline numbers) or
    'TASK/METRIC' (e.g. 'cola/mcc', 'stsb/loss'); an unknown key is an error listing the known.
    """
    flat = {"avg": summary_score(results)}
    flat.update({f"{t}/{k}": float(v) for t, r in results.items() for k, v in r.items()})
    if key not in flat:
        raise KeyError(f"config.checkpoint.best_metric {key!r} is not an evaluation metric; "
                       f"known: {sorted(flat)}")
    return flat if np.isfinite(flat[key]) else None
