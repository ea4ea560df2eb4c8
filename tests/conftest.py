"""Test set-up: 8 host CPU devices (for sharding tests) before JAX starts its backend."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def t5_tok_dir(tmp_path_factory):
    """A tiny T5 SentencePiece tokenizer trained on the embedded SST-2 sample and the GLUE
    label words (text-to-text tests)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from mtlx.data import load_split
    from transformers import T5TokenizerFast
    text = [ex.texts[0] for ex in load_split("sst2", "train").examples]
    text += ["acceptable unacceptable entailment not_entailment equivalent not_equivalent "
             "0.0 1.2 3.8 4.6 5.0 sentence1 sentence2 rte mrpc stsb cola"] * 20
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(text, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"])
    path = tmp_path_factory.mktemp("t5tok")
    T5TokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                    unk_token="<unk>", extra_ids=0).save_pretrained(path)
    return path


def write_t5_text_to_text_config(path, tok_dir, extra=()):
    """A config file (path) for the local demo run as a tiny T5 with RTE and STS-B in
    text-to-text form (config.text_to_text), tokenized with `tok_dir` (t5_tok_dir); `extra`:
    more statements on the config `c`."""
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
    path.write_text(f"from mtlx.train.config import load_config\n\n"
                    f"def get_config(arg=None):\n"
                    f"    c = load_config({demo + ':local'!r})\n"
                    f"    c.tasks = ('rte', 'stsb')\n"
                    f"    c.text_to_text = True\n"
                    f"    c.data.tokenizer = {str(tok_dir)!r}\n"
                    f"    c.model.family = 't5'\n"
                    f"    c.model.config = dict(vocab_size=400, d_model=16, d_kv=8, d_ff=32,\n"
                    f"                          num_layers=2, num_heads=2)\n"
                    + "".join(f"    {line}\n" for line in extra)
                    + "    return c\n")
    return path
