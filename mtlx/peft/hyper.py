"""Hypernetworks that generate task-specific adapter and LoRA weights, for mixed-task batches.

References:
  Karimi Mahabadi, Ruder, Dehghani, Henderson 2021, "Parameter-efficient Multi-task Fine-tuning
  for Transformers via Shared Hypernetworks" (ACL 2021), HyperFormer and HyperFormer++; the
  released code (github.com/rabeehk/hyperformer, hyperformer/adapters/adapter_modeling.py,
  adapter_controller.py, adapter_utils.py; configs/hyperformer++.json).
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (W + (alpha/r) B A).

Three extensions (mtlx.models.layers.Extension), each keyed by a task tuple that must equal the
multi-task model's task order (`check_tasks`):

  HyperFormerPP  ONE generator per stack (encoder, decoder). Its input for (task, layer, block)
                 is concat(task embedding 64, layer-id embedding 64, block-type embedding 64
                 [attention | ffn]) -> MLP 192->128->64 (ReLU) -> LayerNorm -> linear generators
                 of the adapter's down/up kernels and biases and its LayerNorm gamma/beta.
  HyperFormer    one hypernetwork per (stack, layer): the projected task embedding (task
                 embedding 64 -> MLP 64->128->64 -> LayerNorm, the paper's task projector h_I)
                 -> that layer's linear generators, one set per block (attention, ffn).
  HyperLoRA      LoRA factors A [in, r], B [r, out] of the targeted projections, generated per
                 stack from concat(task embedding, layer-id embedding) -> MLP -> LayerNorm ->
                 one linear generator per target; B's generator starts at zero, so the model
                 starts as the backbone (as LoRA initialises B = 0).

The adapter (HyperFormer's MetaLayersAdapterController with add_layer_norm_after_adapter=True,
add_layer_norm_before_adapter=False) sits on every self-attention and FFN sublayer output (not
cross-attention), before the sublayer's residual add:

    out = y + LayerNorm_{gamma_t, beta_t}(up_t(act(down_t(y)))),   adapter dim m = d_model / r

How a step runs: `MultiTaskModel` calls each extension's `generator()` ONCE per forward pass;
it returns every task's weights for every (layer, block) as stacked arrays (leading axes
[layer, task]) and they reach the hooks as ``routing.generated[ext.name]``. Each hook takes its
layer's slice and gathers each example's task row (``routing.task_ids``), so one batch can mix
tasks and the compiled step does not depend on the mix (the released code generated weights for
one task per batch).

Parameters live under ``params['generators_<ext.name>']`` (the name MultiTaskModel gives the
generator); task embeddings under ``.../task_embeddings/<task>/embedding``, so adding a task
adds one embedding and leaves every other parameter, and every other task's generated weights,
unchanged. Initialisation follows the released code: generator and MLP weights N(0, 0.01),
biases 0, embeddings N(0, 1), hypernetwork LayerNorm eps 1e-6, adapter LayerNorm eps 1e-5
(torch.nn.functional.layer_norm's default), activation gelu_new (configs/hyperformer++.json).

    cfg = with_extension(t5_cfg, hyperformer_pp(t5_cfg, tasks))
    model = MultiTaskModel(cfg, tasks)
    mask = trainable_mask(params, trainable_patterns(cfg))   # hypernets, layer norms, heads
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlx.models.layers import PROJECTION_SITES, Extension, Routing, Site

BLOCKS = ("attention", "ffn")          # sublayers that carry adapters (never cross_attention)
ADAPTER_KEYS = ("down_kernel", "down_bias", "up_kernel", "up_bias", "ln_scale", "ln_bias")
GENERATOR_PREFIX = "generators_"       # MultiTaskModel's parameter key for ext.generator()
HYPER_KINDS = ("hyperformer", "hyperformer++", "hyper_lora")

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),   # HF gelu_new (the paper's config)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
}


# ---------------------------------------------------------------------------------------------
# Plain math: applying adapter / LoRA weights given per example
# ---------------------------------------------------------------------------------------------

def _per_row(v, ndim: int):
    """[B, k] -> [B, 1, ..., 1, k] broadcastable against an activation of rank `ndim`."""
    return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def adapter_forward(x, weights: Mapping[str, Any], activation: str = "gelu_new",
                    eps: float = 1e-5):
    """HyperFormer's adapter with per-example weights: x + LN_{scale,bias}(up(act(down(x)))).

    x [B, ..., d]; weights (leading axis B, one row per example): down_kernel [B, d, m],
    down_bias [B, m], up_kernel [B, m, d], up_bias [B, d], ln_scale [B, d], ln_bias [B, d].
    Matmuls in x's dtype, the LayerNorm (mean and two-pass variance, as torch) in float32.
    Equals hyperformer's MetaLayersAdapterController.forward (add_layer_norm_after_adapter).
    """
    dtype, n = x.dtype, x.ndim
    w = {k: weights[k] for k in ADAPTER_KEYS}
    h = jnp.einsum("b...d,bdm->b...m", x, w["down_kernel"].astype(dtype))
    h = ACTIVATIONS[activation](h + _per_row(w["down_bias"], n).astype(dtype))
    u = jnp.einsum("b...m,bmd->b...d", h, w["up_kernel"].astype(dtype))
    u = (u + _per_row(w["up_bias"], n).astype(dtype)).astype(jnp.float32)
    mean = jnp.mean(u, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(u - mean), axis=-1, keepdims=True)
    normed = (u - mean) * jax.lax.rsqrt(var + eps)
    normed = normed * _per_row(w["ln_scale"], n) + _per_row(w["ln_bias"], n)
    return (x.astype(jnp.float32) + normed).astype(dtype)


def lora_forward(x, y, a, b, scale: float):
    """y + scale * (x A) B with per-example factors a [B, in, r], b [B, r, out]; x [B, ..., in]."""
    dtype = y.dtype
    h = jnp.einsum("b...i,bir->b...r", x.astype(dtype), a.astype(dtype))
    return y + scale * jnp.einsum("b...r,bro->b...o", h, b.astype(dtype))


def take_rows(tree, task_ids):
    """Each example's task row of every [T, ...] leaf -> [B, ...]. Padding rows (task id -1)
    take task 0's weights; their outputs are masked out of every loss and metric."""
    def take(v):
        ids = jnp.clip(jnp.asarray(task_ids, jnp.int32), 0, v.shape[0] - 1)
        return jnp.take(v, ids, axis=0)
    return jax.tree_util.tree_map(take, tree)


