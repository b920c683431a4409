"""Config variants and overrides: ``configs/char_lm.py:smoke,cell=gru`` and ``--config.model.hidden=512``.

A config file defines ``get_config(arg)`` returning an ``ml_collections.ConfigDict`` and calls
:func:`apply_variant` on the ``arg`` after the colon: a comma-separated list of preset names
(``smoke``) and ``key=value`` pairs, where ``key`` is a dotted path (``model.hidden``) or a leaf
name that is unique in the config (``hidden``). Unknown names are errors listing the nearest
valid ones.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib

import ml_collections


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(leaf_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def resolve(config, key: str, where: str) -> str:
    """The dotted path that ``key`` names: itself, or the unique leaf called ``key``."""
    paths = leaf_paths(config)
    if key in paths:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"{where}: {key!r} is ambiguous; say one of {', '.join(matches)}")
    names = paths + sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(key, names, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"{where}: unknown config key {key!r}{hint} (valid keys: {', '.join(paths)})")


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_value(config, path: str, value, where: str):
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and value is not None and type(old) is not type(value):
        raise ValueError(
            f"{where}: {path} is a {type(old).__name__} (now {old!r}); cannot set it to {value!r}"
        )
    with node.unlocked():
        node[leaf] = value


def override(config, key: str, text: str, where: str = "override"):
    set_value(config, resolve(config, key, where), parse_value(text), where)


def apply_variant(config, arg: str | None, presets: dict[str, dict], where: str = "config"):
    """Applies ``arg`` = "preset,key=value,..." to ``config`` in order and returns it."""
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if eq:
            override(config, key.strip(), value.strip(), f"{where} variant {item!r}")
        elif item in presets:
            for k, v in presets[item].items():
                set_value(config, resolve(config, k, f"{where} preset {item!r}"), v, f"{where} preset {item!r}")
        else:
            close = difflib.get_close_matches(item, list(presets), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: unknown variant {item!r}{hint} (presets: {', '.join(presets)}; or key=value)")
    return config


def load(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` and applies ``[(dotted.key, value), ...]`` overrides."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} not found (from --config {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"recur_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config(arg)")
    config = module.get_config(arg or None)
    for key, value in overrides:
        override(config, key, value, f"--config.{key}")
    return config
