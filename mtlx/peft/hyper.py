"""Hypernetworks that generate task-specific adapter and LoRA weights, for mixed-task batches.

References:
  Karimi Mahabadi, Ruder, Dehghani, Henderson 2021, "Parameter-efficient Multi-task Fine-tuning
  for Transformers via Shared Hypernetworks" (ACL 2021): HyperFormer and HyperFormer++; the
  released code (github.com/rabeehk/hyperformer: adapters/adapter_modeling.py,
  adapter_controller.py, adapter_utils.py, configs/hyperformer++.json).
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (W + (alpha/r) B A).

Three methods (registry names in `METHODS`), each a `TaskExtension` (mtlx.peft.base):

  'hyperformer++'  HyperFormerPP. ONE generator per stack (encoder, decoder). Its input for
                   (task, layer, block) is concat(task embedding 64, layer-id embedding 64,
                   block-type embedding 64 [attention | ffn]) -> MLP 192->128->64 (ReLU) ->
                   LayerNorm -> linear generators of the adapter's down/up kernels and biases
                   and of its task-conditional LayerNorm gamma/beta.
  'hyperformer'    HyperFormer. A hypernetwork per (stack, layer): the projected task embedding
                   (task embedding 64 -> MLP 64->128->64 -> LayerNorm, the paper's task
                   projector h_I) -> that layer's linear generators, one set per block.
  'hyper_lora'     HyperLoRA. LoRA factors A [in, r], B [r, out] of the targeted projections,
                   generated per stack from concat(task embedding, layer-id embedding) -> MLP ->
                   LayerNorm -> one linear generator per target and factor; B's generator
                   starts at zero, so the model starts as the backbone (LoRA's B = 0).

The adapter (hyperformer's MetaLayersAdapterController with add_layer_norm_after_adapter=True,
add_layer_norm_before_adapter=False) sits on every self-attention and FFN sublayer output (never
cross-attention), before the sublayer's residual add:

    out = y + LayerNorm_{gamma_t, beta_t}(up_t(act(down_t(y)))),   adapter dim m = d_model / r

The arithmetic is the plain functions the per-task methods use (mtlx.peft.adapters.
bottleneck_delta with layer_norm='post', mtlx.peft.lora.lora_delta), called with generated
weights instead of owned ones.

How a step runs: MultiTaskModel calls each extension's `generator()` ONCE per forward pass; it
returns every weight-owning task's weights for every (layer, block) as stacked arrays with
leading axes [layer, task], which reach the hooks as ``routing.generated[ext.name]``. Each hook
takes its layer's slice and routes each example to its task's row (``routing.task_ids``), so one
batch mixes tasks and the compiled step does not depend on the mix (the released code generated
weights for the one task of each batch).

Parameters live under ``params['generators_<name>']`` (MultiTaskModel's key for a generator):
task embeddings at ``task_embeddings/<task>/embedding``, so adding a task adds one embedding and
leaves every other parameter, and every other task's generated weights, unchanged.
Initialisation follows the released code: generator and MLP weights N(0, 0.01), biases 0,
embeddings N(0, 1), hypernetwork LayerNorm eps 1e-6, adapter LayerNorm eps 1e-5 (torch's
layer_norm default), activation gelu_new (configs/hyperformer++.json).

    from mtlx.peft import registry
    cfg = registry.attach(t5_cfg, [{'method': 'hyperformer++', 'reduction_factor': 32}],
                          task_names=model.task_names)        # or HyperFormerPP(...).bind(cfg)
    mask = trainable_mask(params, registry.trainable_patterns(cfg))  # hypernets, norms, heads
    routing = Routing(task_ids, generated=generate(params, cfg))    # calling a backbone directly
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlx.models.layers import PROJECTION_SITES, Site
from mtlx.peft import routing as R
from mtlx.peft.adapters import ACTIVATIONS, bottleneck_delta
from mtlx.peft.base import TaskExtension, check_positive
from mtlx.peft.lora import lora_delta

BLOCKS = ("attention", "ffn")          # sublayers that carry adapters (never cross_attention)
GENERATOR_PREFIX = "generators_"       # MultiTaskModel's parameter key for ext.generator()


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
    """[G, dim] task embeddings, one parameter per task NAME (``<task>/embedding``)."""
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


def adapter_shapes(d: int, m: int) -> Dict[Tuple[str, str], Tuple[int, ...]]:
    """The generated adapter weights, in bottleneck_delta's layout (layer_norm='post')."""
    return {("down", "kernel"): (d, m), ("down", "bias"): (m,), ("up", "kernel"): (m, d),
            ("up", "bias"): (d,), ("norm", "scale"): (d,), ("norm", "bias"): (d,)}


