"""Tokenization: Examples -> flat numpy token arrays per task, ready to be batched.

Tokenizers are Hugging Face fast tokenizers (WordPiece, BPE, SentencePiece/Unigram), loaded
from a local directory or a WordPiece vocab file (`load_tokenizer`). One call tokenizes a whole
split in the Rust tokenizer's batch mode; the result (`TokenizedSplit`) stores every row's tokens
in one flat array with row offsets, so batching is a gather and a pad, never a re-tokenization.

Per head kind (labels follow Hugging Face's reference fine-tuning scripts):
  classification / regression / multilabel: one row per example (single text or a pair).
  token_classification: words -> subwords; the first subword of each word carries the word's
      tag, other subwords and specials IGNORE_INDEX (run_ner.py, label_all_tokens=False).
      With TaskSpec.stride > 0 a long sentence becomes overlapping windows instead of being
      cut, each word tagged in the one window where it has the most context (word_index says
      which word a token tags, for reassembling sentences).
  span: question + context, context truncated ("only_second") into windows of max_length that
      overlap by `stride` tokens; each window is one row whose start/end are the answer's first
      and last token, or the [CLS] position 0 when the answer is not inside it (run_qa.py).
      Character offsets of context tokens are kept for mapping predictions back to text.
  multiple_choice: one row per (context, choice); label 1 on the right choice's row, 0 on the
      others; the rows of one example form one sampling unit (they stay together in a batch).
      Every example takes one row per choice field; an example with fewer candidates
      (source.min_choices) fills the rest with empty rows labelled ABSENT_CHOICE, which
      batches hold as padding rows (no tokens, no task, outside every question's softmax).
  seq2seq (T5 text-to-text, Raffel et al. 2020): input "<task> <field>: <text> ...", target the
      class name / rounded score / target text; both end with the tokenizer's EOS.

A "unit" is what the sampler draws: one row, or the k rows of a multiple-choice example.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mtlx.batch import IGNORE_INDEX
from mtlx.data.errors import DataError
from mtlx.data.readers import SplitData

# The label of a multiple-choice row standing for a candidate the example does not have.
ABSENT_CHOICE = -1

log = logging.getLogger("mtlx.data")


def load_tokenizer(path, *, lowercase: Optional[bool] = None):
    """A fast tokenizer from a local directory (AutoTokenizer) or a WordPiece vocab.txt file.

    For a vocab file this is `BertTokenizerFast(vocab=path)`: transformers 5 silently ignores
    `vocab_file=` (REFERENCE.md section 7). `lowercase` defaults to True for vocab files whose
    path says "uncased" (and True otherwise, as BERT's default); directories carry their own
    setting. No network access is ever attempted.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(path)
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from directory {path}: {e}") from None
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a directory with a "
                                f"tokenizer config, or a WordPiece vocab.txt)")
    if path.suffix == ".model":
        raise ValueError(f"{path}: a raw SentencePiece .model file needs the `sentencepiece` "
                         f"package to convert; pass the directory of a saved fast tokenizer "
                         f"(tokenizer.json) instead")
    if path.name == "tokenizer.json":
        return AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
    first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    if not first or "\t" in first[0] or " " in first[0].strip():
        raise ValueError(f"{path}: not a WordPiece vocab file (one token per line)")
    if lowercase is None:
        lowercase = "cased" not in path.as_posix().lower().replace("uncased", "")
    return BertTokenizerFast(vocab=str(path), do_lower_case=lowercase)


