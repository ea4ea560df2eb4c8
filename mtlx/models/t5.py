"""T5 encoder-decoder (v1.0 and v1.1) in Flax, numerically equal to Hugging Face's PyTorch T5.

References: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer" (JMLR 21); T5 v1.1 (gated-GELU FFN, untied LM head, no decoder output
scaling): google-research/text-to-text-transfer-transformer released_checkpoints.md; Shazeer
2020, "GLU Variants Improve Transformer". The arithmetic follows
`transformers.models.t5.modeling_t5` (pre-LN blocks ``h + Dropout(sublayer(RMSNorm(h)))``,
relative position buckets from Mesh TensorFlow, attention without 1/sqrt(d) scaling).

    cfg = T5Config(vocab_size=32128)
    model = T5Model(cfg)
    params = model.init(rng, input_ids, attention_mask, decoder_input_ids)['params']
    enc = model.apply({'params': params}, input_ids, attention_mask, method=T5Model.encode)
    logits = model.apply({'params': params}, decoder_input_ids, enc.last_hidden_state,
                         attention_mask, method=T5Model.decode)          # [B, Lt, V] float32
    tokens = greedy_decode(params, cfg, input_ids, attention_mask, max_length=32)

Parameter tree (HF names in brackets; S = encoder | decoder, i = layer):

    shared/embedding                                   [shared.weight, S.embed_tokens.weight]
    S/layer_i/attention/{query,key,value,output}/kernel       [S.block.i.layer.0.SelfAttention.{q,k,v,o}]
    S/layer_0/attention/relative_attention_bias [buckets, H]  [S.block.0.layer.0.SelfAttention.relative_attention_bias]
    S/layer_i/attention/layer_norm/scale                      [S.block.i.layer.0.layer_norm]
    decoder/layer_i/cross_attention/{query,...}/kernel        [decoder.block.i.layer.1.EncDecAttention.*]
    decoder/layer_i/cross_attention/layer_norm/scale          [decoder.block.i.layer.1.layer_norm]
    S/layer_i/ffn/{input,gate,output}/kernel   [S.block.i.layer.{1|2}.DenseReluDense.{wi|wi_0, wi_1, wo}]
    S/layer_i/ffn/layer_norm/scale                            [S.block.i.layer.{1|2}.layer_norm]
    S/final_layer_norm/scale                                  [S.final_layer_norm]
    lm_head/kernel  (only when tie_word_embeddings=False)     [lm_head.weight]

Kernels are [in, out] (the transpose of torch's Linear.weight). Calling only `encode` (as a
classification-only multi-task model does) creates only `shared` and `encoder` parameters.

`tie_word_embeddings` keeps T5's historical meaning (Mesh TF, transformers 4.x): True (v1.0) =
the LM head is the shared embedding and the decoder output is scaled by d_model**-0.5 first;
False (v1.1, mT5, Flan-T5) = no scaling and a separate `lm_head`. transformers >= 5 writes
``tie_word_embeddings: true`` for every T5 and records the scaling as ``scale_decoder_outputs``;
`config_from_hf` reads that key when present.

PEFT hooks (mtlx.models.layers), at the same places as in mtlx.models.bert: every linear map
in a layer is a `Projection` with its `Site`; `extend_attention_kv` sees self-attention
keys/values [B, Lk, H, Dh] and the boolean mask [B, 1, Lq, Lk] (keys an extension adds must be
PREPENDED: they get zero position bias); `extend_sublayer` runs on each sublayer's output after
its output projection + dropout, before the residual add, with sub_in = the sublayer's input
before its RMS norm; `extend_embeddings` runs on the encoder's token embeddings at
``Site('encoder', 0, 'embeddings')`` (positions it adds must also be prepended, so that the
decoder can widen its encoder mask to match). Extension modules are created inside the sublayer
that calls them, so their parameters live at ``S/layer_i/{attention,cross_attention,ffn}/...``
(projection extensions one level deeper, under the projection) and ``encoder/...`` for the
embeddings hook. In cached decoding the attention_kv hook runs every step on the whole
[B, max_length, H, Dh] cache buffer with the mask [B, 1, 1, max_length] of filled positions.

Scan over layers (``T5Config(scan_layers=True)``, `config.model.scan_layers`): layer 0 of each
stack runs unrolled (it owns the relative position bias table and computes the bias the other
layers read), layers 1.. run as one `jax.lax.scan` whose body is ONE traced T5Block (layer 1's
sites; remat inside scan when set), as BertConfig.scan_layers does: same parameter tree
(``layer_{i}/...``; init unrolls), the scanned layers' weights stacked each step, each scanned
layer its own dropout key, extensions checked for attaching identically at layers 1..
(`check_scan_layers`, mtlx.models.scan). Cached decoding (`step`) stays unrolled.

This module implements the family contract that `mtlx.models.hf` dispatches to:
`MODEL_TYPES`, `config_from_hf`, `config_to_hf`, `params_from_hf`, `params_to_hf`,
`hf_param_names`, `abstract_params`, `module`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlx.models.dropout import Dropout, dropout
from mtlx.models.embed import Embed
from mtlx.models.attention import IMPLEMENTATIONS, attend, padding_mask
from mtlx.models import activations, precision
from mtlx.models.remat import check_policy as check_remat_policy, remat_layer
from mtlx.models.scan import check_uniform_extensions, scan_layers
from mtlx.models.bert import EncoderOutput
from mtlx.models.layers import (Extension, Projection, Routing, Site, extend_attention_kv,
                                extend_embeddings, extend_layer_norm, extend_sublayer)
from mtlx.models.tree import flat_paths

MODEL_TYPES = ("t5",)
FEED_FORWARD_PROJS = ("relu", "gated-gelu")
EMBEDDINGS_SITE = Site("encoder", 0, "embeddings")
STACKS = ("encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder-decoder. Frozen and hashable (a Flax attribute).

    Field names are HF's (transformers.T5Config), so `config_from_hf` is mostly a copy.
    """
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64                         # per-head size; num_heads * d_kv may differ from d_model
    d_ff: int = 2048
    num_layers: int = 6                    # encoder layers
    num_decoder_layers: Optional[int] = None  # None: same as num_layers (HF's default)
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1              # embeddings, sublayer outputs, FFN hidden, attention probs
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"        # 'relu' (v1.0) | 'gated-gelu' (v1.1; HF gelu_new)
    tie_word_embeddings: bool = True       # True: scaled shared LM head (v1.0); False: own lm_head
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0        # T5 starts decoding from the pad token
    dtype: Any = jnp.float32               # compute dtype (bf16 allowed); norms/softmax in float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None   # None | 'xla' | 'cudnn' (mtlx.models.attention)
    extensions: Tuple[Extension, ...] = ()
    remat: str = "none"                    # activation checkpointing per block (mtlx.models.remat)
    scan_layers: bool = False              # layers 1.. of each stack as one lax.scan (module doc)

    def __post_init__(self):
        check_remat_policy(self.remat)
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"T5Config.scan_layers must be a bool, got {self.scan_layers!r}")
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        # Normalise so that equal configs hash equally ('bfloat16' == jnp.bfloat16) and a list
        # of extensions does not make the config unhashable.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "extensions", tuple(self.extensions))
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(f"T5Config.feed_forward_proj {self.feed_forward_proj!r} is not "
                             f"supported; supported: {list(FEED_FORWARD_PROJS)}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"T5Config.attention_impl must be one of {IMPLEMENTATIONS}, "
                             f"got {self.attention_impl!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 1 or self.num_decoder_layers < 1:
            raise ValueError(f"T5Config.num_layers ({self.num_layers}) and num_decoder_layers "
                             f"({self.num_decoder_layers}) must be positive")

    @property
    def model_type(self) -> str:
        return "t5"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """Mesh TF's bucketing of (key position - query position), int32 in [0, num_buckets).

    Half the buckets (per direction when bidirectional) are exact small distances, the rest
    are log-spaced up to `max_distance`; beyond it everything shares the last bucket. Causal
    (decoder) attention maps all future positions to bucket 0. Same float32 arithmetic as
    transformers' `T5Attention._relative_position_bucket`.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(., 1): log(0) is only reached where is_small selects the exact branch anyway.
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / max_exact
    large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def _gelu_tanh(x):
    # HF's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); on accelerators its
    # gradient saves only x (mtlx.models.activations).
    return activations.gelu_tanh(x)


def _widen_bias(bias, num_keys: int, stack: str, layer: int):
    """The position bias [1, H, Lq, Lk] widened to keys an attention_kv extension prepended
    (prefix tuning): prepended keys sit at no relative position, so they get zero bias."""
    extra = num_keys - bias.shape[-1]
    if extra < 0:
        raise ValueError(f"{stack} layer {layer}: an attention_kv extension dropped keys "
                         f"({bias.shape[-1]} -> {num_keys}); extensions may only prepend keys")
    return jnp.pad(bias, [(0, 0), (0, 0), (0, 0), (extra, 0)]) if extra else bias


def _attend_with_prob_dropout(q, k, v, mask, bias, rate: float, rng):
    """T5 attention (no 1/sqrt(d) scaling) with dropout on the softmax probabilities, as HF T5
    trains (`jax.nn.dot_product_attention` has no dropout). Softmax in float32."""
    logits = precision.einsum("bqhd,bkhd->bhqk", q, k, out_dtype=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, rate, rng)
    return precision.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class T5LayerNorm(nn.Module):
    """RMS norm (Zhang & Sennrich 2019) as T5 uses it: no mean subtraction, no bias, float32
    statistics; output in the compute dtype."""
    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + cfg.layer_norm_epsilon)
        return (scale.astype(jnp.float32) * y).astype(cfg.dtype)


def _projection(cfg: T5Config, features: int, site: Site, std: float, name: str) -> Projection:
    # HF T5's init (T5PreTrainedModel._init_weights, initializer_factor 1): std per matrix.
    return Projection(features, site, use_bias=False, extensions=cfg.extensions, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, kernel_init=nn.initializers.normal(std),
                      name=name)


def _attention_projections(module: nn.Module, cfg: T5Config, kind: str):
    """query/key/value/output Projections of one attention sublayer, with HF's init stds."""
    d, inner = cfg.d_model, cfg.inner_dim
    stds = {"query": (d * cfg.d_kv) ** -0.5, "key": d ** -0.5, "value": d ** -0.5,
            "output": inner ** -0.5}
    return {name: _projection(cfg, d if name == "output" else inner,
                              Site(module.stack, module.layer, f"{kind}.{name}"), std, name)
            for name, std in stds.items()}


def _split_heads(cfg: T5Config, y):
    return y.reshape(*y.shape[:-1], cfg.num_heads, cfg.d_kv)


def _attention(module: nn.Module, cfg: T5Config, q, k, v, mask, bias, deterministic: bool):
    """Softmax(q k^T + bias) v over heads, without 1/sqrt(d) scaling (T5 folds it into the
    init). Dropout on the probabilities when training, as HF does."""
    if not deterministic and cfg.dropout_rate > 0.0:
        if cfg.attention_impl == "cudnn":
            raise ValueError(
                f"attention_impl='cudnn' cannot drop out attention probabilities "
                f"(T5Config.dropout_rate={cfg.dropout_rate}); set dropout_rate=0.0 or "
                f"attention_impl='xla'")
        return _attend_with_prob_dropout(q, k, v, mask, bias, cfg.dropout_rate,
                                         module.make_rng("dropout"))
    if bias is not None and cfg.attention_impl == "cudnn":
        bias = bias.astype(q.dtype)  # cuDNN wants the bias in the input dtype
    return attend(q, k, v, mask=mask, bias=bias, scale=1.0, implementation=cfg.attention_impl)


class T5SelfAttention(nn.Module):
    """Self-attention sublayer: h + extend(Dropout(o(attention(RMSNorm(h))))).

    Layer 0 owns the relative position bias table: called with ``bias=None`` it computes the
    bias [1, H, Lq, Lk] (bidirectional buckets in the encoder, causal in the decoder) and returns
    it, and the stack hands it to every later layer, exactly as HF's first block does.
    With `cache` ({'key', 'value'} [B, max_length, H, Dh]) it runs one decoding position
    `index`: it writes that position's key/value and attends over the whole buffer (the mask
    hides positions not generated yet).
    """
    config: T5Config
    stack: str
    layer: int

    @nn.compact
    def __call__(self, h, mask, bias, routing, deterministic: bool = True, cache=None, index=None,
                 positions=None):
        cfg = self.config
        proj = _attention_projections(self, cfg, "attention")
        x = T5LayerNorm(cfg, name="layer_norm")(h)
        x = extend_layer_norm(cfg.extensions, Site(self.stack, self.layer, "attention.layer_norm"), x, routing)
        q = _split_heads(cfg, proj["query"](x, routing))
        k = _split_heads(cfg, proj["key"](x, routing))
        v = _split_heads(cfg, proj["value"](x, routing))
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), index, 1)
            new_cache = {"key": k, "value": v}
        if bias is None:
            if self.layer != 0:
                raise ValueError(f"{self.stack} layer {self.layer}: only layer 0 owns the relative "
                                 f"position bias; pass it the bias layer 0 returned")
            table = self.param("relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                               (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
            if positions is not None:  # packed rows: positions restart in every segment
                bias = row_position_bias(cfg, table, positions, self.stack == "encoder")
            else:
                queries = (jnp.arange(q.shape[1], dtype=jnp.int32) if index is None
                           else jnp.reshape(index, (1,)).astype(jnp.int32))
                bias = position_bias(cfg, table, queries, k.shape[1], self.stack == "encoder")
        k, v, mask = extend_attention_kv(cfg.extensions, Site(self.stack, self.layer, "attention"),
                                         k, v, mask, routing)
        ctx = _attention(self, cfg, q, k, v, mask,
                         _widen_bias(bias, k.shape[1], self.stack, self.layer), deterministic)
        y = proj["output"](ctx.astype(cfg.dtype).reshape(*x.shape[:-1], cfg.inner_dim), routing)
        y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = extend_sublayer(cfg.extensions, Site(self.stack, self.layer, "attention"), h, y, routing)
        return h + y, bias, new_cache


class T5CrossAttention(nn.Module):
    """Decoder cross-attention sublayer: h + extend(Dropout(o(attention(RMSNorm(h), enc)))).

    No position bias (HF adds an all-zero one). `kv` = precomputed (keys, values) of the encoder
    output (decoding cache); ``kv_only=True`` returns just those, for building the cache.
    """
    config: T5Config
    stack: str
    layer: int

    @nn.compact
    def __call__(self, h, encoder_hidden, mask, routing, deterministic: bool = True, kv=None,
                 kv_only: bool = False):
        cfg = self.config
        proj = _attention_projections(self, cfg, "cross_attention")
        if kv is None:
            kv = (_split_heads(cfg, proj["key"](encoder_hidden, routing)),
                  _split_heads(cfg, proj["value"](encoder_hidden, routing)))
        if kv_only:
            return kv
        x = T5LayerNorm(cfg, name="layer_norm")(h)
        x = extend_layer_norm(cfg.extensions, Site(self.stack, self.layer, "cross_attention.layer_norm"), x, routing)
        q = _split_heads(cfg, proj["query"](x, routing))
        ctx = _attention(self, cfg, q, kv[0], kv[1], mask, None, deterministic)
        y = proj["output"](ctx.astype(cfg.dtype).reshape(*x.shape[:-1], cfg.inner_dim), routing)
        y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = extend_sublayer(cfg.extensions, Site(self.stack, self.layer, "cross_attention"), h, y,
                            routing)
        return h + y


class T5FeedForward(nn.Module):
    """FFN sublayer: h + extend(Dropout(wo(Dropout(act(RMSNorm(h)))))), where
    v1.0: act = relu(wi x); v1.1: act = gelu_new(wi_0 x) * wi_1 x."""
    config: T5Config
    stack: str
    layer: int

    @nn.compact
    def __call__(self, h, routing, deterministic: bool = True):
        cfg = self.config

        def proj(name, features, std):
            return _projection(cfg, features, Site(self.stack, self.layer, f"ffn.{name}"), std, name)

        x = T5LayerNorm(cfg, name="layer_norm")(h)
        x = extend_layer_norm(cfg.extensions, Site(self.stack, self.layer, "ffn.layer_norm"), x, routing)
        if cfg.is_gated:
            y = (_gelu_tanh(proj("input", cfg.d_ff, cfg.d_model ** -0.5)(x, routing))
                 * proj("gate", cfg.d_ff, cfg.d_model ** -0.5)(x, routing))
        else:
            y = jax.nn.relu(proj("input", cfg.d_ff, cfg.d_model ** -0.5)(x, routing))
        y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = proj("output", cfg.d_model, cfg.d_ff ** -0.5)(y, routing)
        y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        y = extend_sublayer(cfg.extensions, Site(self.stack, self.layer, "ffn"), h, y, routing)
        return h + y


class T5Block(nn.Module):
    """One layer: self-attention, (decoder) cross-attention, FFN."""
    config: T5Config
    stack: str
    layer: int

    def setup(self):
        cfg = self.config
        self.attention = T5SelfAttention(cfg, self.stack, self.layer)
        if self.stack == "decoder":
            self.cross_attention = T5CrossAttention(cfg, self.stack, self.layer)
        self.ffn = T5FeedForward(cfg, self.stack, self.layer)

    def __call__(self, h, mask, bias, routing, deterministic: bool = True,
                 encoder_hidden=None, cross_mask=None, positions=None):
        """-> (h, position bias) for the whole sequence (teacher forcing in the decoder).
        positions [B, L]: each token's position (packed rows; layer 0 builds the bias from it)."""
        h, bias, _ = self.attention(h, mask, bias, routing, deterministic, positions=positions)
        if self.stack == "decoder":
            h = self.cross_attention(h, encoder_hidden, cross_mask, routing, deterministic)
        return self.ffn(h, routing, deterministic), bias

    def cross_kv(self, encoder_hidden, routing):
        return self.cross_attention(None, encoder_hidden, None, routing, kv_only=True)

    def step(self, h, mask, bias, cache, index, cross_mask, routing):
        """One decoding position with cache {'key', 'value', 'cross_key', 'cross_value'}."""
        h, bias, self_cache = self.attention(h, mask, bias, routing, True,
                                             cache={"key": cache["key"], "value": cache["value"]},
                                             index=index)
        h = self.cross_attention(h, None, cross_mask, routing, True,
                                 kv=(cache["cross_key"], cache["cross_value"]))
        return self.ffn(h, routing, True), bias, dict(cache, **self_cache)


def remat_block(cfg: T5Config):
    """T5Block, wrapped by `cfg.remat`'s policy when training (its __call__ only: the decoding
    methods `step` / `cross_kv` run without gradients). Argument 5 of __call__ (`deterministic`,
    with self as 0) is static."""
    return remat_layer(T5Block, cfg.remat, static_argnums=(5,))


# Hooks a T5Block calls, with the site names it offers to each (layer index aside).
_PROJECTION_SITES = tuple(f"{k}.{n}" for k in ("attention", "cross_attention")
                          for n in ("query", "key", "value", "output")) + (
    "ffn.input", "ffn.gate", "ffn.output")
_BLOCK_HOOKS = (
    ("projection_input", _PROJECTION_SITES),
    ("projection", _PROJECTION_SITES),
    ("attention_kv", ("attention",)),
    ("sublayer", ("attention", "cross_attention", "ffn")),
    ("layer_norm_output", ("attention.layer_norm", "cross_attention.layer_norm", "ffn.layer_norm")),
)


def check_scan_layers(cfg: T5Config) -> None:
    """Raises ValueError unless ``scan_layers=True`` computes what the unrolled layers compute:
    layers 1.. of each stack run as ONE traced block (layer 1's sites), so every extension must
    attach identically at each of them and declare ``layer_uniform`` (mtlx.models.scan)."""
    if not cfg.scan_layers:
        return
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        check_uniform_extensions(cfg.extensions, stack, range(1, n), _BLOCK_HOOKS,
                                 "T5Config.scan_layers")


def _scan_blocks(module: nn.Module, stack: str, num_layers: int, h, mask, bias, routing,
                 deterministic: bool, encoder_hidden, cross_mask, positions):
    """Layers 1..num_layers-1 of a stack as one jax.lax.scan over their stacked parameters
    ``layer_{i}/...`` (layer 0 ran unrolled: it owns the relative position bias table, which
    the others only read). The body is one T5Block (remat-wrapped if configured) traced with
    layer 1's sites; each step applies it to layer i's parameters with its own dropout key
    (split from the stack's 'dropout' rng). As for BERT (mtlx.models.bert), the stack copies
    the scanned layers' weights each step; the parameter tree is unchanged."""
    cfg = module.config
    if num_layers < 2:
        return h
    check_scan_layers(cfg)
    layer = remat_block(cfg)(cfg, stack, 1, parent=None)

    def apply_layer(p, carry, rngs):
        out, _ = layer.apply({"params": p}, carry, mask, bias, routing, deterministic,
                             encoder_hidden, cross_mask, positions, rngs=rngs)
        return out
    return scan_layers(module, [f"layer_{i}" for i in range(1, num_layers)], h, apply_layer,
                       deterministic, f"T5Config.scan_layers: {stack} params have no "
                                      f"{{missing}} ({num_layers} layers expected)")


def _bias_of_relative(cfg: T5Config, table, relative, bidirectional: bool):
    """[..., H, Lq, Lk] float32 bias from the bucket table [buckets, H] for relative positions
    (key - query) [..., Lq, Lk]."""
    buckets = relative_position_bucket(relative, bidirectional=bidirectional,
                                       num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance)
    values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [..., Lq, Lk, H]
    return jnp.moveaxis(values, -1, -3)


def position_bias(cfg: T5Config, table, query_positions, key_length: int, bidirectional: bool):
    """[1, H, Lq, Lk] float32 bias from the bucket table [buckets, H] for queries at
    `query_positions` [Lq] over keys 0..key_length-1."""
    relative = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions[:, None]
    return _bias_of_relative(cfg, table, relative, bidirectional)[None]


def row_position_bias(cfg: T5Config, table, positions, bidirectional: bool):
    """[B, H, L, L] float32 bias for rows whose tokens sit at `positions` [B, L] (packed rows:
    positions restart at 0 in every segment, so each segment gets the bias it would get alone;
    pairs across segments are masked by the block-diagonal attention mask)."""
    positions = jnp.asarray(positions, jnp.int32)
    relative = positions[:, None, :] - positions[:, :, None]  # key - query
    return _bias_of_relative(cfg, table, relative, bidirectional)


class T5Encoder(nn.Module):
    """extend_embeddings -> dropout -> layers -> RMS norm -> dropout.

    embeddings [B, L, d], attention_mask [B, L] -> (hidden [B, L', d], mask [B, L']); L' > L
    only when an embeddings extension (prompt tuning) prepended positions.
    Packed rows (several examples a row, mtlx.data.packing): `segment_ids` [B, L] keeps
    attention block diagonal and `position_ids` [B, L] (restarting at 0 per segment) gives each
    segment its own relative positions, so every example is encoded as if alone.
    """
    config: T5Config

    @nn.compact
    def __call__(self, embeddings, attention_mask, routing, deterministic: bool = True,
                 position_ids=None, segment_ids=None):
        cfg = self.config
        h, attention_mask = extend_embeddings(cfg.extensions, EMBEDDINGS_SITE, embeddings,
                                              attention_mask, routing)
        for name, x in (("segment_ids", segment_ids), ("position_ids", position_ids)):
            if x is not None and h.shape[1] != x.shape[1]:
                raise ValueError(f"an embeddings extension changed the sequence length from "
                                 f"{x.shape[1]} to {h.shape[1]}; it cannot be combined with "
                                 f"packed rows ({name})")
        mask = padding_mask(attention_mask, segment_ids)
        h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        bias = None  # layer 0 computes it, the others reuse it
        block = remat_block(cfg)
        scan = cfg.scan_layers and not self.is_initializing()
        for i in range(1 if scan else cfg.num_layers):
            h, bias = block(cfg, "encoder", i, name=f"layer_{i}")(h, mask, bias, routing,
                                                                  deterministic, None, None,
                                                                  position_ids)
        if scan:
            h = _scan_blocks(self, "encoder", cfg.num_layers, h, mask, bias, routing,
                             deterministic, None, None, position_ids)
        h = T5LayerNorm(cfg, name="final_layer_norm")(h)
        return Dropout(cfg.dropout_rate)(h, deterministic=deterministic), attention_mask


class T5Decoder(nn.Module):
    """dropout(embeddings) -> layers (causal self-attention, cross-attention, FFN) -> RMS norm
    -> dropout; plus the incremental (KV cache) form used by `greedy_decode`."""
    config: T5Config

    def setup(self):
        cfg = self.config
        block = remat_block(cfg)
        self.layers = [block(cfg, "decoder", i, name=f"layer_{i}")
                       for i in range(cfg.num_decoder_layers)]
        self.final_layer_norm = T5LayerNorm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, embeddings, attention_mask, encoder_hidden, encoder_attention_mask,
                 routing, deterministic: bool = True):
        """embeddings [B, Lt, d]; attention_mask [B, Lt] (1 = real token); encoder_hidden
        [B, Ls, d]; encoder_attention_mask [B, Ls]."""
        positions = jnp.arange(embeddings.shape[1], dtype=jnp.int32)
        causal = positions[None, :] <= positions[:, None]
        mask = attention_mask[:, None, None, :].astype(bool) & causal[None, None]
        cross_mask = encoder_attention_mask[:, None, None, :].astype(bool)
        h = self.dropout(embeddings, deterministic=deterministic)
        bias = None
        scan = self.config.scan_layers and not self.is_initializing()
        for layer in self.layers[:1] if scan else self.layers:
            h, bias = layer(h, mask, bias, routing, deterministic, encoder_hidden, cross_mask)
        if scan:
            h = _scan_blocks(self, "decoder", len(self.layers), h, mask, bias, routing,
                             deterministic, encoder_hidden, cross_mask, None)
        h = self.final_layer_norm(h)
        return self.dropout(h, deterministic=deterministic)

    def init_cache(self, encoder_hidden, max_length: int, routing):
        """Empty self-attention buffers [B, max_length, H, Dh] and each layer's cross-attention
        keys/values of the encoder output (computed once per sequence)."""
        cfg = self.config
        empty = jnp.zeros((encoder_hidden.shape[0], max_length, cfg.num_heads, cfg.d_kv), cfg.dtype)
        cache = {}
        for i, layer in enumerate(self.layers):
            ck, cv = layer.cross_kv(encoder_hidden, routing)
            cache[f"layer_{i}"] = {"key": empty, "value": empty, "cross_key": ck, "cross_value": cv}
        return cache

    def step(self, embeddings, index, cache, encoder_attention_mask, routing):
        """embeddings [B, 1, d] of the token at position `index` -> (hidden [B, 1, d], cache)."""
        max_length = cache["layer_0"]["key"].shape[1]
        visible = jnp.arange(max_length) <= index
        mask = jnp.broadcast_to(visible[None, None, None, :], (embeddings.shape[0], 1, 1, max_length))
        cross_mask = encoder_attention_mask[:, None, None, :].astype(bool)
        h, bias, new_cache = embeddings, None, {}
        for i, layer in enumerate(self.layers):
            h, bias, new_cache[f"layer_{i}"] = layer.step(h, mask, bias, cache[f"layer_{i}"],
                                                          index, cross_mask, routing)
        return self.final_layer_norm(h), new_cache


