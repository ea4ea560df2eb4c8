"""Tokenization: WordPiece (real bert-base-uncased vocab), byte-level BPE and SentencePiece
Unigram tokenizers built locally; pairs, truncation, first-subword tag alignment, QA character
offsets, multiple-choice rows, sharding; each checked against an independent computation."""

import json

import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX
from mtlx.data import (DataError, load_split, load_tokenizer, sample_root, shard_indices,
                       tokenize_split)
from mtlx.data.readers import Example, SplitData
from mtlx.data.errors import ReadReport
from mtlx.data.tasks import get_task

VOCAB = sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt"


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer(VOCAB)


def _split(task, examples, split="train", labelled=True):
    spec = get_task(task) if isinstance(task, str) else task
    return SplitData(spec, split, list(examples), ReadReport(), "<memory>", labelled)


def test_wordpiece_vocab_matches_the_tokenizers_library(bert):
    from tokenizers import BertWordPieceTokenizer
    ref = BertWordPieceTokenizer(str(VOCAB), lowercase=True)
    assert len(bert) == 30522 and bert.pad_token_id == 0
    data = tokenize_split(load_split("mrpc", "dev"), bert)
    for r, ex in enumerate(load_split("mrpc", "dev").examples[:40]):
        enc = ref.encode(ex.texts[0], ex.texts[1])
        assert data.row_tokens(r).tolist() == enc.ids
        a, b = data.row_starts[r], data.row_starts[r + 1]
        assert data.type_ids[a:b].tolist() == enc.type_ids
    assert data.labels.tolist() == [ex.label for ex in load_split("mrpc", "dev").examples]


def test_truncation_strategies(bert):
    spec = get_task("rte")

    def counts(strategy, a, b):
        s = spec.__class__(**{**spec.__dict__, "truncation": strategy, "max_length": 48})
        data = tokenize_split(_split(s, [Example(texts=(a, b), label=1)]), bert)
        toks = bert.convert_ids_to_tokens(data.row_tokens(0))
        assert len(toks) == 48 and data.stats["truncated"] == 1
        return toks.count("alpha"), toks.count("beta")

    # 48 = 45 words + [CLS] [SEP] [SEP]
    assert counts("longest_first", "alpha " * 60, "beta " * 30) == (23, 22)  # longer side first
    assert counts("only_first", "alpha " * 60, "beta " * 30) == (15, 30)
    assert counts("only_second", "alpha " * 20, "beta " * 30) == (20, 25)
    s = spec.__class__(**{**spec.__dict__, "truncation": "only_second", "max_length": 48})
    with pytest.raises(DataError, match="truncation 'only_second' cannot fit"):
        tokenize_split(_split(s, [Example(texts=("alpha " * 60, "beta"), label=1)]), bert)
    short = tokenize_split(_split("rte", [Example(texts=("a b", "c"), label=0)]), bert)
    assert short.stats["truncated"] == 0


def test_first_subword_label_alignment(bert):
    data = load_split("ud_pos", "dev")
    tok = tokenize_split(data, bert)
    for r, ex in enumerate(data.examples[:60]):
        expected = [IGNORE_INDEX]
        for word, tag in zip(ex.texts, ex.tags):
            n = len(bert(word, add_special_tokens=False)["input_ids"])
            expected += [tag] + [IGNORE_INDEX] * (n - 1)
        expected += [IGNORE_INDEX]
        if len(expected) > 128:
            expected = expected[:127] + [IGNORE_INDEX]  # truncated: [SEP] takes the last place
        a, b = tok.row_starts[r], tok.row_starts[r + 1]
        assert tok.token_labels[a:b].tolist() == expected
    assert tok.stats["words_without_tokens"] == 0


