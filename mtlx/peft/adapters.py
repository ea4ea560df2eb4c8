"""Bottleneck adapters, per task: Houlsby, Pfeiffer and parallel placements.

  Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": an adapter after the
      attention and after the feed-forward sublayer, on the sublayer output before the
      residual add: h + f(h), f(h) = up(act(down(h))), down d -> d/rf.
  Pfeiffer et al. 2021 (AdapterFusion, "Pfeiffer" configuration): one adapter, after the
      feed-forward sublayer only.
  He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning": parallel
      adapter, reading the sublayer's INPUT and added to its output, scaled by s:
      out + s f(x) (the paper's best placement is the FFN with s = 4).
  Task-conditional LayerNorm on the adapter branch (HyperFormer, Karimi Mahabadi et al. 2021,
      sec. 2.3: the adapter output goes through a LayerNorm whose gamma/beta belong to the
      task): layer_norm='post' gives h + LN_t(f(h)), 'pre' gives h + f(LN_t(h)).

The up-projection starts at zero, so an adapter is the identity at init. Parameters:
``{sublayer}/{name}/{task}/{down,up}/{kernel,bias}`` (+ ``norm/{scale,bias}``), e.g.
``layer_3/ffn/adapter/rte/down/kernel``. `bottleneck_delta` is the plain function of weights
the hypernetworks call with generated weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlx.models import activations
from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.base import (TaskExtension, check_patterns, check_positive, matches_any,
                            stacked_task_params)

ACTIVATIONS: Mapping[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": activations.gelu,
    "gelu_new": activations.gelu_tanh,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
VARIANTS = ("houlsby", "pfeiffer", "parallel")
DEFAULT_SITES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}
# AdapterHub's defaults: Houlsby swish, Pfeiffer relu; He et al. use relu.
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu", "parallel": "relu"}
LAYER_NORMS = ("none", "pre", "post")


def bottleneck_delta(x, weights, group, *, activation: str = "relu", layer_norm: str = "none",
                     eps: float = 1e-5, impl: str = R.DEFAULT_IMPL):
    """up(act(down(x))) with each example's own task weights (the branch, without residual).

    x [B, ..., d]; weights: {'down': {'kernel' [G, d, m], 'bias' [G, m]}, 'up': {'kernel'
    [G, m, d], 'bias' [G, d]}, and 'norm': {'scale', 'bias'} [G, d] when layer_norm is 'pre'
    or 'post'}; group [B] in [0, G).
    """
    act = ACTIVATIONS[activation]
    if layer_norm == "pre":
        x = R.task_layer_norm(x, weights["norm"]["scale"], weights["norm"]["bias"], group, eps)
    h = R.add_bias(R.routed_matmul(x, weights["down"]["kernel"], group, impl),
                   weights["down"]["bias"], group)
    h = act(h)
    out = R.add_bias(R.routed_matmul(h, weights["up"]["kernel"], group, impl),
                     weights["up"]["bias"], group)
    if layer_norm == "post":
        out = R.task_layer_norm(out, weights["norm"]["scale"], weights["norm"]["bias"], group, eps)
    return out


def bottleneck_size(d: int, reduction_factor: float, key: str) -> int:
    m = int(d // reduction_factor)
    if m < 1:
        raise ValueError(f"{key}={reduction_factor} leaves no bottleneck for hidden size {d} "
                         f"(d / reduction_factor < 1)")
    return m


def adapter_specs(d: int, m: int, layer_norm: str, init_std: float):
    specs = [
        (("down", "kernel"), (d, m), nn.initializers.normal(init_std)),
        (("down", "bias"), (m,), nn.initializers.zeros),
        (("up", "kernel"), (m, d), nn.initializers.zeros),
        (("up", "bias"), (d,), nn.initializers.zeros),
    ]
    if layer_norm != "none":
        specs += [(("norm", "scale"), (d,), nn.initializers.ones),
                  (("norm", "bias"), (d,), nn.initializers.zeros)]
    return specs


def check_adapter_fields(method: str, reduction_factor, activation, layer_norm, scaling) -> None:
    check_positive(reduction_factor, f"{method}.reduction_factor", integer=False)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{method}.activation: unknown activation {activation!r}; known: "
                         f"{sorted(ACTIVATIONS)}")
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"{method}.layer_norm must be one of {list(LAYER_NORMS)}, got {layer_norm!r}")
    check_positive(scaling, f"{method}.scaling", integer=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adapter(TaskExtension):
    """variant: 'houlsby' | 'pfeiffer' | 'parallel'; sites: sublayer patterns (default by
    variant); reduction_factor: d / bottleneck; activation (default by variant); scaling
    (parallel adapters' s); layer_norm: 'none' | 'pre' | 'post' task-conditional LayerNorm
    on the branch; init_std of the down-projection."""
    name: str = "adapter"
    variant: str = "houlsby"
    sites: Optional[Tuple[str, ...]] = None
    reduction_factor: float = 16
    activation: Optional[str] = None
    scaling: float = 1.0
    layer_norm: str = "none"
    layer_norm_eps: float = 1e-5
    init_std: float = 1e-2

    method = "adapter"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"adapter.variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.sites is None:
            object.__setattr__(self, "sites", DEFAULT_SITES[self.variant])
        object.__setattr__(self, "sites", check_patterns(self.sites, "sublayer", "adapter.sites"))
        if self.activation is None:
            object.__setattr__(self, "activation", DEFAULT_ACTIVATION[self.variant])
        check_adapter_fields("adapter", self.reduction_factor, self.activation, self.layer_norm,
                             self.scaling)
        check_positive(self.init_std, "adapter.init_std", integer=False)

    def sublayer(self, site: Site):
        if matches_any(site, self.sites):
            return AdapterSublayer(self, site, name=self.name)
        return None

    def target_map(self):
        return {"adapter.sites": ("sublayer", self.sites)}


class AdapterSublayer(nn.Module):
    ext: Adapter
    site: Site

    @nn.compact
    def __call__(self, sub_in, sub_out, routing):
        ext = self.ext
        d = sub_out.shape[-1]
        m = bottleneck_size(d, ext.reduction_factor, "adapter.reduction_factor")
        w = stacked_task_params(ext, adapter_specs(d, m, ext.layer_norm, ext.init_std))
        group, member = ext.route(routing, sub_out.shape[0], self.site)
        x = sub_in if ext.variant == "parallel" else sub_out
        delta = bottleneck_delta(x, w, group, activation=ext.activation, layer_norm=ext.layer_norm,
                                 eps=ext.layer_norm_eps, impl=ext.impl).astype(sub_out.dtype)
        if ext.scaling != 1.0:
            delta = delta * jnp.asarray(ext.scaling, delta.dtype)
        out = sub_out + delta
        if not ext.all_active:
            out = R.keep_members(member, out, sub_out)
        return out


METHODS = {"adapter": Adapter}
