"""The PyTorch side of the benchmark: the same model and tasks, written the way users of Hugging
Face transformers, PEFT and AdapterHub write multi-task training.

  backbone      transformers.BertModel (its default attention, SDPA in transformers 5) with the
                pooler; per-task heads nn.Linear(d, c) in an nn.ModuleDict keyed by task name,
                on Dropout(pooled) as mtlx.models.multitask.
  shared        everything trains.
  lora          PEFT `get_peft_model` + `add_adapter` per task (LoraConfig r 8, alpha 16,
                query/value, no dropout) and `set_adapter(task)` before each batch.
  adapters      Houlsby adapters (Houlsby et al. 2019): AdapterHub's `adapters` package pins
                transformers 4.57, so this is a faithful equivalent: BertSelfOutput and
                BertOutput are wrapped so that the sublayer output after dense + dropout passes
                through h + up(swish(down(h))) of the active task before the residual add and
                LayerNorm (AdapterHub's "houlsby" config: reduction 16, swish, both sublayers).
  hyperformer++ the released HyperFormer++ code's scheme (github.com/rabeehk/hyperformer): one
                generator per encoder maps concat(task, layer, block embeddings) -> MLP ->
                LayerNorm -> linear generators of every adapter's weights, for the batch's ONE
                task, then adapters y + LN_t(up(gelu_new(down(y)))) on every sublayer.
  frozen configurations train the extension, the heads and the backbone's LayerNorms (as the
                mtlx side: mtlx.peft.registry.trainable_patterns).

Training: one task per batch (those libraries cannot train mixed-task batches): step s takes a
batch of B examples of task s mod T, forward, cross-entropy, backward, global-norm clipping at
1.0, AdamW (lr 1e-4, weight decay 0.01), zero_grad(set_to_none) so parameters of the other tasks
get no update. mode='split' trains the mtlx objective on the mixed batch instead: rows grouped
by task, one forward/backward per task present (sum of the per-task mean losses, gradients
accumulated), then one optimizer step. bfloat16: torch.autocast around forward and loss.

`load_mtlx_params` copies an mtlx MultiTaskModel's parameters into this model (tests check
that both compute the same loss and gradients on the same batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

MODES = ("per_task", "split")


def _torch():
    import torch
    return torch


class _Active:
    """What the wrapped sublayers read at run time: the batch's task and generated weights."""

    def __init__(self, task: str):
        self.task = task
        self.generated: Optional[dict] = None