def _align_encoder_mask(mask, length: int):
    """The encoder mask widened to an encoder output that an embeddings extension lengthened,
    prepending positions every query may see. A caller holding the encoder's own mask
    (`EncoderOutput.attention_mask`, which hides a prompt from rows of tasks without one)
    passes that instead; this serves callers that pass the input mask."""
    extra = length - mask.shape[1]
    if extra < 0:
        raise ValueError(f"encoder_attention_mask covers {mask.shape[1]} positions but the "
                         f"encoder output has {length}")
    if extra:
        mask = jnp.concatenate([jnp.ones((mask.shape[0], extra), mask.dtype), mask], axis=1)
    return mask


class T5Model(nn.Module):
    """T5 encoder-decoder with its LM head. Methods (call with `method=`):

    encode(input_ids, attention_mask, routing, deterministic) -> EncoderOutput
        last_hidden_state [B, L, d] (compute dtype); pooled_output [B, d] = the mean of the
        encoder output over real tokens (attention_mask == 1): T5 has no pooler or [CLS], and
        the masked mean is the usual sentence embedding (Sentence-T5, Ni et al. 2022).
    decode(decoder_input_ids, encoder_hidden, encoder_attention_mask,
           decoder_attention_mask=None, routing, deterministic) -> logits [B, Lt, V] float32
    decode_hidden(...same...) -> decoder output [B, Lt, d] (after the final norm; what
        transformers' T5Model returns as last_hidden_state)
    lm_logits(hidden) -> logits; __call__ = encode then decode (creates every parameter).
    init_cache / decode_step: incremental decoding with a KV cache (see `greedy_decode`).

    Dropout (rate dropout_rate, rng 'dropout') is active when ``deterministic=False``.
    """
    config: T5Config

    def setup(self):
        cfg = self.config
        self.shared = Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0),
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, vocab_sharded=True)
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype,
                                    kernel_init=nn.initializers.normal(1.0))

    def encode(self, input_ids, attention_mask=None, routing: Optional[Routing] = None,
               deterministic: bool = True, position_ids=None, segment_ids=None) -> EncoderOutput:
        """pooled_output: the mean over the row's real tokens (packed rows: pool per segment
        with `segment_mean`)."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h, mask = self.encoder(self.shared(input_ids), attention_mask, routing, deterministic,
                               position_ids, segment_ids)
        m = mask.astype(jnp.float32)[..., None]
        pooled = (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return EncoderOutput(last_hidden_state=h, pooled_output=pooled.astype(cfg.dtype),
                             attention_mask=mask)

    def decode_hidden(self, decoder_input_ids, encoder_hidden, encoder_attention_mask,
                      decoder_attention_mask=None, routing: Optional[Routing] = None,
                      deterministic: bool = True):
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
        encoder_attention_mask = _align_encoder_mask(encoder_attention_mask, encoder_hidden.shape[1])
        return self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden,
                            encoder_attention_mask, routing, deterministic)

    def lm_logits(self, hidden):
        """Decoder output [..., d] -> float32 logits [..., V]."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            # Mesh TF / HF: rescale before reusing the (large-norm) input embedding as output.
            hidden = hidden * jnp.asarray(cfg.d_model ** -0.5, hidden.dtype)
            logits = jnp.einsum("...d,vd->...v", hidden.astype(cfg.dtype),
                                self.shared.embedding.astype(cfg.dtype))
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask,
               decoder_attention_mask=None, routing: Optional[Routing] = None,
               deterministic: bool = True):
        return self.lm_logits(self.decode_hidden(decoder_input_ids, encoder_hidden,
                                                 encoder_attention_mask, decoder_attention_mask,
                                                 routing, deterministic))

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 routing: Optional[Routing] = None, deterministic: bool = True):
        """Teacher-forced logits [B, Lt, V] (float32)."""
        enc = self.encode(input_ids, attention_mask, routing, deterministic)
        return self.decode(decoder_input_ids, enc.last_hidden_state, enc.attention_mask,
                           decoder_attention_mask, routing, deterministic)

    def init_cache(self, encoder_hidden, max_length: int, routing: Optional[Routing] = None):
        return self.decoder.init_cache(encoder_hidden, max_length, routing)

    def decode_step(self, token_ids, index, cache, encoder_attention_mask,
                    routing: Optional[Routing] = None):
        """token_ids [B] at decoder position `index` (scalar) -> (logits [B, V], new cache)."""
        encoder_attention_mask = _align_encoder_mask(
            encoder_attention_mask, cache["layer_0"]["cross_key"].shape[1])
        h, cache = self.decoder.step(self.shared(token_ids[:, None]), index, cache,
                                     encoder_attention_mask, routing)
        return self.lm_logits(h[:, 0]), cache


