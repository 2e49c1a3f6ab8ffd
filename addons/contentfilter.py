"""Content-type filtering: refuse responses (and optionally requests) by media type.

Patterns: an exact type (`application/x-msdownload`), a wildcard subtype (`video/*`), or a
regular expression between slashes (`/application\\/(x-)?zip.*/`), matched case-insensitively
and in full against the media type without parameters (`text/html; charset=utf-8` is
`text/html`). Regexes are compiled once, in `configure`.

Hooks:
- `requestheaders`: with `content_filter_check_request`, a request whose Content-Type is blocked
  gets 403 CONTENT_TYPE_BLOCKED before its body is read.
- `responseheaders`: a response whose Content-Type is blocked is replaced by 403
  CONTENT_TYPE_BLOCKED before any byte of its body reaches the client; the origin's body is read
  and dropped, so the connection to the origin stays usable.
- `response`: puts the 403 body back where mitmproxy filled in the origin's (empty) body, and
  judges responses that never passed `responseheaders` (answered from the cache in `request`).

It applies where the proxy sees HTTP: plain-HTTP proxying, reverse listeners and intercepted
hosts. Passed-through HTTPS tunnels carry no visible Content-Type.

Options: `content_filter_mode`, `content_filter_blocked_types`, `content_filter_check_request`.
The audit's `client_ip` is `kernel.net.client_ip` (through `forwarding_trusted_proxies`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from mitmproxy import ctx, exceptions, http

from addons import errors, policy
from addons.kernel import net
from addons.kernel.options import Option, declare
from addons.kernel.record import record

log = logging.getLogger("waypost.contentfilter")

POLICY = "content_filter"
_CHECKED = "content_filter_checked"  # flow.metadata: responseheaders judged this response
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class TypePatterns(NamedTuple):
    exact: dict[str, str]  # media type -> rule id (the pattern as configured)
    types: dict[str, str]  # "video" (from video/*) -> rule id
    regexes: tuple[tuple[re.Pattern[str], str], ...]

    def __bool__(self) -> bool:
        return bool(self.exact or self.types or self.regexes)


def parse_types(specs: Sequence[str]) -> TypePatterns:
    """`type/subtype`, `type/*` or `/regex/`; ValueError names the bad entry."""
    exact: dict[str, str] = {}
    types: dict[str, str] = {}
    regexes: list[tuple[re.Pattern[str], str]] = []
    for spec in specs:
        text = spec.strip()
        if len(text) > 2 and text.startswith("/") and text.endswith("/"):
            try:
                regexes.append((re.compile(text[1:-1], re.IGNORECASE), text))
            except re.error as e:
                raise ValueError(f"{spec!r} is not a valid regular expression ({e})") from None
            continue
        main, slash, sub = text.lower().partition("/")
        wild = "*" in main or ("*" in sub and sub != "*")
        if not slash or wild or not _TOKEN.fullmatch(main) or not _TOKEN.fullmatch(sub):
            raise ValueError(
                f"{spec!r} is not a media type pattern (use text/html, video/* or /regex/)"
            )
        if sub == "*":
            types.setdefault(main, text)
        else:
            exact.setdefault(f"{main}/{sub}", text)
    return TypePatterns(exact, types, tuple(regexes))


def media_type(content_type: str) -> str:
    """`Text/HTML; charset=utf-8` -> `text/html`."""
    return content_type.partition(";")[0].strip().lower()


def match(patterns: TypePatterns, content_type: str | None) -> str | None:
    """The rule id of the first pattern that blocks `content_type`, or None."""
    if not content_type or not patterns:
        return None
    mtype = media_type(content_type)
    rule = patterns.exact.get(mtype)
    if rule is not None:
        return rule
    if patterns.types:
        rule = patterns.types.get(mtype.partition("/")[0])
        if rule is not None:
            return rule
    for rx, rule in patterns.regexes:
        if rx.fullmatch(mtype):
            return rule
    return None


class _DropOrigin:
    """A response stream callable: sends the 403 body once and drops every origin chunk."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body

    def __call__(self, chunk: bytes) -> bytes:
        out, self.body = self.body, None
        return out or b""


