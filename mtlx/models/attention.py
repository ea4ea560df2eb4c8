"""Scaled dot-product attention through `jax.nn.dot_product_attention`.

The implementation is selectable: None lets JAX pick (XLA everywhere), 'xla' forces the XLA
path, 'cudnn' asks for cuDNN's fused kernel (GPU only; needs bf16/fp16 inputs and no arbitrary
bias, so T5's relative-position bias stays on XLA).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

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


def attend(q, k, v, *, mask=None, bias=None, scale: Optional[float] = None,
           is_causal: bool = False, implementation: Optional[str] = None):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `mask` is boolean broadcastable to [B, H, Lq, Lk]; `bias` is added to the logits.
    Rows whose keys are all masked (fully padded queries) come back finite.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if mask is not None:
        # Broadcast [B,1,Lq,Lk] over heads explicitly: the cuDNN path wants a full mask.
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        implementation=implementation)