def _repeat_routing(routing: Optional[Routing], k: int) -> Optional[Routing]:
    """Each example's routing repeated for its k beams (generated weights are per task)."""
    if routing is None or routing.task_ids is None:
        return routing
    return dataclasses.replace(routing, task_ids=jnp.repeat(routing.task_ids, k, axis=0))


def _decoding_start(model: "T5Model", variables, input_ids, attention_mask, max_length: int,
                    routing: Optional[Routing], rows_each: int = 1):
    """(encoder mask, decoding cache, routing) for cached decoding: the encoder runs once per
    example; with rows_each > 1 (beams) its states, mask and task ids are repeated for that
    many decoder rows each."""
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    enc = model.apply(variables, input_ids, attention_mask, routing, method=T5Model.encode)
    hidden = enc.last_hidden_state
    enc_mask = enc.attention_mask if enc.attention_mask is not None else \
        _align_encoder_mask(attention_mask, hidden.shape[1])
    if rows_each > 1:
        hidden = jnp.repeat(hidden, rows_each, axis=0)                     # [B k, Le, d]
        enc_mask = jnp.repeat(enc_mask, rows_each, axis=0)
        routing = _repeat_routing(routing, rows_each)
    cache = model.apply(variables, hidden, max_length, routing, method=T5Model.init_cache)
    return enc_mask, cache, routing


