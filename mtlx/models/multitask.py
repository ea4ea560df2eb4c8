"""One shared backbone, one small head per task, one forward over a mixed-task batch.

    model = MultiTaskModel(backbone_config=bert_cfg, tasks=(TaskHead('sst2', 'classification', 2),
                                                            TaskHead('stsb', 'regression')))
    params = model.init(rng, batch)['params']          # {'backbone': ..., 'heads': {name: ...}}
    outputs = model.apply({'params': params}, batch)   # pure function of (params, batch)
    losses, counts = task_losses(outputs, batch, model.tasks)

Everything task-specific is keyed by task name. `batch.task_ids[i]` indexes `tasks`; adding a
task appends a name and leaves every other parameter's name and value alone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mtlx.batch import Batch, check_task_ids
from mtlx.models import heads as H
from mtlx.models.dropout import Dropout
from mtlx.models.layers import Routing


def backbone_module(config, name: str = "backbone") -> nn.Module:
    """The Flax module of a backbone config (BertConfig -> BertEncoder, T5Config -> T5Model)."""
    kind = type(config).__name__
    if kind == "BertConfig":
        from mtlx.models.bert import BertEncoder
        return BertEncoder(config, name=name)
    if kind == "T5Config":
        from mtlx.models.t5 import T5Model
        return T5Model(config, name=name)
    raise ValueError(f"unsupported backbone config {kind}; expected BertConfig or T5Config")


def hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model")


class _HeadParams(nn.Module):
    """The parameters of one task's head: kernel [d, out] and bias [out]."""
    features: int

    @nn.compact
    def __call__(self, d: int):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (d, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return {"kernel": kernel, "bias": bias}


class TaskHeads(nn.Module):
    """``params['heads'][task_name] = {'kernel', 'bias'}`` for every task that has a head."""
    tasks: tuple

    @nn.compact
    def __call__(self, d: int):
        return {t.name: _HeadParams(t.out_features, name=t.name)(d)
                for t in self.tasks if t.out_features > 0}


class MultiTaskModel(nn.Module):
    backbone_config: Any
    tasks: tuple  # of TaskHead, in task-id order
    head_dropout: float = 0.1

    def setup(self):
        H.check_tasks(self.tasks)
        is_t5 = type(self.backbone_config).__name__ == "T5Config"
        seq2seq = [t.name for t in self.tasks if t.kind == "seq2seq"]
        if seq2seq and not is_t5:
            raise ValueError(f"tasks {seq2seq} are seq2seq (text-to-text) and need a T5 backbone, "
                             f"got {type(self.backbone_config).__name__}")
        if getattr(self.backbone_config, "extensions", ()):
            from mtlx.peft.registry import check_task_order
            check_task_order(self.backbone_config, self.task_names)
        self.backbone = backbone_module(self.backbone_config)
        self.heads = TaskHeads(self.tasks)
        self.dropout = Dropout(self.head_dropout)
        self.generators = {
            ext.name: ext.generator() for ext in getattr(self.backbone_config, "extensions", ())
            if ext.generator() is not None}

    @property
    def task_names(self) -> tuple:
        return tuple(t.name for t in self.tasks)

    def task_index(self, name: str) -> int:
        names = self.task_names
        if name not in names:
            raise KeyError(f"unknown task {name!r}; this model's tasks: {list(names)}")
        return names.index(name)

    def check_batch(self, batch: Batch) -> None:
        """Host-side validation (run before jit): task ids in range."""
        check_task_ids(batch.task_ids, len(self.tasks), self.task_names)

    def generated_weights(self):
        """Every task's hypernetwork-generated weights ({extension name: pytree}) or None."""
        return {name: gen() for name, gen in self.generators.items()} or None

    def __call__(self, batch: Batch, deterministic: bool = True, segments=None) -> dict:
        """Outputs per head kind (see mtlx.models.heads). With `segments` (packed rows,
        mtlx.data.packing.PackedSegments), sequence-level outputs are per SEGMENT, flattened
        to [B*S, ...] in row-major order, and routed by `segments.task_ids`; rows that mix
        tasks (`segments.mixed`) route task-specific modules and token-level heads per token."""
        cfg = self.backbone_config
        # What task-specific modules and token-level heads route by: each row's task, or on
        # rows that mix tasks each token's.
        route_ids = batch.task_ids
        if segments is not None and segments.mixed:
            route_ids = H.token_task_ids(batch.segment_ids, segments.task_ids)
        # Hypernetworks generate every task's weights once per forward pass (not per example).
        routing = Routing(task_ids=route_ids, generated=self.generated_weights())
        is_t5 = type(cfg).__name__ == "T5Config"
        if is_t5:
            enc = self.backbone.encode(batch.input_ids, batch.attention_mask, routing=routing,
                                       deterministic=deterministic, position_ids=batch.position_ids,
                                       segment_ids=batch.segment_ids)
        else:
            enc = self.backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                                routing=routing, deterministic=deterministic,
                                pool_positions=None if segments is None else segments.starts)
        hidden = enc.last_hidden_state
        token_kinds = sorted({t.kind for t in self.tasks} & {"token_classification", "span"})
        if token_kinds and hidden.shape[1] != batch.input_ids.shape[1]:
            raise ValueError(
                f"an embeddings extension (e.g. prompt tuning) changed the sequence length from "
                f"{batch.input_ids.shape[1]} to {hidden.shape[1]}; token-level heads {token_kinds} "
                f"need one output per input token: use prompt tuning with sequence-level tasks only")
        pooled = enc.pooled_output
        if is_t5 and segments is not None:  # T5 pools by the mean: per segment on packed rows
            pooled = segment_mean(hidden, batch.segment_ids, segments.starts.shape[1])
        elif pooled is None:
            pooled = hidden[:, 0] if segments is None else jnp.take_along_axis(
                hidden, segments.starts[..., None], axis=1)
        seq_task_ids = batch.task_ids
        if segments is not None:  # one pseudo-row per segment for sequence-level heads
            pooled = pooled.reshape((-1, pooled.shape[-1]))
            seq_task_ids = segments.task_ids.reshape((-1,))
        outputs = {"pooled": pooled}
        d = hidden.shape[-1]
        head_params = self.heads(d)
        dtype = hidden.dtype
        pooled_d = self.dropout(pooled, deterministic=deterministic)
        hidden_d = self.dropout(hidden, deterministic=deterministic)
        kinds = {t.kind for t in self.tasks}
        for kind in sorted(kinds - {"seq2seq"}):
            r = H.kind_routing(self.tasks, kind)
            kernel, bias = H.stack_head_params(head_params, r, dtype)
            token_level = kind in ("token_classification", "span")
            local, _ = H.route(route_ids if token_level else seq_task_ids, r)
            out = H.apply_kind(hidden_d if token_level else pooled_d, kernel, bias, local)
            if kind in ("regression", "multiple_choice"):
                outputs[kind] = out[..., 0]
            elif kind == "span":
                outputs["span_start"], outputs["span_end"] = out[..., 0], out[..., 1]
            else:
                outputs[kind] = out
        if "seq2seq" in kinds:
            if batch.decoder_input_ids is None:
                raise ValueError("seq2seq tasks need batch.decoder_input_ids (teacher forcing)")
            outputs["seq2seq"] = self.backbone.decode(
                batch.decoder_input_ids, hidden,
                batch.attention_mask if enc.attention_mask is None else enc.attention_mask,
                decoder_attention_mask=batch.decoder_attention_mask, routing=routing,
                deterministic=deterministic)
        return outputs


