"""Scaled dot-product attention through `jax.nn.dot_product_attention`.

The implementation is selectable: None lets JAX pick (XLA everywhere), 'xla' forces the XLA
path, 'cudnn' asks for cuDNN's fused kernel (GPU only; needs bf16/fp16 inputs and no arbitrary
bias, so T5's relative-position bias stays on XLA).

cuDNN and padding: a boolean mask reaches cuDNN as a dense additive [B, H, Lq, Lk] bias, whose
gradient (dbias) cuDNN also computes in the backward pass. When the caller knows the mask is
plain right padding (each row's real keys first, then padding: what mtlx's tokenization and
Hugging Face tokenizers with padding_side='right' produce), it passes `key_lengths` instead and
cuDNN runs in its padding mode (per-row key lengths, no bias tensor): see `right_padding_lengths`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mtlx.models import precision

IMPLEMENTATIONS = (None, "xla", "cudnn")


def padding_mask(attention_mask, segment_ids=None, kv_attention_mask=None):
    """Boolean [B, 1, Lq, Lk] mask: True where a query may attend to a key.

    `attention_mask` [B, Lk] marks real key tokens. With `segment_ids` [B, L] (packed rows),
    attention is block diagonal: tokens attend only within their own segment.
    """
    keys = attention_mask if kv_attention_mask is None else kv_attention_mask
    mask = keys[:, None, None, :].astype(bool)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None, :, :]
    return mask


def right_padding_lengths(mask):
    """Per-row key lengths [B] int32 of a key-only boolean mask [B, 1, 1, Lk] (True = real key).

    Only meaningful for right padding (True...True False...False per row); the caller vouches
    for that (see the module docstring)."""
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1):
        raise ValueError(f"right_padding_lengths needs a key-only mask [B, 1, 1, Lk], got shape {mask.shape}")
    return jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32)


def attend(q, k, v, *, mask=None, bias=None, scale: Optional[float] = None,
           is_causal: bool = False, implementation: Optional[str] = None, key_lengths=None):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `mask` is boolean broadcastable to [B, H, Lq, Lk]; `bias` is added to the logits.
    Rows whose keys are all masked (fully padded queries) come back finite.
    `key_lengths` [B] (optional): the same mask as right-padding lengths; with
    implementation='cudnn' it replaces `mask` (cuDNN's padding mode), elsewhere it is ignored
    and `mask` is used.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn" and key_lengths is not None and bias is None:
        # At least one key a row: a batch's filler rows have no real token, and a softmax over
        # no key is 0/0 in a fused kernel. Such a row attends to its first (padding) key
        # instead; its outputs are ignored downstream like every padding position's.
        lengths = jnp.maximum(jnp.asarray(key_lengths, jnp.int32), 1)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=is_causal, implementation=implementation,
            key_value_seq_lengths=lengths)
    if implementation != "cudnn" and q.shape[2] == k.shape[2] and precision.f32_accumulate(q, k, v):
        # bf16 on a CPU: the same attention with products that accumulate in float32
        # (mtlx.models.precision), ~2x faster there than XLA's bf16 x bf16 -> bf16 products.
        return _attend_explicit(q, k, v, mask, bias, scale, is_causal)
    if mask is not None:
        # Broadcast [B,1,Lq,Lk] over heads explicitly: the cuDNN path wants a full mask.
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        implementation=implementation)


def _attend_explicit(q, k, v, mask, bias, scale, is_causal):
    """`jax.nn.dot_product_attention`'s XLA path written out (softmax in float32; masked logits
    at float32's lowest value, so a row with no key left comes back finite, uniform over its
    keys) with mtlx.models.precision's products."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = precision.einsum("bqhd,bkhd->bhqk", q, k, out_dtype=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return precision.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
