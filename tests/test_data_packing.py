"""Sequence packing: row layout (segment ids, restarting positions, labels in place), exact
resume, epoch coverage, and -- through a tiny mtlx BERT encoder -- that a packed row gives each
example the same hidden states as running it alone (block-diagonal attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX
from mtlx.data import (Uniform, load_split, load_tokenizer, make_iterator, mixture_for,
                       sample_root, tokenize_split)
from mtlx.data.packing import first_fit, make_packed_iterator


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    return {t: tokenize_split(load_split(t, "train"), tok) for t in ("sst2", "stsb", "ud_pos")}


def test_first_fit():
    # (index, row, offset). The 4th segment (4 tokens) fits in no row (8 and 5 tokens used of 8).
    assert first_fit([5, 5, 3, 4], [0, 0, 0, 0], num_rows=2, row_len=8, max_segments=4) == \
        [(0, 0, 0), (1, 1, 0), (2, 0, 5)]
    assert first_fit([3, 3, 3], [0, 1, 0], 2, 10, 4) == [(0, 0, 0), (1, 1, 0), (2, 0, 3)]  # one task a row
    assert first_fit([1, 1, 1], [0, 0, 0], 1, 10, 2) == [(0, 0, 0), (1, 0, 1)]  # max segments
    # A misfit leaves out its task's later segments (each task's examples stay in order) while
    # the other tasks go on: task 1's 3 tokens find no row; task 0's 2 tokens still go in, task
    # 1's 1 token does not (it would come before the left-out 3).
    assert first_fit([6, 6, 3, 2, 1], [0, 0, 1, 0, 1], 2, 8, 4) == [(0, 0, 0), (1, 1, 0), (3, 0, 6)]
    # Every row closed: nothing more is looked at.
    assert first_fit([8, 1, 1], [0, 1, 0], 1, 8, 4) == [(0, 0, 0)]
    # Mixed rows: any task may join a row (task 1's 3 tokens go next to task 0's).
    assert first_fit([3, 3, 3], [0, 1, 0], 2, 10, 4, mix_tasks=True) == \
        [(0, 0, 0), (1, 0, 3), (2, 0, 6)]
    assert first_fit([6, 6, 3, 2, 1], [0, 0, 1, 0, 1], 2, 8, 4, mix_tasks=True) == \
        [(0, 0, 0), (1, 1, 0), (3, 0, 6)]   # task 1 still waits for its 3 tokens


@pytest.mark.parametrize("mix", [False, True])
def test_first_fit_fills_past_a_misfit_like_a_reference(mix):
    """Against a direct transcription of the rule over random draws: placements are valid
    (no overlap, one task a row unless `mix`, at most S segments) and each task's placed
    segments are a prefix of its draws."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, rows, length, s = int(rng.integers(1, 40)), int(rng.integers(1, 6)), 32, int(rng.integers(1, 5))
        lengths = rng.integers(1, 33, n).tolist()
        tasks = rng.integers(0, 3, n).tolist()
        placed = first_fit(lengths, tasks, rows, length, s, mix_tasks=mix)
        fill = [[] for _ in range(rows)]
        for i, r, o in placed:
            fill[r].append((o, lengths[i], tasks[i]))
        for segs in fill:
            segs.sort()
            assert len(segs) <= s and (mix or len({t for _, _, t in segs}) <= 1)
            end = 0
            for o, m, _ in segs:
                assert o == end  # contiguous from the row start, no overlap
                end = o + m
            assert end <= length
        for t in set(tasks):
            mine = [i for i in range(n) if tasks[i] == t]
            got = [i for i, _, _ in placed if tasks[i] == t]
            assert got == mine[: len(got)]
            if len(got) < len(mine):  # the first left out fitted no row when its turn came
                miss = mine[len(got)]
                before = [(i, r, o) for i, r, o in placed if i < miss]
                used = [0] * rows
                task = [-1] * rows
                count = [0] * rows
                for i, r, o in before:
                    used[r] += lengths[i]
                    task[r] = tasks[i]
                    count[r] += 1
                assert not any(used[r] + lengths[miss] <= length and (mix or task[r] in (-1, t))
                               and count[r] < s for r in range(rows))


