"""The management app's own admin routes beyond /admin/reload (token and method are checked by
the app before a handler runs):

    GET  /admin/config        the effective configuration with sources (`effective.py`)
    GET  /admin/version       Waypost's, mitmproxy's and Python's versions
    POST /admin/explain       what every policy and the router would decide (`explain.py`)
    GET  /admin/openapi.json  the admin API's OpenAPI 3.1 document (`openapi.py`)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from mitmproxy import ctx
from pydantic import ValidationError

from addons import errors
from addons.admin import effective, explain, openapi
from addons.admin.models import ConfigAnswer, ExplainRequest, VersionAnswer
from addons.kernel.version import versions

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _addons() -> list[Any]:
    return list(ctx.master.addons.lookup.values())


def _json(payload: Any) -> web.Response:
    return web.Response(
        body=json.dumps(payload),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def config_answer() -> dict[str, Any]:
    cfg = ctx.master.addons.get("config")
    sources = getattr(cfg, "sources", None)
    if sources is None:
        raise LookupError("No config addon is loaded: the options are all there is.")
    current = getattr(cfg, "current", None)
    profile = current.source if current is not None else None
    answer = effective.effective(sources(), lambda o: getattr(ctx.options, o), profile)
    return ConfigAnswer.model_validate(answer).model_dump(mode="json")


def explain_answer(body: Any) -> dict[str, Any]:
    """ValidationError for a bad body."""
    return explain.explain(ExplainRequest.model_validate(body), _addons())


def bad_body(e: ValidationError) -> web.Response:
    fields = [
        {"field": ".".join(map(str, err["loc"])) or "(body)", "message": err["msg"]}
        for err in e.errors()
    ]
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return web.Response(
        status=400,
        body=errors.body("BAD_REQUEST", message, errors.new_request_id(), {"fields": fields}),
        content_type="application/json",
    )


async def _config(request: web.Request) -> web.Response:
    try:
        return _json(config_answer())
    except LookupError as e:
        return errors.web_error("NOT_FOUND", str(e))


async def _version(request: web.Request) -> web.Response:
    return _json(VersionAnswer.model_validate(versions()).model_dump())


async def _explain(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as e:
        return errors.web_error("BAD_REQUEST", f"(body): not JSON: {e}")
    try:
        return _json(explain_answer(body))
    except ValidationError as e:
        return bad_body(e)


async def _openapi(request: web.Request) -> web.Response:
    return _json(openapi.document(_addons()))


# path -> (the method it takes, handler); GET routes answer HEAD too.
ROUTES: dict[str, tuple[str, Handler]] = {
    "/admin/config": ("GET", _config),
    "/admin/version": ("GET", _version),
    "/admin/explain": ("POST", _explain),
    "/admin/openapi.json": ("GET", _openapi),
}