@functools.partial(jax.jit, static_argnames=("cfg", "max_length"))
def greedy_decode(params, cfg: T5Config, input_ids, attention_mask, max_length: int,
                  routing: Optional[Routing] = None):
    """Greedy (argmax) decoding with a KV cache -> int32 token ids [B, max_length].

    `params` is the parameter tree (the value under 'params'). The output holds the generated
    tokens WITHOUT the decoder start token (the layout of `target_ids`); a row's EOS is kept and
    every position after it is `pad_token_id`, as transformers' ``generate(do_sample=False,
    num_beams=1)`` pads finished rows. Static shapes (a fixed buffer and a `lax.while_loop` that
    stops early once every row has emitted EOS), so it jits once per (cfg, shapes, max_length).
    Each step costs one decoder position: self-attention keys/values are cached in a
    [B, max_length, H, Dh] buffer per layer, cross-attention keys/values are computed once.
    """
    model = T5Model(cfg)
    variables = {"params": params}
    b = input_ids.shape[0]
    enc_mask, cache, routing = _decoding_start(model, variables, input_ids, attention_mask,
                                               max_length, routing)

    def cond(state):
        t, _, _, _, done = state
        return (t < max_length) & ~jnp.all(done)

    def body(state):
        t, token, cache, out, done = state
        logits, cache = model.apply(variables, token, t, cache, enc_mask, routing,
                                    method=T5Model.decode_step)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
        return t + 1, nxt, cache, out, done | (nxt == cfg.eos_token_id)

    state = (jnp.asarray(0, jnp.int32), jnp.full((b,), cfg.decoder_start_token_id, jnp.int32),
             cache, jnp.full((b, max_length), cfg.pad_token_id, jnp.int32),
             jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, state)[3]


