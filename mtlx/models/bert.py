"""BERT and RoBERTa encoders in Flax, numerically equal to Hugging Face's PyTorch models.

References: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding"; Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining
Approach". The layer arithmetic follows `transformers.models.bert.modeling_bert` (post-LN:
``LayerNorm(x + Dropout(Dense(sublayer(x))))``) and RoBERTa's embeddings
(`create_position_ids_from_input_ids`: positions start at ``pad_token_id + 1``).

    cfg = BertConfig(vocab_size=30522)
    enc = BertEncoder(cfg)
    params = enc.init(rng, input_ids, attention_mask)['params']
    out = enc.apply({'params': params}, input_ids, attention_mask, token_type_ids)
    out.last_hidden_state  # [B, L, d]      out.pooled_output  # [B, d] or None

Parameter tree (HF names in brackets):

    embeddings/{word,position,token_type}_embeddings/embedding   [embeddings.*.weight]
    embeddings/layer_norm/{scale,bias}                           [embeddings.LayerNorm]
    layer_{i}/attention/{query,key,value}/{kernel,bias}          [encoder.layer.i.attention.self.*]
    layer_{i}/attention/output/{kernel,bias}                     [... attention.output.dense]
    layer_{i}/attention/layer_norm/{scale,bias}                  [... attention.output.LayerNorm]
    layer_{i}/ffn/input/{kernel,bias}                            [... intermediate.dense]
    layer_{i}/ffn/output/{kernel,bias}                           [... output.dense]
    layer_{i}/ffn/layer_norm/{scale,bias}                        [... output.LayerNorm]
    pooler/dense/{kernel,bias}                                   [pooler.dense]

Kernels are [in, out] (the transpose of torch's Linear.weight).

PEFT hooks (mtlx.models.layers): every linear map in a layer is a `Projection` with its `Site`;
`extend_attention_kv` sees keys/values [B, L, H, Dh] and the boolean mask [B, 1, Lq, Lk];
`extend_sublayer` runs on each sublayer's output after its output dense + dropout and before the
residual add and LayerNorm (where Houlsby adapters sit); `extend_embeddings` runs on the
embedding output (after LayerNorm + dropout) at ``Site('encoder', 0, 'embeddings')``.

Scan over layers (``BertConfig(scan_layers=True)``): the `num_layers` identical layers run as
one `jax.lax.scan` whose body is ONE traced BertLayer (remat-wrapped when ``remat`` is set:
remat inside scan), so tracing and XLA compilation no longer grow with depth. The parameter
tree does not change: params stay ``layer_{i}/...`` (HF I/O, checkpoints, PEFT patterns and
task-keyed parameters are untouched), `init` unrolls (same tree and, for a given rng, the same
values as scan_layers=False), and each forward pass stacks the layers' parameters into
[num_layers, ...] arrays for the scan. That stack is a copy of every layer's weights per step
(forward; its transpose scatters the gradients back in the backward pass): memory traffic of
the model's size, which the compile-time saving has to outweigh (measured in mtlx.bench,
feature 'scan_layers=on'). Outputs and gradients equal the unrolled model's up to float
rounding; with dropout each layer gets its own key split from the encoder's 'dropout' rng,
so the random masks (not their distribution) differ from the unrolled model's. Restriction:
the one traced body sees ``Site('encoder', 0, ...)``, so every extension must attach the same
way at every layer and declare ``layer_uniform = True`` (adapters, LoRA, (IA)^3, prefixes,
Compacter, fusion, task layer norms do); hypernetworks (weights generated per layer, indexed
by ``site.layer``) and layer-subset site patterns raise a ValueError naming the extension
(`check_scan_layers`).

This module also implements the family contract that `mtlx.models.hf` dispatches to:
`MODEL_TYPES`, `config_from_hf`, `config_to_hf`, `params_from_hf`, `params_to_hf`,
`hf_param_names`, `abstract_params`, `module`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtlx.models.dropout import Dropout, dropout
from mtlx.models.embed import Embed
from mtlx.models.attention import IMPLEMENTATIONS, attend, padding_mask, right_padding_lengths
from mtlx.models import activations, precision
from mtlx.models.norms import ResidualLayerNorm
from mtlx.models.remat import check_policy as check_remat_policy, remat_layer
from mtlx.models.scan import check_uniform_extensions, scan_layers
from mtlx.models.layers import (Extension, Projection, Routing, Site, extend_attention_kv,
                                extend_embeddings, extend_layer_norm, extend_sublayer)
from mtlx.models.tree import flat_paths

MODEL_TYPES = ("bert", "roberta")
EMBEDDINGS_SITE = Site("encoder", 0, "embeddings")


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions with the same formula (transformers/activations.py).
# "gelu" is the exact erf form; gelu_new / gelu_fast / gelu_pytorch_tanh are the tanh form
# (mtlx.models.activations: on accelerators their gradients save only the input).
ACTIVATIONS: Mapping[str, Callable] = {
    "gelu": activations.gelu,
    "gelu_new": activations.gelu_tanh,
    "gelu_fast": activations.gelu_tanh,
    "gelu_pytorch_tanh": activations.gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT/RoBERTa encoder. Frozen and hashable (a Flax attribute).

    Field names follow mtlx; `config_from_hf` / `config_to_hf` translate HF's names
    (num_hidden_layers -> num_layers, hidden_dropout_prob -> hidden_dropout, ...).
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"               # a key of ACTIVATIONS
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1            # HF hidden_dropout_prob
    attention_dropout: float = 0.1         # HF attention_probs_dropout_prob (on softmax probs)
    pad_token_id: int = 0                  # RoBERTa: also the position padding index
    model_type: str = "bert"               # 'bert' | 'roberta'
    add_pooler: bool = True                # tanh(Dense(h[:, 0])) as in BertPooler
    initializer_range: float = 0.02        # std of the normal init (HF initializer_range)
    bos_token_id: Optional[int] = None     # kept only so export round-trips HF configs
    eos_token_id: Optional[int] = None
    dtype: Any = jnp.float32               # compute dtype (bf16 allowed)
    param_dtype: Any = jnp.float32
    # None | 'xla' | 'cudnn' (mtlx.models.attention). cudnn reads a plain padding mask as per-row
    # key lengths, so attention_mask must be right padding (real tokens first), as mtlx's
    # tokenization and HF tokenizers' default padding_side='right' give.
    attention_impl: Optional[str] = None
    extensions: Tuple[Extension, ...] = ()
    remat: str = "none"                    # activation checkpointing policy (mtlx.models.remat)
    scan_layers: bool = False              # run the layers with jax.lax.scan (module docstring)

    def __post_init__(self):
        check_remat_policy(self.remat)
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"BertConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        # Normalise so that equal configs hash equally ('bfloat16' == jnp.bfloat16) and a list
        # of extensions does not make the config unhashable.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "extensions", tuple(self.extensions))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"BertConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"BertConfig.attention_impl must be one of {IMPLEMENTATIONS}, "
                             f"got {self.attention_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@flax.struct.dataclass
class EncoderOutput:
    """last_hidden_state [B, L, d] (compute dtype); pooled_output [B, d] or None (no pooler);
    attention_mask [B, L]: which of last_hidden_state's positions a decoder may attend to,
    when the encoder sets it (T5: an embeddings extension such as prompt tuning lengthens the
    sequence, and rows of a task without a prompt must not see its positions)."""
    last_hidden_state: Any
    pooled_output: Optional[Any] = None
    attention_mask: Optional[Any] = None


def default_position_ids(input_ids, config: BertConfig):
    """Position ids HF computes when none are given.

    BERT: 0..L-1. RoBERTa (fairseq's make_positions): ``pad + cumsum(ids != pad) * (ids != pad)``,
    so real tokens count from pad+1 and pad tokens sit at the padding index. Packed rows must
    pass their own `position_ids` (restarting per segment; for RoBERTa offset by pad+1).
    """
    b, l = input_ids.shape
    if config.model_type == "roberta":
        real = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))


def attend_with_prob_dropout(q, k, v, mask, rate: float, rng):
    """Attention with dropout on the softmax probabilities, as HF BERT trains.

    `jax.nn.dot_product_attention` has no dropout, so training with attention_dropout > 0 takes
    this explicit path (softmax in float32). With rate 0 it equals `attend`.
    """
    scale = q.shape[-1] ** -0.5
    logits = precision.einsum("bqhd,bkhd->bhqk", q, k, out_dtype=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, rate, rng)
    return precision.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    # float32 statistics whatever the compute dtype; two-pass variance like torch.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


def _projection(cfg: BertConfig, features: int, site: Site, name: str) -> Projection:
    return Projection(features, site, extensions=cfg.extensions, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _residual_norm(cfg: BertConfig, x, sub_out, name: str, site: Site, routing):
    # LayerNorm(x + sub_out): the sum and the statistics in float32, the output in cfg.dtype;
    # its gradient keeps only the two inputs (mtlx.models.norms).
    y = ResidualLayerNorm(epsilon=cfg.layer_norm_eps, param_dtype=cfg.param_dtype,
                          out_dtype=cfg.dtype, name=name)(x, sub_out)
    return extend_layer_norm(cfg.extensions, site, y, routing)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num, name):
            # the three lookups share a cotangent: all follow the word table's plan (its rows
            # sharded by 'vocab', its size; mtlx.models.embed)
            return Embed(num, cfg.hidden_size, embedding_init=init, dtype=jnp.float32,
                         param_dtype=cfg.param_dtype, name=name, vocab_sharded=True,
                         route_vocab=cfg.vocab_size)

        # Summed in float32 in HF's order (word + token type, then + position).
        h = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        h = h + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        h = h + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
        h = _layer_norm(cfg, "layer_norm")(h).astype(cfg.dtype)
        return Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Self-attention sublayer: returns LayerNorm(x + extend(Dropout(Dense(attention(x)))))."""
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, routing: Optional[Routing], deterministic: bool = True):
        cfg = self.config
        b, l, _ = x.shape

        def heads(name):
            y = _projection(cfg, cfg.hidden_size, Site("encoder", self.layer, f"attention.{name}"),
                            name)(x, routing)
            return y.reshape(b, l, cfg.num_heads, cfg.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        key_mask = mask
        k, v, mask = extend_attention_kv(cfg.extensions, Site("encoder", self.layer, "attention"),
                                         k, v, mask, routing)
        key_lengths = None
        if cfg.attention_impl == "cudnn" and mask is key_mask and mask.shape[1:3] == (1, 1):
            # A key-only [B, 1, 1, L] mask is the encoder's plain right padding (BertEncoder
            # widens any other mask to [B, 1, L, L]), untouched by a prefix extension (whose
            # columns open per example): cuDNN's padding mode, no dense bias and no dbias.
            key_lengths = right_padding_lengths(mask)
        if not deterministic and cfg.attention_dropout > 0.0:
            if cfg.attention_impl == "cudnn":
                raise ValueError(
                    f"attention_impl='cudnn' cannot drop out attention probabilities "
                    f"(BertConfig.attention_dropout={cfg.attention_dropout}); set "
                    f"attention_dropout=0.0 (e.g. load_pretrained(..., attention_dropout=0.0)) "
                    f"or attention_impl='xla'")
            ctx = attend_with_prob_dropout(q, k, v, mask, cfg.attention_dropout,
                                           self.make_rng("dropout"))
        else:
            ctx = attend(q, k, v, mask=mask, implementation=cfg.attention_impl,
                         key_lengths=key_lengths)
        ctx = ctx.astype(cfg.dtype).reshape(b, l, cfg.hidden_size)
        out = _projection(cfg, cfg.hidden_size, Site("encoder", self.layer, "attention.output"),
                          "output")(ctx, routing)
        out = Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
        out = extend_sublayer(cfg.extensions, Site("encoder", self.layer, "attention"), x, out, routing)
        return _residual_norm(cfg, x, out, "layer_norm", Site("encoder", self.layer, "attention.layer_norm"),
                              routing)


class BertFeedForward(nn.Module):
    """Feed-forward sublayer: LayerNorm(x + extend(Dropout(Dense(act(Dense(x))))))."""
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, x, routing: Optional[Routing], deterministic: bool = True):
        cfg = self.config
        h = _projection(cfg, cfg.intermediate_size, Site("encoder", self.layer, "ffn.input"),
                        "input")(x, routing)
        h = ACTIVATIONS[cfg.hidden_act](h)
        out = _projection(cfg, cfg.hidden_size, Site("encoder", self.layer, "ffn.output"),
                          "output")(h, routing)
        out = Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
        out = extend_sublayer(cfg.extensions, Site("encoder", self.layer, "ffn"), x, out, routing)
        return _residual_norm(cfg, x, out, "layer_norm", Site("encoder", self.layer, "ffn.layer_norm"),
                              routing)


