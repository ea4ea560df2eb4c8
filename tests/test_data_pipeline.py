"""The pipeline: batches as a pure function of (seed, step), exact resume, epoch coverage,
multi-process shards (disjoint, covering), one batch structure for every task mix, length
buckets, multiple-choice groups, evaluation batches, prefetch and device placement."""

import json
import threading

import jax
import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX
from mtlx.data import (BatchLayout, RoundRobin, Temperature, Uniform, eval_batches, load_split,
                       load_tokenizer, make_iterator, mixture_for, prefetch, sample_root,
                       tokenize_split)
from mtlx.data.pipeline import device_put_batch

TASKS = ("cola", "stsb", "ud_pos", "rte")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")


@pytest.fixture(scope="module")
def raw():
    return {t: load_split(t, "train") for t in TASKS}


@pytest.fixture(scope="module")
def data(raw, tok):
    return {t: tokenize_split(raw[t], tok) for t in TASKS}


def _same(a, b):
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_resume_gives_exactly_the_same_batches(data):
    mix = mixture_for(data, Temperature(2.0))
    it = make_iterator(data, mix, batch_size=16, seed=3, buckets=(64, 128))
    batches = [next(it) for _ in range(60)]
    assert it.state() == {"step": 60, "seed": 3}
    json.dumps(it.state())  # checkpointable as plain JSON
    for s in (0, 1, 17, 59):
        resumed = make_iterator(data, mix, batch_size=16, seed=3, start_step=s, buckets=(64, 128))
        assert all(_same(next(resumed), batches[i]) for i in range(s, min(s + 3, 60)))
        assert _same(it.batch_at(s), batches[s])
    other = make_iterator(data, mix, batch_size=16, seed=3, buckets=(64, 128))
    other.restore({"step": 42, "seed": 3})
    assert _same(next(other), batches[42])
    with pytest.raises(ValueError, match="saved with seed 4"):
        other.restore({"step": 1, "seed": 4})
    different = make_iterator(data, mix, batch_size=16, seed=4, buckets=(64, 128))
    assert not _same(next(different), batches[0])


def test_rows_hold_the_drawn_examples(data, raw):
    mix = mixture_for(data, Uniform())
    it = make_iterator(data, mix, batch_size=16, seed=0)
    for step in range(10):
        units = it.units_at(step)
        batch = next(it)
        for row, (t, u) in enumerate(units):
            d = data[mix.tasks[t]]
            ex = raw[d.task].examples[d.unit_example[u]]
            n = len(d.row_tokens(u))
            assert batch.task_ids[row] == t and batch.example_mask[row] == 1
            assert batch.input_ids[row, :n].tolist() == d.row_tokens(u).tolist()
            assert batch.attention_mask[row].sum() == n
            if d.head == "classification":
                assert batch.labels[row] == ex.label
                assert (batch.token_labels[row] == IGNORE_INDEX).all()
            elif d.head == "regression":
                assert batch.label_values[row] == np.float32(ex.label)
                assert batch.labels[row] == IGNORE_INDEX
            else:
                tags = batch.token_labels[row][batch.token_labels[row] != IGNORE_INDEX]
                assert tags.tolist() == list(ex.tags)[: len(tags)]
                assert batch.labels[row] == IGNORE_INDEX and batch.label_values[row] == 0


def test_every_epoch_visits_each_example_once(data):
    small = {t: data[t] for t in ("cola", "stsb")}
    mix = mixture_for(small, Uniform())
    it = make_iterator(small, mix, batch_size=32, seed=1)
    seen = {0: [], 1: []}
    while min(len(v) for v in seen.values()) < 2 * 300:
        for t, u in it.units_at(it.step, it.counts):
            seen[t].append(u)
        next(it)
    for t, units in seen.items():
        first, second = units[:300], units[300:600]
        assert sorted(first) == list(range(300)) and sorted(second) == list(range(300))
        assert first != second  # a fresh permutation per epoch


