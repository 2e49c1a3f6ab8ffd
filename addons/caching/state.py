"""What the cache's parts share: per process (`Shared`) and per flow (`FlowState`)."""

from __future__ import annotations

import re

from mitmproxy import http

from addons.caching import rfc9111 as rfc
from addons.caching.store import Entry, Settings, Store

# The flow's FlowState in flow.metadata, from `request` to `response` / `error`.
STATE_KEY = "waypost_cache"


class Shared:
    """The parsed options, the store (replaced when its budget changes) and the counts the
    addon's parts (lookup, answers, storing, revalidation, admin, metrics) work on."""

    def __init__(self) -> None:
        self.enabled = True
        self.settings = Settings()
        self.store = Store(256 * 1024 * 1024, 10000)
        self.max_object_size = 1024 * 1024
        self.patterns: re.Pattern[str] | None = None
        self.coalesce_timeout = 5.0
        self.max_waiters = 100
        self.surrogate = True
        self.counts: dict[str, int] = {}
        # Evictions of the stores a new budget replaced.
        self.evictions_before = 0

    def evictions(self) -> int:
        return self.evictions_before + self.store.evictions


class FlowState:
    """Per-flow cache bookkeeping between `request` and `response`."""

    __slots__ = (
        "primary",
        "url",
        "key",
        "vary",
        "req_cc",
        "entry",
        "result",
        "served",
        "leader",
        "client_inm",
        "client_ims",
        "request_time",
        "conditional",
        "fields",
        "authorization",
        "surrogate",
        "range",
        "if_range",
    )

    def __init__(self, primary: str, url: str, req_cc: rfc.Directives) -> None:
        self.primary, self.url, self.req_cc = primary, url, req_cc
        self.key: str | None = None
        self.vary: tuple[str, ...] | None = None
        self.entry: Entry | None = None
        self.result = "MISS"
        self.served = False
        self.leader: str | None = None
        self.client_inm: str | None = None
        self.client_ims: str | None = None
        self.request_time = 0.0
        self.conditional = False
        # The request's fields as the client sent them (a tuple: later edits by other addons
        # replace it, never change it), for the Vary values at lookup and store alike.
        self.fields: tuple[tuple[bytes, bytes], ...] = ()
        self.authorization = False
        self.surrogate = False
        self.range: str | None = None
        self.if_range: str | None = None


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    return flow.metadata.get(STATE_KEY)