@dataclasses.dataclass
class TokenizedSplit:
    """A task split (or one process's shard of it) as flat token arrays.

    Rows r = 0..R-1: tokens input_ids[row_starts[r]:row_starts[r+1]] (same slices for type_ids
    and token_labels). Units u = 0..U-1 (what the sampler draws): rows
    unit_starts[u]:unit_starts[u+1]; unit_example[u] is the index of the unit's example in the
    whole split (before sharding), so predictions can be matched to examples.
    """
    task: str
    head: str
    split: str
    input_ids: np.ndarray          # int32 [N]
    type_ids: np.ndarray           # int8 [N]
    row_starts: np.ndarray         # int64 [R + 1]
    unit_starts: np.ndarray        # int64 [U + 1]
    unit_example: np.ndarray       # int32 [U]
    labels: np.ndarray             # int32 [R], IGNORE_INDEX where none
    label_values: np.ndarray       # float32 [R]
    num_examples: int              # examples in the whole split (all shards)
    pad_id: int = 0
    shard: tuple = (0, 1)          # (process index, process count)
    num_labels: int = 0
    token_labels: Optional[np.ndarray] = None    # int32 [N]
    multi_labels: Optional[np.ndarray] = None    # float32 [R, C]
    start_positions: Optional[np.ndarray] = None  # int32 [R]
    end_positions: Optional[np.ndarray] = None    # int32 [R]
    char_offsets: Optional[np.ndarray] = None     # int32 [N, 2], (-1, -1) outside the context
    word_index: Optional[np.ndarray] = None       # tagging: int32 [N], the word a token tags, -1 elsewhere
    target_ids: Optional[np.ndarray] = None       # seq2seq: int32 [M] target tokens (EOS incl.)
    target_starts: Optional[np.ndarray] = None    # seq2seq: int64 [R + 1]
    max_target_length: int = 0                    # seq2seq: the task's target length limit
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.row_starts) - 1

    @property
    def num_units(self) -> int:
        return len(self.unit_starts) - 1

    @property
    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_starts)

    @property
    def rows_per_unit(self) -> int:
        """Rows of every unit (constant per task: 1, or the number of choices)."""
        sizes = np.unique(np.diff(self.unit_starts))
        return int(sizes[0]) if len(sizes) else 1

    def row_tokens(self, r: int) -> np.ndarray:
        return self.input_ids[self.row_starts[r]: self.row_starts[r + 1]]