def _build_modules():
    """Module classes (defined lazily so importing this file does not import torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class HoulsbyAdapter(nn.Module):
        def __init__(self, d: int, m: int):
            super().__init__()
            self.down = nn.Linear(d, m)
            self.up = nn.Linear(m, d)
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(F.silu(self.down(h)))

    class TaskAdapters(nn.Module):
        """One adapter per task; the active task's runs (AdapterHub's set_active_adapters)."""

        def __init__(self, tasks: Sequence[str], d: int, m: int, active: _Active):
            super().__init__()
            self.adapters = nn.ModuleDict({t: HoulsbyAdapter(d, m) for t in tasks})
            self._active = active

        def forward(self, h):
            return self.adapters[self._active.task](h)

    class GeneratedAdapter(nn.Module):
        """y + LN_{gamma,beta}(up(gelu_new(down(y)))) with weights generated for this step."""

        def __init__(self, block: int, layer: int, active: _Active, eps: float = 1e-5):
            super().__init__()
            self.block, self.layer, self._active, self.eps = block, layer, active, eps

        def forward(self, y):
            w = {k: v[self.block, self.layer] for k, v in self._active.generated.items()}
            h = F.gelu(y @ w["down_kernel"].to(y.dtype) + w["down_bias"].to(y.dtype),
                       approximate="tanh")
            h = h @ w["up_kernel"].to(y.dtype) + w["up_bias"].to(y.dtype)
            h = F.layer_norm(h, (h.shape[-1],), w["norm_scale"].to(h.dtype),
                             w["norm_bias"].to(h.dtype), self.eps)
            return y + h

    class SublayerWithAdapter(nn.Module):
        """BertSelfOutput / BertOutput with `adapter` on the sublayer output, before the residual
        add and LayerNorm. Keeps the wrapped module's `dense` / `LayerNorm` / `dropout` names so
        the state-dict keys stay Hugging Face's."""

        def __init__(self, inner: nn.Module, adapter: nn.Module):
            super().__init__()
            self.dense, self.dropout, self.LayerNorm = inner.dense, inner.dropout, inner.LayerNorm
            self.adapter = adapter

        def forward(self, hidden_states, input_tensor):
            h = self.dropout(self.dense(hidden_states))
            return self.LayerNorm(self.adapter(h) + input_tensor)

    class HyperFormerPPGenerator(nn.Module):
        """HyperFormer++'s shared generator for one encoder (Karimi Mahabadi et al. 2021, sec.
        2.4): weights of every (block, layer) adapter for ONE task -> {name: [2, L, ...]}."""

        def __init__(self, tasks, num_layers, d, m, task_dim=64, layer_dim=64, block_dim=64,
                     hidden=128, projected=64, hyper_eps=1e-6):
            super().__init__()
            self.d, self.m, self.num_layers = d, m, num_layers
            self.task_embeddings = nn.ParameterDict(
                {t: nn.Parameter(torch.randn(task_dim)) for t in tasks})
            self.layer_embeddings = nn.Parameter(torch.randn(num_layers, layer_dim))
            self.block_embeddings = nn.Parameter(torch.randn(2, block_dim))
            self.hidden = nn.Linear(task_dim + layer_dim + block_dim, hidden)
            self.output = nn.Linear(hidden, projected)
            self.norm = nn.LayerNorm(projected, eps=hyper_eps)
            self.shapes = {"down_kernel": (d, m), "down_bias": (m,), "up_kernel": (m, d),
                           "up_bias": (d,), "norm_scale": (d,), "norm_bias": (d,)}
            self.generators = nn.ModuleDict(
                {k: nn.Linear(projected, math.prod(s)) for k, s in self.shapes.items()})
            for lin in [self.hidden, self.output, *self.generators.values()]:
                nn.init.normal_(lin.weight, std=1e-2)
                nn.init.zeros_(lin.bias)

        def forward(self, task: str):
            n = self.num_layers
            t = self.task_embeddings[task]
            cond = torch.cat([t.expand(2, n, -1),
                              self.layer_embeddings[None].expand(2, -1, -1),
                              self.block_embeddings[:, None].expand(-1, n, -1)], dim=-1)
            c = self.norm(self.output(torch.relu(self.hidden(cond))))
            return {k: g(c).reshape((2, n) + self.shapes[k]) for k, g in self.generators.items()}

    return dict(TaskAdapters=TaskAdapters, GeneratedAdapter=GeneratedAdapter,
                SublayerWithAdapter=SublayerWithAdapter, HyperFormerPPGenerator=HyperFormerPPGenerator)


def hf_config(backbone_cfg, attention_dropout: Optional[float] = None):
    """transformers.BertConfig equal to an mtlx BertConfig (mtlx.models.bert.config_to_hf)."""
    import transformers
    from mtlx.models.bert import config_to_hf
    d = config_to_hf(backbone_cfg)
    for key in ("architectures", "dtype", "model_type"):
        d.pop(key, None)
    if attention_dropout is not None:
        d["attention_probs_dropout_prob"] = attention_dropout
    return transformers.BertConfig(**d)


