"""The preprocessing step: read and tokenize every task of a run once, optionally cached on disk.

    data = prepare_tasks(["cola", "stsb", "ud_pos"], tokenizer, data_root=..., cache_dir=...)

Tokenizing full GLUE + UD takes seconds to tens of seconds; the pipeline afterwards only gathers
and pads. With `cache_dir`, each (task spec, split, file contents, tokenizer, shard, max_length)
is tokenized once and stored as an .npz; the cache key hashes all of these, the data file's bytes
and the tokenizer's full serialisation included, so a changed file or vocabulary never reuses a
stale entry. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mtlx.data.readers import load_split, resolve_path
from mtlx.data.tasks import get_task
from mtlx.data.tokenize import TokenizedSplit, tokenize_split

log = logging.getLogger("mtlx.data")
CACHE_VERSION = 1
_ARRAYS = [f.name for f in dataclasses.fields(TokenizedSplit)
           if f.name not in ("task", "head", "split", "num_examples", "pad_id", "shard",
                             "num_labels", "max_target_length", "stats")]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's complete serialisation (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("caching needs a fast (Rust-backed) tokenizer")
    spec = json.loads(backend.to_str())
    # Truncation/padding settings are per-call state the tokenizer keeps, not its identity.
    spec.pop("truncation", None), spec.pop("padding", None)
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8"))
    h.update(repr((type(tokenizer).__name__, tokenizer.pad_token_id)).encode())
    return h.hexdigest()


def _cache_key(spec, split, path: Path, tokenizer, shard, max_length, on_error) -> str:
    # on_error is part of it: rows a lenient run skipped must not pass a strict run unseen
    h = hashlib.sha256()
    for part in (CACHE_VERSION, repr(spec), split, tuple(shard), max_length,
                 tokenizer_fingerprint(tokenizer), on_error):
        h.update(repr(part).encode("utf-8"))
    h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:32]


def save_tokenized(data: TokenizedSplit, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(data, k) for k in _ARRAYS if getattr(data, k) is not None}
    meta = {k: getattr(data, k) for k in ("task", "head", "split", "num_examples", "pad_id",
                                          "num_labels", "max_target_length", "stats")}
    meta["shard"] = list(data.shard)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokenized(path) -> TokenizedSplit:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode("utf-8"))
        arrays = {k: z[k] for k in _ARRAYS if k in z.files}
    meta["shard"] = tuple(meta["shard"])
    return TokenizedSplit(**meta, **arrays)


def prepare_tasks(tasks: Sequence[Any], tokenizer, *, split: Optional[str] = None,
                  data_root=None, dirs: Optional[Mapping[str, Any]] = None,
                  on_error: str = "raise", shard: tuple = (0, 1),
                  max_length: Optional[int] = None, cache_dir=None) -> dict:
    """{task name: TokenizedSplit} for `split` (default: each task's train split) of each task.

    `shard` = (process index, process count): each process keeps only its examples.
    """
    out = {}
    for task in tasks:
        spec = get_task(task)
        name = split or spec.train_split
        cache_file = None
        if cache_dir is not None:
            path = resolve_path(spec, name, data_root, dirs)
            key = _cache_key(spec, name, path, tokenizer, shard, max_length or spec.max_length,
                             on_error)
            cache_file = Path(cache_dir) / f"{spec.name}-{name}-{key}.npz"
            if cache_file.is_file():
                out[spec.name] = load_tokenized(cache_file)
                log.info("task %r split %r: tokenized data from cache %s", spec.name, name, cache_file)
                continue
        raw = load_split(spec, name, data_root=data_root, dirs=dirs, on_error=on_error)
        data = tokenize_split(raw, tokenizer, shard=shard, max_length=max_length)
        data.stats["skipped_rows"] = dict(raw.report.skipped)
        if cache_file is not None:
            save_tokenized(data, cache_file)
        out[spec.name] = data
    return out
