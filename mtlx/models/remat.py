"""Rematerialisation (activation checkpointing) policies by name, for transformer layers.

  none          keep every activation (fastest, most memory)
  full          keep only each layer's input; recompute the layer in the backward pass
  dots          keep matmul outputs, recompute elementwise ops (jax.checkpoint_policies.dots_saveable)
  dots_no_batch keep matmuls without batch dimensions (weights-only products), MaxText's
                'minimal' policy (dots_with_no_batch_dims_saveable)
"""

from __future__ import annotations

import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def check_policy(name: str, key: str = "remat") -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.{key}: unknown remat policy {name!r}; known: {list(REMAT_POLICIES)}")


def remat_layer(layer_cls, policy: str, static_argnums=()):
    """`layer_cls` wrapped in nn.remat with the named policy (unchanged for 'none').

    static_argnums index the layer's __call__ arguments with `self` as 0 (Flax convention),
    e.g. a Python bool `deterministic`.
    """
    check_policy(policy)
    if policy == "none":
        return layer_cls
    jax_policy = {
        "full": None,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[policy]
    return nn.remat(layer_cls, policy=jax_policy, static_argnums=static_argnums, prevent_cse=True)