def _multitask_class():
    import torch
    from torch import nn
    M = _build_modules()

    class MultiTaskBert(nn.Module):
        """HF BertModel + a PEFT method + per-task heads; one task per forward."""

        def __init__(self, config, tasks: Sequence, method: str, method_cfg: Mapping[str, Any],
                     head_dropout: float = 0.1):
            super().__init__()
            import transformers
            self.method = method
            self.task_names = [t.name for t in tasks]
            self.active = _Active(self.task_names[0])
            bert = transformers.BertModel(config, add_pooling_layer=True)
            d = config.hidden_size
            self.hyper = None
            if method == "adapters":
                m = int(d // method_cfg.get("reduction_factor", 16))
                for layer in bert.encoder.layer:
                    layer.attention.output = M["SublayerWithAdapter"](
                        layer.attention.output, M["TaskAdapters"](self.task_names, d, m, self.active))
                    layer.output = M["SublayerWithAdapter"](
                        layer.output, M["TaskAdapters"](self.task_names, d, m, self.active))
            elif method == "hyperformer++":
                m = int(d // method_cfg.get("reduction_factor", 32))
                n = config.num_hidden_layers
                self.hyper = M["HyperFormerPPGenerator"](self.task_names, n, d, m)
                for i, layer in enumerate(bert.encoder.layer):
                    layer.attention.output = M["SublayerWithAdapter"](
                        layer.attention.output, M["GeneratedAdapter"](0, i, self.active))
                    layer.output = M["SublayerWithAdapter"](
                        layer.output, M["GeneratedAdapter"](1, i, self.active))
            elif method == "lora":
                import peft
                targets = [t.split(".")[-1] for t in method_cfg.get("targets", ["query", "value"])]
                lcfg = dict(r=int(method_cfg.get("rank", 8)),
                            lora_alpha=float(method_cfg.get("alpha", 8.0)),
                            target_modules=targets, lora_dropout=0.0)
                bert = peft.get_peft_model(bert, peft.LoraConfig(**lcfg),
                                           adapter_name=self.task_names[0])
                for t in self.task_names[1:]:
                    bert.add_adapter(t, peft.LoraConfig(**lcfg))
            elif method != "shared":
                raise ValueError(f"mtlx/bench/torch_baseline.py: unknown configuration {method!r}")
            self.bert = bert
            self.heads = nn.ModuleDict({t.name: nn.Linear(d, t.out_features) for t in tasks})
            for h in self.heads.values():
                nn.init.normal_(h.weight, std=0.02)
                nn.init.zeros_(h.bias)
            self.dropout = nn.Dropout(head_dropout)
            if method != "shared":
                self._freeze_backbone()
            self.set_task(self.task_names[0])

        def base_model(self):
            return self.bert.get_base_model() if self.method == "lora" else self.bert

        def _freeze_backbone(self):
            # The encoder's weights are frozen; its LayerNorms, the extension and heads train.
            for name, p in self.base_model().named_parameters():
                is_ext = ".adapter." in name or "lora_" in name
                p.requires_grad = is_ext or "LayerNorm" in name

        def set_task(self, task: str):
            self.active.task = task
            if self.method == "lora":
                self.bert.set_adapter(task)
                # set_adapter leaves only the active task's LoRA trainable; LayerNorms stay.

        def forward(self, input_ids, attention_mask, token_type_ids):
            if self.hyper is not None:
                self.active.generated = self.hyper(self.active.task)
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids)
            return self.heads[self.active.task](self.dropout(out.pooler_output))

    return MultiTaskBert


class TorchBaseline:
    """A cell's PyTorch model, optimizer and pre-placed batches; `step()` runs one training
    step (asynchronous on GPU), `sync()` waits for the device."""

    def __init__(self, backbone_cfg, tasks: Sequence, method: str, method_cfg: Mapping[str, Any],
                 arrays: Sequence[Mapping[str, np.ndarray]], task_ids: Sequence[np.ndarray],
                 device: str = "cpu", dtype: str = "float32", mode: str = "per_task",
                 attention_dropout: Optional[float] = None, head_dropout: float = 0.1,
                 seed: int = 0, lr: float = 1e-4, weight_decay: float = 0.01,
                 clip_norm: float = 1.0):
        torch = _torch()
        if mode not in MODES:
            raise ValueError(f"mtlx/bench/torch_baseline.py: mode must be one of {MODES}, got {mode!r}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"mtlx/bench/torch_baseline.py: dtype must be float32 or bfloat16, got {dtype!r}")
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.mode, self.tasks = mode, tuple(tasks)
        self.autocast = torch.bfloat16 if dtype == "bfloat16" else None
        config = hf_config(backbone_cfg, attention_dropout)
        self.model = _multitask_class()(config, tasks, method, method_cfg, head_dropout).to(self.device)
        self.model.train()
        # LoRA: every task's factors are in the optimizer; set_adapter switches requires_grad,
        # and parameters without a gradient are skipped by AdamW.
        params = [p for n, p in self.model.named_parameters() if p.requires_grad or "lora_" in n]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.clip_norm = clip_norm
        self.batches = [{k: torch.as_tensor(v, dtype=torch.long, device=self.device)
                         for k, v in a.items()} for a in arrays]
        self.task_ids = [np.asarray(t) for t in task_ids]
        self.examples_per_step = int(arrays[0]["input_ids"].shape[0])
        self.i = 0
        self.last_loss = None

    def _loss(self, b, rows=None):
        torch = _torch()
        import torch.nn.functional as F
        sel = (lambda x: x) if rows is None else (lambda x: x[rows])
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else _nullcontext())
        with ctx:
            logits = self.model(sel(b["input_ids"]), sel(b["attention_mask"]), sel(b["token_type_ids"]))
        return F.cross_entropy(logits.float(), sel(b["labels"]))

    def step(self):
        torch = _torch()
        k = self.i % len(self.batches)
        b = self.batches[k]
        if self.mode == "per_task":
            self.model.set_task(self.tasks[self.i % len(self.tasks)].name)
            loss = self._loss(b)
            loss.backward()
            loss = loss.detach()
        else:
            ids = self.task_ids[k]
            loss = 0.0
            for t in np.unique(ids):
                self.model.set_task(self.tasks[int(t)].name)
                rows = torch.as_tensor(np.flatnonzero(ids == t), device=self.device)
                lt = self._loss(b, rows)
                lt.backward()
                loss = loss + lt.detach()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss
        self.i += 1

    def sync(self):
        torch = _torch()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- mtlx weights

def _strip(tree, names):
    if not isinstance(tree, Mapping):
        return tree
    return {k: _strip(v, names) for k, v in tree.items() if k not in names}


def _t(x):
    torch = _torch()
    return torch.as_tensor(np.asarray(x, np.float32))


def _set(param, value) -> None:
    torch = _torch()
    value = _t(value)
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"mtlx/bench/torch_baseline.py: shape {tuple(value.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _linear(lin, node) -> None:
    _set(lin.weight, np.asarray(node["kernel"]).T)
    _set(lin.bias, node["bias"])


def load_mtlx_params(baseline: "TorchBaseline", params: Mapping[str, Any], backbone_cfg) -> None:
    """Copies an mtlx MultiTaskModel's parameters (backbone, heads, adapters / LoRA /
    HyperFormer++ generator) into the baseline's torch model."""
    from mtlx.models.bert import params_to_hf
    model = baseline.model
    ext_names = {e.name for e in backbone_cfg.extensions}
    plain_cfg = dataclasses.replace(backbone_cfg, extensions=())
    tensors = params_to_hf(_strip(params["backbone"], ext_names), plain_cfg)
    root = model.base_model()
    for key, value in tensors.items():
        mod = root
        *path, leaf = key.split(".")
        for part in path:
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        mod = getattr(mod, "base_layer", mod)  # PEFT-wrapped Linear
        _set(getattr(mod, leaf), value)
    for task, node in params["heads"].items():
        _linear(model.heads[task], node)
    bb = params["backbone"]
    for i, layer in enumerate(root.encoder.layer):
        p = bb[f"layer_{i}"]
        if model.method == "adapters":
            for sub, mod in (("attention", layer.attention.output), ("ffn", layer.output)):
                for task, w in p[sub]["adapter"].items():
                    _linear(mod.adapter.adapters[task].down, w["down"])
                    _linear(mod.adapter.adapters[task].up, w["up"])
        elif model.method == "lora":
            for name in ("query", "key", "value"):
                node = p["attention"][name].get("lora")
                if node is None:
                    continue
                lin = getattr(layer.attention.self, name)
                for task, w in node.items():
                    _set(lin.lora_A[task].weight, np.asarray(w["A"]).T)
                    _set(lin.lora_B[task].weight, np.asarray(w["B"]).T)
    if model.method == "hyperformer++":
        (ext,) = [e for e in backbone_cfg.extensions]
        g = params[f"generators_{ext.name}"]
        h = model.hyper
        for task, node in g["task_embeddings"].items():
            _set(h.task_embeddings[task], node["embedding"])
        enc = g["encoder"]
        _set(h.layer_embeddings, enc["layer_embeddings"])
        _set(h.block_embeddings, enc["block_embeddings"])
        _linear(h.hidden, enc["mlp"]["hidden"])
        _linear(h.output, enc["mlp"]["output"])
        _set(h.norm.weight, enc["mlp"]["layer_norm"]["scale"])
        _set(h.norm.bias, enc["mlp"]["layer_norm"]["bias"])
        for k, lin in h.generators.items():
            _linear(lin, enc["generators"][k])


def device_peak_bytes(device: str) -> Optional[int]:
    torch = _torch()
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_device_peak(device: str) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
