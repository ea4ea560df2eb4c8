"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), per task.

A targeted projection y = x W + b becomes y = x W + b + (alpha / r) (x A_t) B_t, with A_t [in, r]
and B_t [r, out] the LoRA factors of the example's task t. B starts at zero (the model is
unchanged at init); A starts as PEFT initialises it (Kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in))). The arithmetic is Hugging Face PEFT's `lora.Linear.forward`
(``result + lora_B(lora_A(dropout(x))) * scaling``) with kernels stored [in, out]:
A = lora_A.weight.T, B = lora_B.weight.T (tests/test_peft_lora.py checks it against PEFT).

Parameters: ``{projection}/{name}/{task}/{A, B}``, e.g. ``layer_0/attention/query/lora/sst2/A``.

Single-task deployment folds a task's factors into the base weights exactly:

    merged = merge_lora(params, ext, 'sst2')           # kernels + (alpha/r) A B, no LoRA left
    cfg_deploy = without_extension(cfg, ext.name)      # the plain backbone runs `merged`
                                                       # (refused if another extension changes
                                                       # a LoRA projection's output first)
    params_again = unmerge_lora(merged, lora_params(params, ext), ext, 'sst2')

LoRA dropout is not implemented (the extension hooks run without the dropout flag): PEFT's
lora_dropout must be 0 for parity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.base import (TaskExtension, check_patterns, check_positive, matches_any,
                            stacked_task_params, uniform)


def lora_delta(x, a, b, scale: float, group, impl: str = R.DEFAULT_IMPL):
    """(alpha/r) (x A[group]) B[group]: x [B, ..., in], a [G, in, r], b [G, r, out] -> [B, ..., out].

    The plain function the hypernetworks call with generated factors.
    """
    return scale * R.routed_matmul(R.routed_matmul(x, a, group, impl), b, group, impl)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(TaskExtension):
    """rank r, alpha (scaling alpha / r, or alpha / sqrt(r) with use_rslora as in PEFT),
    targets: projection-site patterns (default: the query and value of every attention, as in
    the paper and PEFT's BERT and T5 defaults: an encoder-decoder's cross-attention too; until
    the sixteenth session self-attention only)."""
    name: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    targets: Tuple[str, ...] = ("query", "value")
    use_rslora: bool = False

    method = "lora"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self.rank, "lora.rank")
        check_positive(self.alpha, "lora.alpha", integer=False)
        object.__setattr__(self, "targets", check_patterns(self.targets, "projection", "lora.targets"))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def targets_site(self, site: Site) -> bool:
        return matches_any(site, self.targets)

    def projection(self, site: Site):
        if self.targets_site(site):
            return LoRAProjection(self, site, name=self.name)
        return None

    def target_map(self):
        return {"lora.targets": ("projection", self.targets)}


class LoRAProjection(nn.Module):
    ext: LoRA
    site: Site

    @nn.compact
    def __call__(self, x, y, routing):
        ext = self.ext
        d_in, d_out = x.shape[-1], y.shape[-1]
        w = stacked_task_params(ext, [
            (("A",), (d_in, ext.rank), uniform(1.0 / math.sqrt(d_in))),
            (("B",), (ext.rank, d_out), nn.initializers.zeros),
        ])
        group, member = ext.route(routing, x.shape[0], self.site)
        delta = lora_delta(x, w["A"], w["B"], ext.scale, group, ext.impl).astype(y.dtype)
        if not ext.all_active:
            delta = R.keep_members(member, delta, jnp.zeros_like(delta))
        return y + delta


# --------------------------------------------------------------------------- merge / unmerge

def _walk(tree, path=()):
    """Yields (path, node) for every dict node of a params tree."""
    if isinstance(tree, Mapping):
        yield path, tree
        for k, v in tree.items():
            yield from _walk(v, path + (k,))


