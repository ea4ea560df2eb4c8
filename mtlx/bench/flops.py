"""Analytic FLOPs of one multi-task training step: BERT encoder + task heads + PEFT extensions.

Model FLOPs, the numerator of MFU (Chowdhery et al. 2022, PaLM, appendix B; MaxText): the
arithmetic the model needs, whatever the implementation does. Counted:

  * every matrix product, 2 FLOPs per multiply-accumulate (MAC):
      - per token and layer: query/key/value/output projections 4 d^2, feed-forward 2 d f,
        attention scores Q K^T and probabilities x V: 2 L d (L the row length, all heads);
      - per example: the pooler d^2 and the task head d c (c the example's task's outputs; L d c
        for token classification);
      - PEFT extensions where they attach (found by asking each extension's hooks which sites
        it takes, so a pattern such as 'encoder.layer[0-3].attention' is counted exactly):
        bottleneck adapter 2 d m per token and site (down d->m, up m->d), LoRA r (in + out)
        per token and projection, HyperFormer++ the same adapter MACs plus its generator once
        per step for every (task, layer, block): MLP (3 e) h + h p and linear generators
        p (2 d m + m + 3 d) (e the embedding size, h the hidden and p the projected size);
  * the backward pass: a gradient with respect to every product's activation input (2 FLOPs
    per MAC; in all four configurations something trainable sits below every product: the
    embedding LayerNorm trains in the PEFT configurations), a gradient with respect to its
    weight only when that weight trains (2 FLOPs per MAC), and for products of two activations
    (attention) a gradient for each operand. So a full fine-tuning step is 6 x the product
    MACs of the forward pass ("6 N tokens" plus attention, Kaplan et al. 2020 / REFERENCE.md
    section 6: 12 layers L d per token for attention) and a frozen backbone 4 x.

Not counted: embedding lookups and their gradient (gathers and scatters), LayerNorm, softmax,
activations, biases, dropout, losses, the optimizer update, padding-free savings (every one of
the B x L positions is counted, padded or not), and work an implementation does beyond the
model (recomputation under remat; weight gradients of frozen weights that a step computes and
then discards). tests/test_bench.py checks the count against a hand count and against XLA's
own cost analysis of the compiled forward pass and train step of a tiny model.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

from mtlx.models.layers import Site

# The projection sites of a BERT layer and (in, out) in units of (hidden, intermediate) sizes.
_BERT_PROJECTIONS = ("attention.query", "attention.key", "attention.value", "attention.output",
                     "ffn.input", "ffn.output")
_BERT_SUBLAYERS = ("attention", "ffn")


@dataclasses.dataclass(frozen=True)
class Product:
    """One kind of matrix product in the step, summed over the layers and rows it runs on.

    macs: multiply-accumulates of the forward pass. operands: 'weight' (activation x weight)
    or 'activations' (activation x activation, e.g. Q K^T). trainable: whether the weight
    gets a gradient (ignored for 'activations').
    """
    name: str
    macs: float
    operands: str = "weight"
    trainable: bool = True

    @property
    def forward_flops(self) -> float:
        return 2.0 * self.macs

    @property
    def train_flops(self) -> float:
        """forward + backward: 6 MACs-worth when both operands need a gradient, 4 when not."""
        both = self.operands == "activations" or self.trainable
        return (6.0 if both else 4.0) * self.macs


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """The products of one step and their totals (FLOPs per step)."""
    products: tuple

    @property
    def forward(self) -> float:
        return sum(p.forward_flops for p in self.products)

    @property
    def train(self) -> float:
        return sum(p.train_flops for p in self.products)

    def by_name(self) -> Dict[str, float]:
        """{product name: training FLOPs}."""
        out: Dict[str, float] = {}
        for p in self.products:
            out[p.name] = out.get(p.name, 0.0) + p.train_flops
        return out


def _projection_shape(cfg, name: str):
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"ffn.input": (d, f), "ffn.output": (f, d)}.get(name, (d, d))


def encoder_products(cfg, batch_size: int, seq_len: int, trainable: bool = True) -> List[Product]:
    """The products of a BERT encoder (mtlx.models.bert.BertConfig) over B x L positions."""
    if type(cfg).__name__ != "BertConfig":
        raise ValueError(f"mtlx/bench/flops.py: FLOPs are modelled for BertConfig backbones, got "
                         f"{type(cfg).__name__}")
    tokens = float(batch_size) * seq_len
    n, d = cfg.num_layers, cfg.hidden_size
    out = []
    for name in _BERT_PROJECTIONS:
        i, o = _projection_shape(cfg, name)
        out.append(Product(name, n * tokens * i * o, "weight", trainable))
    # Q K^T and P V: per token, L keys x d (all heads together), each.
    out.append(Product("attention.scores", n * tokens * seq_len * d, "activations"))
    out.append(Product("attention.context", n * tokens * seq_len * d, "activations"))
    if cfg.add_pooler:
        out.append(Product("pooler", float(batch_size) * d * d, "weight", trainable))
    return out


def head_products(tasks: Sequence, task_ids: Sequence[int], hidden: int,
                  seq_len: int) -> List[Product]:
    """Task heads: each example multiplies its pooled vector (sequence-level heads) or each of
    its L token vectors (token classification) by its own task's head. Other kinds (span,
    seq2seq) are an error naming the task."""
    macs = 0.0
    for t in task_ids:
        if t < 0:
            continue
        task = tasks[t]
        if task.kind in ("classification", "multilabel", "regression", "multiple_choice"):
            macs += hidden * task.out_features
        elif task.kind == "token_classification":
            macs += seq_len * hidden * task.out_features
        else:
            raise ValueError(f"mtlx/bench/flops.py: no FLOPs model for task {task.name!r} of "
                             f"head kind {task.kind!r}")
    return [Product("heads", macs, "weight", True)]


def extension_products(ext, cfg, batch_size: int, seq_len: int, num_tasks: int) -> List[Product]:
    """The products one PEFT extension adds to a BERT step (every extension weight trains).

    Raises ValueError naming the extension for a method without a FLOPs model here."""
    from mtlx.peft.adapters import Adapter, bottleneck_size
    from mtlx.peft.lora import LoRA
    tokens = float(batch_size) * seq_len
    d = cfg.hidden_size
    sites = [Site("encoder", i, s) for i in range(cfg.num_layers) for s in _BERT_SUBLAYERS]
    projections = [Site("encoder", i, s) for i in range(cfg.num_layers) for s in _BERT_PROJECTIONS]
    hyper_pp = _hyperformer_pp()
    if isinstance(ext, Adapter):
        m = bottleneck_size(d, ext.reduction_factor, "adapter.reduction_factor")
        k = sum(ext.sublayer(s) is not None for s in sites)
        return [Product(f"{ext.name}", k * tokens * 2 * d * m)]
    if isinstance(ext, LoRA):
        macs = 0.0
        for s in projections:
            if ext.projection(s) is not None:
                i, o = _projection_shape(cfg, s.name)
                macs += tokens * ext.rank * (i + o)
        return [Product(f"{ext.name}", macs)]
    if hyper_pp is not None and isinstance(ext, hyper_pp):
        m = ext.adapter_dim
        k = sum(ext.sublayer(s) is not None for s in sites)
        layers = dict(ext.bound_stacks())["encoder"]
        conditions = float(len(ext.active)) * layers * 2  # (task, layer, block), BERT: encoder only
        e_in = ext.task_embedding_dim + ext.layer_embedding_dim + ext.block_embedding_dim
        mlp = conditions * (e_in * ext.hidden_dim + ext.hidden_dim * ext.projected_dim)
        gen = conditions * ext.projected_dim * (2 * d * m + m + 3 * d)
        return [Product(f"{ext.name}.adapters", k * tokens * 2 * d * m),
                Product(f"{ext.name}.generator", mlp + gen)]
    raise ValueError(f"mtlx/bench/flops.py: no FLOPs model for extension {ext.name!r} "
                     f"({type(ext).__name__}); modelled: Adapter, LoRA, HyperFormerPP")


def _hyperformer_pp():
    try:
        from mtlx.peft.hyper import HyperFormerPP
    except ImportError:  # written in parallel; without it there is nothing to count
        return None
    return HyperFormerPP


def step_flops(model, batch_size: int, seq_len: int, task_ids: Optional[Sequence[int]] = None,
               backbone_trainable: bool = True) -> StepFlops:
    """FLOPs of one training step of `model` (mtlx.models.multitask.MultiTaskModel with a BERT
    backbone) on a B x L batch whose rows belong to `task_ids` (default: task i % T for row i).

    backbone_trainable=False: the encoder's weights are frozen (PEFT configurations)."""
    cfg = model.backbone_config
    tasks = tuple(model.tasks)
    if task_ids is None:
        task_ids = [i % len(tasks) for i in range(batch_size)]
    if len(task_ids) != batch_size:
        raise ValueError(f"mtlx/bench/flops.py: {len(task_ids)} task ids for a batch of {batch_size}")
    products = encoder_products(cfg, batch_size, seq_len, backbone_trainable)
    products += head_products(tasks, task_ids, cfg.hidden_size, seq_len)
    for ext in cfg.extensions:
        products += extension_products(ext, cfg, batch_size, seq_len, len(tasks))
    return StepFlops(tuple(products))