# ---------------------------------------------------------------------------------------------
# Generator building blocks (Flax)
# ---------------------------------------------------------------------------------------------

class _TaskEmbedding(nn.Module):
    dim: int

    @nn.compact
    def __call__(self):
        # torch.randn in hyperformer's TaskEmbeddingController.
        return self.param("embedding", nn.initializers.normal(1.0), (self.dim,), jnp.float32)


class TaskEmbeddings(nn.Module):
    """[T, dim] task embeddings, one parameter per task NAME (``<task>/embedding``)."""
    tasks: Tuple[str, ...]
    dim: int

    @nn.compact
    def __call__(self):
        return jnp.stack([_TaskEmbedding(self.dim, name=t)() for t in self.tasks])


def _dense(features: int, std: float, name: str) -> nn.Dense:
    # hyperformer's linear_layer: weight N(0, std), bias 0.
    return nn.Dense(features, kernel_init=nn.initializers.normal(std),
                    bias_init=nn.initializers.zeros, name=name)


class ConditioningMLP(nn.Module):
    """Linear(hidden) -> ReLU -> Linear(out) -> LayerNorm: hyperformer's TaskHyperNet followed
    by its `unique_hyper_net_layer_norm`."""
    hidden: int
    out: int
    std: float
    eps: float

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(_dense(self.hidden, self.std, "hidden")(x))
        x = _dense(self.out, self.std, "output")(x)
        return nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name="layer_norm")(x)


def adapter_shapes(d: int, m: int) -> Dict[str, Tuple[int, ...]]:
    return {"down_kernel": (d, m), "down_bias": (m,), "up_kernel": (m, d), "up_bias": (d,),
            "ln_scale": (d,), "ln_bias": (d,)}


