"""Sequence-labelling metrics: token accuracy and entity-level (span) precision/recall/F1.

Entity scoring follows the CoNLL shared-task evaluation (conlleval.pl, Tjong Kim Sang & De
Meulder 2003, "Introduction to the CoNLL-2003 Shared Task") as re-implemented by seqeval
(Nakayama 2018), which the tests use as the reference: an entity (chunk) counts as correct only
if its type and both boundaries match a gold entity; precision, recall and F1 are micro
averages over all entities of all types.

Two ways to read chunks from tags:
- mode="conlleval" (default; seqeval's default mode): the lenient CoNLL rules, which accept IOB1,
  IOB2 (BIO) and IOBES tags alike. A chunk starts at B-/S-, at an I-/E- that follows O or a
  chunk end, or where the type changes; it ends before B-/S-/O, after E-/S-, or where the type
  changes. So an ill-formed "O I-PER I-PER" still yields one PER entity.
- mode="strict" with scheme="IOB2" or "IOBES" (seqeval `mode='strict'`): only well-formed
  chunks count: IOB2 B-X (I-X)*; IOBES S-X or B-X (I-X)* E-X. Anything else is no entity.

Inputs are per-sentence tag sequences: lists of tag strings, or integer label ids with
`label_names` (id -> tag). With ids, positions whose *reference* is IGNORE_INDEX (non-first
subwords, special tokens, padding; see mtlx/batch.py) are dropped from both sequences first,
so entities are scored on words, as conlleval does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from mtlx.batch import IGNORE_INDEX
from mtlx.metrics._checks import check_lengths, check_pair

_PREFIXES = ("B", "I", "E", "S")


def token_accuracy(predictions: Any, references: Any, *, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of tokens predicted correctly, over positions whose reference != ignore_index.

    `predictions` and `references` are [B, L] arrays (or lists of equal-length rows). Raises if
    every position is ignored: accuracy over no tokens is undefined.
    """
    rows = _token_rows("token_accuracy", predictions, references)
    p = np.concatenate([a for a, _ in rows])
    r = np.concatenate([b for _, b in rows])
    keep = r != ignore_index
    if not keep.any():
        raise ValueError(
            f"mtlx.metrics.token_accuracy: empty input: every reference position is "
            f"ignore_index={ignore_index}")
    return float(np.mean(p[keep] == r[keep]))