class AdapterGenerator(nn.Module):
    """Linear generators: conditioning [..., p] -> every adapter weight [..., *shape], as
    {'down': {'kernel', 'bias'}, 'up': {...}, 'norm': {'scale', 'bias'}}.

    hyperformer's AdapterLayersHyperNet (weight and bias generators of the down and up
    samplers) and LayerNormHyperNet (gamma and beta generators). Parameters ``<group>_<leaf>/
    {kernel, bias}`` (e.g. ``down_kernel/kernel`` is the generator of the down kernel)."""
    d: int
    m: int
    std: float

    @nn.compact
    def __call__(self, c):
        out: dict = {}
        for (group, leaf), shape in adapter_shapes(self.d, self.m).items():
            flat = _dense(math.prod(shape), self.std, f"{group}_{leaf}")(c)
            out.setdefault(group, {})[leaf] = flat.reshape(c.shape[:-1] + shape)
        return out


def _stack_layers(per_layer):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)


class HyperFormerPPGenerator(nn.Module):
    """HyperFormer++: one generator per stack, over (block, layer, task) at once ->
    {stack: {block: adapter weights [L, G, ...]}}. Parameters: task_embeddings/<task>/embedding;
    <stack>/{layer_embeddings [L, 64], block_embeddings [2, 64], mlp/..., generators/...}."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        tasks = TaskEmbeddings(e.active, e.task_embedding_dim, name="task_embeddings")()
        return {stack: _PPStack(e, n, name=stack)(tasks) for stack, n in e.bound_stacks()}


class _PPStack(nn.Module):
    ext: Any
    num_layers: int

    @nn.compact
    def __call__(self, tasks):
        e, L, G = self.ext, self.num_layers, tasks.shape[0]
        layers = self.param("layer_embeddings", nn.initializers.normal(1.0),
                            (L, e.layer_embedding_dim), jnp.float32)
        blocks = self.param("block_embeddings", nn.initializers.normal(1.0),
                            (len(BLOCKS), e.block_embedding_dim), jnp.float32)
        grid = (len(BLOCKS), L, G)
        # concat(task, layer, block): the order of AdapterLayersOneHyperNetController.
        cond = jnp.concatenate([
            jnp.broadcast_to(tasks[None, None], grid + tasks.shape[-1:]),
            jnp.broadcast_to(layers[None, :, None], grid + layers.shape[-1:]),
            jnp.broadcast_to(blocks[:, None, None], grid + blocks.shape[-1:])], axis=-1)
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps, name="mlp")(cond)
        weights = AdapterGenerator(e.d_model, e.adapter_dim, e.init_std, name="generators")(c)
        return {block: jax.tree_util.tree_map(lambda v, i=i: v[i], weights)
                for i, block in enumerate(BLOCKS)}


class HyperFormerGenerator(nn.Module):
    """HyperFormer: a hypernetwork per (stack, layer) maps the projected task embedding to that
    layer's attention and FFN adapters -> {stack: {block: adapter weights [L, G, ...]}}.
    Parameters: task_embeddings/<task>/embedding; task_projector/...;
    <stack>/layer_<i>_<block>/<generator>/..."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        z = TaskEmbeddings(e.active, e.task_embedding_dim, name="task_embeddings")()
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps,
                            name="task_projector")(z)
        return {stack: _LayerHyperNets(e, n, name=stack)(c) for stack, n in e.bound_stacks()}


class _LayerHyperNets(nn.Module):
    ext: Any
    num_layers: int

    @nn.compact
    def __call__(self, c):
        e = self.ext
        per_layer = [{block: AdapterGenerator(e.d_model, e.adapter_dim, e.init_std,
                                              name=f"layer_{i}_{block}")(c) for block in BLOCKS}
                     for i in range(self.num_layers)]
        return _stack_layers(per_layer)


