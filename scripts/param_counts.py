"""Trainable-parameter table on the real T5-base configuration, shapes only (no weights).

    python scripts/param_counts.py                          # print the table
    python scripts/param_counts.py --markdown table.md      # also write it as markdown
    python scripts/param_counts.py --peft-check             # + Hugging Face PEFT's own LoRA count

T5-base (Raffel et al. 2020; HF t5-base): d_model 768, d_ff 3072, 12 + 12 layers, 12 heads,
d_kv 64, vocab 32128, ReLU FFN, tied LM head: 222,903,552 parameters. Every row except the first
is counted by building the mtlx model (MultiTaskModel, 8 GLUE tasks as text-to-text tasks, so no
task heads) with the method attached through mtlx.peft.registry and tracing its init with
jax.eval_shape; trainable parameters are those `registry.trainable_patterns` selects (what
trains, per row, below). "Per task" follows HyperFormer (Karimi Mahabadi et al. 2021, Table 1;
mtlx.models.report): a task's own trainable parameters + 1/T of the shared trainable ones, as a
percentage of the backbone. "Total" is all parameters of the deployed system over the backbone
(8 single-task models = 8.0x). The single-task fine-tuning row is arithmetic (8 copies of the
backbone), labelled as such.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtlx.batch import make_batch  # noqa: E402
from mtlx.models.heads import TaskHead  # noqa: E402
from mtlx.models.multitask import MultiTaskModel, init_params  # noqa: E402
from mtlx.models.report import parameter_report  # noqa: E402
from mtlx.models.t5 import T5Config  # noqa: E402
from mtlx.peft import registry  # noqa: E402
from mtlx.train.optim import trainable_mask  # noqa: E402

GLUE8 = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")  # the paper's 8 tasks
LN = "+ backbone layer norms (shared)"

# (label, method configs, layer norms train?, what trains)
ROWS = (
    ("Full fine-tuning, one multi-task model", None, True, "everything, shared by all tasks"),
    ("Houlsby adapters r=32", [{"method": "adapter", "variant": "houlsby", "reduction_factor": 32}],
     True, "per-task adapters after self-attention and FFN, every layer " + LN),
    ("Pfeiffer adapters r=32", [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 32}],
     False, "per-task adapter after the FFN, every layer"),
    ("LoRA r=8 on q,v", [{"method": "lora", "rank": 8, "alpha": 16,
                          "targets": ["attention.query", "attention.value",
                                      "cross_attention.query", "cross_attention.value"]}],
     False, "per-task A, B on every q and v projection (PEFT's T5 default, cross-attention too)"),
    ("HyperFormer (hypernetwork per layer)", [{"method": "hyperformer", "reduction_factor": 32}],
     True, "per-layer hypernetworks + task projector + task embeddings " + LN),
    ("HyperFormer++ (one hypernetwork per stack)", [{"method": "hyperformer++",
                                                     "reduction_factor": 32}],
     True, "one hypernetwork per stack + layer/block/task embeddings " + LN),
    ("HyperLoRA r=8 on q,v", [{"method": "hyper_lora", "rank": 8, "alpha": 16,
                               "targets": ["attention.query", "attention.value",
                                           "cross_attention.query", "cross_attention.value"]}],
     False, "one LoRA hypernetwork per stack + layer/task embeddings"),
)


def t5_base() -> T5Config:
    return T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_decoder_layers=12, num_heads=12, feed_forward_proj="relu",
                    tie_word_embeddings=True)


def _batch(num_tasks: int):
    ids = np.ones((num_tasks, 4), np.int32)
    return make_batch(input_ids=ids, attention_mask=ids, task_ids=np.arange(num_tasks),
                      decoder_input_ids=ids, decoder_attention_mask=ids)


def count(backbone_config, method_cfgs: Optional[Sequence[dict]], task_names: Sequence[str],
          layer_norms: bool = True) -> dict:
    """parameter_report of a MultiTaskModel (text-to-text tasks) with the methods attached;
    method_cfgs None = everything trains."""
    cfg = backbone_config
    patterns = None
    if method_cfgs:
        cfg = registry.attach(backbone_config, method_cfgs, task_names)
        patterns = registry.trainable_patterns(cfg, heads=False, layer_norms=layer_norms)
    model = MultiTaskModel(cfg, tuple(TaskHead(t, "seq2seq") for t in task_names))
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), _batch(len(task_names))))
    return parameter_report(shapes, task_names, trainable_mask(shapes, patterns))


def table(task_names: Sequence[str] = GLUE8, backbone_config: Optional[T5Config] = None) -> list:
    """Rows: label, total (x backbone), trainable total, trainable per task, % of backbone,
    what trains, how counted."""
    cfg = backbone_config or t5_base()
    t = len(task_names)
    rows = []
    bb = None
    for label, methods, norms, what in ROWS:
        rep = count(cfg, methods, task_names, norms)
        if bb is None:
            # The plain backbone (no extension): per-task adapters and LoRA factors live
            # INSIDE params['backbone'], so a report with them counts them as backbone.
            bb = rep["backbone"]
            rows.append(dict(label="Full fine-tuning, one model per task", total_x=float(t),
                             trainable=t * bb, per_task=float(bb), pct=100.0,
                             what="everything, a separate model per task",
                             how=f"arithmetic: {t} x backbone"))
        per_task = rep["per_task"][task_names[0]]["trainable_amortised"]
        rows.append(dict(label=label, total_x=rep["total"] / bb, trainable=rep["trainable"],
                         per_task=per_task, pct=100.0 * per_task / bb, what=what,
                         how="jax.eval_shape of the mtlx model"))
    return rows


def peft_lora_count(rank: int = 8) -> dict:
    """Hugging Face PEFT's own count for LoRA(r, target_modules=['q', 'v']) on transformers'
    T5ForConditionalGeneration(t5-base config), built on the meta device (no memory)."""
    import peft
    import torch
    import transformers
    hf_cfg = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072,
                                   num_layers=12, num_decoder_layers=12, num_heads=12,
                                   feed_forward_proj="relu", tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(hf_cfg)
        backbone = sum(p.numel() for p in model.parameters())
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                           target_modules=["q", "v"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"backbone": backbone, "trainable": trainable}


def format_table(rows: list, markdown: bool = False) -> str:
    head = ("method", "total (x T5-base)", "trainable, all tasks", "trainable per task*",
            "% of T5-base per task", "what trains", "counted by")
    body = [(r["label"], f"{r['total_x']:.2f}x", f"{r['trainable']:,}", f"{r['per_task']:,.0f}",
             f"{r['pct']:.3f}%", r["what"], r["how"]) for r in rows]
    note = ("* own trainable parameters + 1/T of the shared trainable ones (HyperFormer, "
            "Karimi Mahabadi et al. 2021, Table 1), T = 8 GLUE tasks")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines + ["", note])
    widths = [max(len(x[i]) for x in (head,) + tuple(body)) for i in range(5)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells[:5], widths)))
    lines = [fmt(head), *(fmt(b) for b in body), ""]
    lines += [f"{b[0]}: {b[5]} ({b[6]})" for b in body]
    return "\n".join(lines + ["", note])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument("--peft-check", action="store_true",
                    help="print Hugging Face PEFT's trainable count for LoRA r=8 on q,v (needs "
                         "torch and peft)")
    args = ap.parse_args(argv)
    rows = table()
    print(format_table(rows))
    if args.peft_check:
        ref = peft_lora_count()
        ours = next(r for r in rows if r["label"].startswith("LoRA"))
        print(f"\nHF PEFT, LoRA r=8 target_modules=['q','v'] on T5ForConditionalGeneration "
              f"(t5-base config, meta device): {ref['trainable']:,} trainable (one task) of "
              f"{ref['backbone']:,}; mtlx LoRA row per task: {ours['per_task']:,.0f}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_table(rows, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
