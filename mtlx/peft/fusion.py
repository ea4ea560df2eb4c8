"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"), per target task.

Stage 1 trains one adapter per source task (mtlx.peft.adapters, Pfeiffer placement). Stage 2
freezes them and learns, for each target task and layer, an attention over the source
adapters' outputs (paper eq. 2-3, AdapterHub's `BertFusion` with its default "dynamic"
config: query, key and value projections, value initialised to the identity):

    z_n = adapter_n(h)                      (the N source adapters' branch outputs)
    s_n = (h Q_t + b_q) . (z_n K_t + b_k)   softmax over n (divided by `temperature`)
    out = h + sum_n softmax(s)_n (z_n V_t + b_v)

h is the sublayer output (before the residual add). Every example runs all N source adapters
(inherent to fusion) and its own target task's Q/K/V. Parameters, under each targeted
sublayer: ``{name}/adapters/{source}/{down,up}/...`` (frozen in stage 2) and
``{name}/layers/{task}/{query,key,value}/{kernel,bias}``. `load_fusion_sources` copies
stage-1 adapters into place. Tasks without a fusion layer pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.adapters import (ACTIVATIONS, Adapter, adapter_specs, bottleneck_size,
                                check_adapter_fields)
from mtlx.peft.base import TaskExtension, TaskParams, check_patterns, check_positive, matches_any


def all_adapter_deltas(x, weights, *, activation: str):
    """Every source adapter on every example: x [B, ..., d], weights stacked over N sources
    ({'down': {'kernel' [N, d, m], 'bias' [N, m]}, 'up': ...}) -> [B, ..., N, d]."""
    act = ACTIVATIONS[activation]
    dk, db = weights["down"]["kernel"].astype(x.dtype), weights["down"]["bias"].astype(x.dtype)
    uk, ub = weights["up"]["kernel"].astype(x.dtype), weights["up"]["bias"].astype(x.dtype)
    h = act(jnp.einsum("...d,ndm->...nm", x, dk) + db)
    return jnp.einsum("...nm,nmd->...nd", h, uk) + ub


def fuse(h, z, weights, group, temperature: float = 1.0, impl: str = R.DEFAULT_IMPL):
    """The fusion attention: h [B, ..., d] (query side), z [B, ..., N, d] (source outputs),
    weights {'query'|'key'|'value': {'kernel' [G, d, d], 'bias' [G, d]}} per target task
    -> sum_n softmax_n(q . k_n / temperature) v_n, [B, ..., d]."""
    def proj(name, x):
        p = weights[name]
        return R.add_bias(R.routed_matmul(x, p["kernel"], group, impl), p["bias"], group)

    q = proj("query", h)
    k, v = proj("key", z), proj("value", z)
    scores = jnp.einsum("...d,...nd->...n", q, k).astype(jnp.float32) / temperature
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...n,...nd->...d", probs, v)


def _near_identity(key, shape, dtype=jnp.float32):
    # AdapterHub: value weight = 1e-6 everywhere, 1 on the diagonal.
    return (jnp.full(shape, 1e-6, dtype) + jnp.eye(shape[0], shape[1], dtype=dtype) * (1 - 1e-6))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fusion(TaskExtension):
    """tasks: target tasks with fusion layers (default all); sources: the adapters fused
    (default every model task; names need not be model tasks); sites: sublayer patterns;
    reduction_factor / activation / layer_norm: the source adapters' shape (must match the
    stage-1 adapters); temperature of the softmax."""
    name: str = "fusion"
    sources: Optional[Tuple[str, ...]] = None
    sites: Tuple[str, ...] = ("ffn",)
    reduction_factor: float = 16
    activation: str = "relu"
    temperature: float = 1.0

    method = "fusion"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        if self.sources is None:
            object.__setattr__(self, "sources", self.task_names)
        object.__setattr__(self, "sources", tuple(self.sources))
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"fusion.sources must name at least two distinct adapters, got "
                             f"{list(self.sources)}")
        object.__setattr__(self, "sites", check_patterns(self.sites, "sublayer", "fusion.sites"))
        check_adapter_fields("fusion", self.reduction_factor, self.activation, "none", 1.0)
        check_positive(self.temperature, "fusion.temperature", integer=False)

    def sublayer(self, site: Site):
        if matches_any(site, self.sites):
            return FusionSublayer(self, site, name=self.name)
        return None

    def target_map(self):
        return {"fusion.sites": ("sublayer", self.sites)}

    def task_param_scopes(self):
        return ((("layers",), self.active), (("adapters",), self.sources))

    def trainable_patterns(self):
        # Stage 2 of AdapterFusion: only the fusion layers learn; the source adapters are frozen.
        return (f"(^|/){self.name}/layers/",)