class HyperLoRAGenerator(nn.Module):
    """LoRA factors for every (stack, layer, target): {stack: {target: {'A': [L, G, in, r],
    'B': [L, G, r, out]}}}. Parameters: task_embeddings/<task>/embedding; <stack>/
    {layer_embeddings, mlp/..., <target>/{A, B}/{kernel, bias}}."""
    ext: Any

    @nn.compact
    def __call__(self):
        e = self.ext
        tasks = TaskEmbeddings(e.active, e.task_embedding_dim, name="task_embeddings")()
        return {stack: _LoRAStack(e, stack, n, name=stack)(tasks) for stack, n in e.bound_stacks()}


class _LoRAStack(nn.Module):
    ext: Any
    stack: str
    num_layers: int

    @nn.compact
    def __call__(self, tasks):
        e, L, G = self.ext, self.num_layers, tasks.shape[0]
        layers = self.param("layer_embeddings", nn.initializers.normal(1.0),
                            (L, e.layer_embedding_dim), jnp.float32)
        cond = jnp.concatenate([jnp.broadcast_to(tasks[None], (L,) + tasks.shape),
                                jnp.broadcast_to(layers[:, None], (L, G, layers.shape[-1]))], -1)
        c = ConditioningMLP(e.hidden_dim, e.projected_dim, e.init_std, e.hyper_eps, name="mlp")(cond)
        return {target: _LoRAFactors(d_in, d_out, e.rank, name=target)(c)
                for target, d_in, d_out in e.targets_of(self.stack)}


class _LoRAFactors(nn.Module):
    """Linear generators of one target's factors: c [L, G, p] -> A [L, G, in, r], B [L, G, r, out]."""
    d_in: int
    d_out: int
    rank: int

    @nn.compact
    def __call__(self, c):
        lead, r, p = c.shape[:-1], self.rank, c.shape[-1]
        # A spreads like LoRA's (PEFT's) init U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in),
        # given the unit-variance LayerNorm output; B's generator starts at zero so B = 0.
        a_std = 1.0 / math.sqrt(3.0 * self.d_in * p)
        a = nn.Dense(self.d_in * r, kernel_init=nn.initializers.normal(a_std), name="A")(c)
        b = nn.Dense(r * self.d_out, kernel_init=nn.initializers.zeros, name="B")(c)
        return {"A": a.reshape(lead + (self.d_in, r)), "B": b.reshape(lead + (r, self.d_out))}


# ---------------------------------------------------------------------------------------------
# Hooks: a layer's slice of the generated weights, each example routed to its task's row
# ---------------------------------------------------------------------------------------------

def _generated_at(routing, ext, site: Site):
    gen = None if routing is None or routing.generated is None else routing.generated.get(ext.name)
    if gen is None:
        raise ValueError(
            f"mtlx/peft/hyper.py: {ext.method} '{ext.name}' at {site} found no generated weights "
            f"in routing.generated[{ext.name!r}]; run the backbone through MultiTaskModel (which "
            f"calls ext.generator() once per forward) or pass Routing(task_ids=..., "
            f"generated=generate(params, backbone_config))")
    if site.stack not in gen or site.name not in gen[site.stack]:
        raise ValueError(f"mtlx/peft/hyper.py: {ext.method} '{ext.name}' generated no weights "
                         f"for {site} (it has stacks {sorted(gen)}); bind the extension to the "
                         f"backbone config it runs in")
    tree = gen[site.stack][site.name]
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    if site.layer >= n:
        raise ValueError(f"mtlx/peft/hyper.py: {ext.method} '{ext.name}' generated weights for "
                         f"{n} {site.stack} layers but {site} is layer {site.layer}; bind the "
                         f"extension to the backbone config it runs in")
    return jax.tree_util.tree_map(lambda v: v[site.layer], tree)


class GeneratedAdapter(nn.Module):
    """Sublayer hook: sub_out + LN_t(up_t(act(down_t(sub_out)))) with generated weights."""
    ext: Any
    site: Site

    def __call__(self, sub_in, sub_out, routing):
        ext = self.ext
        w = _generated_at(routing, ext, self.site)
        group, member = ext.route(routing, sub_out.shape[0], self.site)
        delta = bottleneck_delta(sub_out, w, group, activation=ext.activation, layer_norm="post",
                                 eps=ext.adapter_eps, impl=ext.impl).astype(sub_out.dtype)
        out = sub_out + delta
        return out if ext.all_active else R.keep_members(member, out, sub_out)