def _token_rows(metric: str, predictions: Any, references: Any):
    """Pairs (prediction row, reference row) of equal length, from 2-D arrays or ragged lists."""
    if not isinstance(predictions, (list, tuple)):  # a numpy or JAX [B, L] array
        p, r = check_pair(metric, predictions, references, ndim=2)
        return list(zip(p, r))
    check_lengths(metric, predictions, references)
    rows = []
    for i, (a, b) in enumerate(zip(predictions, references)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(
                f"mtlx.metrics.{metric}: sentence {i}: prediction shape {a.shape} != "
                f"reference shape {b.shape} (each row must be 1-D, one entry per token)")
        rows.append((a, b))
    return rows


def _split_tag(metric: str, tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). A bare prefix ('B') gets type '_' (seqeval)."""
    if tag == "O":
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    if prefix not in _PREFIXES:
        raise ValueError(
            f"mtlx.metrics.{metric}: tag {tag!r} is not O and does not start with one of "
            f"{'/'.join(_PREFIXES)} followed by '-TYPE'")
    return prefix, entity_type or "_"


def _conlleval_chunks(metric: str, tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end inclusive) of every chunk under the lenient CoNLL rules."""
    chunks = []
    prev_prefix, prev_type, start = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel O closes a chunk at the end
        prefix, entity_type = _split_tag(metric, tag)
        ends = (
            prev_prefix in ("E", "S")
            or (prev_prefix in ("B", "I") and prefix in ("B", "S", "O"))
            or (prev_prefix != "O" and prev_type != entity_type))
        starts = (
            prefix in ("B", "S")
            or (prev_prefix in ("E", "S", "O") and prefix in ("I", "E"))
            or (prefix != "O" and prev_type != entity_type))
        if ends:
            chunks.append((prev_type, start, i - 1))
        if starts:
            start = i
        prev_prefix, prev_type = prefix, entity_type
    return chunks


def _strict_chunks(metric: str, tags: Sequence[str], scheme: str) -> list[tuple[str, int, int]]:
    """Well-formed chunks only: IOB2 B-X (I-X)*; IOBES S-X | B-X (I-X)* E-X."""
    allowed = ("B", "I") if scheme == "IOB2" else ("B", "I", "E", "S")
    parsed = [_split_tag(metric, t) for t in tags]
    for t, (prefix, _) in zip(tags, parsed):
        if prefix != "O" and prefix not in allowed:
            raise ValueError(f"mtlx.metrics.{metric}: tag {t!r} is not valid in scheme {scheme}")
    chunks, i, n = [], 0, len(parsed)
    while i < n:
        prefix, entity_type = parsed[i]
        if scheme == "IOBES" and prefix == "S":
            chunks.append((entity_type, i, i))
            i += 1
            continue
        if prefix != "B":
            i += 1
            continue
        j = i + 1
        while j < n and parsed[j] == ("I", entity_type):
            j += 1
        if scheme == "IOB2":
            chunks.append((entity_type, i, j - 1))
            i = j
        elif j < n and parsed[j] == ("E", entity_type):
            chunks.append((entity_type, i, j))
            i = j + 1
        else:  # IOBES chunk without its E-X: not an entity
            i = j
    return chunks


def extract_entities(tags: Sequence[str], *, mode: str = "conlleval",
                     scheme: Optional[str] = None) -> list[tuple[str, int, int]]:
    """Entities of one sentence as (type, start, end) with `end` inclusive."""
    _check_mode(mode, scheme)
    if mode == "conlleval":
        return _conlleval_chunks("entity_f1", tags)
    return _strict_chunks("entity_f1", tags, scheme)


def _check_mode(mode: str, scheme: Optional[str]) -> None:
    if mode == "conlleval":
        if scheme is not None:
            raise ValueError(
                "mtlx.metrics.entity_f1: scheme is only used with mode='strict' (conlleval mode "
                f"reads IOB1, IOB2 and IOBES alike), got scheme={scheme!r}")
    elif mode == "strict":
        if scheme not in ("IOB2", "IOBES"):
            raise ValueError(
                f"mtlx.metrics.entity_f1: mode='strict' needs scheme='IOB2' or 'IOBES', got {scheme!r}")
    else:
        raise ValueError(f"mtlx.metrics.entity_f1: mode must be 'conlleval' or 'strict', got {mode!r}")


def _to_tag_sentences(predictions: Any, references: Any, label_names: Optional[Sequence[str]],
                      ignore_index: int) -> tuple[list[list[str]], list[list[str]]]:
    metric = "entity_f1"
    if label_names is None:
        check_lengths(metric, predictions, references)
        pred, ref = [], []
        for i, (a, b) in enumerate(zip(predictions, references)):
            a, b = list(a), list(b)
            if len(a) != len(b):
                raise ValueError(
                    f"mtlx.metrics.{metric}: sentence {i}: {len(a)} predicted tags but {len(b)} "
                    f"reference tags")
            if any(not isinstance(t, str) for t in a + b):
                raise ValueError(
                    f"mtlx.metrics.{metric}: sentence {i} holds non-string tags; pass label ids "
                    f"together with label_names=[...] (id -> tag)")
            pred.append(a)
            ref.append(b)
        return pred, ref
    names = list(label_names)
    pred, ref = [], []
    for i, (a, b) in enumerate(_token_rows(metric, predictions, references)):
        keep = b != ignore_index
        a, b = a[keep], b[keep]
        for what, ids in (("prediction", a), ("reference", b)):
            bad = ids[(ids < 0) | (ids >= len(names))]
            if bad.size:
                raise ValueError(
                    f"mtlx.metrics.{metric}: sentence {i}: {what} label id {int(bad[0])} is "
                    f"outside label_names (0..{len(names) - 1})")
        pred.append([names[int(k)] for k in a])
        ref.append([names[int(k)] for k in b])
    if not any(len(s) for s in ref):
        raise ValueError(
            f"mtlx.metrics.{metric}: empty input: every reference position is ignore_index={ignore_index}")
    return pred, ref


def entity_counts(predictions: Any, references: Any, *, label_names: Optional[Sequence[str]] = None,
                  mode: str = "conlleval", scheme: Optional[str] = None,
                  ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int]:
    """(correct, predicted, gold) entity counts over all sentences; see `entity_f1`."""
    _check_mode(mode, scheme)
    pred, ref = _to_tag_sentences(predictions, references, label_names, ignore_index)
    pred_set, gold_set = set(), set()
    for s, (p, r) in enumerate(zip(pred, ref)):
        pred_set.update((s,) + e for e in extract_entities(p, mode=mode, scheme=scheme))
        gold_set.update((s,) + e for e in extract_entities(r, mode=mode, scheme=scheme))
    return len(pred_set & gold_set), len(pred_set), len(gold_set)


def entity_f1(predictions: Any, references: Any, *, label_names: Optional[Sequence[str]] = None,
              mode: str = "conlleval", scheme: Optional[str] = None,
              ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 (conlleval / seqeval semantics).

    predictions, references: per-sentence tag strings, or label ids ([B, L] array or ragged
    rows) with `label_names`. Returns {"precision", "recall", "f1"}; a ratio whose denominator
    is 0 (no predicted, or no gold, entity) is 0.0, as seqeval's default.
    """
    correct, n_pred, n_gold = entity_counts(
        predictions, references, label_names=label_names, mode=mode, scheme=scheme,
        ignore_index=ignore_index)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