class BertLayer(nn.Module):
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, routing: Optional[Routing], deterministic: bool = True):
        x = BertSelfAttention(self.config, self.layer, name="attention")(x, mask, routing, deterministic)
        return BertFeedForward(self.config, self.layer, name="ffn")(x, routing, deterministic)


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, positions=None):
        """tanh(Dense(h[:, 0])) -> [B, d]; with `positions` [B, S] (packed rows: each
        segment's first token) the same at every position -> [B, S, d]."""
        cfg = self.config
        dense = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         kernel_init=nn.initializers.normal(cfg.initializer_range), name="dense")
        first = hidden[:, 0] if positions is None else jnp.take_along_axis(
            hidden, positions[..., None], axis=1)
        return jnp.tanh(dense(first))


class BertEncoder(nn.Module):
    """BERT/RoBERTa encoder (embeddings, `num_layers` post-LN layers, optional pooler).

    input_ids, attention_mask: int [B, L]. token_type_ids: [B, L] or None (zeros).
    position_ids: [B, L] or None (HF's defaults, see `default_position_ids`); packed rows pass
    positions that restart per segment. segment_ids: [B, L] or None; when given, attention is
    block diagonal (a token sees only its own segment). routing: per-example task information
    for PEFT extensions. Dropout is active when ``deterministic=False`` (rng 'dropout').
    pool_positions: [B, S] or None; packed rows pool each segment's first token -> pooled
    [B, S, d] (None: the first token of the row -> [B, d]).
    """
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
                 segment_ids=None, routing: Optional[Routing] = None,
                 deterministic: bool = True, pool_positions=None) -> EncoderOutput:
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, cfg)
        h = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                   deterministic)
        input_mask = attention_mask
        h, attention_mask = extend_embeddings(cfg.extensions, EMBEDDINGS_SITE, h, attention_mask,
                                              routing)
        if segment_ids is not None and h.shape[1] != segment_ids.shape[1]:
            raise ValueError(
                f"an embeddings extension changed the sequence length from {segment_ids.shape[1]} "
                f"to {h.shape[1]}; it cannot be combined with packed rows (segment_ids)")
        mask = padding_mask(attention_mask, segment_ids)
        if cfg.attention_impl == "cudnn" and attention_mask is not input_mask:
            # A prompt extension inserted columns masked per example: not plain right padding.
            # Widened to [B, 1, L, L], the mask reaches cuDNN as a bias (BertSelfAttention
            # takes key lengths only from a key-only [B, 1, 1, L] mask).
            mask = jnp.broadcast_to(mask, (mask.shape[0], 1, h.shape[1], mask.shape[-1]))
        layer_cls = remat_layer(BertLayer, cfg.remat, static_argnums=(4,))  # 4: deterministic
        if cfg.scan_layers:
            check_scan_layers(cfg)
        if cfg.scan_layers and not self.is_initializing():
            h = self._scan(layer_cls, h, mask, routing, deterministic)
        else:
            # init always unrolls: the parameter tree (and, for a given rng, its values) is the
            # unrolled model's whatever scan_layers says.
            for i in range(cfg.num_layers):
                h = layer_cls(cfg, i, name=f"layer_{i}")(h, mask, routing, deterministic)
        pooled = BertPooler(cfg, name="pooler")(h, pool_positions) if cfg.add_pooler else None
        return EncoderOutput(last_hidden_state=h, pooled_output=pooled)

    def _scan(self, layer_cls, h, mask, routing, deterministic: bool):
        """The layers as one jax.lax.scan over their stacked parameters ``layer_{i}/...``.

        The body is `layer_cls` (BertLayer, remat-wrapped if configured) traced ONCE, with
        ``Site('encoder', 0, ...)`` for every layer (`check_scan_layers` makes sure that is
        the same computation); each step applies it functionally to layer i's parameters and
        its own dropout key (split from this module's 'dropout' rng).
        """
        cfg = self.config
        layer = layer_cls(cfg, 0, parent=None)
        return scan_layers(
            self, [f"layer_{i}" for i in range(cfg.num_layers)], h,
            lambda p, carry, rngs: layer.apply({"params": p}, carry, mask, routing, deterministic,
                                               rngs=rngs),
            deterministic,
            f"BertConfig.scan_layers: params have no {{missing}} ({cfg.num_layers} layers expected)")