EARLY_STOPPING = (False, True, "never")


def check_beam_options(num_beams, length_penalty, early_stopping, prefix: str = "") -> None:
    """ValueError naming the option (`prefix` + its name, e.g. 'config.generation.num_beams')
    unless num_beams is a positive integer, length_penalty a number and early_stopping one of
    False, True, 'never' (transformers' values)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"{prefix}num_beams must be a positive integer, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"{prefix}length_penalty must be a number, got {length_penalty!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"{prefix}early_stopping must be one of {list(EARLY_STOPPING)}, got "
                         f"{early_stopping!r}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_length", "num_beams", "length_penalty",
                                             "early_stopping"))
def beam_search_decode(params, cfg: T5Config, input_ids, attention_mask, max_length: int,
                       num_beams: int = 4, length_penalty: float = 1.0,
                       early_stopping=False, routing: Optional[Routing] = None):
    """Beam search with a KV cache -> int32 token ids [B, max_length]: each example's best
    hypothesis, in `greedy_decode`'s layout (no decoder start token; EOS kept, then
    `pad_token_id`).

    The algorithm and its scores are transformers' (``generate(num_beams=k, do_sample=False,
    length_penalty=..., early_stopping=...)`` with ``max_length = max_length + 1``, the start
    token counted there), written with static shapes in one `lax.while_loop`:
      - every step keeps the 2k best continuations over all beams (sum of log-probabilities,
        float32), so that k of them still run when up to k end in EOS;
      - a continuation among the best k that ends in EOS (or reaches max_length) is a finished
        hypothesis scored sum_logprobs / generated_length ** length_penalty; the k best
        finished ones are kept;
      - the k best continuations not finished run on (their caches gathered from their beams);
      - an example stops improving when (early_stopping False) its best running beam, scored at
        the current length, cannot beat its worst finished one, or ("never", with a positive
        length_penalty) not even at max_length; True: once it has k finished hypotheses; the
        loop ends when no example can improve or max_length is reached.
    At the first step only beam 0 holds the start token (the others score -1e9), so the k beams
    differ. The encoder runs once per example; its keys and values are repeated for the beams.
    Routing (task ids) is repeated per beam, so task-specific extensions see each example's
    task. `num_beams=1` is greedy decoding (a cheaper loop: `greedy_decode`).
    """
    check_beam_options(num_beams, length_penalty, early_stopping)
    model = T5Model(cfg)
    variables = {"params": params}
    b, k = input_ids.shape[0], num_beams
    enc_mask, cache, beam_routing = _decoding_start(model, variables, input_ids, attention_mask,
                                                    max_length, routing, rows_each=k)
    keep = 2 * k                      # candidates a step (one EOS token): transformers' 2k
    top_k_mask = jnp.arange(keep) < k
    neg = jnp.float32(-1.0e9)
    if early_stopping == "never" and length_penalty > 0.0:
        best_len = lambda t: jnp.float32(max_length)                          # noqa: E731
    else:
        best_len = lambda t: t.astype(jnp.float32)                            # noqa: E731

    def gather(x, idx):  # x [B, n, ...], idx [B, m] -> [B, m, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(state):
        t, go = state[0], state[-1]
        return (t < max_length) & go

    def body(state):
        t, token, cache, run_seq, run_score, seqs, scores, finished, unsat, _ = state
        logits, cache = model.apply(variables, token, t, cache, enc_mask, beam_routing,
                                    method=T5Model.decode_step)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)       # [B k, V]
        v = logp.shape[-1]
        total = (logp.reshape(b, k, v) + run_score[:, :, None]).reshape(b, k * v)
        cand_score, cand = jax.lax.top_k(total, keep)                         # [B, 2k]
        src, tok = cand // v, (cand % v).astype(jnp.int32)
        cand_seq = gather(run_seq, src).at[:, :, t].set(tok)                  # [B, 2k, L]
        hits = (tok == cfg.eos_token_id) | (t + 1 >= max_length)
        # the k best continuations that did not finish run on
        running = cand_score + hits.astype(jnp.float32) * neg
        nxt = jax.lax.top_k(running, k)[1]
        run_seq, run_score = gather(cand_seq, nxt), gather(running, nxt)
        beam_src = gather(src, nxt)                                           # [B, k]
        # finished hypotheses among the best k candidates, merged with the kept ones
        just = hits & top_k_mask[None, :]
        fin = cand_score / ((t + 1).astype(jnp.float32) ** length_penalty)
        if early_stopping is True:
            fin = fin + (jnp.all(finished, axis=-1, keepdims=True)).astype(jnp.float32) * neg
        fin = fin + (~unsat).astype(jnp.float32) * neg + (~just).astype(jnp.float32) * neg
        m_seq = jnp.concatenate([seqs, cand_seq], axis=1)
        m_score = jnp.concatenate([scores, fin], axis=1)
        m_fin = jnp.concatenate([finished, just], axis=1)
        best = jax.lax.top_k(m_score, k)[1]
        seqs, scores, finished = gather(m_seq, best), gather(m_score, best), gather(m_fin, best)
        # each running beam's self-attention cache is its source beam's
        rows = (jnp.arange(b)[:, None] * k + beam_src).reshape(b * k)
        cache = {name: dict(layer, key=jnp.take(layer["key"], rows, axis=0),
                            value=jnp.take(layer["value"], rows, axis=0))
                 for name, layer in cache.items()}
        t = t + 1
        best_running = run_score[:, :1] / (best_len(t) ** length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), neg)
        unsat = unsat & jnp.any(best_running > worst, axis=-1, keepdims=True)
        go = jnp.any(unsat) & ~jnp.all(hits)
        if early_stopping is True:
            go = go & ~jnp.all(finished)
        return (t, run_seq[:, :, t - 1].reshape(b * k), cache, run_seq, run_score, seqs, scores,
                finished, unsat, go)

    pad = jnp.full((b, k, max_length), cfg.pad_token_id, jnp.int32)
    state = (jnp.asarray(0, jnp.int32), jnp.full((b * k,), cfg.decoder_start_token_id, jnp.int32),
             cache, pad, jnp.zeros((b, k), jnp.float32).at[:, 1:].set(neg), pad,
             jnp.full((b, k), neg), jnp.zeros((b, k), bool), jnp.ones((b, 1), bool),
             jnp.asarray(True))
    out = jax.lax.while_loop(cond, body, state)
    return out[5][:, 0]


def module(cfg: T5Config) -> T5Model:
    return T5Model(cfg)


def abstract_params(cfg: T5Config):
    """The parameter pytree (every parameter, decoder and LM head included) as
    jax.ShapeDtypeStruct leaves (no memory allocated)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    routing = Routing(task_ids=jnp.zeros((1,), jnp.int32))

    def init():
        return module(cfg).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), ids,
                                routing=routing)["params"]

    return jax.eval_shape(init)


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion
# ---------------------------------------------------------------------------------------------