def segment_mean(hidden, segment_ids, num_segments: int):
    """[B, S, d]: the mean of each segment's tokens (segment k+1 of `segment_ids` [B, L]);
    zeros for a segment slot without tokens. Sums in float32."""
    member = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    sums = jnp.einsum("bls,bld->bsd", member, hidden.astype(jnp.float32))
    return (sums / jnp.maximum(member.sum(1)[..., None], 1.0)).astype(hidden.dtype)


def greedy_generate(model: MultiTaskModel, params: dict, batch: Batch, max_length: int):
    """Text-to-text (seq2seq) tasks: greedy decoding with the T5 backbone -> ids [B, max_length].

    Every row is decoded (rows of other tasks give text too; ignore them); task-specific
    extensions route by `batch.task_ids`, hypernetwork weights are generated once.
    """
    return generate(model, params, batch, max_length)


def generate(model: MultiTaskModel, params: dict, batch: Batch, max_length: int,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping=False):
    """Text-to-text (seq2seq) tasks: ids [B, max_length] decoded by the T5 backbone, greedily
    (num_beams=1: `mtlx.models.t5.greedy_decode`) or by beam search
    (`mtlx.models.t5.beam_search_decode`: transformers' algorithm, its length_penalty and
    early_stopping). Every row is decoded (rows of other tasks give text too; ignore them);
    task-specific extensions route by `batch.task_ids` (repeated per beam), hypernetwork
    weights are generated once."""
    from mtlx.models import t5
    t5.check_beam_options(num_beams, length_penalty, early_stopping)
    generated = model.apply({"params": params}, method=MultiTaskModel.generated_weights)
    routing = Routing(task_ids=batch.task_ids, generated=generated)
    if num_beams == 1:
        return t5.greedy_decode(params["backbone"], model.backbone_config, batch.input_ids,
                                batch.attention_mask, max_length, routing=routing)
    return t5.beam_search_decode(params["backbone"], model.backbone_config, batch.input_ids,
                                 batch.attention_mask, max_length, num_beams=num_beams,
                                 length_penalty=float(length_penalty),
                                 early_stopping=early_stopping, routing=routing)


def init_params(model: MultiTaskModel, rng, batch: Batch) -> dict:
    """Initial parameters (a plain dict pytree) for `model` on a batch of the run's shapes."""
    return model.init({"params": rng, "dropout": rng}, batch)["params"]


def with_backbone(params: dict, backbone_params: dict) -> dict:
    """`params` with the backbone replaced, e.g. by a loaded Hugging Face checkpoint.

    Only the backbone parameters the model has are taken (a T5 model with no seq2seq task has
    no decoder parameters); a backbone parameter the model has but the checkpoint lacks is an
    error naming its path.
    """
    import flax.traverse_util as tu
    have = tu.flatten_dict(params["backbone"], sep="/")
    got = tu.flatten_dict(backbone_params, sep="/")
    missing = sorted(set(have) - set(got))
    if missing:
        raise KeyError(f"backbone parameters missing from the checkpoint: {missing[:10]}"
                       + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for k, v in have.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise ValueError(f"backbone parameter {k}: checkpoint shape {tuple(got[k].shape)} "
                             f"!= model shape {tuple(v.shape)}")
    out = dict(params)
    out["backbone"] = tu.unflatten_dict({k: got[k] for k in have}, sep="/")
    return out