# Hooks a BertLayer calls, with the site names it offers to each (layer index aside).
_LAYER_HOOKS = (
    ("projection_input", ("attention.query", "attention.key", "attention.value",
                          "attention.output", "ffn.input", "ffn.output")),
    ("projection", ("attention.query", "attention.key", "attention.value", "attention.output",
                    "ffn.input", "ffn.output")),
    ("attention_kv", ("attention",)),
    ("sublayer", ("attention", "ffn")),
    ("layer_norm_output", ("attention.layer_norm", "ffn.layer_norm")),
)


@functools.lru_cache(maxsize=64)
def check_scan_layers(cfg: BertConfig) -> None:
    """Raises ValueError unless ``scan_layers=True`` computes what the unrolled layers compute.

    Under scan ONE layer body is traced (with layer 0's sites) and run for every layer, so each
    extension must attach identically at every layer (same hooks, same sites, equal modules up
    to the layer index) and declare ``layer_uniform = True``: its modules do not use the layer
    index except through their own per-layer parameters (bottleneck adapters, LoRA, (IA)^3,
    prefixes, ...). Hypernetwork methods index generated weights by ``site.layer`` and layer-
    subset site patterns attach to some layers only: both are refused, naming the extension.
    """
    if cfg.scan_layers:
        check_uniform_extensions(cfg.extensions, "encoder", range(cfg.num_layers), _LAYER_HOOKS,
                                 "BertConfig.scan_layers")


