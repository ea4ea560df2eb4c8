"""The one registry of PEFT methods: build extensions from configuration by method name.

    exts = build_extensions([{'method': 'lora', 'rank': 8, 'alpha': 16,
                              'targets': ['attention.query', 'attention.value']},
                             {'method': 'adapter', 'variant': 'houlsby', 'tasks': ['rte']}],
                            task_names=('sst2', 'rte', 'stsb'))
    cfg = attach(bert_cfg, method_cfgs, task_names)   # build + bind + check against the model

A method config is a mapping (dict or ml_collections.ConfigDict) with 'method' and the method
dataclass's fields (see each class); every other key is an error naming it. Common keys:
'name' (parameter scope, default the method name), 'tasks' (the tasks owning weights, default
all), 'impl' ('gather' | 'ragged' | 'onehot'). Errors name the config entry (``peft[1].rank``).

Helpers around a model with extensions: `check_coverage` (every target pattern matches a site
of THIS model), `check_task_order` (extensions route with the model's task ids),
`check_task_weights` (a loaded checkpoint has weights for every task of every extension),
`trainable_patterns` (what trains by default), `without_extension` (for merged deployment).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple, Type

from mtlx.models.layers import Extension, Site

# Modules defining `METHODS = {name: class}`; mtlx.peft.hyper is optional (it is written in
# parallel and registers its hypernetwork methods the same way).
_METHOD_MODULES = ("mtlx.peft.adapters", "mtlx.peft.lora", "mtlx.peft.prompt",
                   "mtlx.peft.compacter", "mtlx.peft.ia3", "mtlx.peft.fusion",
                   "mtlx.peft.task_norm")
_OPTIONAL_MODULES = ("mtlx.peft.hyper",)
_EXTRA: Dict[str, Type] = {}

LAYER_NORM_PATTERN = r"(^|/)(final_)?layer_norm/"
HEADS_PATTERN = r"^heads/"


def register(method: str, cls: Type) -> Type:
    """Adds a method class (a frozen dataclass with a `task_names` field) under `method`."""
    known = methods()
    if method in known and known[method] is not cls:
        raise ValueError(f"PEFT method {method!r} is already registered ({known[method].__name__})")
    _EXTRA[method] = cls
    return cls


@functools.lru_cache(maxsize=None)
def _builtin_methods() -> Tuple[Tuple[str, Type], ...]:
    found: Dict[str, Type] = {}
    for name in _METHOD_MODULES + _OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name in _OPTIONAL_MODULES and e.name == name:
                continue  # not written yet; a broken import inside it still raises
            raise
        for method, cls in getattr(module, "METHODS", {}).items():
            if method in found:
                raise ValueError(f"PEFT method {method!r} is defined by two modules")
            found[method] = cls
    return tuple(found.items())


def methods() -> Dict[str, Type]:
    """{method name: class} of every registered method."""
    return {**dict(_builtin_methods()), **_EXTRA}


def _as_dict(cfg: Any, key: str) -> dict:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{key} must be a mapping with a 'method' key, got {type(cfg).__name__}")
    return dict(cfg)


def _freeze(value):
    # Lists from YAML/ConfigDict become tuples so the extension stays hashable.
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def build_extension(cfg: Any, task_names: Sequence[str], key: str = "peft") -> Extension:
    """One extension from one method config; errors name `key` (e.g. 'peft[0]')."""
    d = _as_dict(cfg, key)
    known = methods()
    if "method" not in d:
        raise ValueError(f"{key}.method is missing; known methods: {sorted(known)}")
    method = d.pop("method")
    if method not in known:
        raise ValueError(f"{key}.method: unknown PEFT method {method!r}; known: {sorted(known)}")
    cls = known[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"task_names"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown} for method {method!r}; its keys: "
                         f"{sorted(fields)}")
    try:
        return cls(task_names=tuple(task_names), **{k: _freeze(v) for k, v in d.items()})
    except (ValueError, TypeError) as e:
        raise type(e)(f"{key}: {e}") from None


def build_extensions(method_cfgs: Iterable[Any], task_names: Sequence[str],
                     key: str = "peft") -> Tuple[Extension, ...]:
    """Extensions from a list of method configs, for a model whose tasks are `task_names`
    (in task-id order). Raises naming ``{key}[i]`` for unknown methods, unknown keys, invalid
    values, and two methods with the same parameter name."""
    if isinstance(method_cfgs, Mapping) or hasattr(method_cfgs, "to_dict"):
        method_cfgs = [method_cfgs]
    exts = tuple(build_extension(c, task_names, f"{key}[{i}]") for i, c in enumerate(method_cfgs))
    check_unique_names(exts, key)
    return exts


def check_unique_names(exts: Sequence[Extension], key: str = "extensions") -> None:
    seen: Dict[str, int] = {}
    for i, e in enumerate(exts):
        if e.name in seen:
            raise ValueError(f"{key}[{i}] and {key}[{seen[e.name]}] share the name {e.name!r}; "
                             f"parameters would collide: give one a different 'name'")
        seen[e.name] = i


def attach(backbone_config, method_cfgs: Iterable[Any], task_names: Sequence[str],
           key: str = "peft"):
    """The backbone config with the configured methods appended to its extensions, bound to
    the backbone family and checked against its sites (`check_coverage`)."""
    exts = tuple(e.bind(backbone_config) if hasattr(e, "bind") else e
                 for e in build_extensions(method_cfgs, task_names, key))
    config = dataclasses.replace(backbone_config,
                                 extensions=tuple(backbone_config.extensions) + exts)
    check_unique_names(config.extensions)
    check_coverage(config)
    return config


def without_extension(backbone_config, name: str):
    """The config without the extension called `name` (e.g. after `merge_lora`; a LoRA is
    checked to fold exactly: `lora.check_mergeable`)."""
    kept = tuple(e for e in backbone_config.extensions if e.name != name)
    if len(kept) == len(backbone_config.extensions):
        raise KeyError(f"no extension named {name!r}; extensions: "
                       f"{[e.name for e in backbone_config.extensions]}")
    from mtlx.peft.lora import LoRA, check_mergeable
    removed = next(e for e in backbone_config.extensions if e.name == name)
    if isinstance(removed, LoRA):
        check_mergeable(backbone_config, removed)
    return dataclasses.replace(backbone_config, extensions=kept)


# --------------------------------------------------------------------------- site coverage

_SEEN: set = set()


@dataclasses.dataclass(frozen=True)
class _SiteProbe(Extension):
    """Records every site a backbone offers to each hook; changes nothing."""
    name: str = "_site_probe"

    def _see(self, kind, site):
        _SEEN.add((kind, site))
        return None

    def projection_input(self, site):
        return self._see("projection_input", site)

    def projection(self, site):
        return self._see("projection", site)

    def sublayer(self, site):
        return self._see("sublayer", site)

    def attention_kv(self, site):
        return self._see("attention_kv", site)

    def embeddings(self, site):
        return self._see("embeddings", site)

    def layer_norm_output(self, site):
        return self._see("layer_norm", site)


@functools.lru_cache(maxsize=32)
def _discover(config) -> Tuple[Tuple[str, Site], ...]:
    from mtlx.models.hf import family
    probe_cfg = dataclasses.replace(config, extensions=(_SiteProbe(),))
    _SEEN.clear()
    family(config.model_type).abstract_params(probe_cfg)  # traced with jax.eval_shape
    seen = tuple(sorted(_SEEN, key=lambda ks: (ks[0], str(ks[1]))))
    _SEEN.clear()
    return seen


def discover_sites(backbone_config) -> Dict[str, Tuple[Site, ...]]:
    """{hook kind: sites} the backbone offers (found by tracing its init with a probe
    extension under jax.eval_shape: no weights, shapes only)."""
    base = dataclasses.replace(backbone_config, extensions=())
    out: Dict[str, list] = {}
    for kind, site in _discover(base):
        out.setdefault(kind, []).append(site)
    return {k: tuple(v) for k, v in out.items()}


def check_coverage(backbone_config) -> None:
    """Every target pattern of every extension matches at least one site of this model.

    Raises ValueError naming the config key and pattern, with the model's site names (e.g.
    'cross_attention.query' on BERT, or layer 20 of a 12-layer model).
    """
    sites = None
    for ext in backbone_config.extensions:
        target_map = getattr(ext, "target_map", None)
        if target_map is None:
            continue
        for key, (kind, patterns) in target_map().items():
            if sites is None:
                sites = discover_sites(backbone_config)
            available = sites.get(kind, ())
            for p in patterns:
                if not matches_any_site(available, p):
                    names = sorted({s.name for s in available})
                    raise ValueError(
                        f"{ext.name}: {key} pattern {p!r} matches no {kind} site of this "
                        f"{backbone_config.model_type} model ({_depth(backbone_config)}); its "
                        f"{kind} site names: {names}")


def matches_any_site(sites: Sequence[Site], pattern: str) -> bool:
    from mtlx.peft.base import site_matches
    return any(site_matches(s, pattern) for s in sites)


def _depth(cfg) -> str:
    dec = getattr(cfg, "num_decoder_layers", None)
    return f"{cfg.num_layers} layers" + (f" + {dec} decoder layers" if dec else "")


def check_task_order(backbone_config, task_names: Sequence[str]) -> None:
    """Raises unless every task-routed extension was built for exactly these task names in
    this order (task ids index that tuple: another order would route to the wrong weights)."""
    for ext in backbone_config.extensions:
        own = getattr(ext, "task_names", None)
        if own is not None and tuple(own) != tuple(task_names):
            raise ValueError(f"extension {ext.name!r} was built for tasks {list(own)} but the "
                             f"model's tasks are {list(task_names)}: rebuild it with the model's "
                             f"task names in task-id order")


# --------------------------------------------------------------------------- what trains

def trainable_patterns(method, *, heads: bool = True, layer_norms: bool = True,
                       params=None) -> Tuple[str, ...]:
    """Default trainable-parameter patterns for `mtlx.train.optim.trainable_mask`: the given
    extension(s)' own trainable parameters + task heads + the backbone's layer norms.

    `method`: an extension, a sequence of them, or a backbone config (its extensions).
    `params` (optional, arrays or shapes): when given, the heads / layer-norm defaults are
    dropped if the model has none (a T5 model whose tasks are all seq2seq has no heads), so
    that trainable_mask's "pattern matches nothing" check stays meaningful for the rest.
    """
    if hasattr(method, "extensions"):
        exts = tuple(method.extensions)
    elif isinstance(method, Extension):
        exts = (method,)
    else:
        exts = tuple(method)
    patterns = []
    for ext in exts:
        own = getattr(ext, "trainable_patterns", None)
        patterns += list(own()) if own else [f"(^|/){ext.name}/"]
    optional = ([HEADS_PATTERN] if heads else []) + ([LAYER_NORM_PATTERN] if layer_norms else [])
    if params is not None:
        import re
        import flax.traverse_util as tu
        paths = list(tu.flatten_dict(params, sep="/"))
        optional = [p for p in optional if any(re.search(p, k) for k in paths)]
    return tuple(dict.fromkeys(patterns + optional))


# --------------------------------------------------------------------------- checkpoints

def _nodes_named(tree, names, path=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if k in names and isinstance(v, Mapping):
                yield path + (k,), v
            else:
                yield from _nodes_named(v, names, path + (k,))


def check_task_weights(params, extensions: Sequence[Extension], *,
                       allow_extra: bool = False) -> None:
    """Checks a (loaded) params tree against each extension's tasks.

    Raises KeyError naming the extension, the task(s) without weights and a parameter path
    where they are missing; with allow_extra=False also for weights of tasks the extension
    does not know (a renamed task would otherwise be dropped silently).
    """
    for ext in extensions:
        active = getattr(ext, "active", None)
        if active is None:
            continue
        names = {ext.name, f"generators_{ext.name}"}
        nodes = list(_nodes_named(params, names))
        if not nodes:
            raise KeyError(f"the checkpoint has no parameters of extension {ext.name!r} "
                           f"({type(ext).__name__}); expected '.../{ext.name}/<task>/...' for "
                           f"tasks {list(active)}")
        for path, node in nodes:
            scopes = (((), active),) if path[-1] != ext.name else ext.task_param_scopes()
            for scope, expected in scopes:
                sub = node
                for s in scope:
                    sub = sub.get(s, {}) if isinstance(sub, Mapping) else {}
                where = "/".join(path + scope)
                missing = [t for t in expected if t not in sub]
                if missing:
                    raise KeyError(f"the checkpoint has no {ext.name!r} weights for task(s) "
                                   f"{missing} (extension {type(ext).__name__} "
                                   f"'{ext.name}', e.g. at {where}/); it has weights for "
                                   f"{sorted(sub)}")
                extra = sorted(set(sub) - set(expected))
                if extra and not allow_extra:
                    raise KeyError(f"the checkpoint has {ext.name!r} weights for task(s) {extra} "
                                   f"that extension '{ext.name}' does not route (its tasks: "
                                   f"{list(expected)}) at {where}/; pass allow_extra=True to "
                                   f"ignore them")
