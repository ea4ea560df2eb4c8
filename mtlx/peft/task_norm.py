"""Task-conditional layer normalisation: every task owns the gain and bias of the backbone's
layer norms (the task-conditional LayerNorm of HyperFormer, Karimi Mahabadi et al. 2021, and of
CA-MTL's conditional layer norm, Pilault et al. 2021), routed per example.

At a layer-norm site the shared norm gives y = xhat * gamma + beta. The method applies a
per-task affine y * s_t + b_t with s = 1, b = 0 at initialisation (the pretrained model
unchanged), which is exactly a task-specific norm with gamma_t = gamma * s_t and
beta_t = beta * s_t + b_t: one shared pretrained norm, T task-specific ones, no copy of the
pretrained values needed.
Parameters: ``{sublayer}/{name}/{task}/{scale,bias}``, e.g.
``layer_0/ffn/task_layer_norm/rte/scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.base import TaskExtension, check_patterns, matches_any, stacked_task_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskLayerNorm(TaskExtension):
    """targets: layer-norm sites (default every sublayer norm: attention, cross-attention, FFN)."""
    name: str = "task_layer_norm"
    targets: Tuple[str, ...] = ("*layer_norm",)

    method = "task_layer_norm"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "targets",
                           check_patterns(self.targets, "layer_norm", "task_layer_norm.targets"))

    def layer_norm_output(self, site: Site):
        if matches_any(site, self.targets):
            return TaskAffine(self, site, name=self.name)
        return None

    def target_map(self):
        return {"task_layer_norm.targets": ("layer_norm", self.targets)}


class TaskAffine(nn.Module):
    """y [B, ..., d] -> y * scale[task] + bias[task]."""
    ext: TaskLayerNorm
    site: Site

    @nn.compact
    def __call__(self, y, routing):
        ext = self.ext
        d = y.shape[-1]
        w = stacked_task_params(ext, [(("scale",), (d,), nn.initializers.ones),
                                      (("bias",), (d,), nn.initializers.zeros)])
        group, member = ext.route(routing, y.shape[0], self.site)
        out = R.add_bias(R.scale_rows(y, w["scale"], group), w["bias"], group)
        if not ext.all_active:
            out = R.keep_members(member, out, y)
        return out


METHODS = {"task_layer_norm": TaskLayerNorm}