class GeneratedLoRA(nn.Module):
    """Projection hook: y + (alpha/r) (x A_t) B_t with generated factors."""
    ext: Any
    site: Site

    def __call__(self, x, y, routing):
        ext = self.ext
        w = _generated_at(routing, ext, self.site)
        group, member = ext.route(routing, x.shape[0], self.site)
        delta = lora_delta(x, w["A"], w["B"], ext.scale, group, ext.impl).astype(y.dtype)
        if not ext.all_active:
            delta = R.keep_members(member, delta, jnp.zeros_like(delta))
        return y + delta


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------

def _is_t5(cfg) -> bool:
    return type(cfg).__name__ == "T5Config"


def _backbone_stacks(cfg, decoder: Optional[bool], method: str) -> Tuple[Tuple[str, int], ...]:
    if not _is_t5(cfg):
        if decoder:
            raise ValueError(f"{method}.decoder=True but {type(cfg).__name__} has no decoder")
        return (("encoder", cfg.num_layers),)
    stacks = (("encoder", cfg.num_layers),)
    return stacks + ((("decoder", cfg.num_decoder_layers),) if decoder is not False else ())


def projection_shapes(cfg) -> Dict[str, Tuple[int, int]]:
    """(in, out) of every projection site a BertConfig / T5Config backbone has."""
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