@pytest.mark.parametrize("mixed", [False, True])
def test_packed_rows(data, mixed):
    mix = mixture_for(data, Uniform())
    it = make_packed_iterator(data, mix, batch_size=8, seed=0, row_len=128, max_segments=6,
                              mix_tasks=mixed)
    total_real = 0
    for _ in range(20):
        units = it.units_at(it.step, it.counts)
        pb = next(it)
        b, seg = pb.batch, pb.segments
        assert b.input_ids.shape == (8, 128) and seg.task_ids.shape == (8, 6)
        order = {}
        for t, u in units:
            d = it.data[t]
            order.setdefault(t, []).append((d, u))
        seen = 0
        for row in range(8):
            k = int(seg.mask[row].sum())
            if k == 0:
                assert b.example_mask[row] == 0 and b.task_ids[row] == -1
                continue
            if mixed:   # no task a row; the segments say each token's task
                assert b.task_ids[row] == -1 and (seg.task_ids[row, :k] >= 0).all()
            else:
                assert set(seg.task_ids[row, :k].tolist()) == {b.task_ids[row]}   # one task a row
            for j in range(k):
                tokens = np.nonzero(b.segment_ids[row] == j + 1)[0]
                start = seg.starts[row, j]
                assert tokens[0] == start and (np.diff(tokens) == 1).all()
                assert b.input_ids[row, start] == 101                          # its [CLS]
                assert b.position_ids[row, tokens].tolist() == list(range(len(tokens)))
                assert (b.attention_mask[row, tokens] == 1).all()
            seen += k
        assert (b.attention_mask == (b.segment_ids > 0)).all()
        assert seen == len(units)
        total_real += int(b.attention_mask.sum())
        # Every drawn unit appears once, tokens intact, its labels in place.
        for t, u in units:
            d = it.data[t]
            toks = d.row_tokens(u)
            rows = np.nonzero((seg.task_ids == t).any(1))[0]
            hits = [(r, j) for r in rows for j in range(int(seg.mask[r].sum()))
                    if np.array_equal(b.input_ids[r][b.segment_ids[r] == j + 1], toks)]
            assert hits, (d.task, u)
            r, j = hits[0]
            if d.head == "classification":
                assert seg.labels[r, j] == d.labels[u] and b.labels[r] == IGNORE_INDEX
            elif d.head == "regression":
                assert seg.label_values[r, j] == d.label_values[u]
            else:
                a = d.row_starts[u]
                assert b.token_labels[r][b.segment_ids[r] == j + 1].tolist() == \
                    d.token_labels[a: a + len(toks)].tolist()
    # Packing fills rows far better than one example per row padded to 128 would.
    packed_fill = total_real / (20 * 8 * 128)
    one_per_row = np.mean([d.row_lengths.mean() for d in it.data]) / 128
    assert packed_fill > 0.7 and packed_fill > 2.5 * one_per_row


def test_mixed_rows_fill_better_than_rows_of_one_task(data):
    def fill(mixed):
        it = make_packed_iterator(data, mixture_for(data, Uniform()), batch_size=8, seed=0,
                                  row_len=128, max_segments=6, mix_tasks=mixed)
        return np.mean([np.asarray(next(it).batch.attention_mask).mean() for _ in range(40)])
    one, mixed = fill(False), fill(True)
    assert mixed > one + 0.03, (one, mixed)


@pytest.mark.parametrize("mixed", [False, True])
def test_packed_resume_and_epochs(data, mixed):
    mix = mixture_for(data)
    it = make_packed_iterator(data, mix, batch_size=4, seed=1, row_len=128, max_segments=8,
                              mix_tasks=mixed)
    batches = [next(it) for _ in range(30)]
    for s in (0, 7, 29):
        resumed = make_packed_iterator(data, mix, batch_size=4, seed=1, row_len=128,
                                       max_segments=8, start_step=s, mix_tasks=mixed)
        got = next(resumed)
        assert all(np.array_equal(x, y) for x, y in
                   zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(batches[s])))
    fresh = make_packed_iterator(data, mix, batch_size=4, seed=1, row_len=128, max_segments=8,
                                 mix_tasks=mixed)
    sizes = [d.num_units for d in fresh.data]
    seen = {t: [] for t in range(3)}
    while any(len(seen[t]) < sizes[t] for t in range(3)):
        for t, u in fresh.units_at(fresh.step, fresh.counts):
            seen[t].append(u)
        next(fresh)
    for t in range(3):  # the first epoch of each task visits every example exactly once
        assert sorted(seen[t][: sizes[t]]) == list(range(sizes[t]))


