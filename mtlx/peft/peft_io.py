"""One task's LoRA to and from Hugging Face PEFT's on-disk format.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (a `peft.LoraConfig`) and
``adapter_model.safetensors`` with keys ``base_model.model.{module}.lora_{A,B}.weight``,
``{module}`` the torch module path of the targeted Linear in the bare base model
(``encoder.layer.0.attention.self.query`` for BertModel, ``encoder.block.0.layer.0.
SelfAttention.q`` for T5). lora_A.weight = A.T [r, in], lora_B.weight = B.T [out, r].

    export_peft_lora('out/rte-lora', params, cfg, ext, 'rte', base_model_name_or_path='bert-base-uncased')
    model = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(...), 'out/rte-lora')
    params = import_peft_lora('out/rte-lora', params, cfg, ext, 'rte')

mtlx has one LoRA per task; PEFT has one per adapter directory, so a task is exported alone.
The module names come from each family's `hf_param_names`, so the same code serves BERT,
RoBERTa and T5 (encoder and decoder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from mtlx.peft.lora import LoRA, lora_params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _backbone(params) -> Tuple[Mapping, bool]:
    """The backbone tree of model params ({'backbone', 'heads'}) or of backbone params."""
    if isinstance(params, Mapping) and "backbone" in params:
        return params["backbone"], True
    return params, False


def _module_names(backbone_config) -> Dict[Tuple[str, ...], str]:
    """mtlx projection path (tuple) -> torch module path in the bare HF model."""
    from mtlx.models.hf import family
    import dataclasses
    base = dataclasses.replace(backbone_config, extensions=())
    out = {}
    for path, key in family(backbone_config.model_type).hf_param_names(base).items():
        if path.endswith("/kernel") and key.endswith(".weight"):
            out[tuple(path.split("/")[:-1])] = key[: -len(".weight")]
    return out


def peft_lora_config(ext: LoRA, modules, base_model_name_or_path: Optional[str] = None) -> dict:
    """The adapter_config.json of a PEFT LoRA with this extension's rank and scaling."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": ext.rank,
        "lora_alpha": ext.alpha,
        "use_rslora": ext.use_rslora,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft_lora(path: str, params, backbone_config, ext: LoRA, task: str, *,
                     base_model_name_or_path: Optional[str] = None,
                     overwrite: bool = False) -> str:
    """Writes `task`'s LoRA as a PEFT adapter directory that `peft.PeftModel.from_pretrained`
    loads onto the bare HF model (BertModel / RobertaModel / T5Model or
    T5ForConditionalGeneration). Atomic (written to a temporary directory, then renamed)."""
    from safetensors.numpy import save_file

    if task not in ext.active:
        raise KeyError(f"lora '{ext.name}': task {task!r} has no LoRA weights; tasks with "
                       f"weights: {list(ext.active)}")
    backbone, _ = _backbone(params)
    names = _module_names(backbone_config)
    tensors = {}
    for proj_path, sub in lora_params(backbone, ext).items():
        if proj_path not in names:
            raise ValueError(f"LoRA at {'/'.join(proj_path)} has no Hugging Face module to map to")
        if task not in sub:
            raise KeyError(f"{'/'.join(proj_path)}/{ext.name} has no weights for task {task!r}")
        module = names[proj_path]
        a = np.asarray(jax.device_get(sub[task]["A"]), np.float32)
        b = np.asarray(jax.device_get(sub[task]["B"]), np.float32)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    modules = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors}
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(peft_lora_config(ext, modules, base_model_name_or_path), f, indent=2)
            f.write("\n")
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read(path: str):
    from safetensors.numpy import load_file
    cfg_file, w_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f!r} is missing: a PEFT LoRA directory holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    with open(cfg_file) as f:
        cfg = json.load(f)
    return cfg, load_file(w_file)


def _check_config(cfg: Mapping[str, Any], ext: LoRA, path: str) -> None:
    where = os.path.join(path, CONFIG_FILE)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    checks = {"r": ext.rank, "lora_alpha": ext.alpha, "use_rslora": ext.use_rslora}
    for key, ours in checks.items():
        theirs = cfg.get(key, False if key == "use_rslora" else None)
        if theirs is None or float(theirs) != float(ours):
            raise ValueError(f"{where}: {key}={theirs!r} but the mtlx extension has "
                             f"lora.{ {'r': 'rank', 'lora_alpha': 'alpha'}.get(key, key)}={ours!r}")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, ok in unsupported.items():
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{where}: per-module rank_pattern/alpha_pattern is not supported")


def import_peft_lora(path: str, params, backbone_config, ext: LoRA, task: str):
    """`params` with `task`'s LoRA factors read from a PEFT adapter directory.

    Every LoRA site of the mtlx model must be in the file and every module of the file must
    be a LoRA site here; r, lora_alpha and use_rslora must agree (errors name the key).
    Returns the same structure as `params` (model params or backbone params).
    """
    import jax.numpy as jnp
    if task not in ext.active:
        raise KeyError(f"lora '{ext.name}': task {task!r} has no LoRA weights; tasks with "
                       f"weights: {list(ext.active)}")
    cfg, tensors = _read(path)
    _check_config(cfg, ext, path)
    prefix = f"{backbone_config.model_type}."
    factors: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{os.path.join(path, WEIGHTS_FILE)}: {key!r} is not a LoRA weight")
        module = m["module"]
        module = module[len(prefix):] if module.startswith(prefix) else module
        factors.setdefault(module, {})[m["which"]] = np.asarray(value, np.float32)
    backbone, is_model = _backbone(params)
    names = _module_names(backbone_config)
    sites = lora_params(backbone, ext)
    by_module = {names[p]: p for p in sites if p in names}
    extra = sorted(set(factors) - set(by_module))
    if extra:
        raise ValueError(f"{path}: LoRA weights for module(s) {extra[:4]} that lora.targets "
                         f"{list(ext.targets)} does not cover in this model")
    missing = sorted(set(by_module) - set(factors))
    if missing:
        raise ValueError(f"{path}: no LoRA weights for module(s) {missing[:4]} that "
                         f"lora.targets {list(ext.targets)} covers")

    def put(tree, proj_path, a, b):
        if not proj_path:
            node = dict(tree)
            sub = dict(node[ext.name])
            old = sub[task]
            if old["A"].shape != a.shape or old["B"].shape != b.shape:
                raise ValueError(f"{'/'.join(path_)}: PEFT factors {a.shape}/{b.shape} do not "
                                 f"match the model's {old['A'].shape}/{old['B'].shape}")
            sub[task] = {"A": jnp.asarray(a, old["A"].dtype), "B": jnp.asarray(b, old["B"].dtype)}
            node[ext.name] = sub
            return node
        out = dict(tree)
        out[proj_path[0]] = put(tree[proj_path[0]], proj_path[1:], a, b)
        return out

    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: module {module!r} has lora_{list(pair)} but needs both A and B")
        path_ = by_module[module]
        backbone = put(backbone, path_, pair["A"].T, pair["B"].T)
    if is_model:
        return dict(params, backbone=backbone)
    return backbone
