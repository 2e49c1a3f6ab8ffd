"""Environment variables that override profile keys.

The table is derived from the schema: a field marked `Annotated[..., Env("PROXY_PORT")]` is
overridden by `PROXY_PORT`. The variables are merged into the raw profile before validation,
so their errors name the variable; a list field takes a comma-separated value.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from addons.schema.fields import Env
from addons.schema.models import Profile

KeyPath = tuple[str, ...]


def _env_fields(model: type[BaseModel], path: KeyPath = ()) -> Iterator[tuple[str, KeyPath, bool]]:
    """(variable, key path, takes a list) for every field of `model` marked with `Env`."""
    for name, field in model.model_fields.items():
        here = path + (name,)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _env_fields(field.annotation, here)
        for marker in field.metadata:
            if isinstance(marker, Env):
                yield marker.name, here, typing.get_origin(field.annotation) is list


ENV_OVERRIDES: dict[str, KeyPath] = {var: path for var, path, _ in _env_fields(Profile)}
_LIST_ENV = {var for var, _, is_list in _env_fields(Profile) if is_list}


def apply(data: dict[str, Any], environ: Mapping[str, str]) -> dict[KeyPath, str]:
    """Write the variables set in `environ` into `data`; return which key each one set."""
    applied: dict[KeyPath, str] = {}
    for var, target in ENV_OVERRIDES.items():
        if var in environ:
            raw: Any = environ[var]
            if var in _LIST_ENV:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
            _set_path(data, target, raw)
            applied[target] = var
    return applied


def _set_path(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    for key in path[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[path[-1]] = value