_REQUIRED_HF = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# A weight old checkpoints carry that HF's model never uses (cross-attention has no bias).
_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_EMBEDDING_PATH = "shared/embedding"
_LM_HEAD_PATH = "lm_head/kernel"


def config_from_hf(hf: Mapping[str, Any]) -> T5Config:
    """T5Config from a HF config.json dict.

    Raises KeyError naming a missing architecture key and ValueError naming a key whose value
    is not supported (feed_forward_proj other than relu / gated-gelu, model_type, several EOS
    ids, no pad id). transformers >= 5 always writes ``tie_word_embeddings: true`` and keeps
    the v1.0/v1.1 distinction in ``scale_decoder_outputs``, which wins when present.
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not a T5 type {MODEL_TYPES}")
    for key in _REQUIRED_HF:
        if key not in hf:
            raise KeyError(f"config.json has no {key!r}, which a T5 config needs")
    ffp = hf.get("feed_forward_proj", "relu")
    if ffp not in FEED_FORWARD_PROJS:
        raise ValueError(f"config.json feed_forward_proj={ffp!r} is not supported; supported: "
                         f"'relu' (T5 v1.0) and 'gated-gelu' (T5 v1.1)")
    pad = hf.get("pad_token_id", 0)
    if pad is None:
        raise ValueError("config.json pad_token_id is null; T5 needs it (decoder start, padding "
                         "after EOS)")
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"config.json eos_token_id={eos!r}: only one EOS id is supported")
        eos = eos[0]
    if eos is None:
        raise ValueError("config.json eos_token_id is null; T5 needs it (greedy decoding stops there)")
    start = hf.get("decoder_start_token_id")
    if "scale_decoder_outputs" in hf:
        tied = bool(hf["scale_decoder_outputs"])
    else:
        tied = bool(hf.get("tie_word_embeddings", True))
    num_decoder_layers = hf.get("num_decoder_layers")
    return T5Config(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        d_kv=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_layers=int(hf["num_layers"]),
        num_decoder_layers=None if num_decoder_layers is None else int(num_decoder_layers),
        num_heads=int(hf["num_heads"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=ffp,
        tie_word_embeddings=tied,
        pad_token_id=int(pad),
        eos_token_id=int(eos),
        decoder_start_token_id=int(pad if start is None else start),
    )


def config_to_hf(cfg: T5Config) -> dict:
    """A config.json dict that transformers' T5Config / T5ForConditionalGeneration load (both
    the 4.x reading of tie_word_embeddings and 5.x's scale_decoder_outputs)."""
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "dtype": jnp.dtype(cfg.param_dtype).name,
    }