class AdapterGenerator(nn.Module):
    """Linear generators: conditioning [..., p] -> every adapter weight [..., *shape].

    hyperformer's AdapterLayersHyperNet (weight and bias generators of the down and up
    samplers) and LayerNormHyperNet (gamma and beta generators)."""
    d: int
    m: int
    std: float

    @nn.compact
    def __call__(self, c):
        out = {}
        for key, shape in adapter_shapes(self.d, self.m).items():
            flat = _dense(math.prod(shape), self.std, key)(c)
            out[key] = flat.reshape(c.shape[:-1] + shape)
        return out


class HyperFormerPPGenerator(nn.Module):
    """HyperFormer++: one generator per stack over (block, layer, task) -> {stack: {block:
    {key: [L, T, ...]}}}. Parameters: task_embeddings/<task>/embedding; <stack>/
    {layer_embeddings [L, 64], block_embeddings [2, 64], mlp/..., generators/<key>/...}."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        tasks = TaskEmbeddings(e.tasks, e.task_embedding_dim, name="task_embeddings")()
        return {stack: _PPStack(e, n, name=stack)(tasks) for stack, n in e.stacks}


class _PPStack(nn.Module):
    ext: Any
    num_layers: int

    @nn.compact
    def __call__(self, tasks):
        e, L, T = self.ext, self.num_layers, tasks.shape[0]
        layers = self.param("layer_embeddings", nn.initializers.normal(1.0),
                            (L, e.layer_embedding_dim), jnp.float32)
        blocks = self.param("block_embeddings", nn.initializers.normal(1.0),
                            (len(BLOCKS), e.block_embedding_dim), jnp.float32)
        grid = (len(BLOCKS), L, T)
        # concat(task, layer, block), the order of AdapterLayersOneHyperNetController.
        cond = jnp.concatenate([
            jnp.broadcast_to(tasks[None, None], grid + tasks.shape[-1:]),
            jnp.broadcast_to(layers[None, :, None], grid + layers.shape[-1:]),
            jnp.broadcast_to(blocks[:, None, None], grid + blocks.shape[-1:])], axis=-1)
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps, name="mlp")(cond)
        weights = AdapterGenerator(e.d_model, e.adapter_dim, e.init_std, name="generators")(c)
        return {block: {k: v[i] for k, v in weights.items()} for i, block in enumerate(BLOCKS)}


class HyperFormerGenerator(nn.Module):
    """HyperFormer: a hypernetwork per (stack, layer) maps the projected task embedding to that
    layer's attention and FFN adapters -> {stack: {block: {key: [L, T, ...]}}}. Parameters:
    task_embeddings/<task>/embedding; task_projector/...; <stack>/layer_<i>/<block>/<key>/..."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        z = TaskEmbeddings(e.tasks, e.task_embedding_dim, name="task_embeddings")()
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps,
                            name="task_projector")(z)
        return {stack: _LayerHyperNets(e, n, name=stack)(c) for stack, n in e.stacks}


class _LayerHyperNets(nn.Module):
    ext: Any
    num_layers: int

    @nn.compact
    def __call__(self, c):
        e = self.ext
        per_layer = [_LayerHyperNet(e, name=f"layer_{i}")(c) for i in range(self.num_layers)]
        return {block: {k: jnp.stack([w[block][k] for w in per_layer]) for k in ADAPTER_KEYS}
                for block in BLOCKS}


class _LayerHyperNet(nn.Module):
    ext: Any

    @nn.compact
    def __call__(self, c):
        e = self.ext
        return {block: AdapterGenerator(e.d_model, e.adapter_dim, e.init_std, name=block)(c)
                for block in BLOCKS}


