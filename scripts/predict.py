#!/usr/bin/env python
"""Predict with a trained multi-task model: one JSONL file, any mix of tasks.

    python scripts/predict.py --config configs/demo.py --workdir DIR --input in.jsonl --output out.jsonl

DIR, the input and the output may be local paths or URLs (gs://...: mtlx.paths).

Each input line names its task and gives the task's text fields, e.g.
    {"task": "sst2", "sentence": "a gorgeous film"}
    {"task": "mrpc", "sentence1": "...", "sentence2": "..."}
    {"task": "ud_pos", "tokens": ["The", "cat", "sat"]}
    {"task": "squad", "question": "...", "context": "..."}
    {"task": "copa", "premise": "...", "choice1": "...", "choice2": "..."}
Each output line repeats the input with "prediction" added: the label name (classification),
the value (regression), the generated text (text-to-text tasks: config.text_to_text or a
seq2seq task; for a class task the label name it generates, which may be none of them), the
list of label names scored positive (multilabel), the index of
the chosen candidate among the task's choice fields, as its labels count them (multiple
choice; a task with source.min_choices takes requests whose trailing choice fields are
empty or absent), one tag per word (token classification; null for a word that makes
no subword; words past data.max_length get none, and the line then has
"words_without_prediction" and stderr names it, unless the task tags long inputs in windows:
--config.task_overrides=ud_pos.stride=32), or the answer
text cut from the context (span tasks: the best start/end pair over the context's windows,
mtlx.train.spans). A span task with unanswerable questions (SQuAD 2.0, e.g. "squad_v2")
answers "" for "no answer" and adds "no_answer_score": the question's null score minus its
best span's score, "" above the task's null_score_threshold (null when no span is valid).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlx.train.config import parse_cli  # noqa: E402


def read_requests(path: Path, specs: dict) -> dict:
    """{task: [(line number, record)]}; errors name the file and line."""
    by_task = {}
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    for n, data in enumerate(raw.split(b"\n"), 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path}:{n}: not UTF-8 (byte {e.start} of the line)")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            raise SystemExit(f"{path}:{n}: a request is a JSON object, got {type(rec).__name__}")
        task = rec.get("task")
        if task not in specs:
            raise SystemExit(f"{path}:{n}: unknown task {task!r}; this model's tasks: {sorted(specs)}")
        by_task.setdefault(task, []).append((n, rec))
    return by_task


def request_texts(rec: dict, spec, where: str) -> tuple:
    """The request's texts for `spec`: its text fields' strings, or the list of words of a
    token-classification request; SystemExit naming `where` otherwise."""
    if spec.head == "token_classification":
        words = rec.get("tokens")
        if not isinstance(words, list) or not words or \
                not all(isinstance(w, str) and w.strip() for w in words):
            raise SystemExit(f"{where}: task {spec.name!r} needs \"tokens\": a non-empty list of "
                             f"non-empty strings, got {words!r}")
        return tuple(words)
    texts = tuple(rec.get(f) for f in spec.text_fields)
    bad = [f for f, t in zip(spec.text_fields, texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise SystemExit(f"{where}: task {spec.name!r} needs fields {list(spec.text_fields)} as "
                         f"non-empty strings; "
                         + ", ".join(f"{f!r} is {rec.get(f)!r}" for f in bad))
    return texts


def words_cut(words, tagged: int, tokenizer) -> int:
    """How many of `words` the tokenizer cut (past max_length): every word from the first
    after the `tagged` ones that makes a subword (a word that makes none, such as a
    zero-width space, gets no tag without being cut)."""
    for i in range(tagged, len(words)):
        if tokenizer(words[i], add_special_tokens=False)["input_ids"]:
            return len(words) - i
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", default="latest")
    args, cfg = parse_cli(parser, argv)
    import jax
    import numpy as np
    from mtlx import data as D
    from mtlx import paths
    from mtlx.data.errors import ReadReport, RowErrors
    from mtlx.data.readers import make_example
    from mtlx.train.loop import restore_state, setup, text_generation
    from mtlx.train.step import make_eval_step

    s = setup(cfg, train=False)
    params = restore_state(s, args.workdir, args.checkpoint).state.params
    eval_step = jax.jit(make_eval_step(s.model))
    generate, decode = text_generation(s)
    specs = {sp.name: sp for sp in s.run.specs}
    requests = read_requests(paths.as_path(args.input), specs)
    outputs = {}
    for task, recs in requests.items():
        spec = specs[task]
        if spec.head not in ("classification", "regression", "token_classification", "span",
                             "multiple_choice", "multilabel", "seq2seq"):
            raise SystemExit(f"task {task!r}: prediction for head {spec.head!r} is not supported yet")
        examples = []
        errors = RowErrors("raise", args.input, task)
        for n, rec in recs:
            if spec.head == "multiple_choice":   # the data files' checks: fields, empty choices
                try:
                    examples.append(make_example(spec, rec, False, errors, line=n))
                except D.DataError as e:
                    raise SystemExit(str(e))
                continue
            texts = request_texts(rec, spec, f"{args.input}:{n}")
            kwargs = dict(texts=texts, line=n)
            if spec.head == "token_classification":
                kwargs["tags"] = (0,) * len(texts)  # placeholder labels, never read
            examples.append(D.Example(**kwargs))
        split = D.SplitData(task=spec, split="predict", examples=examples,
                            report=ReadReport(path=args.input, task=task, rows_read=len(examples)),
                            path=args.input, labelled=spec.head == "token_classification")
        try:
            tok = D.tokenize_split(split, s.run.tokenizer, max_length=cfg.data.max_length)
        except D.DataError as e:  # e.g. a question too long for a window: its request's line
            raise SystemExit(str(D.DataError(e.message, path=args.input, line=e.line,
                                             where=e.where, task=task)))
        task_id = s.names.index(task)
        decoder = words = None
        choice_scores = {}   # multiple choice: example -> its candidates' scores, in order
        if spec.head == "token_classification":
            from mtlx.train.evaluate import WordTags
            words = WordTags(tok)
        if spec.head == "span":
            from mtlx.train.spans import SpanDecoder, SpanReferences
            decoder = SpanDecoder.for_task(spec, tok, SpanReferences.from_split(split))  # no golds
        for eb in D.eval_batches(tok, task_id, batch_size=cfg.get("eval_batch_size", 32),
                                 layout=s.run.layout, buckets=s.buckets):
            example_index = np.asarray(eb.example_index)
            if spec.head == "seq2seq":   # the generated text (config.generation)
                ids = np.asarray(generate(params, eb.batch))
                for j, ex in enumerate(example_index):
                    if ex >= 0:
                        n, rec = recs[ex]
                        outputs[n] = dict(rec, prediction=decode([int(t) for t in ids[j]]).strip())
                continue
            preds, _, _ = jax.device_get(eval_step(params, eb.batch))
            if decoder is not None:
                decoder.add(preds, example_index, np.asarray(eb.row_index),
                            np.flatnonzero(example_index >= 0))
                continue
            if words is not None:  # each word's tag from the row (window) that tags it
                words.add(np.asarray(preds["token_classification"]), example_index,
                          np.asarray(eb.row_index), np.flatnonzero(example_index >= 0))
                continue
            for j, ex in enumerate(example_index):  # j: the row in this batch
                if ex < 0:   # padding rows, absent candidates included
                    continue
                n, rec = recs[ex]
                if spec.head == "multiple_choice":
                    choice_scores.setdefault(int(ex), []).append(float(preds["multiple_choice"][j]))
                    continue
                if spec.head == "classification":
                    value = spec.labels[int(preds["classification"][j])]
                elif spec.head == "multilabel":
                    value = [name for name, on in zip(spec.labels, preds["multilabel"][j]) if on]
                else:
                    value = float(preds["regression"][j])
                outputs[n] = dict(rec, prediction=value)
        for ex, scores in choice_scores.items():
            n, rec = recs[ex]
            outputs[n] = dict(rec, prediction=int(np.argmax(scores)))
        if words is not None:
            tags = words.tags()
            for ex, (n, rec) in enumerate(recs):
                value = [None if t is None else spec.labels[t] for t in tags.get(ex, [])]
                missing = words_cut(rec["tokens"], len(value), s.run.tokenizer)
                value += [None] * (len(rec["tokens"]) - missing - len(value))  # no subword
                outputs[n] = dict(rec, prediction=value)
                if missing > 0:  # words past data.max_length were cut by the tokenizer
                    print(f"{args.input}:{n}: task {task!r}: {missing} of {len(rec['tokens'])} "
                          f"words are past config.data.max_length={cfg.data.max_length} tokens "
                          f"and get no tag (tag long inputs in windows: "
                          f"--config.task_overrides={task}.stride=N)", file=sys.stderr)
                    outputs[n]["words_without_prediction"] = missing
        if decoder is not None:
            no_answer = decoder.no_answer_scores() if decoder.null_answers else {}
            for ex, text in decoder.answers().items():
                n, rec = recs[ex]
                outputs[n] = dict(rec, prediction=text)
                if ex in no_answer:  # SQuAD 2.0: "" = no answer; the score it was decided by
                    score = no_answer[ex]
                    outputs[n]["no_answer_score"] = score if np.isfinite(score) else None
    paths.write_atomic(args.output, "".join(json.dumps(outputs[n]) + "\n" for n in sorted(outputs)))
    print(f"wrote {len(outputs)} predictions to {args.output}")


if __name__ == "__main__":
    main()
