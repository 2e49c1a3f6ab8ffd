"""The answers Waypost makes itself: JSON error bodies, request ids, and fail-closed hooks.

Every response the proxy generates (a refusal, a limit, a rewritten mitmproxy error) goes
through `make()`, so clients and log readers see one shape:

    {"error": {"code": "...", "message": "...", "request_id": "...", "timestamp": "..."}}

- `STATUS` / `code_of`: the one table of error codes and their statuses, both ways.
- `make`: a mitmproxy response for a flow; `web_error`: the same body as an aiohttp response,
  for the management app and the endpoints it serves (admin, cache admin, CLI).
- `reason_of` / `classify`: a mitmproxy error message (and the status mitmproxy would send) as
  a short reason (`connection_refused`, `closed`, ...) and the Waypost code and status.
- `install_error_page`: the one patch of mitmproxy's HTTP/1 error page
  (`_http1.make_error_response`, used for unparsable request heads, protocol errors and the
  wire guards' refusals in `addons/kernel/wire.py`), so those answers are JSON too; installed
  through `addons/kernel/patching.py` by the addons that need it (hygiene, upstream).
  `error_page(status, message, flow)` also writes the page of a failed upstream exchange
  (upstream's patched `Http1Server.send`), with the flow's request id and timers; without a
  flow, the page carries the id of the request whose head was read (its access line's).
  `error_response` is that answer as a response, which upstream's patched `Http2Server`
  sends as HTTP/2 frames.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import random
import re
import sys
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from addons.kernel import patching, wire
from addons.kernel.record import record

if TYPE_CHECKING:
    from aiohttp import web

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
    "TEMPORARILY_BANNED": 429,  # ratelimit_ban_status may make it 403
    "CONFIG_INVALID": 422,
    "HEADERS_TOO_LARGE": 431,
    "INTERNAL_ERROR": 500,
    "BACKEND_UNREACHABLE": 502,
    "CIRCUIT_OPEN": 503,
    "BACKEND_TIMEOUT": 504,
}
# The code of a status when only the status is known (aiohttp's own refusals, mitmproxy's error
# pages): the first code STATUS lists for it.
_CODE_OF: dict[int, str] = {s: c for c, s in reversed(STATUS.items())}


def code_of(status: int) -> str | None:
    """The Waypost code for an HTTP status, or None when STATUS has none."""
    return _CODE_OF.get(status)


# Client-supplied ids are echoed into headers and logs, so only a conservative token survives.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(flow: http.HTTPFlow) -> str:
    """The flow's request id: a valid incoming X-Request-ID, else a new UUID. Stable per flow."""
    meta = record(flow)
    rid = meta.get("request_id")
    if rid is None:
        rid = _PAGE_IDS.get(flow.request) if _PAGE_IDS else None
        if rid is None:
            rid = incoming_request_id(flow.request.headers.get("x-request-id"))
        meta["request_id"] = rid
    return rid


# Request ids shared between a flow and an error page mitmproxy writes without it (a malformed
# body: the page goes out before the flow's error hook runs): the page's id, which the flow
# then takes, or the id of an answer made while the body was still to be read, which the page
# then takes. Weak: an entry goes with its request.
_PAGE_IDS: weakref.WeakKeyDictionary[http.Request, str] = weakref.WeakKeyDictionary()


def incoming_request_id(value: str | None) -> str:
    """A client's X-Request-ID if it is a valid one, else a new UUID."""
    return value if value and _VALID_REQUEST_ID.fullmatch(value) else new_request_id()


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


# A name from mitmproxy.utils.emoji, like policy.ENFORCED: what mitmproxy's `flow.mark` accepts.
REFUSED_MARK = ":warning:"


