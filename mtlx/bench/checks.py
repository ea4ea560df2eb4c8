"""Correctness checks run before a GPU benchmark (scripts/gpu_check.sh), so fast numbers are
also right numbers.

  float32 vs reference   mtlx float32 against the PyTorch Hugging Face model holding the same
                         weights (mtlx.bench.torch_baseline.load_mtlx_params), full-precision
                         matmuls on both sides: per-task loss and the task head's logits.
  bfloat16 vs reference  mtlx with bf16 compute (float32 weights) against the same float32
                         reference, with a bf16 tolerance.
  cudnn vs xla           cuDNN fused attention against XLA's attention, both bf16: logits, and
                         the gradients of one training loss (GPU only; elsewhere 'skipped').
Each check returns {'name', 'status': 'pass'|'fail'|'skipped', measured errors, tolerances}.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import numpy as np

TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def _setup(config: str, size: str, seq_len: int, batch: int, num_tasks: int, seed: int = 0):
    import flax.traverse_util as tu
    import jax
    from mtlx.batch import make_batch
    from mtlx.bench import workload as W
    from mtlx.models.multitask import MultiTaskModel, init_params
    cell = W.Cell(config, size, seq_len, num_tasks, batch)
    cfg = dataclasses.replace(W.backbone_config(cell), hidden_dropout=0.0, attention_dropout=0.0)
    tasks = W.task_heads(num_tasks)
    arrays = W.synthetic_arrays(batch, seq_len, W.SIZES[size]["vocab_size"], seed)
    # Right-padded rows of several lengths, so padding is compared too (cuDNN's padding mode
    # against XLA's boolean mask, and both against the reference).
    lengths = np.linspace(max(2, seq_len // 4), seq_len, batch).astype(int)
    real = np.arange(seq_len)[None] < lengths[:, None]
    arrays = dict(arrays, attention_mask=real.astype(np.int32),
                  input_ids=np.where(real, arrays["input_ids"], 0).astype(np.int32),
                  token_type_ids=np.where(real, arrays["token_type_ids"], 0).astype(np.int32))
    b = make_batch(task_ids=np.full(batch, 1 % num_tasks), **arrays)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    params = jax.jit(lambda r, x: init_params(model, r, x))(jax.random.key(seed), b)
    # Non-trivial extension weights (adapters start as the identity).
    rng = np.random.default_rng(seed + 1)
    flat = {k: np.asarray(v) + (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in tu.flatten_dict(params).items()}
    return cell, cfg, tasks, arrays, b, tu.unflatten_dict(flat)


def _mtlx_outputs(cfg, tasks, params, batch, dtype: str, attention=None):
    import jax
    import jax.numpy as jnp
    from mtlx.models import heads as H
    from mtlx.models.multitask import MultiTaskModel
    cfg = dataclasses.replace(cfg, dtype=jnp.dtype(dtype), attention_impl=attention)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)

    def loss(p):
        out = model.apply({"params": p}, batch)
        losses, _ = H.task_losses(out, batch, tasks)
        return jnp.sum(losses), out["classification"]

    (l, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(l), np.asarray(logits, np.float32), grads


def _torch_reference(cell, cfg, tasks, arrays, params, device: str):
    import torch
    from mtlx.bench import torch_baseline as TB
    from mtlx.bench import workload as W
    methods = W.CONFIGS[cell.config]
    tb = TB.TorchBaseline(cfg, tasks, cell.config, methods[0] if methods else {}, [arrays],
                          [np.full(cell.batch_size, 1 % cell.num_tasks)], device=device,
                          attention_dropout=0.0, head_dropout=0.0)
    TB.load_mtlx_params(tb, params, cfg)
    tb.model.eval()
    tb.model.set_task(tasks[1 % len(tasks)].name)
    b = tb.batches[0]
    with torch.no_grad():
        logits = tb.model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
    return float(loss), logits.float().cpu().numpy()


def _compare(name: str, loss, logits, ref_loss, ref_logits, tol: float) -> dict:
    width = ref_logits.shape[-1]
    got = logits[:, :width]
    scale = max(float(np.abs(ref_logits).max()), 1.0)
    err_logits = float(np.abs(got - ref_logits).max()) / scale
    err_loss = abs(loss - ref_loss) / max(abs(ref_loss), 1e-6)
    ok = err_logits <= tol and err_loss <= tol
    return {"name": name, "status": "pass" if ok else "fail", "loss": loss, "reference_loss": ref_loss,
            "relative_error_loss": err_loss, "relative_error_logits": err_logits, "tolerance": tol}


def run_checks(config: str = "adapters", size: str = "tiny", seq_len: int = 128, batch: int = 4,
               num_tasks: int = 3, torch_device: str = "cpu") -> List[dict]:
    import jax
    out: List[dict] = []
    prev = jax.config.jax_default_matmul_precision
    try:
        import torch
        prev_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        torch = None
    try:
        jax.config.update("jax_default_matmul_precision", "highest")
        cell, cfg, tasks, arrays, b, params = _setup(config, size, seq_len, batch, num_tasks)
        ref_loss, ref_logits = _torch_reference(cell, cfg, tasks, arrays, params, torch_device)
        l32, lg32, _ = _mtlx_outputs(cfg, tasks, params, b, "float32")
        out.append(_compare(f"float32 vs torch reference ({cell.label})", l32, lg32, ref_loss,
                            ref_logits, TOL["float32"]))
        jax.config.update("jax_default_matmul_precision", prev)
        l16, lg16, g_xla = _mtlx_outputs(cfg, tasks, params, b, "bfloat16", "xla")
        out.append(_compare(f"bfloat16 vs float32 torch reference ({cell.label})", l16, lg16,
                            ref_loss, ref_logits, TOL["bfloat16"]))
        if jax.devices()[0].platform != "gpu":
            out.append({"name": "cudnn vs xla attention", "status": "skipped",
                        "reason": f"cuDNN attention needs an NVIDIA GPU (backend: "
                                  f"{jax.devices()[0].platform})"})
        else:
            try:
                lc, lgc, g_cudnn = _mtlx_outputs(cfg, tasks, params, b, "bfloat16", "cudnn")
            except Exception as e:  # noqa: BLE001 - reported as a failed check
                out.append({"name": "cudnn vs xla attention", "status": "fail",
                            "reason": f"{type(e).__name__}: {e}"[:500]})
            else:
                res = _compare("cudnn vs xla attention (bf16)", lc, lgc, l16, lg16, TOL["bfloat16"])
                gx = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(g_xla)])
                gc = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(g_cudnn)])
                res["relative_error_grads"] = float(np.linalg.norm(gc - gx) / max(np.linalg.norm(gx), 1e-12))
                if res["relative_error_grads"] > TOL["bfloat16"]:
                    res["status"] = "fail"
                out.append(res)
    finally:
        jax.config.update("jax_default_matmul_precision", prev)
        if torch is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
    return out


def summary(checks: List[dict]) -> Dict[str, int]:
    out = {"pass": 0, "fail": 0, "skipped": 0}
    for c in checks:
        out[c["status"]] += 1
    return out