def test_truncated_tagging_counts_lost_words(bert):
    words = tuple(f"word{i}" for i in range(200))
    ex = Example(texts=words, tags=tuple(0 for _ in words))
    tok = tokenize_split(_split("ud_pos", [ex]), bert)
    kept = int((tok.token_labels != IGNORE_INDEX).sum())
    assert tok.stats["truncated"] == 1 and tok.stats["words_truncated"] == 200 - kept



def _ner_examples(seed, n, longest):
    rng = np.random.default_rng(seed)
    vocab = ["Paris", "unbelievably", "the", "New", "York", "Normandy", ",", "rollo", "##x", "a",
             "Conqueror", "1066", ".", "\u200b"]  # a zero-width space makes no subword
    out = []
    for i in range(n):
        k = int(rng.integers(1, longest))
        out.append(Example(texts=tuple(rng.choice(vocab, k)), tags=tuple(int(t) for t in rng.integers(0, 9, k)),
                           uid=f"s{i}"))
    return out


def test_tagging_windows_tag_every_word_once_where_it_has_most_context(bert):
    """TaskSpec.stride > 0: long sentences become overlapping windows; every word that makes a
    subword is tagged exactly once, on its first subword, in the window where that subword is
    farthest from both window edges (ties: the earlier window); sentences that fit are tokenized
    exactly as without windows."""
    import dataclasses
    examples = _ner_examples(0, 40, 60)
    spec = dataclasses.replace(get_task("conll2003_ner"), stride=5)
    tok = tokenize_split(_split(spec, examples), bert, max_length=20)
    full = tokenize_split(_split("conll2003_ner", examples), bert, max_length=512)
    assert full.stats["truncated"] == 0 and tok.num_rows > len(examples)  # some really windowed
    enc = bert([list(e.texts) for e in examples], is_split_into_words=True, truncation=True,
               max_length=20, stride=5, return_overflowing_tokens=True)
    for i, ex in enumerate(examples):
        rows = np.flatnonzero(tok.unit_example == i)
        f0, f1 = full.row_starts[i], full.row_starts[i + 1]
        first_ids = {int(w): int(full.input_ids[f0 + t]) for t, w in enumerate(full.word_index[f0:f1]) if w >= 0}
        tagged = {}
        for r in rows:
            a, b = tok.row_starts[r], tok.row_starts[r + 1]
            for t in np.flatnonzero(tok.word_index[a:b] >= 0):
                w = int(tok.word_index[a + t])
                assert w not in tagged, (i, w)  # once
                tagged[w] = (int(r), int(t))
                assert tok.token_labels[a + t] == ex.tags[w]
                assert tok.input_ids[a + t] == first_ids[w]  # on its first subword
            assert (tok.token_labels[a:b] >= 0).sum() == (tok.word_index[a:b] >= 0).sum()
        assert set(tagged) == set(first_ids)  # every word that makes a subword
        for w, (r, t) in tagged.items():  # the most central window of those holding it
            def centrality(row, pos):
                content = [k for k, x in enumerate(enc.word_ids(row)) if x is not None]
                j = content.index(pos)
                return min(j, len(content) - 1 - j)
            # Windows holding w's first subword: w's first token there is that subword (a window
            # starting inside w begins with a continuation piece).
            holding = []
            for rr in rows:
                wids = enc.word_ids(rr)
                if w in wids and enc["input_ids"][rr][wids.index(w)] == first_ids[w]:
                    holding.append((centrality(rr, wids.index(w)), -int(rr)))
            assert max(holding) == (centrality(r, t), -r), (i, w)
        if len(rows) == 1:  # fits one window: as without windows
            np.testing.assert_array_equal(tok.row_tokens(rows[0]), full.row_tokens(i))
    with pytest.raises(DataError, match=r"stride 9 leaves windows of max_length 19 .* at most 8"):
        tokenize_split(_split(dataclasses.replace(spec, stride=9), examples), bert, max_length=19)


def _squad_example(context, answer, qid="q"):
    return Example(texts=("what is it?", context), answers=((answer, context.index(answer)),), uid=qid)


