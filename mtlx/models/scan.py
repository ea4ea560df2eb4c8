"""Scan over layers: running a stack's layers as one traced body, and what that body needs of
the extensions.

`scan_layers` runs the layers `names` of a module (their parameters ``name/...`` stay where
the unrolled model keeps them) as one `jax.lax.scan`: each forward pass stacks their
parameters into [n, ...] arrays and gives each layer its own dropout key, split from the
module's 'dropout' rng.

Under `jax.lax.scan` ONE layer body is traced (with the first scanned layer's sites) and run for
every layer, so each extension must attach identically at every scanned layer (same hooks, same
sites, equal modules up to the layer index) and declare ``layer_uniform = True``: its modules do
not use the layer index except through their own per-layer parameters (bottleneck adapters,
LoRA, (IA)^3, prefixes, ...). Hypernetwork methods index generated weights by ``site.layer`` and
layer-subset site patterns attach to some layers only: both are refused, naming the extension.
Used by BertConfig.scan_layers and T5Config.scan_layers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mtlx.models.layers import Site


def scan_layers(module, names: Sequence[str], h, apply_layer: Callable, deterministic: bool,
                missing_message: str):
    """h through the layers `names` of `module` as one jax.lax.scan; apply_layer(params, h,
    rngs) -> h runs ONE layer (a template module applied functionally). A layer without
    parameters is a KeyError: `missing_message` followed by the missing names."""
    params = module.variables.get("params", {})
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(missing_message.format(missing=missing[:4]))
    # A copy of every scanned layer's weights each step (stacked [n, ...]); XLA fuses it into
    # the scan's input but it is real memory traffic.
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    keys = None
    if not deterministic and module.has_rng("dropout"):
        keys = jax.random.split(module.make_rng("dropout"), len(names))

    def body(carry, xs):
        p, key = xs
        return apply_layer(p, carry, {} if key is None else {"dropout": key}), None

    h, _ = jax.lax.scan(body, h, (stacked, keys))
    return h


def check_uniform_extensions(extensions: Sequence, stack: str, layers: Sequence[int],
                             hooks: Sequence[tuple], what: str) -> None:
    """Raises ValueError unless every extension attaches the same way at each of `layers` of
    `stack` through `hooks` ((hook name, site names) pairs) and declares layer_uniform.
    `what` names the setting in the message (e.g. "BertConfig.scan_layers")."""
    if not extensions or len(layers) < 1:
        return
    # Hooks build (unbound) Flax modules; called inside a module's compact method they would
    # become its children. Flax's module context is thread-local, so a fresh thread calls
    # them as top-level, throw-away modules.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(_check, tuple(extensions), stack, tuple(layers), tuple(hooks), what).result()


def _check(extensions, stack, layers, hooks, what) -> None:
    first = layers[0]
    for ext in extensions:
        attaches = False
        for hook, names in hooks:
            fn = getattr(ext, hook, None)
            if fn is None:
                continue
            for name in names:
                per_layer = [_module_signature(fn(Site(stack, i, name)), i) for i in layers]
                attaches = attaches or any(sig is not None for sig in per_layer)
                for i, sig in zip(layers, per_layer):
                    if sig != per_layer[0]:
                        raise ValueError(
                            f"{what}=True needs every extension to attach identically at every "
                            f"layer, but {type(ext).__name__} '{ext.name}' ({hook} hook) gives "
                            f"{_describe(per_layer[0])} at {Site(stack, first, name)} and "
                            f"{_describe(sig)} at {Site(stack, i, name)}; set {what}=False (or "
                            f"attach it to every layer)")
        if attaches and not getattr(ext, "layer_uniform", False):
            raise ValueError(
                f"{what}=True cannot run extension {type(ext).__name__} '{ext.name}': it does not "
                f"declare layer_uniform=True (its modules may depend on the layer index, e.g. "
                f"hypernetwork weights generated per layer, which one scanned layer body cannot "
                f"do); set {what}=False")


def _module_signature(module, layer: int):
    """What a hook returned, comparable across layers: None, or (class, name, fields) with the
    layer index of any Site field replaced by -1."""
    if module is None:
        return None
    fields = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if isinstance(value, Site):
            if value.layer != layer:
                return ("site-layer-mismatch", f.name, value)
            value = dataclasses.replace(value, layer=-1)
        fields[f.name] = value
    return (type(module), module.name, tuple(sorted(fields.items(), key=lambda kv: kv[0])))


def _describe(signature) -> str:
    if signature is None:
        return "nothing"
    if signature[0] == "site-layer-mismatch":
        return f"a module whose {signature[1]} is {signature[2]}"
    return f"{signature[0].__name__} '{signature[1]}'"