def make(
    code: str,
    message: str,
    flow: http.HTTPFlow | None = None,
    headers: Mapping[str, str] | None = None,
    status: int | None = None,
    details: Mapping[str, Any] | None = None,
    rid: str | None = None,
) -> http.Response:
    """A JSON error response for `code` (one of STATUS); records the code on the flow.

    `details` adds fields to the error object (e.g. the `rule` that refused the request).
    `rid`: the request id when there is no flow (else a new one).
    With a flow, marks it (REFUSED_MARK) and adds "waypost CODE status" to its comment for
    mitmweb, unless a policy decision (`policy.decide`) already did.
    """
    status = status or STATUS[code]
    if flow is not None:
        rid = request_id(flow)
        if flow.request.timestamp_end is None:  # the body may still fail: see _PAGE_IDS
            _PAGE_IDS[flow.request] = rid
    else:
        rid = rid or new_request_id()
    resp = http.Response.make(
        status,
        body(code, message, rid, details),
        {"Content-Type": "application/json", "X-Request-ID": rid, **(headers or {})},
    )
    # mitmproxy 11's status table lacks 429/431 and would send an empty reason phrase.
    resp.reason = HTTPStatus(status).phrase
    if flow is not None:
        meta = record(flow)
        meta["error_code"] = code
        if "decision" not in meta:  # a policy's refusal is marked already (policy.decide)
            # Shown by mitmweb; only refusals and failures pay for it.
            line = f"waypost {code} {status}"
            flow.comment = f"{flow.comment}\n{line}" if flow.comment else line
            flow.marked = REFUSED_MARK
    return resp


def web_error(
    code: str,
    message: str,
    rid: str | None = None,
    headers: Mapping[str, str] | None = None,
    status: int | None = None,
) -> web.Response:
    """`make`'s JSON error as an aiohttp response (the management app, cache admin, CLI).

    Never cached: these answer probes, admin calls and command runs.
    """
    # Imported here: aiohttp costs ~0.2 s to import and most addons that use errors never
    # serve an aiohttp endpoint.
    from aiohttp import web

    rid = rid or new_request_id()
    return web.Response(
        status=status or STATUS[code],
        body=body(code, message, rid),
        content_type="application/json",
        headers={"X-Request-ID": rid, "Cache-Control": "no-store", **(headers or {})},
    )


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


# --- mitmproxy's errors as Waypost's ---------------------------------------------------------

CONNECT_TIMEOUT_MARK = "upstream connect timeout"


class Failure(NamedTuple):
    code: str  # one of STATUS
    status: int
    reason: str  # short machine reason, recorded as backend_error (or client_error)
    message: str  # for the client


_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), r)
    for p, r in (
        (r"Client disconnected|reset by client", "client_disconnected"),
        (re.escape(CONNECT_TIMEOUT_MARK), "connect_timeout"),
        (r"Request destination unknown", "self_connect"),
        (r"\[Errno 110\]|timed out", "connect_timeout"),
        (
            r"Name or service not known|nodename nor servname|name resolution|getaddrinfo"
            r"|No address associated|\[Errno -\d+\]",
            "dns_failure",
        ),
        # Before "refused": the egress policy's kill says "... refused the connection".
        (r"^Connection killed", "connection_killed"),
        (r"\[Errno 111\]|refused", "connection_refused"),
        (r"unreachable|No route to host|\[Errno 113\]", "unreachable"),
        (r"server closed connection|peer closed|closed by peer", "closed"),
        (r"Response body exceeds", "response_too_large"),
        (r"Request body exceeds", "request_too_large"),
        (
            r"Cannot parse HTTP response|unexpected server response|response.*validat",
            "invalid_response",
        ),
        (r"^\[Errno|Connect call failed|Cannot connect|Cannot open connection", "connect_failed"),
    )
)

_MESSAGES = {
    "connect_timeout": "The backend did not accept the connection in time.",
    "read_timeout": "The backend did not respond in time.",
    "self_connect": "Request destination unknown: the request is addressed to the proxy itself.",
    "dns_failure": "The backend host name could not be resolved.",
    "connection_refused": "The backend refused the connection.",
    "unreachable": "The backend is unreachable.",
    "connection_killed": "The connection to the backend was refused by policy.",
    "closed": "The backend closed the connection without a complete response.",
    "response_too_large": "The backend response exceeds the proxy's body size limit.",
    "request_too_large": "The request body exceeds the proxy's body size limit.",
    "invalid_response": "The backend sent an invalid response.",
    "connect_failed": "The backend could not be reached.",
}


def reason_of(message: str) -> str:
    """A short reason for a mitmproxy error message (`connection_refused`, `closed`, ...)."""
    for rx, reason in _REASONS:
        if rx.search(message):
            return reason
    return "error"


