"""Building blocks shared by the encoders, and the ONE extension point for PEFT methods.

Every linear map inside a transformer layer is a `Projection` with a `Site` (which stack, which
layer, which named place); extensions may rescale its input or change its output. Every sublayer output (attention, cross-attention, feed-forward)
passes through `extend_sublayer`, attention keys/values through `extend_attention_kv`, and input
embeddings through `extend_embeddings`. Adapters, LoRA, prefix/prompt tuning, (IA)^3 and
hypernetwork-generated weights (mtlx.peft) attach at these points by configuration: an encoder
never knows which methods exist.

Site names are the same in every model family:
  projections: attention.{query,key,value,output}, cross_attention.{query,key,value,output},
               ffn.input, ffn.gate (T5 v1.1 gated GELU), ffn.output
  sublayers:   attention, cross_attention, ffn
  layer norms: attention.layer_norm, cross_attention.layer_norm, ffn.layer_norm
  embeddings:  embeddings
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from mtlx.models import precision

PROJECTION_SITES = (
    "attention.query", "attention.key", "attention.value", "attention.output",
    "cross_attention.query", "cross_attention.key", "cross_attention.value",
    "cross_attention.output", "ffn.input", "ffn.gate", "ffn.output",
)
SUBLAYER_SITES = ("attention", "cross_attention", "ffn")
LAYER_NORM_SITES = ("attention.layer_norm", "cross_attention.layer_norm", "ffn.layer_norm")


@dataclasses.dataclass(frozen=True)
class Site:
    """A named place in the network: `stack` is 'encoder' or 'decoder', `layer` 0-based."""
    stack: str
    layer: int
    name: str

    def __str__(self) -> str:
        return f"{self.stack}.layer{self.layer}.{self.name}"


@flax.struct.dataclass
class Routing:
    """What task-specific extensions need at run time, passed down the layers.

    task_ids:  int32 [B], each example's task (index into the model's task tuple); [B, L],
               each token's, on packed rows that mix tasks (mtlx.data.packing).
    generated: weights produced once per step outside the layers (hypernetworks), keyed by
               extension name, or None.
    """
    task_ids: Any = None
    generated: Optional[Any] = None


class Extension:
    """Base of every PEFT method. Each hook returns an (unbound) Flax module to run at that
    site, or None to leave the site alone. Modules are instantiated inside the calling layer, so
    their parameters live under it (e.g. ``layer_3/attention/query/lora/...``).

    Hook call conventions:
      projection_input(site) -> module(x, routing) -> x  (rescales a projection's INPUT before
                           the matmul, e.g. (IA)^3 on ffn.output; the output hooks then see it)
      projection(site)  -> module(x, y, routing) -> y          (x input, y = x W + b)
      sublayer(site)    -> module(sub_in, sub_out, routing) -> sub_out   (before residual add)
      attention_kv(site)-> module(k, v, mask, routing) -> (k, v, mask)   (k/v [B, L, H, D])
      embeddings(site)  -> module(emb, mask, routing) -> (emb, mask)
      generator()       -> module() -> pytree, run ONCE per forward pass by the multi-task
                           model before the backbone (hypernetworks generate every task's
                           weights here); the result reaches the hooks as
                           ``routing.generated[ext.name]``.

    layer_uniform (class attribute): True when the modules this extension returns do not depend
    on ``site.layer`` except through their own parameters (adapters, LoRA, ...), so one traced
    layer body can run every layer (BertConfig.scan_layers); False (the default) for e.g.
    hypernetworks that index generated weights by layer.

    routes_per_token (class attribute): True when the extension can give each TOKEN its task's
    weights (Routing.task_ids [B, L], packed rows that mix tasks); False for methods that give
    a whole row its task's virtual tokens (prompt and prefix tuning), which such rows refuse.
    """
    name: str = "extension"
    layer_uniform = False
    routes_per_token = True

    def projection_input(self, site: Site) -> Optional[nn.Module]:
        return None

    def projection(self, site: Site) -> Optional[nn.Module]:
        return None

    def sublayer(self, site: Site) -> Optional[nn.Module]:
        return None

    def attention_kv(self, site: Site) -> Optional[nn.Module]:
        return None

    def embeddings(self, site: Site) -> Optional[nn.Module]:
        return None

    def generator(self) -> Optional[nn.Module]:
        return None

    def layer_norm_output(self, site: Site) -> Optional[nn.Module]:
        """module(y, routing) -> y on a sublayer's layer-norm OUTPUT (BERT: the post-LN after
        the residual add; T5: the pre-LN on the sublayer input)."""
        return None


class Projection(nn.Module):
    """y = x W (+ b), then any extension attached to this site (LoRA, (IA)^3, ...).

    Params: ``kernel`` [in, out] and ``bias`` [out] (if use_bias), same layout as nn.Dense.
    """
    features: int
    site: Site
    use_bias: bool = True
    extensions: Sequence[Extension] = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, routing: Optional[Routing] = None):
        for ext in self.extensions:
            module = ext.projection_input(self.site)
            if module is not None:
                x = module(x, routing)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = precision.dot(x, kernel, self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        for ext in self.extensions:
            module = ext.projection(self.site)
            if module is not None:
                y = module(x, y, routing)
        return y


def extend_sublayer(extensions: Sequence[Extension], site: Site, sub_in, sub_out, routing):
    for ext in extensions:
        module = ext.sublayer(site)
        if module is not None:
            sub_out = module(sub_in, sub_out, routing)
    return sub_out


def extend_attention_kv(extensions: Sequence[Extension], site: Site, k, v, mask, routing):
    for ext in extensions:
        module = ext.attention_kv(site)
        if module is not None:
            k, v, mask = module(k, v, mask, routing)
    return k, v, mask


def extend_embeddings(extensions: Sequence[Extension], site: Site, emb, mask, routing):
    for ext in extensions:
        module = ext.embeddings(site)
        if module is not None:
            emb, mask = module(emb, mask, routing)
    return emb, mask


def extend_layer_norm(extensions: Sequence[Extension], site: Site, y, routing):
    for ext in extensions:
        module = ext.layer_norm_output(site)
        if module is not None:
            y = module(y, routing)
    return y
