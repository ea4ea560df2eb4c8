"""The data stage: task registry -> readers -> tokenization -> mixtures -> batches.

    from mtlx import data
    tok = data.load_tokenizer(data.sample_root() / "vocab/bert-base-uncased/vocab.txt")
    splits = {t: data.tokenize_split(data.load_split(t, "train"), tok) for t in ("cola", "stsb")}
    mixture = data.mixture_for(splits, data.Temperature(2.0))
    it = data.make_iterator(splits, mixture, batch_size=32, seed=0, buckets=(64, 128))
    batch = next(it)            # an mtlx.batch.Batch; it.state() -> {"step": 1, "seed": 0}

Modules: tasks (TaskSpec, registry, built-in tasks), readers / conll / tfds_source (files ->
Examples, with errors naming file and line), tokenize (Examples -> flat token arrays), mixtures
(sampling strategies), prepare (read + tokenize a run's tasks, cached on disk), pipeline (deterministic resumable batches, evaluation batches, prefetch),
packing (several examples per row). The embedded real-data sample is `sample_root()`.
"""

from mtlx.data.errors import DataError, ReadReport
from mtlx.data.mixtures import (Annealed, Mixture, Proportional, RoundRobin, Schedule,
                                Temperature, Uniform, make_strategy)
from mtlx.data.pipeline import (BatchLayout, DataIterator, EvalBatch, collate, device_put_batch,
                                eval_batches, make_iterator, mixture_for, prefetch)
from mtlx.data.prepare import prepare_tasks
from mtlx.data.readers import (Example, SplitData, load_split, resolve_path, sample_root,
                               with_local_files)
from mtlx.data.tasks import (HEAD_KINDS, Source, SplitFile, TaskSpec, TfdsSource,
                             UnknownTaskError, get_task, list_tasks, register_task,
                             task_from_config, text_to_text)
from mtlx.data.tokenize import TokenizedSplit, load_tokenizer, shard_indices, tokenize_split

__all__ = [
    "DataError", "ReadReport", "Annealed", "Mixture", "Proportional", "RoundRobin", "Schedule",
    "Temperature", "Uniform", "make_strategy", "BatchLayout", "DataIterator", "EvalBatch",
    "collate", "device_put_batch", "eval_batches", "make_iterator", "mixture_for", "prefetch",
    "Example", "SplitData", "load_split", "resolve_path", "sample_root", "with_local_files",
    "HEAD_KINDS", "Source",
    "SplitFile", "TaskSpec", "TfdsSource", "UnknownTaskError", "get_task", "list_tasks",
    "register_task", "task_from_config", "text_to_text", "TokenizedSplit", "load_tokenizer", "shard_indices",
    "tokenize_split", "prepare_tasks",
]