OPTIONS: tuple[Option, ...] = (
    Option(
        "content_filter_mode",
        str,
        "enforce",
        "enforce: refuse blocked content types with 403 CONTENT_TYPE_BLOCKED; shadow: let them pass and only log and count would_block.",
        policy.MODES,
    ),
    Option(
        "content_filter_blocked_types",
        Sequence[str],
        [],
        "Blocked media types of responses: exact (application/x-msdownload), type/* (video/*) or /regex/ (matched in full, case-insensitively, without parameters).",
    ),
    Option(
        "content_filter_check_request",
        bool,
        False,
        "Also refuse requests whose own Content-Type is blocked (before their body is read).",
    ),
)


class ContentFilter:
    def __init__(self) -> None:
        self.patterns = TypePatterns({}, {}, ())
        self.mode = "enforce"
        self.check_request = False

    def load(self, loader: Any) -> None:
        net.load(loader)  # the audit's client_ip honours forwarding_trusted_proxies
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        if "content_filter_blocked_types" in updated:
            try:
                self.patterns = parse_types(ctx.options.content_filter_blocked_types)
            except ValueError as e:
                raise exceptions.OptionsError(f"content_filter_blocked_types: {e}") from None
        if "content_filter_mode" in updated:
            self.mode = ctx.options.content_filter_mode
        if "content_filter_check_request" in updated:
            self.check_request = ctx.options.content_filter_check_request

    @errors.fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.check_request or not self.patterns:
            return
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        if record(flow).get("local"):
            return
        ctype = flow.request.headers.get("content-type")
        rule = match(self.patterns, ctype)
        if rule is not None and self._decide(flow, rule, ctype, "request"):
            flow.response = self._refusal(flow, rule, "request")

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """POST /admin/explain: the request side (the body's Content-Type), read-only; the
        response side is decided when a response comes."""
        ctype = flow.request.headers.get("content-type")
        rule = match(self.patterns, ctype) if self.check_request and self.patterns else None
        found = policy.explained(POLICY, rule, self.mode, "block", content_type=ctype)
        found["response_checked"] = bool(self.patterns)
        return found

    @errors.fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self.patterns or flow.response is None or flow.error or not flow.live:
            return
        if flow.websocket or record(flow).get("local"):
            return
        flow.metadata[_CHECKED] = True
        ctype = flow.response.headers.get("content-type")
        rule = match(self.patterns, ctype)
        if rule is None or not self._decide(flow, rule, ctype, "response"):
            return
        refusal = self._refusal(flow, rule, "response")
        # mitmproxy still reads the origin's body into flow.response. Streaming it through
        # _DropOrigin sends our body instead and discards the origin's bytes; a response
        # without a body skips streaming and is fixed up in `response`.
        refusal.stream = _DropOrigin(refusal.raw_content or b"")
        flow.response = refusal

    @errors.fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        if isinstance(resp.stream, _DropOrigin):
            if resp.stream.body:
                # Not streamed (the origin's response had no body): mitmproxy replaced our
                # body with the origin's empty one.
                resp.content = b"" if flow.request.method == "HEAD" else resp.stream.body
                resp.stream.body = None
            return
        if not self.patterns or flow.metadata.get(_CHECKED) or flow.error or not flow.live:
            return
        # A response set by an addon in `request` (a cache hit) never passed responseheaders;
        # its body is in memory and not sent yet, so it is judged here. The proxy's own error
        # answers are left alone.
        if flow.websocket or record(flow).get("error_code"):
            return
        ctype = resp.headers.get("content-type")
        rule = match(self.patterns, ctype)
        if rule is not None and self._decide(flow, rule, ctype, "response"):
            flow.response = self._refusal(flow, rule, "response")

    def _decide(self, flow: http.HTTPFlow, rule: str, ctype: str | None, where: str) -> bool:
        return policy.decide(
            POLICY,
            rule,
            net.client_ip(flow) or None,
            self.mode,
            flow,
            decision="block",
            content_type=media_type(ctype or ""),
            direction=where,
        )

    def _refusal(self, flow: http.HTTPFlow, rule: str, where: str) -> http.Response:
        record(flow)["blocked_by"] = POLICY
        return errors.make(
            "CONTENT_TYPE_BLOCKED",
            f"The {where}'s content type is blocked by rule {rule!r}.",
            flow,
            details={"rule": rule},
        )


addons = [ContentFilter()]