def _mapping(cfg: T5Config):
    """(mtlx path, HF key, transpose?) for every parameter except the embedding and LM head."""
    attn = {"query": "q", "key": "k", "value": "v", "output": "o"}
    ffn = ({"input": "wi_0", "gate": "wi_1", "output": "wo"} if cfg.is_gated
           else {"input": "wi", "output": "wo"})
    rows = []
    for stack in STACKS:
        n = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
        for i in range(n):
            m, h = f"{stack}/layer_{i}", f"{stack}.block.{i}.layer"
            for ours, theirs in attn.items():
                rows.append((f"{m}/attention/{ours}/kernel", f"{h}.0.SelfAttention.{theirs}.weight", True))
            if i == 0:
                rows.append((f"{m}/attention/relative_attention_bias",
                             f"{h}.0.SelfAttention.relative_attention_bias.weight", False))
            rows.append((f"{m}/attention/layer_norm/scale", f"{h}.0.layer_norm.weight", False))
            ffn_index = 1
            if stack == "decoder":
                for ours, theirs in attn.items():
                    rows.append((f"{m}/cross_attention/{ours}/kernel",
                                 f"{h}.1.EncDecAttention.{theirs}.weight", True))
                rows.append((f"{m}/cross_attention/layer_norm/scale", f"{h}.1.layer_norm.weight", False))
                ffn_index = 2
            for ours, theirs in ffn.items():
                rows.append((f"{m}/ffn/{ours}/kernel",
                             f"{h}.{ffn_index}.DenseReluDense.{theirs}.weight", True))
            rows.append((f"{m}/ffn/layer_norm/scale", f"{h}.{ffn_index}.layer_norm.weight", False))
        rows.append((f"{stack}/final_layer_norm/scale", f"{stack}.final_layer_norm.weight", False))
    return rows