def test_one_structure_for_every_task_mix(data):
    mix = mixture_for(data, Temperature(1.0))
    it = make_iterator(data, mix, batch_size=8, seed=0)
    structures = set()
    for _ in range(40):
        b = next(it)
        structures.add((jax.tree_util.tree_structure(b), tuple(x.shape for x in jax.tree_util.tree_leaves(b))))
    assert len(structures) == 1
    layout = BatchLayout.for_data(list(data.values()))
    assert layout == BatchLayout(token_labels=True)
    only_cls = make_iterator({"cola": data["cola"]}, mixture_for({"cola": data["cola"]}), batch_size=8, seed=0)
    assert next(only_cls).token_labels is None


def test_length_buckets(data):
    mix = mixture_for(data)
    it = make_iterator(data, mix, batch_size=4, seed=0, buckets=(16, 32, 64, 128))
    shapes = set()
    for _ in range(100):
        b = next(it)
        longest = int(b.attention_mask.sum(1).max())
        expected = min(x for x in (16, 32, 64, 128) if x >= longest)
        assert b.seq_len == expected
        shapes.add(b.input_ids.shape)
    assert len(shapes) > 1 and shapes <= {(4, 16), (4, 32), (4, 64), (4, 128)}


def test_multi_process_shards_are_disjoint_and_cover(raw, tok):
    tasks = ("cola", "stsb")
    procs = 2
    shards = [{t: tokenize_split(raw[t], tok, shard=(p, procs)) for t in tasks} for p in range(procs)]
    mix = mixture_for(shards[0], Uniform())
    assert mix.sizes == (300, 300)  # sizes are whole-split sizes, the same on every process
    its = [make_iterator(s, mix, batch_size=16, seed=5, buckets=(128,)) for s in shards]
    single = make_iterator({t: tokenize_split(raw[t], tok) for t in tasks}, mix, batch_size=16,
                           seed=5, buckets=(128,))
    seen = [{0: set(), 1: set()} for _ in range(procs)]
    for _ in range(80):
        global_tasks = mix.sample(5, its[0].step, 1, 16)[0]
        parts = []
        for p, it in enumerate(its):
            for t, u in it.units_at(it.step, it.counts):
                seen[p][t].add(int(it.data[t].unit_example[u]))
            parts.append(next(it))
            assert parts[-1].batch_size == 8
        # The global batch's task ids are the mixture's draws for the whole batch.
        assert np.concatenate([b.task_ids for b in parts]).tolist() == global_tasks.tolist()
        assert single.batch_at(single.step).task_ids.tolist() == global_tasks.tolist()
        next(single)
    for t in range(2):
        assert not seen[0][t] & seen[1][t]                        # disjoint
        assert seen[0][t] | seen[1][t] == set(range(300))          # together: all of the data
    with pytest.raises(ValueError, match="different process shards"):
        make_iterator({"cola": shards[0]["cola"], "stsb": shards[1]["stsb"]}, mix, batch_size=16, seed=0)
    with pytest.raises(ValueError, match="several processes"):
        make_iterator(shards[0], mix, batch_size=16, seed=0, buckets=(64, 128))
    with pytest.raises(ValueError, match="not divisible by the process count 2"):
        make_iterator(shards[0], mix, batch_size=15, seed=0)


def _copa(tmp_path, n=9):
    import json as _json
    d = tmp_path / "superglue" / "COPA"
    d.mkdir(parents=True)
    rows = [{"premise": f"Premise number {i}.", "choice1": f"first {i}", "choice2": f"second {i}",
             "question": "cause" if i % 2 else "effect", "label": i % 2, "idx": i} for i in range(n)]
    (d / "train.jsonl").write_text("\n".join(_json.dumps(r) for r in rows))
    return load_split("copa", "train", dirs={"superglue": tmp_path / "superglue"})