def module(cfg: BertConfig) -> BertEncoder:
    return BertEncoder(cfg)


def abstract_params(cfg: BertConfig):
    """The parameter pytree as jax.ShapeDtypeStruct leaves (no memory allocated)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    routing = Routing(task_ids=jnp.zeros((1,), jnp.int32))

    cfg = dataclasses.replace(cfg, scan_layers=False)  # the same tree; init unrolls anyway

    def init():
        return module(cfg).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), routing=routing)["params"]

    return jax.eval_shape(init)


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion
# ---------------------------------------------------------------------------------------------

# HF config keys that change the computation and that this encoder does not implement.
_UNSUPPORTED_HF = {
    "position_embedding_type": ("absolute", "relative position embeddings are not implemented"),
    "is_decoder": (False, "a causal (decoder) BERT is not implemented"),
    "add_cross_attention": (False, "cross-attention BERT is not implemented"),
}


def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
    """BertConfig from a HF config.json dict. Raises ValueError naming an unsupported key."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not a BERT family type {MODEL_TYPES}")
    for key, (expected, why) in _UNSUPPORTED_HF.items():
        if key in hf and hf[key] != expected:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported ({why}); "
                             f"expected {expected!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    defaults = {"bert": {"pad_token_id": 0, "type_vocab_size": 2},
                "roberta": {"pad_token_id": 1, "type_vocab_size": 2}}[model_type]
    pad = hf.get("pad_token_id", defaults["pad_token_id"])
    if pad is None:
        if model_type == "roberta":
            raise ValueError("config.json pad_token_id is null, but RoBERTa needs it (position ids)")
        pad = 0
    return BertConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        intermediate_size=int(hf.get("intermediate_size", 3072)),
        hidden_act=act,
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", defaults["type_vocab_size"])),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=int(pad),
        model_type=model_type,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )


