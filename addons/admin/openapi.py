"""GET /admin/openapi.json: the admin API as an OpenAPI 3.1 document, generated from the pydantic
models that validate its requests and describe its answers (`models.py`, with their examples).

The routes other addons serve (`management_routes()`: /admin/backends, /admin/cache, ...) are
described here too (`EXTENSIONS`), so the document is whole whichever addons are loaded; an
addon with routes this table does not know adds its own operations through a duck-typed
`management_openapi() -> {path: {method: operation}}`, merged over this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from addons.admin import models
from addons.kernel.version import waypost_version

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    models.ExplainRequest,
    models.ExplainAnswer,
    models.ConfigAnswer,
    models.VersionAnswer,
    models.ReloadAnswer,
    models.ErrorAnswer,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refusals(*extra: int) -> dict[str, Any]:
    why = {
        400: "The request body or query is invalid (the error names the field).",
        401: "No or a malformed bearer token.",
        403: "A wrong bearer token.",
        404: "The admin API is off (admin_token is empty), or nothing is there.",
        405: "Another method is required (see Allow).",
    }
    return {
        str(s): _json(_ref(models.ErrorAnswer), why[s]) for s in sorted({401, 403, 404, *extra})
    }


def _op(
    summary: str,
    answer: dict[str, Any],
    *,
    body: type[BaseModel] | None = None,
    params: Iterable[dict[str, Any]] = (),
    errors: Iterable[int] = (),
    example: Any = None,
) -> dict[str, Any]:
    ok = _json(answer)
    if example is not None:
        ok["content"]["application/json"]["example"] = example
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_refusals(*errors)}}
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
        op["responses"].update(_refusals(400, *errors))
    if params:
        op["parameters"] = list(params)
    return op


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


_OBJECT: dict[str, Any] = {"type": "object"}

# The management app's own admin routes: path -> method -> operation.
OWN: dict[str, dict[str, Any]] = {
    "/admin/reload": {
        "post": _op("Re-read the profile; a bad one is refused and the old one stays.",
                    _ref(models.ReloadAnswer), errors=(405,)),
    },
    "/admin/config": {
        "get": _op("The effective configuration, secrets redacted, with each value's source.",
                   _ref(models.ConfigAnswer), errors=(405,)),
    },
    "/admin/version": {
        "get": _op("Waypost's, mitmproxy's and Python's versions.", _ref(models.VersionAnswer),
                   errors=(405,)),
    },
    "/admin/explain": {
        "post": _op("What every policy and the router would decide for a request (nothing is "
                    "sent, no state changes).", _ref(models.ExplainAnswer), body=models.ExplainRequest,
                    errors=(405,)),
    },
    "/admin/openapi.json": {
        "get": _op("This document.", _OBJECT, errors=(405,)),
    },
}  # fmt: skip

# Routes other addons serve through management_routes(); described here so the document is
# the same whichever are loaded.
EXTENSIONS: dict[str, dict[str, Any]] = {
    "/admin/backends": {
        "get": _op("Every backend: health, circuit breaker, requests, recent failures.",
                   _OBJECT, errors=(405,),
                   example={"timestamp": "2026-01-01T00:00:00.000Z", "backends": [
                       {"name": "api-1", "url": "http://10.0.0.5:8080", "status": "healthy",
                        "circuit": "closed", "available": True}]}),
    },
    "/admin/cache": {
        "delete": _op("Purge cache entries by URL/host glob and/or tag (soft: mark stale).",
                      _OBJECT, errors=(400, 405),
                      params=[_query("pattern", "Glob over the URL or host."),
                              _query("tag", "Surrogate-Key / Cache-Tag."),
                              _query("soft", "true: mark stale instead of dropping.")],
                      example={"invalidated": 3, "remaining": 120}),
    },
    "/admin/cache/stats": {
        "get": _op("Cache sizes, limits, hit and miss rates, evictions.", _OBJECT, errors=(405,)),
    },
    "/admin/bans": {
        "get": _op("Client addresses banned by the rate limiter, with when each ban ends.",
                   _OBJECT, errors=(405,)),
    },
    "/admin/bans/{ip}": {
        "delete": _op("Lift the ban of one client address.", _OBJECT, errors=(405,),
                      params=[{"name": "ip", "in": "path", "required": True,
                               "schema": {"type": "string"}}]),
    },
}  # fmt: skip


def document(addons: Iterable[Any] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `addons` may add operations (`management_openapi()`)."""
    paths: dict[str, dict[str, Any]] = {p: dict(ops) for p, ops in {**OWN, **EXTENSIONS}.items()}
    for addon in addons:
        extra = getattr(addon, "management_openapi", None)
        if callable(extra):
            for path, ops in extra().items():
                paths.setdefault(path, {}).update(ops)
    _, schemas = models_json_schema(
        [(m, "validation" if m is models.ExplainRequest else "serialization") for m in _MODELS],
        ref_template=_REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Waypost admin API",
            "version": waypost_version(),
            "description": "The management port's /admin/* routes (also on the proxy port, "
            "metrics_proxy_port_admin). Every route needs `Authorization: Bearer <admin_token>`; "
            "with admin_token empty they all answer 404.",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas.get("$defs", {}),
        },
        "paths": dict(sorted(paths.items())),
    }