class _Stacked(nn.Module):
    """Per-name parameters (one TaskParams child per name) stacked in `names` order."""
    names: Tuple[str, ...]
    specs: tuple

    @nn.compact
    def __call__(self):
        return R.stack_tasks([TaskParams(self.specs, name=n)() for n in self.names], self.names)


class FusionSublayer(nn.Module):
    ext: Fusion
    site: Site

    @nn.compact
    def __call__(self, sub_in, sub_out, routing):
        ext = self.ext
        d = sub_out.shape[-1]
        m = bottleneck_size(d, ext.reduction_factor, "fusion.reduction_factor")
        sources = _Stacked(ext.sources, tuple(adapter_specs(d, m, "none", 1e-2)), name="adapters")()
        qk = nn.initializers.normal(0.02)
        layers = _Stacked(ext.active, (
            (("query", "kernel"), (d, d), qk), (("query", "bias"), (d,), nn.initializers.zeros),
            (("key", "kernel"), (d, d), qk), (("key", "bias"), (d,), nn.initializers.zeros),
            (("value", "kernel"), (d, d), _near_identity),
            (("value", "bias"), (d,), nn.initializers.zeros)), name="layers")()
        group, member = ext.route(routing, sub_out.shape[0], self.site)
        z = all_adapter_deltas(sub_out, sources, activation=ext.activation)
        out = sub_out + fuse(sub_out, z, layers, group, ext.temperature, ext.impl).astype(sub_out.dtype)
        if not ext.all_active:
            out = R.keep_members(member, out, sub_out)
        return out


def load_fusion_sources(params, stage1_params, adapter: Adapter, fusion: Fusion):
    """`params` (a model with the fusion extension) with every stage-1 adapter copied in:
    ``{sublayer}/{adapter.name}/{source}`` of `stage1_params` (a model with the adapter
    extension, same backbone) goes to ``{sublayer}/{fusion.name}/adapters/{source}``.

    The adapter config must have the fusion's shape, checked field by field (a sequential
    variant reading the sublayer output, reduction_factor, activation, no LayerNorm or
    scaling); a fused sublayer without stage-1 weights for a source is an error naming both.
    """
    if adapter.variant == "parallel":
        raise ValueError("fusion sources must be sequential adapters (adapter.variant 'houlsby' "
                         "or 'pfeiffer'): fusion reads the sublayer output")
    for field in ("reduction_factor", "activation"):
        if getattr(adapter, field) != getattr(fusion, field):
            raise ValueError(f"adapter.{field}={getattr(adapter, field)!r} differs from "
                             f"fusion.{field}={getattr(fusion, field)!r}")
    if adapter.layer_norm != "none" or adapter.scaling != 1.0:
        raise ValueError("fusion sources cannot have adapter.layer_norm or adapter.scaling")
    copied = [0]

    def walk(node, other, path):
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, other.get(k, {}) if isinstance(other, Mapping) else {}, path + (k,))
               for k, v in node.items()}
        if isinstance(node.get(fusion.name), Mapping) and "adapters" in node[fusion.name]:
            where = "/".join(path)
            stage1 = other.get(adapter.name) if isinstance(other, Mapping) else None
            if stage1 is None:
                raise KeyError(f"{where}: the stage-1 params have no adapter '{adapter.name}' "
                               f"here to fuse")
            missing = [s for s in fusion.sources if s not in stage1]
            if missing:
                raise KeyError(f"{where}/{adapter.name}: the stage-1 params have no adapter "
                               f"weights for source task(s) {missing}")
            target = dict(out[fusion.name])
            target["adapters"] = {s: stage1[s] for s in fusion.sources}
            out[fusion.name] = target
            copied[0] += 1
        return out

    result = walk(params, stage1_params, ())
    if not copied[0]:
        raise KeyError(f"params hold no fusion layer named {fusion.name!r}")
    return result


METHODS = {"fusion": Fusion}