def _export_dtype(cfg: BertConfig) -> np.dtype:
    """The dtype `params_to_hf` writes: the param dtype, bfloat16 widened to float32."""
    return np.dtype(np.float32) if cfg.param_dtype == jnp.bfloat16 else np.dtype(cfg.param_dtype)


def config_to_hf(cfg: BertConfig) -> dict:
    """A config.json dict that transformers' AutoConfig / BertModel / RobertaModel load."""
    return {
        "model_type": cfg.model_type,
        "architectures": ["RobertaModel" if cfg.model_type == "roberta" else "BertModel"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "is_decoder": False,
        "add_cross_attention": False,
        "dtype": _export_dtype(cfg).name,
    }


def _linear(mtlx_path: str, hf_prefix: str):
    return [(f"{mtlx_path}/kernel", f"{hf_prefix}.weight", True),
            (f"{mtlx_path}/bias", f"{hf_prefix}.bias", False)]


def _norm(mtlx_path: str, hf_prefix: str):
    return [(f"{mtlx_path}/scale", f"{hf_prefix}.weight", False),
            (f"{mtlx_path}/bias", f"{hf_prefix}.bias", False)]


def _mapping(cfg: BertConfig):
    """(mtlx path, HF key without model prefix, transpose?) for every parameter."""
    rows = [
        ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", False),
        ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", False),
        ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", False),
        *_norm("embeddings/layer_norm", "embeddings.LayerNorm"),
    ]
    for i in range(cfg.num_layers):
        m, h = f"layer_{i}", f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            rows += _linear(f"{m}/attention/{name}", f"{h}.attention.self.{name}")
        rows += _linear(f"{m}/attention/output", f"{h}.attention.output.dense")
        rows += _norm(f"{m}/attention/layer_norm", f"{h}.attention.output.LayerNorm")
        rows += _linear(f"{m}/ffn/input", f"{h}.intermediate.dense")
        rows += _linear(f"{m}/ffn/output", f"{h}.output.dense")
        rows += _norm(f"{m}/ffn/layer_norm", f"{h}.output.LayerNorm")
    if cfg.add_pooler:
        rows += _linear("pooler/dense", "pooler.dense")
    return rows


def hf_param_names(cfg: BertConfig) -> dict:
    """mtlx parameter path ('layer_0/attention/query/kernel') -> HF key (bare-model form)."""
    return {m: h for m, h, _ in _mapping(cfg)}


# Keys of the encoder's namespace in a checkpoint; anything else (cls., lm_head., classifier.,
# qa_outputs., ...) is a task head of BertFor*/RobertaFor* and is ignored by the encoder.
_ENCODER_KEY = re.compile(r"^(embeddings|encoder|pooler)\.")
# Buffers older transformers versions saved with the weights: not parameters.
_BUFFER_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _normalise_keys(tensors: Mapping[str, Any], cfg: BertConfig) -> dict:
    """Strips the 'bert.'/'roberta.' prefix of BertFor*/RobertaFor* checkpoints and maps the
    TF-era LayerNorm names gamma/beta to weight/bias (as transformers does on load)."""
    prefix = f"{cfg.model_type}."
    out = {}
    for key, value in tensors.items():
        bare = key[len(prefix):] if key.startswith(prefix) else key
        bare = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", bare)
        bare = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", bare)
        out[bare] = value
    return out


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
    """mtlx params from HF weights (keys with or without the 'bert.'/'roberta.' prefix).

    Raises KeyError naming the HF key of a missing weight, and ValueError listing weights in
    the encoder's namespace (embeddings./encoder./pooler.) that this config has no place for
    (e.g. extra layers). Task-head weights of BertFor* checkpoints are ignored. Leaves are
    numpy arrays of cfg.param_dtype.
    """
    bare = _normalise_keys(tensors, cfg)
    params: dict = {}
    used = set()
    for mtlx_path, hf_key, transpose in _mapping(cfg):
        if hf_key not in bare:
            hint = (" (this checkpoint has no pooler: load it with add_pooler=False)"
                    if hf_key.startswith("pooler.") else "")
            raise KeyError(f"weight {hf_key!r} (for mtlx parameter {mtlx_path!r}) is missing from "
                           f"the checkpoint{hint}")
        value = np.asarray(bare[hf_key])
        if transpose:
            if value.ndim != 2:
                raise ValueError(f"weight {hf_key!r} should be a 2-D Linear weight, got shape {value.shape}")
            value = value.T
        _set(params, mtlx_path, np.ascontiguousarray(value.astype(cfg.param_dtype)))
        used.add(hf_key)
    unexpected = sorted(k for k in bare if _ENCODER_KEY.match(k) and k not in used
                        and k not in _BUFFER_KEYS and not (k.startswith("pooler.") and not cfg.add_pooler))
    if unexpected:
        raise ValueError(f"checkpoint weights with no place in this {cfg.model_type} config "
                         f"({cfg.num_layers} layers): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return params


def params_to_hf(params, cfg: BertConfig) -> dict:
    """HF bare-model weights (BertModel/RobertaModel keys) as float numpy arrays.

    Raises ValueError for parameters with no HF equivalent (extension parameters such as
    adapters or LoRA): exporting would silently drop them.
    """
    flat = flat_paths(params)
    out = {}
    for mtlx_path, hf_key, transpose in _mapping(cfg):
        if mtlx_path not in flat:
            raise KeyError(f"parameter {mtlx_path!r} (HF {hf_key!r}) is missing from params")
        value = np.asarray(jax.device_get(flat.pop(mtlx_path)))
        if value.dtype == jnp.bfloat16:
            value = value.astype(np.float32)  # safetensors' numpy writer has no bfloat16
        out[hf_key] = np.ascontiguousarray(value.T if transpose else value)
    if flat:
        raise ValueError(
            f"parameters with no Hugging Face {cfg.model_type} equivalent: {sorted(flat)[:8]}; "
            f"extension parameters (adapters, LoRA, ...) cannot go into a plain checkpoint: merge "
            f"or drop them before exporting")
    return out