class HyperLoRAGenerator(nn.Module):
    """LoRA factors for every (stack, layer, target): {stack: {target: {'a': [L, T, in, r],
    'b': [L, T, r, out]}}}. Parameters: task_embeddings/<task>/embedding; <stack>/
    {layer_embeddings, mlp/..., <target>/{a,b}/{kernel,bias}}."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        tasks = TaskEmbeddings(e.tasks, e.task_embedding_dim, name="task_embeddings")()
        return {stack: _LoRAStack(e, stack, n, name=stack)(tasks) for stack, n in e.stacks}


class _LoRAStack(nn.Module):
    ext: Any
    stack: str
    num_layers: int

    @nn.compact
    def __call__(self, tasks):
        e, L, T = self.ext, self.num_layers, tasks.shape[0]
        layers = self.param("layer_embeddings", nn.initializers.normal(1.0),
                            (L, e.layer_embedding_dim), jnp.float32)
        cond = jnp.concatenate([jnp.broadcast_to(tasks[None], (L,) + tasks.shape),
                                jnp.broadcast_to(layers[:, None], (L, T, layers.shape[-1]))], -1)
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps, name="mlp")(cond)
        return {target: _LoRAFactors(d_in, d_out, e.rank, e.projected_dim, name=target)(c)
                for target, d_in, d_out in e.targets_of(self.stack)}


class _LoRAFactors(nn.Module):
    """Linear generators of one target's factors: c [L, T, p] -> a [L, T, in, r], b [L, T, r, out]."""
    d_in: int
    d_out: int
    rank: int
    p: int

    @nn.compact
    def __call__(self, c):
        lead, r = c.shape[:-1], self.rank
        # A spreads like LoRA's kaiming-uniform init (std 1/sqrt(3 in)) given the unit-variance
        # LayerNorm output; B's generator starts at zero so B = 0 and the model starts as the
        # backbone, as in LoRA.
        a_std = 1.0 / math.sqrt(3.0 * self.d_in * self.p)
        a = nn.Dense(self.d_in * r, kernel_init=nn.initializers.normal(a_std), name="a")(c)
        b = nn.Dense(r * self.d_out, kernel_init=nn.initializers.zeros, name="b")(c)
        return {"a": a.reshape(lead + (self.d_in, r)), "b": b.reshape(lead + (r, self.d_out))}


# ---------------------------------------------------------------------------------------------
# Hooks: take a layer's slice of the generated weights, gather each example's task row
# ---------------------------------------------------------------------------------------------

def _generated(routing: Optional[Routing], ext_name: str, site: str, stack: str, key: str):
    gen = None if routing is None or routing.generated is None else routing.generated.get(ext_name)
    if gen is None:
        raise ValueError(
            f"mtlx/peft/hyper.py: extension {ext_name!r} at {site} found no generated weights in "
            f"routing.generated[{ext_name!r}]; run the backbone through MultiTaskModel (which "
            f"calls ext.generator() once per forward) or pass Routing(generated=generate(params, "
            f"backbone_config)) yourself")
    if stack not in gen or key not in gen[stack]:
        raise ValueError(f"mtlx/peft/hyper.py: extension {ext_name!r} generated no weights for "
                         f"{site} (has stacks {sorted(gen)}); the extension was built for a "
                         f"different backbone configuration")
    return gen[stack][key]


def _layer_slice(tree, layer: int, ext_name: str, site: str):
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    if layer >= n:
        raise ValueError(f"mtlx/peft/hyper.py: extension {ext_name!r} generated weights for {n} "
                         f"layers but {site} is layer {layer}; build the extension from the "
                         f"backbone config it runs in")
    return jax.tree_util.tree_map(lambda v: v[layer], tree)


class GeneratedAdapter(nn.Module):
    """Sublayer hook: sub_out + LN(up(act(down(sub_out)))) with each example's task weights."""
    ext_name: str
    site: Site
    activation: str
    eps: float

    def __call__(self, sub_in, sub_out, routing):
        s = self.site
        w = _generated(routing, self.ext_name, str(s), s.stack, s.name)
        w = take_rows(_layer_slice(w, s.layer, self.ext_name, str(s)), routing.task_ids)
        return adapter_forward(sub_out, w, self.activation, self.eps)


class GeneratedLoRA(nn.Module):
    """Projection hook: y + (alpha/r) (x A_t) B_t with each example's task factors."""
    ext_name: str
    site: Site
    scale: float

    def __call__(self, x, y, routing):
        s = self.site
        w = _generated(routing, self.ext_name, str(s), s.stack, s.name)
        w = take_rows(_layer_slice(w, s.layer, self.ext_name, str(s)), routing.task_ids)
        return lora_forward(x, y, w["a"], w["b"], self.scale)


