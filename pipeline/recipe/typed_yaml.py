"""A small typed-YAML engine: dataclass type hints -> checked values, with errors a user can act on.

    build(Recipe, yaml.safe_load(text), "", "recipe.yaml")

Supported hints: the dataclasses themselves (nested), int, float (also "1e-5", which YAML 1.1
reads as a string), str, bool, Literal[...], X | None, unions, list[X], dict[str, X] and Any.
An error names the file, the dotted key path and what was expected; a misspelt key gets the
nearest allowed name. Knows nothing about recipes beyond the error type it raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Mapping


class RecipeError(ValueError):
    """A recipe that cannot run; the message starts with the file and the dotted key path."""


def describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(kind))
    if origin is list:
        return f"a list of {describe(typing.get_args(kind)[0])}"
    if origin is dict:
        return f"a mapping of {describe(typing.get_args(kind)[1])}"
    if dataclasses.is_dataclass(kind):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(kind))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string",
            Any: "any value"}.get(kind, str(kind))


def convert(kind: Any, value: Any, path: str, source: str, aliases: Mapping[str, str] | None = None) -> Any:
    """``value`` as ``kind``, or RecipeError naming ``path`` and what was expected."""
    origin = typing.get_origin(kind)
    wrong = RecipeError(f"{source}: {path}: expected {describe(kind)}, got {value!r}")
    if kind is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(kind) and type(value) in {type(v) for v in typing.get_args(kind)}:
            return value
        raise wrong
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) == 1:  # "X or null": X's own, more precise, error
            return convert(options[0], value, path, source, aliases)
        for option in options:
            try:
                return convert(option, value, path, source, aliases)
            except RecipeError:
                continue
        raise wrong
    if kind is type(None):
        if value is None:
            return None
        raise wrong
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path, source, aliases)
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        return [convert(typing.get_args(kind)[0], item, f"{path}[{i}]", source, aliases) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {str(k): convert(typing.get_args(kind)[1], v, f"{path}.{k}", source, aliases) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-5 (no dot) as a string; it is a number to anyone writing a learning rate.
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)
        raise wrong
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"recipe schema has an unsupported type at {path}: {kind}")


def build(cls: type, data: Any, path: str, source: str, aliases: Mapping[str, str] | None = None) -> Any:
    """An instance of dataclass ``cls`` from a YAML mapping: unknown keys name the nearest allowed one
    (``aliases``: other tools' names for ours), missing required keys are listed."""
    aliases = aliases or {}
    if data is None:
        data = {}
    where = path or "the recipe's top level"
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where}: expected {describe(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            close = [aliases[key]] if aliases.get(key) in allowed else difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{source}: {dotted}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        kwargs[key] = convert(hints[key], value, dotted, source, aliases)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{source}: {where}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)