def _set_bound(ext, method: str, **values):
    """A copy of `ext` with backbone-derived fields set; a value the user gave that disagrees
    with the backbone is an error naming the field."""
    for key, value in values.items():
        given = getattr(ext, key)
        if given is not None and given != value:
            raise ValueError(f"{method}.{key}={given!r} disagrees with the backbone config "
                             f"({value!r}); leave it unset, bind() fills it in")
    return dataclasses.replace(ext, **values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HyperBase(TaskExtension):
    """Fields shared by the hypernetworks. `stacks` (((stack, num_layers), ...)) and the sizes
    are filled by `bind(backbone_config)`; `decoder` (T5) = False keeps the decoder plain."""
    task_embedding_dim: int = 64
    hidden_dim: int = 128
    projected_dim: int = 64
    hyper_eps: float = 1e-6                  # the LayerNorm after the conditioning MLP
    init_std: float = 1e-2
    decoder: Optional[bool] = None
    stacks: Optional[Tuple[Tuple[str, int], ...]] = None

    def __post_init__(self):
        super().__post_init__()
        m = self.method
        for key in ("task_embedding_dim", "hidden_dim", "projected_dim"):
            check_positive(getattr(self, key), f"{m}.{key}")
        check_positive(self.init_std, f"{m}.init_std", integer=False)
        if self.stacks is not None:
            stacks = tuple((str(s), int(n)) for s, n in self.stacks)
            object.__setattr__(self, "stacks", stacks)
            if any(s not in ("encoder", "decoder") or n < 1 for s, n in stacks):
                raise ValueError(f"{m}.stacks must be (('encoder'|'decoder', num_layers >= 1), "
                                 f"...), got {self.stacks}")

    def bound_stacks(self) -> Tuple[Tuple[str, int], ...]:
        if self.stacks is None:
            raise ValueError(f"{self.method} '{self.name}' is not bound to a backbone: call "
                             f".bind(backbone_config) (registry.attach does) before using it")
        return self.stacks

    def trainable_patterns(self) -> Tuple[str, ...]:
        """The generator: hypernetworks and task embeddings (HyperFormer trains these plus the
        backbone's layer norms, which registry.trainable_patterns adds)."""
        return (f"^{re.escape(GENERATOR_PREFIX + self.name)}/",)

    def task_param_scopes(self):
        return ((("task_embeddings",), self.active),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HyperAdapterBase(_HyperBase):
    reduction_factor: int = 32               # adapter dim = d_model / reduction_factor
    activation: str = "gelu_new"
    adapter_eps: float = 1e-5                # the adapter's task-conditional LayerNorm
    d_model: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        m = self.method
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{m}.activation: unknown activation {self.activation!r}; known: "
                             f"{sorted(ACTIVATIONS)}")
        check_positive(self.reduction_factor, f"{m}.reduction_factor")
        if self.d_model is not None and self.d_model % self.reduction_factor:
            raise ValueError(f"{m}.reduction_factor ({self.reduction_factor}) must divide d_model "
                             f"({self.d_model}): the adapter dim is d_model / reduction_factor")

    @property
    def adapter_dim(self) -> int:
        return self.d_model // self.reduction_factor

    def bind(self, backbone_config):
        d = backbone_config.d_model if _is_t5(backbone_config) else backbone_config.hidden_size
        return _set_bound(self, self.method, d_model=d,
                          stacks=_backbone_stacks(backbone_config, self.decoder, self.method))

    def sublayer(self, site: Site):
        if site.name in BLOCKS and site.stack in dict(self.bound_stacks()):
            return GeneratedAdapter(self, site, name=self.name)
        return None

    def target_map(self):
        return {f"{self.method}.sites": ("sublayer", BLOCKS)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperFormerPP(_HyperAdapterBase):
    """HyperFormer++ (Karimi Mahabadi et al. 2021, sec. 2.4): one shared generator per stack."""
    name: str = "hyperformer_pp"
    layer_embedding_dim: int = 64
    block_embedding_dim: int = 64

    method = "hyperformer++"

    def generator(self):
        self.bound_stacks()
        return HyperFormerPPGenerator(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperFormer(_HyperAdapterBase):
    """HyperFormer (Karimi Mahabadi et al. 2021, sec. 2.2-2.3): a hypernetwork per layer."""
    name: str = "hyperformer"

    method = "hyperformer"

    def generator(self):
        self.bound_stacks()
        return HyperFormerGenerator(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperLoRA(_HyperBase):
    """LoRA (Hu et al. 2021) whose factors a hypernetwork generates per task and layer.

    targets: projection site names (exact, e.g. 'attention.query'; applied in every layer of
    every stack that has the site); shapes ((target, in, out), ...) is filled by bind()."""
    name: str = "hyper_lora"
    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = ("attention.query", "attention.value")
    layer_embedding_dim: int = 64
    shapes: Optional[Tuple[Tuple[str, int, int], ...]] = None

    method = "hyper_lora"

    def __post_init__(self):
        super().__post_init__()
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in PROJECTION_SITES]
        if unknown or not targets:
            raise ValueError(f"hyper_lora.targets {unknown or list(targets)} are not projection "
                             f"site names; known: {list(PROJECTION_SITES)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"hyper_lora.targets repeats a site: {list(targets)}")
        check_positive(self.rank, "hyper_lora.rank")
        check_positive(self.alpha, "hyper_lora.alpha", integer=False)
        if self.shapes is not None:
            object.__setattr__(self, "shapes", tuple((str(t), int(i), int(o)) for t, i, o in self.shapes))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def bind(self, backbone_config):
        have = projection_shapes(backbone_config)
        missing = [t for t in self.targets if t not in have]
        if missing:
            raise ValueError(f"hyper_lora.targets {missing} do not exist in "
                             f"{type(backbone_config).__name__}; it has {sorted(have)}")
        return _set_bound(self, self.method,
                          shapes=tuple((t,) + have[t] for t in self.targets),
                          stacks=_backbone_stacks(backbone_config, self.decoder, self.method))

    def targets_of(self, stack: str):
        """((target, in, out), ...) that exist in `stack` (cross-attention: decoder only)."""
        if self.shapes is None:
            self.bound_stacks()
            raise ValueError(f"hyper_lora '{self.name}' has no target shapes: call .bind()")
        return tuple(t for t in self.shapes
                     if stack == "decoder" or not t[0].startswith("cross_attention."))

    def projection(self, site: Site):
        if site.stack in dict(self.bound_stacks()) and any(
                t == site.name for t, _, _ in self.targets_of(site.stack)):
            return GeneratedLoRA(self, site, name=self.name)
        return None

    def target_map(self):
        return {"hyper_lora.targets": ("projection", self.targets)}

    def generator(self):
        self.targets_of("encoder")
        return HyperLoRAGenerator(self)


METHODS = {"hyperformer++": HyperFormerPP, "hyperformer": HyperFormer, "hyper_lora": HyperLoRA}


# ---------------------------------------------------------------------------------------------
# Using generated weights outside MultiTaskModel
# ---------------------------------------------------------------------------------------------

def generate(params: Mapping[str, Any], backbone_config) -> Dict[str, Any]:
    """Every generator extension's weights from the multi-task model's `params`, for calling a
    backbone directly (e.g. T5 greedy_decode with ``Routing(task_ids=...,
    generated=generate(params, cfg))``). Jit it with the call that uses it."""
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