def lora_params(params, ext: LoRA) -> Dict[Tuple[str, ...], Any]:
    """{path of the projection: its LoRA subtree ({task: {A, B}})} found in `params`."""
    found = {path: node[ext.name] for path, node in _walk(params)
             if ext.name in node and "kernel" in node and isinstance(node[ext.name], Mapping)}
    if not found:
        raise KeyError(f"params hold no LoRA parameters named {ext.name!r} (expected "
                       f"'.../<projection>/{ext.name}/<task>/A')")
    return found


def _factor_product(sub, ext: LoRA, task: str, path):
    if task not in sub:
        raise KeyError(f"{'/'.join(path)}/{ext.name} has no weights for task {task!r}; it has "
                       f"{sorted(sub)}")
    a = jnp.asarray(sub[task]["A"], jnp.float32)
    b = jnp.asarray(sub[task]["B"], jnp.float32)
    return ext.scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _rebuild(tree, path, fn):
    """A copy of `tree` whose node at `path` is replaced by fn(node)."""
    if not path:
        return fn(tree)
    out = dict(tree)
    out[path[0]] = _rebuild(tree[path[0]], path[1:], fn)
    return out


def check_mergeable(backbone_config, ext: LoRA) -> None:
    """Raises ValueError when folding `ext` into the kernels would not be exact: an extension
    before it in `backbone_config.extensions` changes the output of a projection it targets
    (output hooks run in config order: with (IA)^3 first, the model computes
    (x W + b) * l + s x A B, and the merged kernel would give (x (W + s A B) + b) * l).
    Input-side hooks (e.g. (IA)^3 on ffn.output's input) scale x for both terms alike."""
    from mtlx.peft.registry import discover_sites
    exts = list(backbone_config.extensions)
    names = [e.name for e in exts]
    if ext.name not in names:
        raise KeyError(f"lora '{ext.name}' is not an extension of this config; it has {names}")
    earlier = exts[: names.index(ext.name)]
    for site in discover_sites(backbone_config).get("projection", ()):
        if not ext.targets_site(site):
            continue
        for other in earlier:
            if other.projection(site) is not None:
                raise ValueError(
                    f"lora '{ext.name}' cannot be merged exactly: '{other.name}' changes the "
                    f"output of {site} before LoRA adds to it; list '{ext.name}' before "
                    f"'{other.name}' in the config, or keep LoRA unmerged")


def merge_lora(params, ext: LoRA, task: str, backbone_config=None):
    """`params` with `task`'s LoRA folded into each targeted kernel and every LoRA subtree
    named `ext.name` removed: run it with the backbone config minus this extension
    (`registry.without_extension`, which checks the fold is exact). With `backbone_config`,
    that check (`check_mergeable`) runs here too."""
    if backbone_config is not None:
        check_mergeable(backbone_config, ext)
    if task not in ext.active:
        raise KeyError(f"lora '{ext.name}': task {task!r} has no LoRA weights; tasks with "
                       f"weights: {list(ext.active)}")
    out = params
    for path, sub in lora_params(params, ext).items():
        delta = _factor_product(sub, ext, task, path)

        def merge(node, delta=delta):
            node = {k: v for k, v in node.items() if k != ext.name}
            node["kernel"] = (jnp.asarray(node["kernel"], jnp.float32) + delta).astype(
                jnp.asarray(node["kernel"]).dtype)
            return node

        out = _rebuild(out, path, merge)
    return out


def unmerge_lora(merged, lora: Mapping[Tuple[str, ...], Any], ext: LoRA, task: str):
    """Inverse of `merge_lora`: subtracts `task`'s product from each kernel and puts the LoRA
    subtrees (`lora_params(original, ext)`) back. Exact up to float rounding."""
    out = merged
    for path, sub in lora.items():
        delta = _factor_product(sub, ext, task, path)

        def unmerge(node, delta=delta, sub=sub, path=path):
            if "kernel" not in node:
                raise KeyError(f"{'/'.join(path)} has no kernel to unmerge from")
            node = dict(node)
            node["kernel"] = (jnp.asarray(node["kernel"], jnp.float32) - delta).astype(
                jnp.asarray(node["kernel"]).dtype)
            node[ext.name] = sub
            return node

        out = _rebuild(out, path, unmerge)
    return out


METHODS = {"lora": LoRA}
