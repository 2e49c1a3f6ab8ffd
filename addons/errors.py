"""The answers Waypost makes itself: JSON error bodies, request ids, and fail-closed hooks.

Every response the proxy generates (a refusal, a limit, a rewritten mitmproxy error) goes
through `make()`, so clients and log readers see one shape:

    {"error": {"code": "...", "message": "...", "request_id": "...", "timestamp": "..."}}
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import random
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar

from mitmproxy import http

from addons.kernel.record import record

log = logging.getLogger("waypost")

STATUS: dict[str, int] = {
    "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "ACCESS_DENIED": 403,
    "DOMAIN_BLOCKED": 403,
    "CONTENT_TYPE_BLOCKED": 403,
    "COMMAND_NOT_ALLOWED": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "REQUEST_TIMEOUT": 408,
    "PAYLOAD_TOO_LARGE": 413,
    "URI_TOO_LONG": 414,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "RATE_LIMITED": 429,
    "CONFIG_INVALID": 422,
    "HEADERS_TOO_LARGE": 431,
    "INTERNAL_ERROR": 500,
    "BACKEND_UNREACHABLE": 502,
    "CIRCUIT_OPEN": 503,
    "BACKEND_TIMEOUT": 504,
}

# Client-supplied ids are echoed into headers and logs, so only a conservative token survives.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


# Until the lead converts addons/cache.py, cli.py and router.py (split into packages in
# parallel branches) to record(flow); then this line goes.
waypost = record


def request_id(flow: http.HTTPFlow) -> str:
    """The flow's request id: a valid incoming X-Request-ID, else a new UUID. Stable per flow."""
    meta = record(flow)
    rid = meta.get("request_id")
    if rid is None:
        incoming = flow.request.headers.get("x-request-id", "")
        rid = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        meta["request_id"] = rid
    return rid


def new_request_id() -> str:
    """A random (version 4) UUID string.

    Request ids need uniqueness, not secrecy: `random` is 3x cheaper than uuid.uuid4()'s
    os.urandom per request, and the random module reseeds itself in forked workers.
    """
    h = "%032x" % (random.getrandbits(128) & _UUID_CLEAR | _UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_V4 = (4 << 76) | (2 << 62)


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def body(code: str, message: str, rid: str, details: Mapping[str, Any] | None = None) -> bytes:
    error = {"code": code, "message": message, "request_id": rid, "timestamp": timestamp()}
    # Extra fields never replace the contract's own.
    extra = {k: v for k, v in (details or {}).items() if k not in error}
    return json.dumps({"error": error | extra}).encode()


def make(
    code: str,
    message: str,
    flow: http.HTTPFlow | None = None,
    headers: Mapping[str, str] | None = None,
    status: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> http.Response:
    """A JSON error response for `code` (one of STATUS); records the code on the flow.

    `details` adds fields to the error object (e.g. the `rule` that refused the request).
    """
    status = status or STATUS[code]
    rid = request_id(flow) if flow is not None else new_request_id()
    resp = http.Response.make(
        status,
        body(code, message, rid, details),
        {"Content-Type": "application/json", "X-Request-ID": rid, **(headers or {})},
    )
    # mitmproxy 11's status table lacks 429/431 and would send an empty reason phrase.
    resp.reason = HTTPStatus(status).phrase
    if flow is not None:
        record(flow)["error_code"] = code
    return resp


Hook = TypeVar("Hook", bound=Callable[..., Any])


def fail_closed(hook: Hook) -> Hook:
    """Answer 500 INTERNAL_ERROR when a security hook raises, instead of letting the flow pass.

    mitmproxy logs an exception from an addon hook and carries on with the flow, which for a
    policy check means the request goes through unchecked.
    """
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: Any, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception:
                _refuse(hook, flow)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            _refuse(hook, flow)

    return wrapper  # type: ignore[return-value]


def _refuse(hook: Callable[..., Any], flow: http.HTTPFlow) -> None:
    log.exception("hook %s failed; refusing the request", hook.__qualname__)
    record(flow)["decision"] = "internal_error"
    flow.response = make("INTERNAL_ERROR", "The proxy could not process this request.", flow)
