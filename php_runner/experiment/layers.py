"""Validating config values merged from several sources (layers), with errors that name the file and the dotted field.

A layer is one source of values: a spec file, a preset, a grid point, the command line. Pydantic
validates their deep merge; the first problem is blamed on the last layer that sets the failing path.
"""

from __future__ import annotations

import difflib

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from php_runner.errors import InputError


def first_problem(err: ValidationError) -> tuple[str, str]:
    """The first problem of a pydantic error: (dotted field, empty for the whole object; one-line message)."""
    first = err.errors()[0]
    message = " ".join(first["msg"].removeprefix("Value error, ").split())
    field = ""
    for part in first["loc"]:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field, message


@dataclass(frozen=True)
class Layer:
    """One source of config values, for merging and for naming the culprit of an error."""

    origin: str       # file (or "command line")
    prefix: str       # how the values are addressed inside it, e.g. "grid." or "tiny."
    values: dict[str, Any]


def validate_layers(model: type[BaseModel], layers: list[Layer]) -> Any:
    try:
        return model.model_validate(deep_merge(*(layer.values for layer in layers)))
    except ValidationError as err:
        layer = layer_of(layers, tuple(err.errors()[0]["loc"]))
        field, message = first_problem(err)
        if err.errors()[0]["type"] == "extra_forbidden":
            message += suggestion(model, tuple(err.errors()[0]["loc"]))
        where = f"{layer.prefix}{field}" if field else layer.prefix.rstrip(".")
        raise InputError(f"{layer.origin}: {where}: {message}" if where else f"{layer.origin}: {message}") from None


def suggestion(model: type[BaseModel], loc: tuple) -> str:
    """"; did you mean 'lr'?" for an unknown key at ``loc``: the closest field of the model holding it."""
    holder: Any = model
    for part in loc[:-1]:
        field = holder.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        holder = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(holder.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def layer_of(layers: list[Layer], loc: tuple) -> Layer:
    """The last layer that sets the failing path (or its nearest enclosing table).

    A path no layer sets (a required section missing) is blamed on the first layer: the root of
    the spec chain, which must define every section (or extend a spec that does).
    """
    for depth in range(len(loc), 0, -1):
        for layer in reversed(layers):
            if contains(layer.values, loc[:depth]):
                return layer
    return layers[0]


def culprit(files: list[tuple[Path, dict]], loc: tuple) -> str:
    return str(layer_of([Layer(str(file), "", raw) for file, raw in files], loc).origin)


def contains(values: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(values, dict) and part in values:
            values = values[part]
        elif isinstance(values, list) and isinstance(part, int) and 0 <= part < len(values):
            values = values[part]
        else:
            return False
    return True


def deep_merge(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key, later sources win; anything else (lists included) is replaced."""
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            elif isinstance(value, Mapping):
                merged[key] = deep_merge(value)
            else:
                merged[key] = value
    return merged


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        section, field = dotted.split(".")
        nested.setdefault(section, {})[field] = value
    return nested