def hf_param_names(cfg: T5Config) -> dict:
    """mtlx parameter path ('encoder/layer_0/attention/query/kernel') -> HF key."""
    names = {m: h for m, h, _ in _mapping(cfg)}
    names[_EMBEDDING_PATH] = "shared.weight"
    if not cfg.tie_word_embeddings:
        names[_LM_HEAD_PATH] = "lm_head.weight"
    return names


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _shared_embedding(tensors: Mapping[str, Any]):
    """The one input embedding: shared.weight, or its aliases encoder/decoder.embed_tokens
    (checkpoints keep any subset of the three; transformers ties them all)."""
    present = [k for k in _EMBEDDING_KEYS if k in tensors]
    if not present:
        raise KeyError(f"weight 'shared.weight' (for mtlx parameter {_EMBEDDING_PATH!r}) is missing "
                       f"from the checkpoint, and so are its aliases {list(_EMBEDDING_KEYS[1:])}")
    first = np.asarray(tensors[present[0]])
    for key in present[1:]:
        if not np.array_equal(np.asarray(tensors[key]), first):
            raise ValueError(f"checkpoint weights {present[0]!r} and {key!r} differ: this T5 "
                             f"shares one input embedding between encoder and decoder")
    return present[0], first


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: T5Config) -> dict:
    """mtlx params (the tree under 'params') from HF T5 weights.

    Raises KeyError naming the HF key of a missing weight and ValueError for weights in the
    encoder/decoder namespace this config has no place for (e.g. extra layers) or for an
    embedding/LM head layout the config contradicts. The LM head: with tie_word_embeddings the
    shared embedding (a separate lm_head.weight equal to it is accepted, a different one is an
    error); without, lm_head.weight, or the shared embedding when the checkpoint has none —
    transformers >= 5 ties T5's LM head to `shared` in that case and saves only shared.weight.
    Leaves are numpy arrays of cfg.param_dtype.
    """
    params: dict = {}
    used = set(_IGNORED_KEYS)

    def put(path, value, transpose, hf_key):
        value = np.asarray(value)
        if transpose:
            if value.ndim != 2:
                raise ValueError(f"weight {hf_key!r} should be a 2-D Linear weight, got shape {value.shape}")
            value = value.T
        _set(params, path, np.ascontiguousarray(value.astype(cfg.param_dtype)))
        used.add(hf_key)

    emb_key, emb = _shared_embedding(tensors)
    put(_EMBEDDING_PATH, emb, False, emb_key)
    used.update(k for k in _EMBEDDING_KEYS if k in tensors)
    for mtlx_path, hf_key, transpose in _mapping(cfg):
        if hf_key not in tensors:
            raise KeyError(f"weight {hf_key!r} (for mtlx parameter {mtlx_path!r}) is missing from "
                           f"the checkpoint (T5Config: {cfg.num_layers}+{cfg.num_decoder_layers} "
                           f"layers, feed_forward_proj={cfg.feed_forward_proj!r})")
        put(mtlx_path, tensors[hf_key], transpose, hf_key)
    head = tensors.get("lm_head.weight")
    if cfg.tie_word_embeddings:
        if head is not None and not np.array_equal(np.asarray(head), emb):
            raise ValueError("checkpoint has its own lm_head.weight, different from shared.weight, "
                             "but the config ties them (tie_word_embeddings / "
                             "scale_decoder_outputs true): an untied head with decoder-output "
                             "scaling is not a T5 variant this model implements")
    else:
        put(_LM_HEAD_PATH, emb if head is None else head, True, "lm_head.weight")
    used.add("lm_head.weight")
    unexpected = sorted(k for k in tensors if k.split(".")[0] in STACKS and k not in used)
    if unexpected:
        raise ValueError(f"checkpoint weights with no place in this T5 config "
                         f"({cfg.num_layers}+{cfg.num_decoder_layers} layers, "
                         f"feed_forward_proj={cfg.feed_forward_proj!r}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return params


def params_to_hf(params, cfg: T5Config) -> dict:
    """HF T5 weights (T5ForConditionalGeneration keys, also loadable by T5Model) as numpy.

    Writes shared.weight once (transformers re-ties encoder/decoder.embed_tokens to it) and
    lm_head.weight only when the head is untied. Raises ValueError for parameters with no HF
    equivalent (extension parameters such as adapters or LoRA): exporting would drop them.
    """
    flat = flat_paths(params)
    out = {}
    rows = [(_EMBEDDING_PATH, "shared.weight", False), *_mapping(cfg)]
    if not cfg.tie_word_embeddings:
        rows.append((_LM_HEAD_PATH, "lm_head.weight", True))
    for mtlx_path, hf_key, transpose in rows:
        if mtlx_path not in flat:
            raise KeyError(f"parameter {mtlx_path!r} (HF {hf_key!r}) is missing from params")
        value = np.asarray(jax.device_get(flat.pop(mtlx_path)))
        out[hf_key] = np.ascontiguousarray(value.T if transpose else value)
    if flat:
        raise ValueError(
            f"parameters with no Hugging Face T5 equivalent: {sorted(flat)[:8]}; extension "
            f"parameters (adapters, LoRA, ...) cannot go into a plain checkpoint: merge or drop "
            f"them before exporting")
    return out
