"""The preprocessing step: prepare_tasks, and its on-disk cache (hit, and invalidation when the
data file, the tokenizer or the shard changes)."""

import shutil

import numpy as np
import pytest

from mtlx.data import load_tokenizer, sample_root
from mtlx.data.prepare import load_tokenized, prepare_tasks, save_tokenized

VOCAB = sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(VOCAB)


def _equal(a, b):
    for field in ("input_ids", "type_ids", "row_starts", "unit_starts", "unit_example", "labels",
                  "label_values", "token_labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), field
    assert (a.task, a.head, a.split, a.num_examples, a.pad_id, a.shard, a.num_labels) == \
        (b.task, b.head, b.split, b.num_examples, b.pad_id, b.shard, b.num_labels)


def test_cache_round_trip_and_invalidation(tmp_path, tok):
    glue = tmp_path / "glue"
    shutil.copytree(sample_root() / "glue" / "CoLA", glue / "CoLA")
    cache = tmp_path / "cache"
    first = prepare_tasks(["cola", "ud_pos"], tok, dirs={"glue": glue}, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    again = prepare_tasks(["cola", "ud_pos"], tok, dirs={"glue": glue}, cache_dir=cache)
    for t in ("cola", "ud_pos"):
        _equal(first[t], again[t])
    # A changed data file, another tokenizer, another shard: new entries, not stale ones.
    path = glue / "CoLA" / "train.tsv"
    path.write_bytes(path.read_bytes().replace(b"\t1\t\t", b"\t0\t\t", 1))
    changed = prepare_tasks(["cola"], tok, dirs={"glue": glue}, cache_dir=cache)["cola"]
    assert changed.labels.tolist() != first["cola"].labels.tolist()
    cased = load_tokenizer(VOCAB, lowercase=False)
    prepare_tasks(["cola"], cased, dirs={"glue": glue}, cache_dir=cache)
    prepare_tasks(["cola"], tok, dirs={"glue": glue}, cache_dir=cache, shard=(1, 2))
    assert len(list(cache.glob("cola-*.npz"))) == 4
    assert not list(cache.glob("*.tmp*"))


def test_save_load_span_and_skip_stats(tmp_path, tok):
    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\nfine\t1\n")
    data = prepare_tasks(["sst2"], tok, dirs={"glue": glue}, on_error="skip")["sst2"]
    assert data.num_examples == 2 and data.stats["skipped_rows"] == {"unknown_label": 1}
    save_tokenized(data, tmp_path / "x.npz")
    _equal(load_tokenized(tmp_path / "x.npz"), data)


def test_a_lenient_runs_cache_does_not_serve_a_strict_run(tmp_path, tok):
    """on_error is part of the cache key: rows a run with on_error='skip' dropped must still
    stop a run with on_error='raise' that shares its cache."""
    from mtlx.data import DataError
    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\nfine\t1\n")
    cache = tmp_path / "cache"
    lenient = prepare_tasks(["sst2"], tok, dirs={"glue": glue}, on_error="skip", cache_dir=cache)
    assert lenient["sst2"].num_examples == 2
    with pytest.raises(DataError, match=r"train.tsv:3"):
        prepare_tasks(["sst2"], tok, dirs={"glue": glue}, on_error="raise", cache_dir=cache)