@pytest.mark.parametrize("strategy", [Uniform(), RoundRobin()], ids=["uniform", "round_robin"])
def test_mixed_batches_with_multiple_choice_keep_the_strategys_mix(tmp_path, data, tok, strategy):
    """COPA takes 2 rows an example, CoLA 1, 7 rows a batch. The draw that no longer fits a
    batch opens the next one: dropping it (as before) took COPA's share to 0.46 under uniform
    sampling and 0.44 under round robin. And a resumed iterator still starts where the
    uninterrupted one is."""
    copa = tokenize_split(_copa(tmp_path, n=60), tok)
    mixed = {"cola": data["cola"], "copa": copa}
    mix = mixture_for(mixed, strategy)
    it = make_iterator(mixed, mix, batch_size=7, seed=2)
    walked = {}
    for step in range(2000):
        if step in (1, 7, 33, 250, 1999):
            walked[step] = it.units_at(it.step, it.counts, it.cursor)
        b = next(it)
        assert 6 <= int(b.example_mask.sum()) <= 7  # at most one row left unfilled
    share = it.counts / it.counts.sum()
    assert abs(share[1] - 0.5) < (0.002 if isinstance(strategy, RoundRobin) else 0.02), share
    for step, units in walked.items():
        assert make_iterator(mixed, mix, batch_size=7, seed=2, start_step=step).units_at(step) == units
        restored = make_iterator(mixed, mix, batch_size=7, seed=2)
        restored.restore({"step": step, "seed": 2})
        assert restored.units_at(restored.step, restored.counts, restored.cursor) == units


def test_multiple_choice_rows_stay_together(tmp_path, data, tok):
    copa = tokenize_split(_copa(tmp_path), tok)
    mixed = {"cola": data["cola"], "copa": copa}
    mix = mixture_for(mixed, Uniform())
    it = make_iterator(mixed, mix, batch_size=7, seed=2)
    for _ in range(50):
        b = next(it)
        is_mc = b.task_ids == 1
        groups = b.group_ids[is_mc]
        assert (b.group_ids[~is_mc] == -1).all()
        for g in np.unique(groups):
            rows = np.nonzero(b.group_ids == g)[0]
            assert len(rows) == 2 and rows[1] == rows[0] + 1 and rows[0] == g
            assert sorted(b.labels[rows].tolist()) == [0, 1]
        used = int(b.example_mask.sum())
        assert (b.task_ids[used:] == -1).all() and used >= 6  # at most one row left unfilled


