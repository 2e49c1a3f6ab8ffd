"""Environment variables that override profile keys.

Two names reach the same keys, both derived from the schema:
- the product requirements' names: a field marked `Annotated[..., Env("PROXY_PORT")]` is overridden by
  `PROXY_PORT`;
- one systematic name for every key: `WAYPOST_` + the key path in capitals, `__` between
  levels (`cache.max_memory` -> `WAYPOST_CACHE__MAX_MEMORY`); it wins over the requirements' name.

The variables are merged into the raw profile before validation, so their errors name the
variable. A list takes a comma-separated value or JSON (`[...]`), a mapping or a list of
rules JSON; a choice is matched whatever its case. A Kubernetes service link in a port variable
(`PROXY_PORT=tcp://10.96.0.12:8080`, injected for a Service named `proxy`) is ignored with a
WARNING.

Why not pydantic-settings (tried, 2.14.1 with `env_nested_delimiter="__"`): its errors name
the key (`cache.max_memory`), not the variable, so a value set by both the file and the
environment cannot be told apart; and a misspelt `WAYPOST_CACHE__MAX_MEMROY` is silently
ignored even with `extra="forbid"`. Deriving both tables from the schema is these 40 lines.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from addons.schema.fields import Env
from addons.schema.models import Profile

log = logging.getLogger("waypost.config")

KeyPath = tuple[str, ...]
PREFIX = "WAYPOST_"
_SERVICE_LINK = re.compile(r"^[a-z]+://")


def _leaves(model: type[BaseModel], path: KeyPath = ()) -> Iterator[tuple[KeyPath, FieldInfo]]:
    for name, field in model.model_fields.items():
        here = path + (name,)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, here)
        else:
            yield here, field


_FIELDS: dict[KeyPath, FieldInfo] = {
    path: field for path, field in _leaves(Profile) if len(path) > 1
}
ENV_OVERRIDES: dict[str, KeyPath] = {
    marker.name: path
    for path, field in _FIELDS.items()
    for marker in field.metadata
    if isinstance(marker, Env)
}
SYSTEMATIC: dict[str, KeyPath] = {
    PREFIX + "__".join(key.upper() for key in path): path for path in _FIELDS
}


def apply(data: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[KeyPath, str], list[str]]:
    """Write the variables set in `environ` into `data`; return which variable set each key,
    and the problems (each naming its variable)."""
    applied: dict[KeyPath, str] = {}
    problems: list[str] = []
    unknown = [v for v in environ if v.startswith(PREFIX) and "__" in v and v not in SYSTEMATIC]
    for var in unknown:
        close = difflib.get_close_matches(var, SYSTEMATIC, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"environment variable {var}: not a profile key{hint}")
    # The requirements' names first, so the systematic name of the same key wins.
    for var, target in [*ENV_OVERRIDES.items(), *SYSTEMATIC.items()]:
        if var not in environ:
            continue
        if var.endswith("PORT") and _SERVICE_LINK.match(environ[var]):
            log.warning(
                "environment variable %s=%s looks like a Kubernetes service link, not a port: "
                "ignored (name the Service otherwise, or set enableServiceLinks: false)",
                var,
                environ[var],
            )
            continue
        try:
            value = _convert(_FIELDS[target], environ[var])
        except ValueError as e:
            problems.append(f"environment variable {var}: {'.'.join(target)}: {e}")
            continue
        _set_path(data, target, value)
        applied[target] = var
    return applied, problems


def _convert(field: FieldInfo, raw: str) -> Any:
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list or origin is dict or (args and typing.get_origin(args[0]) in (list, dict)):
        if raw.lstrip().startswith(("[", "{")):
            try:
                return json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from None
        items = [item.strip() for item in raw.split(",") if item.strip()]
        inner = typing.get_args(annotation)[0] if origin is list else None
        return [_choice(inner, item) for item in items]
    return _choice(annotation, raw)


def _choice(annotation: Any, raw: str) -> str:
    """A Literal's own spelling of `raw`, matched whatever its case (`INFO` -> `info`)."""
    if typing.get_origin(annotation) is typing.Literal:
        for choice in typing.get_args(annotation):
            if isinstance(choice, str) and choice.lower() == raw.lower():
                return choice
    return raw


def _set_path(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    for key in path[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[path[-1]] = value