# ---------------------------------------------------------------------------------------------
# Extensions
# ---------------------------------------------------------------------------------------------

def _check_common(ext, kind: str) -> None:
    tasks = tuple(ext.tasks)
    object.__setattr__(ext, "tasks", tasks)
    object.__setattr__(ext, "stacks", tuple((str(s), int(n)) for s, n in ext.stacks))
    where = f"mtlx/peft/hyper.py {kind}"
    if not tasks:
        raise ValueError(f"{where}: tasks is empty; give the multi-task model's task names")
    bad = [t for t in tasks if not isinstance(t, str) or not t or "/" in t]
    if bad:
        raise ValueError(f"{where}: task names must be non-empty strings without '/', got {bad}")
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise ValueError(f"{where}: task names must be unique; repeated: {dupes}")
    for stack, n in ext.stacks:
        if stack not in ("encoder", "decoder") or n < 1:
            raise ValueError(f"{where}: stacks must be (('encoder'|'decoder', num_layers >= 1), "
                             f"...), got {ext.stacks}")
    for key in ("task_embedding_dim", "hidden_dim", "projected_dim"):
        if getattr(ext, key) < 1:
            raise ValueError(f"{where}: {key} must be >= 1, got {getattr(ext, key)}")


@dataclasses.dataclass(frozen=True)
class _HyperAdapterBase(Extension):
    tasks: Tuple[str, ...]
    d_model: int
    stacks: Tuple[Tuple[str, int], ...]      # e.g. (('encoder', 12), ('decoder', 12))
    reduction_factor: int = 32               # adapter dim = d_model / reduction_factor
    task_embedding_dim: int = 64
    hidden_dim: int = 128
    projected_dim: int = 64
    activation: str = "gelu_new"
    adapter_eps: float = 1e-5                # the adapter's task-conditional LayerNorm
    hyper_eps: float = 1e-6                  # the LayerNorm after the conditioning MLP
    init_std: float = 1e-2

    def __post_init__(self):
        kind = type(self).__name__
        _check_common(self, kind)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"mtlx/peft/hyper.py {kind}: activation {self.activation!r} is not "
                             f"supported; supported: {sorted(ACTIVATIONS)}")
        if self.reduction_factor < 1 or self.d_model % self.reduction_factor:
            raise ValueError(f"mtlx/peft/hyper.py {kind}: reduction_factor ({self.reduction_factor})"
                             f" must divide d_model ({self.d_model}): adapter dim = d_model / r")

    @property
    def adapter_dim(self) -> int:
        return self.d_model // self.reduction_factor

    def sublayer(self, site: Site):
        if site.name in BLOCKS and site.stack in dict(self.stacks):
            return GeneratedAdapter(self.name, site, self.activation, self.adapter_eps)
        return None


@dataclasses.dataclass(frozen=True)
class HyperFormerPP(_HyperAdapterBase):
    """HyperFormer++ (Karimi Mahabadi et al. 2021, Sec. 2.4): one shared generator per stack."""
    layer_embedding_dim: int = 64
    block_embedding_dim: int = 64
    name: str = "hyperformer_pp"

    def generator(self):
        return HyperFormerPPGenerator(self)


@dataclasses.dataclass(frozen=True)
class HyperFormer(_HyperAdapterBase):
    """HyperFormer (Karimi Mahabadi et al. 2021, Sec. 2.2-2.3): a hypernetwork per layer."""
    name: str = "hyperformer"

    def generator(self):
        return HyperFormerGenerator(self)