@pytest.mark.parametrize("mixed", [False, True], ids=["task_rows", "mixed_rows"])
def test_packing_keeps_the_strategys_mix(mixed):
    """RTE's examples are long, CoLA's short. Draws a step cannot place open the next step's
    draws: dropped (as before), RTE's share under uniform sampling was 0.39. Resumed and
    restored iterators still place what the uninterrupted one places."""
    tok = load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")
    sp = {t: tokenize_split(load_split(t, "train"), tok, max_length=64) for t in ("rte", "cola")}
    mix = mixture_for(sp, Uniform())
    kw = dict(batch_size=4, seed=0, row_len=64, max_segments=4, mix_tasks=mixed)
    it = make_packed_iterator(sp, mix, **kw)
    walked = {}
    for step in range(2000):
        if step in (5, 77, 1999):
            walked[step] = it.units_at(it.step)
        next(it)
    share = it.counts / it.counts.sum()
    assert abs(share[0] - 0.5) < 0.02, share
    for step, units in walked.items():
        assert make_packed_iterator(sp, mix, start_step=step, **kw).units_at(step) == units
        restored = make_packed_iterator(sp, mix, **kw)
        restored.restore({"step": step, "seed": 0})
        assert restored.units_at(restored.step) == units


def test_packed_row_equals_examples_alone_through_bert(data):
    bert = pytest.importorskip("mtlx.models.bert")
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0)
    enc = bert.BertEncoder(cfg)
    mix = mixture_for({"sst2": data["sst2"]})
    it = make_packed_iterator({"sst2": data["sst2"]}, mix, batch_size=2, seed=0, row_len=96)
    pb = next(it)
    b = pb.batch
    params = jax.jit(enc.init)(jax.random.PRNGKey(0), jnp.asarray(b.input_ids[:1, :8]),
                      jnp.asarray(b.attention_mask[:1, :8]))["params"]
    apply = jax.jit(lambda ids, mask, types, pos, seg: enc.apply(
        {"params": params}, ids, mask, types, position_ids=pos, segment_ids=seg).last_hidden_state)
    packed = apply(b.input_ids, b.attention_mask, b.token_type_ids, b.position_ids, b.segment_ids)
    # The same segments alone, one per row, padded (ordinary padding mask, default positions).
    segs = [(row, np.nonzero(b.segment_ids[row] == j + 1)[0]) for row in range(2)
            for j in range(int(pb.segments.mask[row].sum()))]
    width = max(len(idx) for _, idx in segs)
    ids = np.zeros((len(segs), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (row, idx) in enumerate(segs):
        ids[i, : len(idx)], mask[i, : len(idx)] = b.input_ids[row, idx], 1
    pos = np.broadcast_to(np.arange(width), ids.shape)
    alone = apply(ids, mask, np.zeros_like(ids), pos, None)
    for i, (row, idx) in enumerate(segs):
        np.testing.assert_allclose(np.asarray(packed[row, idx]), np.asarray(alone[i, : len(idx)]),
                                   atol=1e-5)
    assert len(segs) >= 3


def test_packing_errors(data, tmp_path):
    mix = mixture_for(data)
    with pytest.raises(ValueError, match="do not fit the largest bucket 16"):
        make_packed_iterator(data, mix, batch_size=4, seed=0, row_len=16)
    with pytest.raises(ValueError, match="max_segments must be >= 1"):
        make_packed_iterator(data, mix, batch_size=4, seed=0, row_len=128, max_segments=0)
    import dataclasses
    span_like = dataclasses.replace(data["sst2"], head="span", task="fake_squad")
    with pytest.raises(ValueError, match=r"\['fake_squad'\] cannot be packed"):
        make_packed_iterator([span_like], mixture_for([span_like]), batch_size=4, seed=0, row_len=128)
    # The unpacked iterator is untouched by packing's subclass.
    assert make_iterator(data, mix, batch_size=4, seed=0).state() == {"step": 0, "seed": 0}