def shard_indices(n: int, index: int, count: int) -> np.ndarray:
    """The examples process `index` of `count` owns: every count-th from `index` (disjoint,
    together covering 0..n-1, sizes differ by at most one)."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} out of range for {count} processes")
    return np.arange(index, n, count)


def tokenize_split(data: SplitData, tokenizer, *, shard: tuple = (0, 1),
                   max_length: Optional[int] = None) -> TokenizedSplit:
    """Tokenizes the examples of `data` that belong to `shard` = (process index, count)."""
    spec = data.task
    max_length = max_length or spec.max_length
    owned = shard_indices(len(data.examples), *shard)
    if len(owned) == 0:
        raise DataError(f"split {data.split!r} has {len(data.examples)} examples: none for process "
                        f"{shard[0]} of {shard[1]} (a task with no examples is an error)",
                        path=data.path, task=spec.name)
    examples = [data.examples[i] for i in owned]
    fn = {"token_classification": _token_classification, "span": _span,
          "multiple_choice": _multiple_choice, "seq2seq": _seq2seq}.get(spec.head, _sequence)
    out = fn(spec, examples, owned, tokenizer, max_length, data.labelled)
    out.update(task=spec.name, head=spec.head, split=data.split, num_examples=len(data.examples),
               pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
               shard=tuple(shard), num_labels=spec.num_labels)
    result = TokenizedSplit(**out)
    if result.stats.get("words_without_tokens"):
        log.warning("task %r: %d words produce no subword token and carry no label", spec.name,
                    result.stats["words_without_tokens"])
    if result.stats.get("truncated"):
        log.warning("task %r split %r: %d of %d examples longer than max_length=%d were truncated%s",
                    spec.name, data.split, result.stats["truncated"], len(examples), max_length,
                    f" ({result.stats['words_truncated']} tagged words lost)"
                    if result.stats.get("words_truncated") else "")
    return result


# ----------------------------------------------------------------------------- helpers

def _flatten(rows: Sequence[Sequence[int]], dtype) -> tuple:
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype, int(starts[-1]))
    return flat, starts


def _encode(tokenizer, spec, first, second, max_length, **kw):
    strategy = spec.truncation if second is not None else True
    try:
        return tokenizer(first, second, truncation=strategy, max_length=max_length,
                         return_token_type_ids=True, return_attention_mask=False, **kw)
    except Exception as e:  # the Rust tokenizer raises a bare Exception
        if "Truncation error" not in str(e):
            raise
        raise DataError(f"truncation {strategy!r} cannot fit an example into max_length "
                        f"{max_length}: the segment it may cut is too short ({e}); use "
                        f"'longest_first' or a larger max_length", task=spec.name) from None


def _count_truncated(tokenizer, spec, first, second, ids, max_length) -> int:
    """Rows at max_length may have been cut: re-tokenize only those without truncation."""
    full = [i for i, r in enumerate(ids) if len(r) >= max_length]
    if not full:
        return 0
    a = [first[i] for i in full]
    b = [second[i] for i in full] if second is not None else None
    enc = tokenizer(a, b, truncation=False, return_attention_mask=False, verbose=False)
    return sum(len(r) > max_length for r in enc["input_ids"])


def _units(rows_per_unit: int, num_units: int, owned) -> tuple:
    unit_starts = np.arange(num_units + 1, dtype=np.int64) * rows_per_unit
    return unit_starts, np.asarray(owned, np.int32)


def _base(ids, types, labels, values, unit_starts, unit_example, **extra) -> dict:
    flat, starts = _flatten(ids, np.int32)
    tflat, _ = _flatten(types, np.int8)
    return dict(input_ids=flat, type_ids=tflat, row_starts=starts, unit_starts=unit_starts,
                unit_example=unit_example, labels=np.asarray(labels, np.int32),
                label_values=np.asarray(values, np.float32), **extra)


# ----------------------------------------------------------------------------- per head kind

def _sequence(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    first = [ex.texts[0] for ex in examples]
    second = [ex.texts[1] for ex in examples] if len(spec.text_fields) > 1 else None
    if len(spec.text_fields) > 2:
        # More than two text fields: join the rest into the second segment.
        second = [" ".join(ex.texts[1:]) for ex in examples]
    enc = _encode(tokenizer, spec, first, second, max_length)
    n = len(examples)
    labels = np.full(n, IGNORE_INDEX, np.int32)
    values = np.zeros(n, np.float32)
    extra = {}
    if spec.head == "classification" and labelled:
        labels[:] = [ex.label for ex in examples]
    elif spec.head == "regression" and labelled:
        values[:] = [ex.label for ex in examples]
    elif spec.head == "multilabel":
        multi = np.zeros((n, spec.num_labels), np.float32)
        if labelled:
            for i, ex in enumerate(examples):
                multi[i, list(ex.label)] = 1.0
        extra["multi_labels"] = multi
    unit_starts, unit_example = _units(1, n, owned)
    out = _base(enc["input_ids"], enc["token_type_ids"], labels, values, unit_starts, unit_example, **extra)
    out["stats"] = {"truncated": _count_truncated(tokenizer, spec, first, second, enc["input_ids"], max_length)}
    return out


def _token_classification(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    if spec.stride > 0:
        return _token_windows(spec, examples, owned, tokenizer, max_length, labelled)
    words = [list(ex.texts) for ex in examples]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    token_labels, word_index, truncated, words_lost, untokenized = [], [], 0, 0, 0
    for i, ex in enumerate(examples):
        word_ids = enc.word_ids(i)
        first = _first_subwords(word_ids)
        seen = {w for w in first if w >= 0}
        row = [ex.tags[w] if labelled and w >= 0 else IGNORE_INDEX for w in first]
        last = max((w for w in word_ids if w is not None), default=-1)
        # Cut by max_length (not: trailing words that make no subword).
        cut = last < len(ex.texts) - 1 and len(word_ids) >= max_length
        if cut:
            truncated += 1
            words_lost += len(ex.texts) - 1 - last
        # Words that produce no subword at all (e.g. a lone control character) cannot be tagged.
        untokenized += sum(1 for w in range(last + 1 if cut else len(ex.texts)) if w not in seen)
        token_labels.append(row)
        word_index.append(first)
    n = len(examples)
    unit_starts, unit_example = _units(1, n, owned)
    out = _base(enc["input_ids"], enc["token_type_ids"], np.full(n, IGNORE_INDEX), np.zeros(n),
                unit_starts, unit_example)
    out["token_labels"], _ = _flatten(token_labels, np.int32)
    out["word_index"], _ = _flatten(word_index, np.int32)
    out["stats"] = {"truncated": truncated, "words_truncated": words_lost,
                    "words_without_tokens": untokenized}
    return out


def _first_subwords(word_ids) -> list:
    """Per token: its word's index on the word's first subword, -1 elsewhere."""
    seen, out = set(), []
    for w in word_ids:
        out.append(w if w is not None and w not in seen else -1)
        if w is not None:
            seen.add(w)
    return out


def _token_windows(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    """Tagging with windows (TaskSpec.stride > 0): a sentence longer than max_length is cut into
    windows of max_length tokens that overlap by `stride` tokens (the tokenizer's overflow, as
    run_qa.py cuts contexts), so no word is lost. Each word is tagged in ONE window, the one
    where its first subword has the most context on both sides (ties: the earlier): its label
    (and word_index) sit there and nowhere else, so training counts it once and evaluation and
    prediction read each word's tag exactly once (mtlx.train.evaluate reassembles sentences)."""
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if 2 * spec.stride > max_length - specials:
        raise DataError(f"stride {spec.stride} leaves windows of max_length {max_length} "
                        f"({max_length - specials} tokens besides the specials) no room to move "
                        f"on: use a stride of at most {(max_length - specials) // 2} (task "
                        f"stride: config.task_overrides) or a larger config.data.max_length",
                        task=spec.name)
    words = [list(ex.texts) for ex in examples]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                    stride=spec.stride, return_overflowing_tokens=True,
                    return_token_type_ids=True, return_attention_mask=False)
    sample = list(enc["overflow_to_sample_mapping"])
    rows_of = {}
    for r, i in enumerate(sample):
        rows_of.setdefault(i, []).append(r)
    token_labels = [None] * len(sample)
    word_index = [None] * len(sample)
    untokenized = 0
    for i, rows in rows_of.items():
        ex = examples[i]
        # Global content position of each window's content tokens: windows overlap by stride.
        best = {}  # word -> (centrality, row, token) of its first subword's best window
        start, overlap = 0, 0
        prev_words = None
        for r in rows:
            wids = enc.word_ids(r)
            content = [t for t, w in enumerate(wids) if w is not None]
            cw = [wids[t] for t in content]
            if prev_words is not None:
                overlap = min(spec.stride, len(prev_words), len(cw))
                if prev_words[len(prev_words) - overlap:] != cw[:overlap]:
                    raise DataError(f"the tokenizer's overflowing windows do not overlap by "
                                    f"stride {spec.stride} tokens", task=spec.name,
                                    line=ex.line or None, where=None if ex.line else f"id {ex.uid}")
                start += len(prev_words) - overlap
            for j, t in enumerate(content):
                w = cw[j]
                g = start + j
                before = cw[j - 1] if j > 0 else _word_before(prev_words, overlap)
                if g > 0 and before == w:  # not the word's first subword
                    continue
                centrality = min(j, len(content) - 1 - j)
                if w not in best or centrality > best[w][0]:
                    best[w] = (centrality, r, t)
            prev_words = cw
        for r in rows:
            token_labels[r] = [IGNORE_INDEX] * len(enc["input_ids"][r])
            word_index[r] = [-1] * len(enc["input_ids"][r])
        for w, (_, r, t) in best.items():
            word_index[r][t] = w
            if labelled:
                token_labels[r][t] = ex.tags[w]
        untokenized += len(ex.texts) - len(best)
    n = len(sample)
    out = _base(enc["input_ids"], enc["token_type_ids"], np.full(n, IGNORE_INDEX), np.zeros(n),
                np.arange(n + 1, dtype=np.int64), np.asarray(owned, np.int32)[np.asarray(sample, np.int64)])
    out["token_labels"], _ = _flatten(token_labels, np.int32)
    out["word_index"], _ = _flatten(word_index, np.int32)
    out["stats"] = {"truncated": 0, "words_truncated": 0, "windows": n, "examples": len(examples),
                    "words_without_tokens": untokenized}
    return out