def test_eval_batches_cover_each_example_once(data, raw, tok, tmp_path):
    d = data["ud_pos"]
    seen = []
    batches = list(eval_batches(d, 2, batch_size=64, layout=BatchLayout(token_labels=True)))
    assert len(batches) == -(-400 // 64)
    for eb in batches:
        real = eb.batch.example_mask > 0
        assert (eb.example_index[~real] == -1).all() and (eb.batch.task_ids[real] == 2).all()
        seen += eb.example_index[real].tolist()
    assert seen == list(range(400))
    # Several processes: the same number of batches everywhere, shards together cover the split.
    parts = [tokenize_split(raw["cola"], tok, shard=(p, 3)) for p in range(3)]
    runs = [list(eval_batches(p, 0, batch_size=48, buckets=(64,))) for p in parts]
    assert len({len(r) for r in runs}) == 1
    assert {eb.batch.input_ids.shape for r in runs for eb in r} == {(16, 64)}  # one shape
    # without one bucket, each process would take its batch's length from its own rows
    for buckets in (None, (32, 64)):
        with pytest.raises(ValueError, match=r"'cola': evaluating a shard on 3 processes needs one length bucket"):
            next(eval_batches(parts[0], 0, batch_size=48, buckets=buckets))
    mix = mixture_for({"cola": parts[0]})
    with pytest.raises(ValueError, match=r"3 processes need one length bucket given"):
        make_iterator({"cola": parts[0]}, mix, batch_size=48, seed=0)
    covered = sorted(i for r in runs for eb in r for i in eb.example_index.tolist() if i >= 0)
    assert covered == list(range(300))
    copa = tokenize_split(_copa(tmp_path, n=5), tok)
    mc = list(eval_batches(copa, 1, batch_size=4))
    assert len(mc) == 3 and mc[0].example_index.tolist() == [0, 0, 1, 1]
    assert mc[2].batch.group_ids.tolist() == [0, 0, -1, -1]


def test_windowed_tagging_on_several_processes_needs_num_batches(raw, tok):
    """Tagging in windows: windows per example vary by process, so evaluating a shard needs the
    agreed number of batches; with it, the shards' rows together cover every window."""
    import dataclasses
    split = dataclasses.replace(raw["ud_pos"], task=dataclasses.replace(raw["ud_pos"].task, stride=4))
    whole = tokenize_split(split, tok, max_length=16)
    parts = [tokenize_split(split, tok, shard=(p, 2), max_length=16) for p in range(2)]
    assert whole.num_rows > whole.num_examples
    with pytest.raises(ValueError, match="'ud_pos': its examples are cut into windows .* pass num_batches"):
        list(eval_batches(parts[0], 0, batch_size=32, buckets=(16,)))
    n = max(-(-p.num_units // 16) for p in parts)
    rows = []  # (example, tokens) of every row evaluated, over both shards
    for part in parts:
        for eb in eval_batches(part, 0, batch_size=32, num_batches=n, buckets=(16,)):
            rows += [(part.unit_example[r], tuple(part.row_tokens(r))) for r in eb.row_index.tolist() if r >= 0]
    assert sorted(rows) == sorted((whole.unit_example[r], tuple(whole.row_tokens(r)))
                                  for r in range(whole.num_rows))


def test_prefetch_state_and_errors(data):
    mix = mixture_for(data)
    plain = make_iterator(data, mix, batch_size=8, seed=0)
    expected = [next(plain) for _ in range(6)]
    with prefetch(make_iterator(data, mix, batch_size=8, seed=0), size=3) as pf:
        got = [next(pf) for _ in range(4)]
        assert pf.state() == {"step": 4, "seed": 0}  # what was consumed, not what is queued
    assert all(_same(a, b) for a, b in zip(got, expected))

    def boom(_):
        raise RuntimeError("transfer failed")
    pf = prefetch(make_iterator(data, mix, batch_size=8, seed=0), transform=boom)
    with pytest.raises(RuntimeError, match="transfer failed"):
        next(pf)
    assert not any(t.name == "mtlx-prefetch" and t.is_alive() for t in threading.enumerate())


def test_device_put_with_a_data_sharding(data):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    mix = mixture_for(data)
    batch = next(make_iterator(data, mix, batch_size=16, seed=0))
    on_device = device_put_batch(batch, sharding)
    assert on_device.input_ids.shape == batch.input_ids.shape
    assert on_device.input_ids.sharding.is_equivalent_to(sharding, 2)
    assert np.array_equal(np.asarray(on_device.input_ids), batch.input_ids)
    assert isinstance(device_put_batch(batch).labels, jax.Array)


def test_iterator_errors(data, tok):
    mix = mixture_for(data)
    with pytest.raises(ValueError, match=r"no tokenized data for mixture task\(s\) \['rte'\]"):
        make_iterator({t: data[t] for t in ("cola", "stsb", "ud_pos")}, mix, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="do not fit the largest bucket 32"):
        make_iterator(data, mix, batch_size=8, seed=0, buckets=(16, 32))


def test_multilabel_and_classification_share_one_layout(tmp_path, data, tok):
    from mtlx.data import task_from_config
    (tmp_path / "t.jsonl").write_text("\n".join(
        f'{{"body": "text number {i}", "tags": "{tags}"}}'
        for i, tags in enumerate(["a|c", "b", "a|b|c", "c"] * 5)) + "\n")
    spec = task_from_config({"name": "topics", "head": "multilabel", "format": "jsonl",
                             "files": {"train": str(tmp_path / "t.jsonl")}, "label_separator": "|",
                             "columns": {"body": "body", "label": "tags"}, "labels": ["a", "b", "c"]})
    topics = tokenize_split(load_split(spec, "train"), tok)
    mixed = {"cola": data["cola"], "topics": topics}
    it = make_iterator(mixed, mixture_for(mixed, Uniform()), batch_size=8, seed=0)
    assert it.layout == BatchLayout(multi_label_width=3)
    expected = {0: [1, 0, 1], 1: [0, 1, 0], 2: [1, 1, 1], 3: [0, 0, 1]}
    for _ in range(10):
        units = it.units_at(it.step, it.counts)
        b = next(it)
        for row, (t, u) in enumerate(units):
            if t == 1:
                assert b.multi_labels[row].tolist() == expected[int(topics.unit_example[u]) % 4]
                assert b.labels[row] == IGNORE_INDEX
            else:
                assert b.multi_labels[row].tolist() == [0, 0, 0]