@dataclasses.dataclass(frozen=True)
class HyperLoRA(Extension):
    """LoRA (Hu et al. 2021) whose factors a hypernetwork generates per task and layer."""
    tasks: Tuple[str, ...]
    stacks: Tuple[Tuple[str, int], ...]
    targets: Tuple[Tuple[str, int, int], ...]   # (projection site name, in, out)
    rank: int = 8
    alpha: float = 16.0
    task_embedding_dim: int = 64
    layer_embedding_dim: int = 64
    hidden_dim: int = 128
    projected_dim: int = 64
    hyper_eps: float = 1e-6
    init_std: float = 1e-2
    name: str = "hyper_lora"

    def __post_init__(self):
        _check_common(self, "HyperLoRA")
        object.__setattr__(self, "targets", tuple((str(t), int(i), int(o)) for t, i, o in self.targets))
        names = [t for t, _, _ in self.targets]
        unknown = [t for t in names if t not in PROJECTION_SITES]
        if unknown or not names:
            raise ValueError(f"mtlx/peft/hyper.py HyperLoRA: targets {unknown or names} are not "
                             f"projection sites; known: {list(PROJECTION_SITES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"mtlx/peft/hyper.py HyperLoRA: targets repeated: {names}")
        if self.rank < 1:
            raise ValueError(f"mtlx/peft/hyper.py HyperLoRA: rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_of(self, stack: str):
        """Targets that exist in `stack` (cross-attention only in the decoder)."""
        return tuple(t for t in self.targets
                     if stack == "decoder" or not t[0].startswith("cross_attention."))

    def projection(self, site: Site):
        if site.stack in dict(self.stacks) and site.name in {t for t, _, _ in self.targets_of(site.stack)}:
            return GeneratedLoRA(self.name, site, self.scale)
        return None

    def generator(self):
        return HyperLoRAGenerator(self)


# ---------------------------------------------------------------------------------------------
# Building from a backbone config; trainable patterns; inference helper
# ---------------------------------------------------------------------------------------------

def _task_names(tasks) -> Tuple[str, ...]:
    return tuple(getattr(t, "name", t) for t in tasks)


def _is_t5(cfg) -> bool:
    return type(cfg).__name__ == "T5Config"


def _stacks(cfg, tasks, decoder: Optional[bool]):
    if not _is_t5(cfg):
        if decoder:
            raise ValueError(f"mtlx/peft/hyper.py: decoder=True but {type(cfg).__name__} has no decoder")
        return (("encoder", cfg.num_layers),)
    if decoder is None:
        # TaskHeads tell whether the decoder runs (seq2seq tasks); plain names: assume it does.
        kinds = [getattr(t, "kind", None) for t in tasks]
        decoder = any(k in (None, "seq2seq") for k in kinds)
    stacks = (("encoder", cfg.num_layers),)
    return stacks + ((("decoder", cfg.num_decoder_layers),) if decoder else ())


def _d_model(cfg) -> int:
    return cfg.d_model if _is_t5(cfg) else cfg.hidden_size


def hyperformer_pp(backbone_config, tasks: Sequence, decoder: Optional[bool] = None,
                   **kw) -> HyperFormerPP:
    """HyperFormer++ sized for `backbone_config` (BertConfig or T5Config). `tasks`: TaskHeads or
    names, in the multi-task model's order. `decoder`: T5 only; None = when a task is seq2seq
    (or tasks are plain names). Other keywords: the HyperFormerPP fields."""
    return HyperFormerPP(tasks=_task_names(tasks), d_model=_d_model(backbone_config),
                         stacks=_stacks(backbone_config, tasks, decoder), **kw)


def hyperformer(backbone_config, tasks: Sequence, decoder: Optional[bool] = None,
                **kw) -> HyperFormer:
    """HyperFormer (a hypernetwork per layer) sized for `backbone_config`; see hyperformer_pp."""
    return HyperFormer(tasks=_task_names(tasks), d_model=_d_model(backbone_config),
                       stacks=_stacks(backbone_config, tasks, decoder), **kw)


def projection_shapes(cfg) -> Dict[str, Tuple[int, int]]:
    """(in, out) of every projection site the backbone has."""
    if _is_t5(cfg):
        d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
        attn = {"query": (d, inner), "key": (d, inner), "value": (d, inner), "output": (inner, d)}
        shapes = {f"{k}.{n}": s for k in ("attention", "cross_attention") for n, s in attn.items()}
        shapes.update({"ffn.input": (d, ff), "ffn.output": (ff, d)})
        if cfg.is_gated:
            shapes["ffn.gate"] = (d, ff)
        return shapes
    d, ff = cfg.hidden_size, cfg.intermediate_size
    shapes = {f"attention.{n}": (d, d) for n in ("query", "key", "value", "output")}
    shapes.update({"ffn.input": (d, ff), "ffn.output": (ff, d)})
    return shapes


def hyper_lora(backbone_config, tasks: Sequence,
               targets: Sequence[str] = ("attention.query", "attention.value"),
               decoder: Optional[bool] = None, **kw) -> HyperLoRA:
    """HyperLoRA sized for `backbone_config`. `targets`: projection site names (a target is
    applied in every layer of every stack that has it); other keywords: the HyperLoRA fields."""
    shapes = projection_shapes(backbone_config)
    missing = [t for t in targets if t not in shapes]
    if missing:
        raise ValueError(f"mtlx/peft/hyper.py hyper_lora: targets {missing} do not exist in "
                         f"{type(backbone_config).__name__}; it has {sorted(shapes)}")
    return HyperLoRA(tasks=_task_names(tasks), stacks=_stacks(backbone_config, tasks, decoder),
                     targets=tuple((t,) + shapes[t] for t in targets), **kw)


def with_extension(backbone_config, ext: Extension):
    """`backbone_config` with `ext` appended to its extensions (names must stay unique)."""
    names = [e.name for e in backbone_config.extensions]
    if ext.name in names:
        raise ValueError(f"mtlx/peft/hyper.py: the config already has an extension named "
                         f"{ext.name!r}; extensions: {names}")
    return dataclasses.replace(backbone_config, extensions=tuple(backbone_config.extensions) + (ext,))


def hyper_extensions(backbone_config):
    return tuple(e for e in backbone_config.extensions
                 if isinstance(e, (_HyperAdapterBase, HyperLoRA)))


def check_tasks(backbone_config, task_names: Sequence[str]) -> None:
    """Raises ValueError unless every hypernetwork extension was built for exactly these tasks
    in this order (generated rows are indexed by the model's task ids)."""
    names = _task_names(task_names)
    for e in hyper_extensions(backbone_config):
        if tuple(e.tasks) != names:
            raise ValueError(f"mtlx/peft/hyper.py: extension {e.name!r} was built for tasks "
                             f"{list(e.tasks)} but the model's tasks are {list(names)} (same "
                             f"names in the same order needed: task ids index generated rows)")


def trainable_patterns(backbone_config, heads: bool = True,
                       layer_norms: bool = True) -> Tuple[str, ...]:
    """Regexes for mtlx.train.optim.trainable_mask: every hypernetwork extension's generator
    (hypernetworks + task embeddings), the backbone's layer norms (HyperFormer's
    `unfreeze_layer_norms`; BERT scale+bias incl. the embedding norm, T5 RMS-norm scales incl.
    the final norms) and the task heads (pass heads=False for a model without any, e.g. a
    seq2seq-only T5)."""
    exts = hyper_extensions(backbone_config)
    if not exts:
        raise ValueError(f"mtlx/peft/hyper.py trainable_patterns: {type(backbone_config).__name__}"
                         f".extensions has no hypernetwork extension")
    pats = [f"^{re.escape(GENERATOR_PREFIX + e.name)}/" for e in exts]
    if layer_norms:
        pats.append(r"^backbone/(.*/)?(layer_norm|final_layer_norm)/")
    if heads:
        pats.append(r"^heads/")
    return tuple(pats)


def generate(params: Mapping[str, Any], backbone_config) -> Dict[str, Any]:
    """Every hypernetwork extension's generated weights from the multi-task model's `params`,
    for calling the backbone directly (e.g. T5 greedy_decode with
    ``Routing(task_ids=..., generated=generate(params, cfg))``)."""
    out = {}
    for e in backbone_config.extensions:
        gen = e.generator()
        if gen is None:
            continue
        key = GENERATOR_PREFIX + e.name
        if key not in params:
            raise KeyError(f"mtlx/peft/hyper.py generate: params have no {key!r} for extension "
                           f"{e.name!r}; top-level keys: {sorted(params)}")
        out[e.name] = gen.apply({"params": params[key]})
    return out
