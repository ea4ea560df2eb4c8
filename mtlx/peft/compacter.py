"""Compacter (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers"), per task.

A bottleneck adapter (mtlx.peft.adapters) whose down- and up-projections are parameterised
hypercomplex multiplication (PHM) layers (Zhang et al. 2021):

    W = sum_{i=1..n} A_i (x) B_i,    A_i [n, n] "rules",  B_i = s_i t_i  [k/n, d/n], rank r

with (x) the Kronecker product. As in the paper, the rules A_i are shared by every Compacter
layer of the model (one set per task, `shared_rules=True`: they are created once per forward
pass by the extension's generator(), which MultiTaskModel runs, and reach the layers as
``routing.generated[name]``); the low-rank factors s_i, t_i are per layer. With
shared_rules=False every layer owns its rules (PHM-Adapter).

Init (our choice, the paper does not fix it): rules N(0, 1), down factors N(0, 0.07^2) (down
kernel entries of std ~0.01 for n=4, r=1), up factor t zero, so the adapter is the identity at
init. Parameters: ``{sublayer}/{name}/{task}/{down,up}/{s,t,bias}``, rules at
``generators_{name}/{task}/rules`` (shared) or ``{sublayer}/{name}/{task}/rules``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.adapters import bottleneck_delta, bottleneck_size, check_adapter_fields
from mtlx.peft.base import (TaskExtension, check_patterns, check_positive, matches_any,
                            stacked_task_params)

FACTOR_STD = 0.07


def phm_kernel(rules, s, t):
    """sum_i kron(rules_i, s_i t_i) per task: rules [G, n, n, n], s [G, n, p, r],
    t [G, n, r, q] -> [G, n p, n q]."""
    g, n = rules.shape[0], rules.shape[1]
    b = jnp.einsum("gkpr,gkrq->gkpq", s, t)
    w = jnp.einsum("gkab,gkpq->gapbq", rules, b)
    return w.reshape(g, n * s.shape[2], n * t.shape[3])


def compacter_weights(rules, params):
    """Adapter weights ({'down': {'kernel', 'bias'}, 'up': ...}) from PHM parameters."""
    out = {}
    for proj in ("down", "up"):
        p = params[proj]
        out[proj] = {"kernel": phm_kernel(rules, p["s"], p["t"]), "bias": p["bias"]}
    if "norm" in params:
        out["norm"] = params["norm"]
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compacter(TaskExtension):
    """sites: sublayer patterns (default after attention and FFN; ('ffn',) is Compacter++);
    reduction_factor; phm_dim n (must divide the hidden size and the bottleneck);
    phm_rank r of the factors; shared_rules; activation; layer_norm as in adapters."""
    name: str = "compacter"
    sites: Tuple[str, ...] = ("attention", "ffn")
    reduction_factor: float = 32
    phm_dim: int = 4
    phm_rank: int = 1
    shared_rules: bool = True
    activation: str = "gelu"
    layer_norm: str = "none"
    layer_norm_eps: float = 1e-5

    method = "compacter"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "sites", check_patterns(self.sites, "sublayer", "compacter.sites"))
        check_adapter_fields("compacter", self.reduction_factor, self.activation, self.layer_norm, 1.0)
        check_positive(self.phm_dim, "compacter.phm_dim")
        check_positive(self.phm_rank, "compacter.phm_rank")

    def sublayer(self, site: Site):
        if matches_any(site, self.sites):
            return CompacterSublayer(self, site, name=self.name)
        return None

    def generator(self) -> Optional[nn.Module]:
        return CompacterRules(self) if self.shared_rules else None

    def target_map(self):
        return {"compacter.sites": ("sublayer", self.sites)}

    def trainable_patterns(self):
        return (f"(^|/){self.name}/", f"(^|/)generators_{self.name}/")

    def rule_specs(self):
        n = self.phm_dim
        return [(("rules",), (n, n, n), nn.initializers.normal(1.0))]


class CompacterRules(nn.Module):
    """The shared rules [G, n, n, n] of every task, created once per forward pass."""
    ext: Compacter

    @nn.compact
    def __call__(self):
        return stacked_task_params(self.ext, self.ext.rule_specs())["rules"]


class CompacterSublayer(nn.Module):
    ext: Compacter
    site: Site

    @nn.compact
    def __call__(self, sub_in, sub_out, routing):
        ext = self.ext
        n, r = ext.phm_dim, ext.phm_rank
        d = sub_out.shape[-1]
        m = bottleneck_size(d, ext.reduction_factor, "compacter.reduction_factor")
        if d % n or m % n:
            raise ValueError(f"compacter.phm_dim={n} must divide the hidden size ({d}) and the "
                             f"bottleneck ({m} = {d} / reduction_factor {ext.reduction_factor})")
        f = nn.initializers.normal(FACTOR_STD)
        specs = [(("down", "s"), (n, d // n, r), f), (("down", "t"), (n, r, m // n), f),
                 (("down", "bias"), (m,), nn.initializers.zeros),
                 (("up", "s"), (n, m // n, r), f), (("up", "t"), (n, r, d // n), nn.initializers.zeros),
                 (("up", "bias"), (d,), nn.initializers.zeros)]
        if ext.layer_norm != "none":
            specs += [(("norm", "scale"), (d,), nn.initializers.ones),
                      (("norm", "bias"), (d,), nn.initializers.zeros)]
        if not ext.shared_rules:
            specs += ext.rule_specs()
        params = stacked_task_params(ext, specs)
        if ext.shared_rules:
            generated = None if routing is None or routing.generated is None else routing.generated.get(ext.name)
            if generated is None:
                raise ValueError(
                    f"compacter '{ext.name}' at {self.site}: the shared PHM rules come from the "
                    f"extension's generator(), which MultiTaskModel runs once per forward pass; "
                    f"run the backbone inside MultiTaskModel, pass routing.generated="
                    f"{{'{ext.name}': rules [G, n, n, n]}}, or set compacter.shared_rules=False")
            rules = generated
        else:
            rules = params["rules"]
        w = compacter_weights(rules, params)
        group, member = ext.route(routing, sub_out.shape[0], self.site)
        delta = bottleneck_delta(sub_out, w, group, activation=ext.activation,
                                 layer_norm=ext.layer_norm, eps=ext.layer_norm_eps,
                                 impl=ext.impl).astype(sub_out.dtype)
        out = sub_out + delta
        if not ext.all_active:
            out = R.keep_members(member, out, sub_out)
        return out


METHODS = {"compacter": Compacter}
