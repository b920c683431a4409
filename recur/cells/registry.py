"""Cells by name: ``get_cell("lstm:cifg,ln", hidden_size=256)``.

A name is ``family`` or ``family:switch,switch,...``. A switch is a registered variant tag of the
family (``cifg``, ``nfg``, ``relu``...) or ``field=value`` for any field of the cell's dataclass
(``lstm:forget_bias=0``, ``clockwork:periods=1-2-4-8``). Switches apply left to right.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib

from recur.cells.base import Cell

_FAMILIES: dict[str, type] = {}
_VARIANTS: dict[str, dict[str, dict]] = {}


def register(family: str, variants: dict[str, dict] | None = None):
    """Class decorator: register a cell class under ``family`` with its variant tags."""

    def wrap(cls):
        if family in _FAMILIES:
            raise ValueError(f"cell family {family!r} is registered twice")
        _FAMILIES[family] = cls
        _VARIANTS[family] = dict(variants or {})
        cls.family = family
        return cls

    return wrap


def list_cells() -> list[str]:
    """Every registered name: each family, then each ``family:variant``."""
    names = []
    for family in _FAMILIES:
        names.append(family)
        names.extend(f"{family}:{tag}" for tag in _VARIANTS[family])
    return names


def _parse_value(text: str, field: dataclasses.Field, where: str):
    if isinstance(field.default, tuple) or "tuple" in str(field.type):
        parts = [p for p in text.replace("-", " ").split()]
        try:
            return tuple(ast.literal_eval(p) for p in parts)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: cannot read {text!r} as a tuple for {field.name!r}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as an activation name


def switches(spec: str) -> tuple[type, dict]:
    """The cell class and constructor keyword arguments that ``spec`` names."""
    family, _, rest = spec.partition(":")
    if family not in _FAMILIES:
        close = difflib.get_close_matches(family, list(_FAMILIES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown cell {family!r} in {spec!r}{hint}; valid cells: {', '.join(list_cells())}"
        )
    cls = _FAMILIES[family]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict = {}
    for switch in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = switch.partition("=")
        if eq:
            if key not in fields or key == "hidden_size":
                raise ValueError(
                    f"unknown field {key!r} in cell name {spec!r}; {family} fields: "
                    f"{', '.join(n for n in fields if n != 'hidden_size')}"
                )
            kwargs[key] = _parse_value(value, fields[key], f"cell name {spec!r}")
        elif switch in _VARIANTS[family]:
            kwargs.update(_VARIANTS[family][switch])
        else:
            valid = list(_VARIANTS[family])
            close = difflib.get_close_matches(switch, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown variant {switch!r} of cell {family!r} in {spec!r}{hint}; valid variants: "
                f"{', '.join(valid) or 'none'}; or set a field with key=value"
            )
    return cls, kwargs


def split_specs(text: str) -> list[str]:
    """A comma-separated list of cell names, whose variants also come after commas:
    "lstm:fgr,peepholes,gru,lstm:proj_size=512" -> ["lstm:fgr,peepholes", "gru", "lstm:proj_size=512"].
    A piece that does not start with a cell family ("family" or "family:...") continues the name
    before it."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if piece.partition(":")[0] in _FAMILIES or not specs:
            specs.append(piece)
        else:
            specs[-1] += "," + piece
    return specs


def get_cell(spec: str, hidden_size: int, **overrides) -> Cell:
    """Build the cell ``spec`` names, e.g. ``get_cell("gru:cho", 128, dtype=jnp.bfloat16)``."""
    cls, kwargs = switches(spec)
    kwargs.update(overrides)
    return cls(hidden_size=hidden_size, **kwargs)


def name_of(cell: Cell) -> str:
    """``family:field=value,...`` for the fields that differ from their defaults."""
    changed = []
    for f in dataclasses.fields(cell):
        value = getattr(cell, f.name)
        if f.name in ("hidden_size", "dtype", "param_dtype") or value == f.default:
            continue
        if isinstance(value, tuple):
            value = "-".join(str(v) for v in value)
        changed.append(f"{f.name}={value}")
    family = getattr(type(cell), "family", type(cell).__name__.lower())
    return family + (":" + ",".join(changed) if changed else "")