def test_span_labels_and_char_offsets(bert):
    context = ("The Normans were the people who in the 10th and 11th centuries gave their name to "
               "Normandy, a region in France. " * 3) + "The answer is Rollo of Normandy here."
    ex = _squad_example(context, "Rollo of Normandy")
    spec = get_task("squad")
    s = spec.__class__(**{**spec.__dict__, "max_length": 48, "stride": 16})
    tok = tokenize_split(_split(s, [ex]), bert)
    assert tok.num_rows > 1 and (tok.unit_example == 0).all()
    hits = 0
    for r in range(tok.num_rows):
        a = tok.row_starts[r]
        offs = tok.char_offsets[a: tok.row_starts[r + 1]]
        st, en = tok.start_positions[r], tok.end_positions[r]
        ctx_tokens = np.nonzero(offs[:, 0] >= 0)[0]
        covered = (offs[ctx_tokens[0], 0], offs[ctx_tokens[-1], 1])
        inside = covered[0] <= context.index("Rollo") and covered[1] >= len(context) - len(" here.")
        if st == 0:
            assert en == 0 and not inside  # window without the answer points at [CLS]
        else:
            hits += 1
            assert context[offs[st, 0]: offs[en, 1]] == "Rollo of Normandy"
    assert hits >= 1
    # Windows overlap by `stride` tokens: consecutive windows share context tokens.
    first = tok.char_offsets[tok.row_starts[0]: tok.row_starts[1]]
    second = tok.char_offsets[tok.row_starts[1]: tok.row_starts[2]]
    assert second[second[:, 0] >= 0][0, 0] < first[first[:, 0] >= 0][-1, 0]


def test_span_question_too_long_is_an_error(bert):
    spec = get_task("squad")
    s = spec.__class__(**{**spec.__dict__, "max_length": 32, "stride": 8})
    ex = Example(texts=("why " * 40, "a context"), answers=(("a", 0),), uid="long-q")
    with pytest.raises(DataError, match="leaves no room for a context window"):
        tokenize_split(_split(s, [ex]), bert)


def test_multiple_choice_rows(bert):
    ex = Example(texts=("The man broke his toe.",), choices=("because he fell", "so he ran"), label=1)
    tok = tokenize_split(_split("copa", [ex, ex]), bert)
    assert tok.num_units == 2 and tok.num_rows == 4 and tok.rows_per_unit == 2
    assert tok.labels.tolist() == [0, 1, 0, 1]
    assert bert.decode(tok.row_tokens(1)) == "[CLS] the man broke his toe. [SEP] so he ran [SEP]"


def test_sharding_is_disjoint_and_covers(bert):
    data = load_split("sst2", "dev")
    parts = [tokenize_split(data, bert, shard=(p, 3)) for p in range(3)]
    ids = np.concatenate([p.unit_example for p in parts])
    assert sorted(ids.tolist()) == list(range(len(data)))
    assert all(p.num_examples == len(data) for p in parts)
    full = tokenize_split(data, bert)
    for p in parts:
        for u in range(p.num_units):
            assert p.row_tokens(u).tolist() == full.row_tokens(int(p.unit_example[u])).tolist()
    with pytest.raises(DataError, match="none for process 2 of 3"):
        tokenize_split(_split("sst2", [Example(texts=("a",), label=0)] * 2), bert, shard=(2, 3))
    with pytest.raises(ValueError, match="out of range"):
        shard_indices(10, 3, 3)


def _bpe_dir(tmp_path):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast
    text = [ex.texts[0] for ex in load_split("sst2", "train").examples]
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(text, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tk = bpe._tokenizer
    tk.post_processor = processors.RobertaProcessing(
        ("</s>", tk.token_to_id("</s>")), ("<s>", tk.token_to_id("<s>")), add_prefix_space=True)
    RobertaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                         cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                         add_prefix_space=True).save_pretrained(tmp_path)
    return tk


