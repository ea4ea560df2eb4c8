"""Tiny random Hugging Face PyTorch models, saved locally, as references for parity tests.

No hub downloads: every model is built from a config with a fixed seed. `perturb_` makes every
parameter (biases and LayerNorm scales included) non-trivial, so a swapped or missing weight in
a conversion changes the outputs instead of hiding behind HF's zero/one initialisation.

    path, model = save_tiny_bert(tmp_path)                 # BertModel, eval mode, eager attention
    path, model = save_tiny_roberta(tmp_path, num_hidden_layers=3)
    path, model = save_tiny(transformers.T5Model, transformers.T5Config(...), tmp_path / "t5")
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

TINY_BERT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
TINY_ROBERTA = dict(TINY_BERT, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    max_position_embeddings=66)


def perturb_(model, seed: int = 0, std: float = 0.2) -> None:
    """Adds seeded N(0, std) noise to every parameter in place (deterministic in `seed`)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def build_tiny(model_cls, config, seed: int = 0, perturb: bool = True):
    """A seeded model in eval mode with eager attention (the plain softmax reference)."""
    import torch
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config)
    if perturb:
        perturb_(model, seed)
    return model.eval()


def save_tiny(model_cls, config, path, seed: int = 0, safe_serialization: bool = True,
              perturb: bool = True):
    """Builds a tiny model and saves it to `path` (safetensors, or pytorch_model.bin when
    safe_serialization=False via torch.save of the state dict). Returns (path, model)."""
    import torch
    model = build_tiny(model_cls, config, seed, perturb)
    path = str(path)
    os.makedirs(path, exist_ok=True)
    if safe_serialization:
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path, model


def save_tiny_bert(tmp_path, seed: int = 0, safe_serialization: bool = True,
                   add_pooling_layer: bool = True, **overrides: Any):
    import transformers
    config = transformers.BertConfig(**{**TINY_BERT, **overrides})
    cls = transformers.BertModel if add_pooling_layer else _no_pooler(transformers.BertModel)
    return save_tiny(cls, config, os.path.join(str(tmp_path), f"tiny-bert-{seed}"), seed,
                     safe_serialization)


def save_tiny_roberta(tmp_path, seed: int = 0, safe_serialization: bool = True,
                      add_pooling_layer: bool = True, **overrides: Any):
    import transformers
    config = transformers.RobertaConfig(**{**TINY_ROBERTA, **overrides})
    cls = transformers.RobertaModel if add_pooling_layer else _no_pooler(transformers.RobertaModel)
    return save_tiny(cls, config, os.path.join(str(tmp_path), f"tiny-roberta-{seed}"), seed,
                     safe_serialization)


def _no_pooler(model_cls):
    return lambda config: model_cls(config, add_pooling_layer=False)


def torch_outputs(model, **inputs: Optional[np.ndarray]):
    """Runs a HF model on numpy inputs (None entries dropped); returns its output with numpy
    arrays in place of tensors."""
    import torch
    feed = {k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out = model(**feed)
    return {k: v.float().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def padded_batch(rng: np.random.Generator, lengths, vocab_size: int, pad_id: int = 0,
                 low: int = 3, type_split: bool = False):
    """A right-padded batch: input_ids, attention_mask, token_type_ids (segment B after the
    middle of each sequence when type_split) with ids in [low, vocab_size) so no real token
    equals the pad id."""
    b, l = len(lengths), max(lengths)
    ids = np.full((b, l), pad_id, np.int32)
    mask = np.zeros((b, l), np.int32)
    types = np.zeros((b, l), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(low, vocab_size, n)
        mask[i, :n] = 1
        if type_split:
            types[i, n // 2:n] = 1
    return ids, mask, types
