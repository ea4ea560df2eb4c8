"""Prefix tuning and prompt tuning, per task.

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): every targeted self-attention layer gets `length` learned key and value
vectors per head, prepended to the layer's own keys/values, so every query can attend to
them. The prefixes are learned directly (Li & Liang's MLP reparameterisation, used only to
stabilise training, is not implemented). Parameters: ``{attention}/{name}/{task}/{key,value}``
[length, heads, head_dim], e.g. ``layer_0/attention/prefix/rte/key``.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): `length` learned vectors inserted into the input embedding sequence, initialised
uniformly in [-0.5, 0.5] (the paper's random-uniform init). T5 prepends them (the model
widens its encoder mask at the front, mtlx.models.t5); BERT/RoBERTa insert them right after
the leading [CLS]/<s> so that the pooler still reads it (insert_at=1; `bind` sets it).
Parameters: ``embeddings_site/{name}/{task}/prompt`` [length, d] under the backbone
(``backbone/{name}/{task}/prompt`` for BERT, ``backbone/encoder/{name}/...`` for T5).

Examples of tasks without weights see their extra positions masked out: prefix keys and
prompt positions are invisible to their queries, so their outputs at the original positions
are those of the plain model. Token-level heads (tagging, spans) read one output per input
position: with prompt tuning the encoder output is `length` positions longer, so prompt
tuning is for sequence-level tasks (and T5's decoder).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.base import (TaskExtension, check_patterns, check_positive, matches_any,
                            stacked_task_params, uniform)


def _per_example_only(group, method: str) -> None:
    if group.ndim != 1:
        raise ValueError(
            f"{method} gives each ROW its task's virtual tokens, but these rows mix tasks (per-"
            f"token task ids {tuple(group.shape)}, from packing with config.data."
            f"packing_mix_tasks=True): pack one task a row (packing_mix_tasks=False) instead")


def prepend_prefix(k, v, mask, prefix_key, prefix_value, group, member=None):
    """Prepends each example's task prefix to keys/values and opens the mask for it.

    k, v [B, L, H, D]; mask bool broadcastable to [B, 1, Lq, L] (or None); prefix_key/value
    [G, n, H, D]; member [B] bool or None (all examples have prefixes). Returns
    (k [B, n+L, H, D], v, mask [B, 1, Lq, n+L]). The plain function of weights.
    """
    _per_example_only(group, "prefix tuning")
    b = k.shape[0]
    n = prefix_key.shape[1]
    pk = R.per_example(prefix_key, group).astype(k.dtype)
    pv = R.per_example(prefix_value, group).astype(v.dtype)
    if mask is None:
        mask = jnp.ones((b, 1, 1, k.shape[1]), bool)
    mask = jnp.broadcast_to(mask, (b,) + mask.shape[1:])
    visible = jnp.ones((b,), bool) if member is None else member
    pmask = jnp.broadcast_to(visible[:, None, None, None], mask.shape[:3] + (n,))
    return (jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1),
            jnp.concatenate([pmask.astype(mask.dtype), mask], axis=-1))


def insert_prompt(emb, mask, prompt, group, insert_at: int, member=None):
    """Inserts each example's task prompt at position `insert_at`.

    emb [B, L, d]; mask [B, L]; prompt [G, n, d]; member [B] bool or None. Returns
    (emb [B, L+n, d], mask [B, L+n]); non-members get zero vectors with mask 0.
    """
    _per_example_only(group, "prompt tuning")
    b, n = emb.shape[0], prompt.shape[1]
    p = R.per_example(prompt, group).astype(emb.dtype)
    visible = jnp.ones((b,), bool) if member is None else member
    if member is not None:
        p = R.keep_members(member, p, jnp.zeros_like(p))
    pmask = jnp.broadcast_to(visible[:, None], (b, n)).astype(mask.dtype)
    i = insert_at
    return (jnp.concatenate([emb[:, :i], p, emb[:, i:]], axis=1),
            jnp.concatenate([mask[:, :i], pmask, mask[:, i:]], axis=1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuning(TaskExtension):
    """length: prefix vectors per layer; sites: self-attention patterns (default every
    layer of every stack); init_std of the prefixes."""
    name: str = "prefix"
    length: int = 10
    sites: Tuple[str, ...] = ("attention",)
    init_std: float = 0.02

    method = "prefix"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)
    routes_per_token = False  # a row's task's prefix, not a token's

    def __post_init__(self):
        super().__post_init__()
        check_positive(self.length, "prefix.length")
        check_positive(self.init_std, "prefix.init_std", integer=False)
        object.__setattr__(self, "sites", check_patterns(self.sites, "attention_kv", "prefix.sites"))

    def attention_kv(self, site: Site):
        if matches_any(site, self.sites):
            return PrefixKV(self, site, name=self.name)
        return None

    def target_map(self):
        return {"prefix.sites": ("attention_kv", self.sites)}


class PrefixKV(nn.Module):
    ext: PrefixTuning
    site: Site

    @nn.compact
    def __call__(self, k, v, mask, routing):
        ext = self.ext
        _, _, h, d = k.shape
        init = nn.initializers.normal(ext.init_std)
        w = stacked_task_params(ext, [(("key",), (ext.length, h, d), init),
                                      (("value",), (ext.length, h, d), init)])
        group, member = ext.route(routing, k.shape[0], self.site)
        return prepend_prefix(k, v, mask, w["key"], w["value"], group,
                              None if ext.all_active else member)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning(TaskExtension):
    """length: prompt vectors; insert_at: position of the first prompt vector (None: set by
    `bind` from the backbone: 1 after BERT/RoBERTa's [CLS], 0 for T5)."""
    name: str = "prompt"
    length: int = 20
    insert_at: Optional[int] = None

    method = "prompt"
    routes_per_token = False  # a row's task's prompt, not a token's

    def __post_init__(self):
        super().__post_init__()
        check_positive(self.length, "prompt.length")
        if self.insert_at is not None and (isinstance(self.insert_at, bool)
                                           or not isinstance(self.insert_at, int)
                                           or self.insert_at < 0):
            raise ValueError(f"prompt.insert_at must be a non-negative integer or None, got "
                             f"{self.insert_at!r}")

    def bind(self, backbone_config):
        kind = backbone_config.model_type
        if kind == "t5":
            if self.insert_at not in (None, 0):
                raise ValueError(f"prompt.insert_at={self.insert_at}: T5 needs prompts prepended "
                                 f"(insert_at=0); its decoder widens the encoder mask at the front")
            return dataclasses.replace(self, insert_at=0)
        if self.insert_at is None:
            return dataclasses.replace(self, insert_at=1)  # keep [CLS]/<s> first for the pooler
        return self

    def embeddings(self, site: Site):
        return PromptEmbeddings(self, site, name=self.name)

    def target_map(self):
        return {"prompt": ("embeddings", ("embeddings",))}


class PromptEmbeddings(nn.Module):
    ext: PromptTuning
    site: Site

    @nn.compact
    def __call__(self, emb, mask, routing):
        ext = self.ext
        if ext.insert_at is None:
            raise ValueError("prompt.insert_at is unset: build with mtlx.peft.registry.attach "
                             "(which binds it to the backbone) or set it: 1 for BERT/RoBERTa "
                             "(after [CLS]), 0 for T5")
        if ext.insert_at > emb.shape[1]:
            raise ValueError(f"prompt.insert_at={ext.insert_at} is past the input length "
                             f"{emb.shape[1]}")
        w = stacked_task_params(ext, [(("prompt",), (ext.length, emb.shape[-1]), uniform(0.5))])
        group, member = ext.route(routing, emb.shape[0], self.site)
        return insert_prompt(emb, mask, w["prompt"], group, ext.insert_at,
                             None if ext.all_active else member)


METHODS = {"prefix": PrefixTuning, "prompt": PromptTuning}