def test_bpe_tokenizer_directory(tmp_path):
    ref = _bpe_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id == 1
    data = load_split("rte", "dev")
    out = tokenize_split(data, tok)
    ref.enable_truncation(128, strategy="longest_first")
    for r, ex in enumerate(data.examples[:20]):
        assert out.row_tokens(r).tolist() == ref.encode(ex.texts[0], ex.texts[1]).ids
    pos = tokenize_split(load_split("ud_pos", "dev"), tok)
    ex = load_split("ud_pos", "dev").examples[0]
    first = pos.token_labels[pos.row_starts[0]: pos.row_starts[1]]
    assert first[first != IGNORE_INDEX].tolist() == list(ex.tags)


def test_sentencepiece_unigram_tokenizer_directory(tmp_path):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast
    text = [ex.texts[0] for ex in load_split("sst2", "train").examples]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(text, vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    T5TokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                    unk_token="<unk>", extra_ids=0).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.convert_ids_to_tokens(tok("a film")["input_ids"])[0].startswith("\u2581")
    data = load_split("ud_pos", "dev")
    out = tokenize_split(data, tok)
    for r, ex in enumerate(data.examples[:20]):
        labels = out.token_labels[out.row_starts[r]: out.row_starts[r + 1]]
        if not out.stats["truncated"]:
            assert labels[labels != IGNORE_INDEX].tolist() == list(ex.tags)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "spiece.model").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="needs the `sentencepiece` package"):
        load_tokenizer(tmp_path / "spiece.model")
    (tmp_path / "vocab.txt").write_text("a\tb\nc d\n")
    with pytest.raises(ValueError, match="not a WordPiece vocab file"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="cannot load a tokenizer from directory"):
        load_tokenizer(tmp_path / "emptydir")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(cfg)


def test_windowed_tagging_evaluates_whole_sentences(bert):
    """Evaluation of tagging in windows reassembles sentences (mtlx.train.evaluate.WordTags):
    with predictions that depend only on a word's first subword, token accuracy and entity F1
    over windows of 20 tokens equal those over whole sentences in one row."""
    import dataclasses

    import jax.numpy as jnp

    from mtlx.data import eval_batches
    from mtlx.train import evaluate as E
    examples = _ner_examples(1, 30, 50)
    plain = get_task("conll2003_ner")
    windowed = dataclasses.replace(plain, stride=4)
    full = tokenize_split(_split(plain, examples, "dev"), bert, max_length=512)
    tok = tokenize_split(_split(windowed, examples, "dev"), bert, max_length=20)
    assert tok.num_rows > full.num_rows

    def eval_fn(params, batch):  # a tag per subword id: a word's tag comes from its first subword
        return {"token_classification": jnp.asarray(batch.input_ids) % 9}, jnp.zeros(1), jnp.ones(1)

    got = {}
    for spec, data in ((plain, full), (windowed, tok)):
        got[spec.stride] = E.evaluate_tasks(eval_fn, None, [spec], {spec.name: data},
                                            lambda name, tid, d=data: eval_batches(d, tid, batch_size=8))
    want, res = got[0]["conll2003_ner"], got[4]["conll2003_ner"]
    assert set(res) == {"entity_precision", "entity_recall", "entity_f1", "loss"}
    for k in ("entity_precision", "entity_recall", "entity_f1"):
        assert res[k] == pytest.approx(want[k]), k
    assert 0.0 < want["entity_f1"] < 1.0
    # Per-row scoring of the windows (no reassembly) would differ: entities cut at windows.
    rowwise = E.evaluate_tasks(eval_fn, None, [dataclasses.replace(windowed, stride=0)],
                               {plain.name: tok}, lambda name, tid: eval_batches(tok, tid, batch_size=8))
    assert rowwise["conll2003_ner"]["entity_f1"] != pytest.approx(want["entity_f1"])