def classify(status: int | None, message: str, timed_out: str | None = None) -> Failure:
    """Map a mitmproxy error (status it would send, message) to the Waypost error.

    `status` None means unknown (the `error` hook only has the message): inferred from it.
    `timed_out` is "connect_timeout"/"read_timeout" when one of our timers fired.
    """
    reason = timed_out or reason_of(message)
    if reason == "client_disconnected":  # nobody is left to answer
        return Failure("BAD_REQUEST", 400, reason, "The client disconnected.")
    if reason in ("connect_timeout", "read_timeout") and (status is None or status >= 500):
        return Failure("BACKEND_TIMEOUT", 504, reason, _MESSAGES[reason])
    if status is None:
        if reason == "request_too_large":
            status = 413
        elif reason == "error" and message.startswith(("HTTP/1 protocol error", "HTTP/2")):
            status = 400
        else:
            status = 502
    if status == 413:
        return Failure(
            "PAYLOAD_TOO_LARGE", 413, "request_too_large", _MESSAGES["request_too_large"]
        )
    if status == 502:
        text = _MESSAGES.get(reason, "The backend could not be reached.")
        return Failure("BACKEND_UNREACHABLE", 502, reason, text)
    if status == 400:
        return Failure("BAD_REQUEST", 400, "bad_request", f"Malformed request: {message}")
    return Failure(code_of(status) or "INTERNAL_ERROR", status, reason, message)


# --- the error-page patch ----------------------------------------------------------------------

# Errors of the client's request, answered with the caller's message (the wire guards' reasons,
# the parser's complaint); anything else is a mitmproxy error and goes through `classify`.
CLIENT_ERRORS = frozenset({400, 408, 413, 414, 431})


def error_page(status_code: int, message: str = "", flow: http.HTTPFlow | None = None) -> bytes:
    """`_http1.make_error_response` as Waypost JSON.

    With the flow of a failed exchange: its request id and which of our timers fired. Without
    one (a malformed body, an unparsable head, a wire guard): the id of the request whose head
    was read, the one its access line carries.
    """
    rid = None if flow is not None else _caller_request_id(sys._getframe(1))
    return http1.assemble_response(
        error_response(status_code, message, flow, {"Connection": "close"}, rid)
    )


def error_response(
    status_code: int,
    message: str,
    flow: http.HTTPFlow | None,
    headers: Mapping[str, str] | None = None,
    rid: str | None = None,
) -> http.Response:
    """The JSON answer for an error mitmproxy would answer `status_code` with: a client error
    with the caller's message, anything else through `classify` (a timer of ours that fired
    makes it 504). `error_page` writes it as HTTP/1; the HTTP/2 server as its own frames."""
    if status_code not in CLIENT_ERRORS:
        timed_out = record(flow).get("timed_out") if flow is not None else None
        failure = classify(status_code, message, timed_out)
        return make(failure.code, failure.message, flow, headers, failure.status, rid=rid)
    if status_code == 413:
        limits = wire.limits()
        if limits is not None and limits.max_body is not None:
            message = f"The request body exceeds the limit of {limits.max_body} bytes."
        else:  # mitmproxy's own body_size_limit, whose message names mitmproxy
            message = _MESSAGES["request_too_large"]
    return make(_CODE_OF[status_code], message, flow, headers, status_code, rid=rid)


def _caller_request_id(frame: FrameType | None) -> str | None:
    # mitmproxy's make_error_response(status, message) gets no flow, and every caller (its
    # Http1Server.read_headers and send, the wire guards) is a method of the Http1Server
    # whose `request` is the flow's request while one is being read or answered.
    server = frame.f_locals.get("self") if frame is not None else None
    request = getattr(server, "request", None) if isinstance(server, _http1.Http1Server) else None
    if request is None:
        return None
    rid = _PAGE_IDS.get(request)
    if rid is None:
        rid = _PAGE_IDS[request] = incoming_request_id(request.headers.get("x-request-id"))
    return rid


ERROR_PAGE = patching.Patch(
    key="errors.error_page",
    target=_http1,
    name="make_error_response",
    replacement=error_page,
    missing="no hook sees the HTTP/1 error page mitmproxy writes for an unparsable request "
    "head or a protocol error (it is not a flow's response)",
)


def install_error_page(by: str) -> bool:
    """Make mitmproxy's HTTP/1 error pages JSON while `by` (an addon) needs it; idempotent.

    False on a mitmproxy version that was not checked.
    """
    return patching.install(ERROR_PAGE, unchecked="mitmproxy's own error pages stay HTML", by=by)


def uninstall_error_page(by: str) -> None:
    patching.uninstall(ERROR_PAGE.key, by=by)
