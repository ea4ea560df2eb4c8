"""T5 text-to-text tasks: inputs "<task> <field>: <text>", class-name / rounded-score targets,
and decoder fields (shifted right behind the start token) in mixed batches, checked against
Hugging Face's own T5 `_shift_right` via transformers' PyTorch T5 model helper."""

import numpy as np
import pytest

from mtlx.batch import IGNORE_INDEX
from mtlx.data import (BatchLayout, Uniform, get_task, load_split, load_tokenizer, make_iterator,
                       mixture_for, text_to_text, tokenize_split)
from mtlx.data.tasks import TaskSpec


@pytest.fixture(scope="module")
def t5_tok(tmp_path_factory):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast
    text = [ex.texts[0] for ex in load_split("sst2", "train").examples]
    text += ["acceptable unacceptable entailment not_entailment 0.0 1.2 3.8 4.6 5.0 sentence1 sentence2"] * 20
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(text, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"])
    path = tmp_path_factory.mktemp("t5tok")
    T5TokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                    unk_token="<unk>", extra_ids=0).save_pretrained(path)
    return load_tokenizer(path)


def test_text_to_text_specs():
    rte = text_to_text(get_task("rte"))
    assert rte.head == "seq2seq" and rte.labels == get_task("rte").labels and rte.name == "rte"
    stsb = text_to_text(get_task("stsb"))
    assert stsb.target == "score" and stsb.labels == ()
    with pytest.raises(ValueError, match="only classification and regression"):
        text_to_text(get_task("ud_pos"))
    with pytest.raises(ValueError, match="target must be '' or 'score'"):
        TaskSpec("x", "regression", get_task("stsb").source, target="score")


def test_inputs_and_targets(t5_tok):
    rte = text_to_text(get_task("rte"))
    data = load_split(rte, "dev")
    tok = tokenize_split(data, t5_tok)
    ex = data.examples[0]
    assert t5_tok.decode(tok.row_tokens(0), skip_special_tokens=True) == \
        t5_tok.decode(t5_tok(f"rte sentence1: {ex.texts[0]} sentence2: {ex.texts[1]}")["input_ids"][:128],
                      skip_special_tokens=True)
    target = tok.target_ids[tok.target_starts[0]: tok.target_starts[1]]
    assert target[-1] == t5_tok.eos_token_id
    assert t5_tok.decode(target, skip_special_tokens=True) == rte.labels[ex.label]
    stsb = text_to_text(get_task("stsb"))
    sdata = load_split(stsb, "dev")
    st = tokenize_split(sdata, t5_tok)
    for r, ex in enumerate(sdata.examples[:30]):
        text = t5_tok.decode(st.target_ids[st.target_starts[r]: st.target_starts[r + 1]],
                             skip_special_tokens=True)
        assert abs(float(text) - ex.label) <= 0.1 + 1e-9 and round(float(text) * 5) == float(text) * 5


def test_decoder_fields_in_mixed_batches(t5_tok):
    torch = pytest.importorskip("torch")
    from transformers import T5Config, T5ForConditionalGeneration
    data = {t.name: tokenize_split(load_split(t, "train"), t5_tok)
            for t in (text_to_text(get_task("cola")), text_to_text(get_task("stsb")))}
    mix = mixture_for(data, Uniform())
    it = make_iterator(data, mix, batch_size=8, seed=0)
    assert it.layout == BatchLayout(target_length=16)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=len(t5_tok), d_model=8, d_ff=8, num_layers=1,
                                             num_heads=1, d_kv=4, decoder_start_token_id=0,
                                             pad_token_id=0))
    for _ in range(5):
        b = next(it)
        assert b.decoder_input_ids.shape == b.target_ids.shape == (8, 16)
        labels = torch.tensor(np.where(b.target_ids == IGNORE_INDEX, IGNORE_INDEX, b.target_ids),
                              dtype=torch.long)
        # Hugging Face's shift: decoder inputs = start token + targets[:-1], -100 -> pad.
        expected = hf._shift_right(labels).numpy()
        assert (b.decoder_input_ids == expected).all()
        assert (b.decoder_attention_mask == (b.target_ids != IGNORE_INDEX)).all()
        for row in range(8):
            n = int(b.decoder_attention_mask[row].sum())
            assert b.target_ids[row, n - 1] == t5_tok.eos_token_id
            assert (b.target_ids[row, n:] == IGNORE_INDEX).all()


def test_fields_in_t5s_order(t5_tok):
    """T5's GLUE preprocessor writes the fields sorted by name: MNLI's input is
    "mnli hypothesis: ... premise: ...", whatever order the task lists them in."""
    import dataclasses
    from mtlx.data.readers import Example, SplitData
    from mtlx.data.errors import ReadReport
    mnli = text_to_text(get_task("mnli"))
    assert mnli.text_fields == ("premise", "hypothesis")
    split = SplitData(task=mnli, split="x", examples=[Example(texts=("the cat sat", "a cat"), label=0)],
                      report=ReadReport(path="x", task="mnli"), path="x", labelled=True)
    tok = tokenize_split(split, t5_tok)
    assert t5_tok.decode(tok.row_tokens(0), skip_special_tokens=True) == t5_tok.decode(
        t5_tok("mnli hypothesis: a cat premise: the cat sat")["input_ids"], skip_special_tokens=True)