def _word_before(prev_words, overlap):
    """The word of the token just before a window's first content token (None at the start)."""
    if prev_words is None or overlap >= len(prev_words):
        return None
    return prev_words[len(prev_words) - overlap - 1]


def _span(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    questions = [ex.texts[0] for ex in examples]
    contexts = [ex.texts[1] for ex in examples]
    q_lens = tokenizer(questions, add_special_tokens=False, return_attention_mask=False,
                       return_token_type_ids=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for i, q in enumerate(q_lens):
        if len(q) + specials + spec.stride + 1 > max_length:
            ex = examples[i]
            raise DataError(f"question of {len(q)} tokens leaves no room for a context window "
                            f"with stride {spec.stride} in max_length {max_length}: lower the "
                            f"task's stride (TaskSpec.stride, task config 'stride') or raise "
                            f"max_length (config.data.max_length)",
                            line=ex.line or None, where=None if ex.line else f"id {ex.uid}",
                            task=spec.name)
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length,
                    stride=spec.stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, return_token_type_ids=True,
                    return_attention_mask=False)
    sample = enc["overflow_to_sample_mapping"]
    starts, ends, offsets = [], [], []
    for r, i in enumerate(sample):
        seq = enc.sequence_ids(r)
        offs = enc["offset_mapping"][r]
        row_offsets = [(a, b) if s == 1 else (-1, -1) for (a, b), s in zip(offs, seq)]
        offsets.append(row_offsets)
        if not labelled:
            starts.append(IGNORE_INDEX), ends.append(IGNORE_INDEX)
            continue
        ex = examples[i]
        if not ex.answers:  # SQuAD 2.0 unanswerable: point at [CLS]
            starts.append(0), ends.append(0)
            continue
        text, char_start = ex.answers[0]
        char_end = char_start + len(text)
        ctx = [t for t, s in enumerate(seq) if s == 1]
        if offs[ctx[0]][0] > char_start or offs[ctx[-1]][1] < char_end:
            starts.append(0), ends.append(0)  # answer not (wholly) in this window
            continue
        s_tok = next(t for t in ctx if offs[t][1] > char_start)
        e_tok = next(t for t in reversed(ctx) if offs[t][0] < char_end)
        starts.append(s_tok), ends.append(e_tok)
    n = len(sample)
    unit_starts = np.arange(n + 1, dtype=np.int64)
    unit_example = np.asarray(owned, np.int32)[np.asarray(sample, np.int64)]
    out = _base(enc["input_ids"], enc["token_type_ids"], np.full(n, IGNORE_INDEX), np.zeros(n),
                unit_starts, unit_example)
    out["start_positions"] = np.asarray(starts, np.int32)
    out["end_positions"] = np.asarray(ends, np.int32)
    flat_offsets = np.asarray(list(itertools.chain.from_iterable(offsets)), np.int32).reshape(-1, 2)
    out["char_offsets"] = flat_offsets
    out["stats"] = {"truncated": 0, "windows": n, "examples": len(examples)}
    return out


def _multiple_choice(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    k = spec.source.num_choices
    first, second, labels, present = [], [], [], []
    for ex in examples:
        context = " ".join(ex.texts)
        for c, choice in enumerate(ex.choices):
            first.append(context)
            second.append(choice)
            labels.append(int(c == ex.label) if labelled else IGNORE_INDEX)
        present.append(len(ex.choices))
    enc = _encode(tokenizer, spec, first, second, max_length)
    ids, types, rows, i = [], [], [], 0
    for n in present:   # each example's k rows: its candidates, then empty absent ones
        for c in range(k):
            if c < n:
                ids.append(enc["input_ids"][i])
                types.append(enc["token_type_ids"][i])
                rows.append(labels[i])
                i += 1
            else:
                ids.append([])
                types.append([])
                rows.append(ABSENT_CHOICE)
    unit_starts, unit_example = _units(k, len(examples), owned)
    out = _base(ids, types, rows, np.zeros(len(rows)), unit_starts, unit_example)
    out["stats"] = {"truncated": _count_truncated(tokenizer, spec, first, second, enc["input_ids"], max_length)}
    return out


def target_text(spec, label) -> str:
    """The target string of a seq2seq example (see TaskSpec.target)."""
    if spec.labels:
        return spec.labels[label]
    if spec.target == "score":
        return f"{round(float(label) * 5) / 5:.1f}"  # T5: STS-B scores rounded to 0.2
    return str(label)


def _seq2seq(spec, examples, owned, tokenizer, max_length, labelled) -> dict:
    # T5's GLUE preprocessor (t5.data.preprocessors.glue) writes the fields in sorted name
    # order: "mnli hypothesis: ... premise: ...", the input its released checkpoints know.
    inputs = [f"{spec.name} " + " ".join(f"{f}: {t}" for f, t in
                                         sorted(zip(spec.text_fields, ex.texts)))
              for ex in examples]
    enc = tokenizer(inputs, truncation=True, max_length=max_length, return_token_type_ids=True,
                    return_attention_mask=False)
    n = len(examples)
    if labelled:
        targets = tokenizer([target_text(spec, ex.label) for ex in examples], truncation=True,
                            max_length=spec.max_target_length, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
    else:
        targets = [[] for _ in examples]
    unit_starts, unit_example = _units(1, n, owned)
    # The gold answer as evaluation scores it (the loss reads target_ids only): the class index
    # of a task with labels, the unrounded score of a "score" target.
    labels, values = np.full(n, IGNORE_INDEX), np.zeros(n)
    if labelled and spec.labels:
        labels[:] = [ex.label for ex in examples]
    elif labelled and spec.target == "score":
        values[:] = [float(ex.label) for ex in examples]
    out = _base(enc["input_ids"], enc["token_type_ids"], labels, values, unit_starts, unit_example)
    out["target_ids"], out["target_starts"] = _flatten(targets, np.int32)
    out["max_target_length"] = spec.max_target_length
    out["stats"] = {"truncated": _count_truncated(tokenizer, spec, inputs, None, enc["input_ids"], max_length)}
    return out
