"""GET /admin/config's answer: every option a profile sets, its value as applied, where it came
from (the config addon's `sources()`), and secrets redacted.

Redacted (each listed in `redacted` with why): admin.token and cli.token, and mitmproxy's
upstream_auth and proxyauth from the `mitmproxy:` section ("secret"); the password of any URL
with userinfo (state.redis_url, a backend's URL: "url password"); the value of any header
named like a credential (Authorization, Cookie, *token*, *api-key*, *secret*, *password*:
"credential header") wherever a header map or match appears in a value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "********"
# Waypost's tokens, and core mitmproxy options a profile's `mitmproxy:` section may carry
# credentials in (user:password).
SECRETS = frozenset({"admin_token", "cli_token", "upstream_auth", "proxyauth"})
_CREDENTIAL = re.compile(
    r"authorization|cookie|token|secret|password|passwd|api[-_]?key|credential", re.I
)
_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.I)


def credential_header(name: str) -> bool:
    return bool(_CREDENTIAL.search(name))


def without_password(url: str) -> str | None:
    """`url` with its password replaced, or None when it has none."""
    if not _USERINFO.match(url):
        return None
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{hostport}"))


def redact(option: str, value: Any) -> tuple[Any, str | None]:
    """The value to show and why it was changed (None: shown as is)."""
    if option in SECRETS:
        return (REDACTED, "secret") if value else (value, None)
    if isinstance(value, str) and value[:1] in "[{":
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if parsed is not None:
            shown, why = _walk(parsed)
            return (shown, why) if why else (value, None)
    return _walk(value)


def _walk(value: Any, name: str = "") -> tuple[Any, str | None]:
    """Redact credentials inside lists and mappings (`name`: the key the value sits under, a
    header's name in a header map); the first reason found."""
    if isinstance(value, str):
        if name and credential_header(name):
            return REDACTED, "credential header"
        clean = without_password(value)
        return (clean, "url password") if clean is not None else (value, None)
    reasons: list[str] = []
    if isinstance(value, dict):
        # A header match is {"name": ..., "value": ...}: the name says what the value is.
        header = value.get("name")
        secret = isinstance(header, str) and credential_header(header)
        out: dict[str, Any] = {}
        for k, v in value.items():
            if secret and k != "name" and isinstance(v, str):
                out[k], why = REDACTED, "credential header"
            else:
                out[k], why = _walk(v, k)
            if why:
                reasons.append(why)
        return out, (reasons[0] if reasons else None)
    if isinstance(value, list):
        items = []
        for v in value:
            shown, why = _walk(v, name)
            items.append(shown)
            if why:
                reasons.append(why)
        return items, (reasons[0] if reasons else None)
    return value, None


def effective(
    sources: Iterable[Any], value_of: Callable[[str], Any], profile: str | None
) -> dict[str, Any]:
    """The answer: {"profile", "keys": {key: {value, option, source, where}}, "redacted"};
    `sources` are the config addon's (key, option, source, where)."""
    keys: dict[str, dict[str, Any]] = {}
    redacted: list[dict[str, str]] = []
    for src in sources:
        key = src.key
        shown, why = redact(src.option, value_of(src.option))
        if why:
            redacted.append({"key": key, "why": why})
        keys[key] = {
            "value": shown,
            "option": src.option,
            "source": src.source,
            "where": src.where,
        }
    return {"profile": profile, "keys": keys, "redacted": redacted}
