"""Configs as code: `configs/NAME.py` defines `get_config(arg)` returning a ConfigDict.

`load_config('configs/demo.py:local')` imports the file and calls get_config('local').
`apply_overrides(cfg, ['--config.optim.learning_rate=3e-4', ...])` sets existing keys only:
an unknown key is an error naming it with near matches, a value of the wrong type is an
error naming the key, the expected type and the value.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
    pass


def load_config(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"mtlx_config_{p.stem}", p)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg)")
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _all_keys(cfg, prefix="") -> list:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _parse(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare string


def convert_value(key: str, current, raw: str):
    """A command-line value `raw` for config key `key` as the type of its `current` value
    (Python literals; a bare word is a string); ConfigError when it is not that type."""
    value = _parse(raw)
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        return raw if not isinstance(value, str) else value
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        if isinstance(value, str):
            return tuple(x for x in value.split(",") if x)
    else:
        return value
    raise ConfigError(f"--config.{key}: expected {type(current).__name__} "
                      f"(current value {current!r}), got {raw!r}")


def set_key(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = _all_keys(cfg)
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('config.' + n for n in near)}?" if near else ""
            raise ConfigError(f"unknown config key 'config.{key}'{hint}")
        if i < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    current = node[last]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a group; set one of its keys: "
                          f"{', '.join('config.' + key + '.' + k for k in current.keys())}")
    with node.ignore_type():
        node[last] = convert_value(key, current, raw)


def apply_overrides(cfg: ml_collections.ConfigDict, args: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` arguments (also `--config.a.b value`)."""
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --config.key=value")
        body = arg[len("--config."):]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, raw = body, args[i + 1]
            i += 1
        set_key(cfg, key, raw)
        i += 1
    return cfg


def parse_cli(parser, argv=None):
    """(args, config) from a script's argparse parser that has --config: the config file loaded
    and every remaining `--config.key=value` applied; a bad key or value exits via
    parser.error (status 2) with the message."""
    args, overrides = parser.parse_known_args(argv)
    try:
        return args, apply_overrides(load_config(args.config), overrides)
    except ConfigError as e:
        parser.error(str(e))
