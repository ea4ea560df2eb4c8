"""What every task-specific PEFT method shares: task bookkeeping, site patterns, parameters.

A method is a frozen, hashable dataclass (it sits in the backbone config, a Flax module
attribute) deriving from `TaskExtension`. It carries the model's task names in task-id order
(`task_names`) and the subset of tasks that own weights (`tasks`, default all); examples of the
other tasks pass through unchanged (zero delta). Parameters are keyed by task name under the
method's name at the site, e.g. ``layer_0/attention/query/lora/{task}/A``.

Target patterns name sites (mtlx.models.layers): a pattern matches a site when it matches
the site's full name ``{stack}.layer{i}.{name}`` or a dot-separated tail of it (as PEFT's
target_modules match module names), with shell wildcards (fnmatch): 'attention.query' is
every self-attention query projection, 'query' also the cross-attention ones, 'encoder.*.ffn'
the encoder's feed-forward sublayers, 'decoder.layer[0-3].attention.value' four decoder layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mtlx.models.layers import LAYER_NORM_SITES, PROJECTION_SITES, SUBLAYER_SITES, Extension, Site
from mtlx.peft import routing as R

# Site names per hook kind, for checking patterns before any model exists.
HOOK_SITES = {
    "projection": PROJECTION_SITES,
    "projection_input": PROJECTION_SITES,
    "sublayer": SUBLAYER_SITES,
    "attention_kv": ("attention",),
    "embeddings": ("embeddings",),
    "layer_norm": LAYER_NORM_SITES,
}
_STACKS = ("encoder", "decoder")
_MAX_LAYERS = 128


def site_matches(site: Site, pattern: str) -> bool:
    full = str(site)
    return fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(full, "*." + pattern)


def matches_any(site: Site, patterns: Sequence[str]) -> bool:
    return any(site_matches(site, p) for p in patterns)


def check_patterns(patterns: Sequence[str], kind: str, key: str) -> Tuple[str, ...]:
    """Validates target patterns against the site names of a hook kind (no model needed).

    Raises ValueError naming `key` when the list is empty, not a list of strings, or a
    pattern can match no site of any model (a typo); whether it matches a site of a GIVEN
    model is checked by `mtlx.peft.registry.check_coverage`.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{key} must be a non-empty list of site patterns, got {list(patterns)!r}")
    names = HOOK_SITES[kind]
    universe = [Site(s, i, n) for s in _STACKS for i in range(_MAX_LAYERS) for n in names]
    for p in patterns:
        if not any(site_matches(site, p) for site in universe):
            raise ValueError(f"{key}: pattern {p!r} matches no {kind} site; site names are "
                             f"{list(names)} (optionally as '<stack>.layer<i>.<name>', shell "
                             f"wildcards allowed)")
    return patterns


def check_positive(value, key: str, integer: bool = True):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskExtension(Extension):
    """Base of the task-routed methods.

    task_names: the model's tasks in task-id order (``MultiTaskModel.task_names``).
    tasks:      the tasks that own weights of this method (None: all); the others get the
                identity.
    name:       the parameter scope name at each site (unique among a model's extensions).
    impl:       'gather' | 'ragged' | 'onehot' (mtlx.peft.routing).
    """
    task_names: Tuple[str, ...]
    tasks: Optional[Tuple[str, ...]] = None
    name: str = "extension"
    impl: str = R.DEFAULT_IMPL

    method = "extension"  # the registry name (class attribute, not a field)

    def __post_init__(self):
        object.__setattr__(self, "task_names", tuple(self.task_names))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        m = self.method
        if not self.task_names or not all(isinstance(t, str) and t for t in self.task_names):
            raise ValueError(f"{m}.task_names must be a non-empty list of task names, got "
                             f"{list(self.task_names)!r}")
        dupes = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
        if dupes:
            raise ValueError(f"{m}.task_names repeats {dupes}")
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in self.task_names]
            if unknown:
                raise ValueError(f"{m}.tasks names unknown task(s) {unknown}; the model's tasks: "
                                 f"{list(self.task_names)}")
            if not self.tasks:
                raise ValueError(f"{m}.tasks is empty: a method with no task owning weights does "
                                 f"nothing; drop it or list the tasks")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"{m}.name must be a non-empty string without '/', got {self.name!r}")
        R.check_impl(self.impl, f"{m}.impl")

    @property
    def active(self) -> Tuple[str, ...]:
        """Tasks owning weights, in model task order (the stacking order)."""
        if self.tasks is None:
            return self.task_names
        return tuple(t for t in self.task_names if t in self.tasks)

    @property
    def all_active(self) -> bool:
        return len(self.active) == len(self.task_names)

    def route(self, routing, batch_size: int, site: Site):
        """(group, member) for the examples of a forward pass: [B], or [B, L] when
        `routing.task_ids` is per token (packed rows that mix tasks).

        Without routing information only a one-task method can run (every example is that
        task); otherwise it is an error naming the site.
        """
        task_ids = None if routing is None else routing.task_ids
        if task_ids is None:
            if len(self.task_names) == 1:
                zeros = jnp.zeros((batch_size,), jnp.int32)
                return zeros, jnp.ones((batch_size,), bool)
            raise ValueError(f"{self.method} '{self.name}' at {site}: no routing.task_ids; a "
                             f"model with {len(self.task_names)} tasks must say which task each "
                             f"example belongs to (MultiTaskModel passes batch.task_ids)")
        return R.route(task_ids, self.task_names, self.active)

    def target_map(self) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
        """{config key: (hook kind, patterns)} for coverage checks against a model."""
        return {}

    def bind(self, backbone_config) -> "TaskExtension":
        """This method adapted to a backbone (settings that depend on the model family)."""
        return self

    def task_param_scopes(self) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...]:
        """((path below a node named `name`, the names its children must include), ...): where
        a checkpoint must hold per-task weights (registry.check_task_weights)."""
        return (((), self.active),)

    def trainable_patterns(self) -> Tuple[str, ...]:
        """Regular expressions (optim.trainable_mask) over this method's trainable params."""
        return (f"(^|/){self.name}/",)


# (path inside one task's parameters, shape, initializer)
ParamSpec = Tuple[Tuple[str, ...], Tuple[int, ...], Callable]


class TaskParams(nn.Module):
    """One task's parameters from specs ((path, shape, init), ...); returns the nested dict.

    Instantiated once per task with ``name=task``, so parameters live at ``{task}/{path}`` and
    each task's init depends only on its own path (adding a task changes no other weights).
    """
    specs: Tuple[ParamSpec, ...]
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        out: dict = {}
        children: Dict[str, list] = {}
        for path, shape, init in self.specs:
            if len(path) == 1:
                out[path[0]] = self.param(path[0], init, tuple(shape), self.param_dtype)
            else:
                children.setdefault(path[0], []).append((path[1:], shape, init))
        for child, specs in children.items():
            out[child] = TaskParams(tuple(specs), self.param_dtype, name=child)()
        return out


def stacked_task_params(ext: TaskExtension, specs: Sequence[ParamSpec],
                        param_dtype=jnp.float32) -> dict:
    """Creates `specs` for every task of `ext` that owns weights (inside the calling compact
    module) and returns them stacked [G, ...] in `ext.active` order."""
    per_task = [TaskParams(tuple(specs), param_dtype, name=t)() for t in ext.active]
    return R.stack_tasks(per_task, ext.active)


def uniform(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        import jax
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init
