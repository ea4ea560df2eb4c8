"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"), per task: learned vectors that rescale attention keys and values
and the feed-forward activations.

  keys/values: k = (x W_k + b) * l_k, v = (x W_v + b) * l_v         (projection OUTPUT)
  feed-forward: y = (l_ff * act(x W_1)) W_2 + b                      (INPUT of ffn.output)

as Hugging Face PEFT's `ia3.Linear` does (``base_layer(x) * scaling`` for attention targets,
``base_layer(x * scaling)`` for feed-forward targets). Vectors start at one (identity).
Parameters: ``{projection}/{name}/{task}/scale``, e.g. ``layer_0/ffn/output/ia3/mnli/scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn

from mtlx.models.layers import Site
from mtlx.peft import routing as R
from mtlx.peft.base import TaskExtension, check_patterns, matches_any, stacked_task_params


def ia3_scale(x, scale, group):
    """x [B, ..., n] * scale[group] with scale [G, n]: the plain function of weights."""
    return R.scale_rows(x, scale, group)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3(TaskExtension):
    """targets: projections whose OUTPUT is rescaled (default the keys and values of every
    attention: self-attention and, in an encoder-decoder, cross-attention, as in T-Few's
    released (IA)^3 and PEFT's T5 default; until the sixteenth session self-attention only);
    input_targets: projections whose INPUT is rescaled (default the FFN's second projection,
    i.e. the FFN activations). A site may not be in both."""
    name: str = "ia3"
    targets: Tuple[str, ...] = ("key", "value")
    input_targets: Tuple[str, ...] = ("ffn.output",)

    method = "ia3"
    layer_uniform = True  # same module at every layer (BertConfig.scan_layers)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "targets", check_patterns(self.targets, "projection", "ia3.targets"))
        object.__setattr__(self, "input_targets",
                           check_patterns(self.input_targets, "projection_input", "ia3.input_targets"))

    def _both(self, site: Site) -> bool:
        if matches_any(site, self.targets) and matches_any(site, self.input_targets):
            raise ValueError(f"ia3: site {site} matches both ia3.targets and ia3.input_targets; "
                             f"rescale either its output or its input")
        return False

    def projection(self, site: Site):
        if not self._both(site) and matches_any(site, self.targets):
            return IA3Scale(self, site, name=self.name)
        return None

    def projection_input(self, site: Site):
        if not self._both(site) and matches_any(site, self.input_targets):
            return IA3Scale(self, site, name=self.name)
        return None

    def target_map(self):
        return {"ia3.targets": ("projection", self.targets),
                "ia3.input_targets": ("projection_input", self.input_targets)}


class IA3Scale(nn.Module):
    """Called as (x, y, routing) on a projection's output or (x, routing) on its input."""
    ext: IA3
    site: Site

    @nn.compact
    def __call__(self, *args):
        ext = self.ext
        z, routing = args[-2], args[-1]
        w = stacked_task_params(ext, [(("scale",), (z.shape[-1],), nn.initializers.ones)])
        group, member = ext.route(routing, z.shape[0], self.site)
        out = ia3_scale(z, w["scale"], group)
        if not ext.all_active:
            out = R.keep_members(member, out, z)
        return out


METHODS = {"ia3": IA3}
