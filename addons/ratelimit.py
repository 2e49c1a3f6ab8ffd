"""Per-client rate limiting: a token bucket per client IP, and a cap on concurrent connections.

Requests and CONNECTs (`requestheaders`, `http_connect`) each take one token from the bucket of
their client IP (the socket peer, or behind `forwarding_trusted_proxies` the X-Forwarded-For
client: `kernel.net.client_ip`, the address every policy and log uses). A bucket holds `burst`
tokens and refills at `requests_per_second`. An empty bucket answers 429 RATE_LIMITED with
- `Retry-After`: whole seconds until the next token, rounded up;
- `RateLimit-Policy: "<id>";q=<burst>;w=<seconds to refill the whole burst>` and
  `RateLimit: "<id>";r=<tokens left>;t=<seconds until the bucket is full again>`, the
  structured-field form of draft-ietf-httpapi-ratelimit-headers-10 (quoted policy ids, q/w and
  r/t parameters; the form the working group has used since draft -09).

Rules (`ratelimit_rules`, JSON) give hosts or path prefixes their own limit, bucket and mode;
the first matching rule wins, a rule with requests_per_second 0 exempts what it matches.
Clients in `ratelimit_exempt` are never limited. `mode` `shadow` (policy-wide or per rule)
lets refused requests pass, logged as `would_block` and counted (`addons/policy.py`).

Memory: a bucket is one float (the moment it will be full again) in an LRU-ordered table of at
most `ratelimit_max_clients` entries; a full bucket is the same as no bucket, so idle ones
are swept every few seconds. Past the bound the least recently used bucket goes (it then
starts full again: a flood of distinct addresses can reset other clients' buckets, never grow
memory). An OrderedDict rather than cachetools.TTLCache: measured here, TTLCache costs ~20x
more per lookup-and-update and twice the memory per entry, for an expiry the bucket state
already encodes.

Workers and instances (`addons/state.py`): with `state_backend: memory` and N workers
(`kernel.instance.identity().workers`) each worker enforces rate/N with a bucket of
ceil(burst/N): the kernel spreads a client's connections over the workers, so the instance
holds about the configured rate (docs/operations.md, "Rate limits and bans", has the measured
error). With `state_backend: redis` the bucket is one Redis key `<prefix>:rl:<limit id>:<client
IP>` updated by one Lua script (`BUCKET_SCRIPT`: the same `full_at` on Redis's own clock, the
ban check and the violation count in the same round trip), so every worker of every instance
takes from the same bucket. Redis unavailable (`state.UNAVAILABLE`): the request is decided on
this process's own bucket at the memory rate (rate/N), counted in waypost_state_fallbacks_total.

Temporary bans (`ratelimit_ban_after` > 0): a client refused `ban_after` times within
`ratelimit_ban_within` is refused everything for `ratelimit_ban_duration`, with
`ratelimit_ban_status` (429 or 403) TEMPORARILY_BANNED and Retry-After (seconds left); the ban
is logged and counted once (`policy_decisions_total{policy="ratelimit",decision="ban"}`), each
refusal while banned is counted (`decision="banned"`) without a log line. Memory: a table
bounded by `ratelimit_max_clients`; Redis: a key `<prefix>:ban:<ip>` with a PX TTL, so a ban
set through one instance refuses the client on all of them, and a sorted set `<prefix>:bans`
(scored by each ban's end) that `/admin/bans` reads instead of scanning the keyspace. Exempt
clients are never banned. `GET /admin/bans` lists the bans, `DELETE /admin/bans/<ip>` lifts
one (management_routes()).

Connections: `ratelimit_max_connections_per_ip` caps concurrent connections per peer address
(slowloris and connection floods). A connection over the cap is closed before any byte is
read: a client that opens hundreds of connections is not owed an HTTP answer, and reading one
would spend what the cap protects. The cap is checked as the connection is accepted (an
admission gate, `kernel/admission.py`, asked by backlog.py), before mitmproxy sets it up, and
again in `client_connected` for what the gate let through. Trusted proxies and exempt clients
are not capped.

The bucket, its rules and table are in `ratelimiting/bucket.py`; bans and the Redis script in
`ratelimiting/bans.py`. This file is the addon: options, hooks, metrics, the admin routes.

Hooks: running, done, client_connected, client_disconnected, http_connect, requestheaders
(both awaitable only with state_backend redis). Extension: management_routes() (/admin/bans).
Options: ratelimit_requests_per_second, ratelimit_burst, ratelimit_mode, ratelimit_exempt,
ratelimit_rules, ratelimit_max_connections_per_ip, ratelimit_max_clients, ratelimit_ban_after,
ratelimit_ban_within, ratelimit_ban_duration, ratelimit_ban_status;
forwarding_trusted_proxies (declared by `addons/kernel/net.py`); state_* (`addons/state.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

from aiohttp import web
from mitmproxy import connection, ctx, exceptions, http
from prometheus_client.core import GaugeMetricFamily, Metric

from addons import errors, metrics, policy, state
from addons.kernel import admission, hosts, instance, net
from addons.kernel.options import Option, at_least, choice, declare, duration, once, spawn
from addons.kernel.record import record
from addons.ratelimiting.bans import BUCKET_SCRIPT, Bans, ban_entry, bound, lift, shared_bans
from addons.ratelimiting.bucket import (
    DEFAULT_ID,
    Buckets,
    Limit,
    Take,
    divided,
    effective_burst,
    headers,
    match,
    parse_rate,
    parse_rules,
    retry_after,
    take,
)

log = logging.getLogger("waypost.ratelimit")

SWEEP_SECONDS = 5.0


# --- metrics -------------------------------------------------------------------------------


class _Collector:
    """ratelimit_buckets (tracked clients), ratelimit_connections (open, counted) and
    ratelimit_bans (this process's ban table) at scrape."""

    def __init__(self) -> None:
        self.addon: RateLimit | None = None

    def collect(self) -> Iterator[Metric]:
        addon = self.addon
        yield GaugeMetricFamily(
            "ratelimit_buckets",
            "Client buckets held by the rate limiter (bounded by ratelimit_max_clients).",
            len(addon.buckets) if addon else 0,
        )
        yield GaugeMetricFamily(
            "ratelimit_connections",
            "Open client connections counted against ratelimit_max_connections_per_ip.",
            len(addon.counted) if addon else 0,
        )
        yield GaugeMetricFamily(
            "ratelimit_bans",
            "Clients banned in this process's own table (memory backend, or while Redis is "
            "down; Redis's bans are listed by /admin/bans).",
            len(addon.bans.banned) if addon else 0,
        )


def _collector() -> _Collector:
    collector = _Collector()
    metrics.REGISTRY.register(collector)
    return collector


# One per process: `-s addons/ratelimit.py` re-executes this module on every reload.
COLLECTOR = once("ratelimit.collector", _collector)


# --- the addon -----------------------------------------------------------------------------


OPTIONS: tuple[Option, ...] = (
    Option(
        "ratelimit_requests_per_second",
        str,
        "0",
        "Requests (and CONNECTs) per second each client IP may make on average, e.g. 10 or 0.5; 0 turns the default limit off (rules still apply).",
    ),
    Option(
        "ratelimit_burst",
        int,
        0,
        "Bucket size: requests a client may make at once before the rate applies; 0 means one second's worth (at least 1).",
    ),
    Option(
        "ratelimit_mode",
        str,
        "enforce",
        "enforce: answer 429 RATE_LIMITED over the limit, and close connections over the cap. shadow: let them through, logged as would_block and counted. Rules may set their own.",
        policy.MODES,
    ),
    Option(
        "ratelimit_exempt",
        Sequence[str],
        [],
        "Client networks (CIDRs) never rate limited nor capped, e.g. monitoring hosts.",
    ),
    Option(
        "ratelimit_rules",
        str,
        "",
        'JSON list of per-host or per-path limits, first match wins: [{"id": "api", "host": "api.example.com" or "*.example.com", "path": "/search", "requests_per_second": 2, "burst": 5, "mode": "shadow"}]; requests_per_second 0 exempts what the rule matches.',
    ),
    Option(
        "ratelimit_max_connections_per_ip",
        int,
        0,
        "Concurrent connections one client IP may hold; more are closed when they connect (0: no cap). Trusted proxies and exempt clients are not capped.",
    ),
    Option(
        "ratelimit_max_clients",
        int,
        100_000,
        "Most client buckets kept in memory (about 175 bytes each); past it the least recently used bucket is dropped. Also bounds the local ban table.",
    ),
    Option(
        "ratelimit_ban_after",
        int,
        0,
        "Temporary bans: a client refused this many times within ratelimit_ban_within is refused everything for ratelimit_ban_duration (0: no bans).",
    ),
    Option(
        "ratelimit_ban_within",
        str,
        "60s",
        "The window in which ratelimit_ban_after violations ban a client, e.g. 60s.",
    ),
    Option(
        "ratelimit_ban_duration",
        str,
        "10m",
        "How long a temporary ban lasts, e.g. 10m.",
    ),
    Option(
        "ratelimit_ban_status",
        str,
        "429",
        "Status of the TEMPORARILY_BANNED answer: 429 or 403.",
        ("429", "403"),
    ),
)
_LIMITS = frozenset(
    {"ratelimit_requests_per_second", "ratelimit_burst", "ratelimit_mode", "ratelimit_rules"}
)
_BANS = frozenset(
    {
        "ratelimit_ban_after",
        "ratelimit_ban_within",
        "ratelimit_ban_duration",
        "ratelimit_ban_status",
    }
)
BAN_STATUSES = ("429", "403")


class RateLimit:
    def __init__(self) -> None:
        self.default = Limit(DEFAULT_ID, 0.0, 1, "enforce")
        self.rules: tuple[Limit, ...] = ()
        # This process's share of each limit (memory backend, Redis fallback): by id.
        self.workers = 1
        self.local: dict[str, Limit] = {}
        self.local_default = self.default
        self.mode = "enforce"
        self.exempt = net.NO_NETWORKS
        self.has_exempt = False
        self._exempt_cache: dict[str, bool] = {}
        self.max_connections = 0
        self.buckets = Buckets(100_000)
        self.bans = Bans(100_000)
        self.ban_after = 0
        self.ban_within = 60.0
        self.ban_duration = 600.0
        self.ban_status = 429
        self.connections: dict[str, int] = {}  # peer IP -> open connections counted
        self.counted: dict[str, str] = {}  # client.id -> peer IP, for the decrement
        self.active = False
        self.shared = False  # state_backend redis: decisions are Redis's
        self._sweeper: asyncio.Task[None] | None = None
        self._script: Any = None  # BUCKET_SCRIPT registered on the current Redis client

    def load(self, loader: object) -> None:
        net.load(loader)
        state.load(loader)
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        state.configure(updated)
        self.shared = state.STATE.shared
        opts = ctx.options
        if updated & _LIMITS:
            self._configure_limits()
        if updated & _BANS:
            self._configure_bans()
        if "ratelimit_exempt" in updated:
            self.exempt = net.networks_option("ratelimit_exempt", opts.ratelimit_exempt)
            self._exempt_cache = {}
            self.has_exempt = bool(self.exempt)
        if "ratelimit_max_connections_per_ip" in updated:
            self.max_connections = at_least(
                "ratelimit_max_connections_per_ip", opts.ratelimit_max_connections_per_ip, 0
            )
            if self.max_connections:
                admission.register("ratelimit", self._refuses_at_accept)
            else:
                admission.unregister("ratelimit")
        if "ratelimit_max_clients" in updated:
            maxsize = at_least("ratelimit_max_clients", opts.ratelimit_max_clients, 1)
            self.buckets.resize(maxsize)
            self.bans.maxsize = maxsize
            bound(self.bans.banned, maxsize)
            bound(self.bans.violations, maxsize)
        self.active = bool(self.default.rate or self.rules)
        COLLECTOR.addon = self

    def _configure_limits(self) -> None:
        opts = ctx.options
        rate = parse_rate(opts.ratelimit_requests_per_second)
        burst = at_least("ratelimit_burst", opts.ratelimit_burst, 0)
        mode = opts.ratelimit_mode
        try:
            rules = parse_rules(opts.ratelimit_rules, mode)
        except ValueError as e:
            raise exceptions.OptionsError(f"ratelimit_rules: {e}") from None
        self.mode = mode
        self.default = Limit(DEFAULT_ID, rate, effective_burst(rate, burst), mode)
        self.rules = rules
        self.workers = instance.identity().workers
        self.local_default = divided(self.default, self.workers)
        self.local = {r.id: divided(r, self.workers) for r in rules}

    def _configure_bans(self) -> None:
        opts = ctx.options
        self.ban_after = at_least("ratelimit_ban_after", opts.ratelimit_ban_after, 0)
        self.ban_within = duration("ratelimit_ban_within", opts.ratelimit_ban_within, 0.001)
        self.ban_duration = duration("ratelimit_ban_duration", opts.ratelimit_ban_duration, 0.001)
        self.ban_status = int(
            choice("ratelimit_ban_status", opts.ratelimit_ban_status, BAN_STATUSES)
        )

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = spawn(self._sweep())

    def done(self) -> None:
        admission.unregister("ratelimit")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        state.done()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            self.buckets.sweep(now)
            self.bans.sweep(now)

    def _exempt(self, ip: str) -> bool:
        if not self.has_exempt:
            return False
        cache = self._exempt_cache
        found = cache.get(ip)
        if found is None:
            if len(cache) >= 4096:
                cache.clear()
            addr = net.parse_ip(ip) if ip else None
            found = cache[ip] = addr is not None and net.lookup(self.exempt, addr) is not None
        return found

    # --- connections ---

    def client_connected(self, client: connection.Client) -> None:
        if not self.max_connections or client.error:
            return
        ip = net.peer_ip(client)
        if not ip or self._uncapped(ip):
            return
        if self._over_cap(ip):
            client.error = "Connection refused: too many connections from this address."
            return
        self.connections[ip] = self.connections.get(ip, 0) + 1
        self.counted[client.id] = ip

    def _over_cap(self, ip: str) -> bool:
        """Whether a new connection from `ip` is refused (recorded by `policy.decide`)."""
        count = self.connections.get(ip, 0)
        return count >= self.max_connections and policy.decide(
            "ratelimit",
            "max_connections_per_ip",
            ip,
            self.mode,
            decision="refuse",
            connections=count,
        )

    def _refuses_at_accept(self, ip: str) -> bool:
        """The admission gate (`kernel/admission.py`): the cap, checked as the connection is
        accepted. In shadow mode it lets every connection through, for `client_connected` to
        record the would-be refusal once."""
        if self.mode == "shadow" or self.connections.get(ip, 0) < self.max_connections:
            return False
        return not self._uncapped(ip) and self._over_cap(ip)

    def _uncapped(self, ip: str) -> bool:
        """Exempt clients and trusted proxies (the peer `ip`) are not capped."""
        return self._exempt(ip) or (net.TRUSTED.active and net.TRUSTED.is_trusted(ip))

    def client_disconnected(self, client: connection.Client) -> None:
        ip = self.counted.pop(client.id, None)
        if ip is not None:
            left = self.connections.get(ip, 1) - 1
            if left > 0:
                self.connections[ip] = left
            else:
                self.connections.pop(ip, None)

    # --- requests ---

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self.requestheaders(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if not self.active or flow.response or flow.error or not flow.live:
            return None
        if self.shared:
            return self._limit_shared(flow)
        self._limit(flow)
        return None

    def _match(self, flow: http.HTTPFlow) -> Limit:
        if self.rules:
            req = flow.request
            tunnel = req.method == "CONNECT"
            rule = match(self.rules, hosts.host_key(req.host), None if tunnel else req.path)
            if rule is not None:
                return rule
        return self.default

    @errors.fail_closed
    def _limit(self, flow: http.HTTPFlow) -> None:
        """Decide on this process's own bucket and bans (memory, or Redis unavailable)."""
        ip = net.client_ip(flow)
        if self.has_exempt and self._exempt(ip):
            return
        # The default limit inlined: the path of every request in memory mode.
        limit = self._match(flow) if self.rules else self.default
        now = time.monotonic()
        if self.ban_after:
            left = self.bans.left(ip, now)
            if left:
                self._banned(flow, ip, left)
                return
        if not limit.rate:
            return
        if limit is self.default:
            key, share = ip, self.local_default
        else:
            key, share = f"{limit.id} {ip}", self.local[limit.id]
        result = self.buckets.take(key, now, share.rate, share.burst)
        if result is None:
            return
        if self.ban_after:
            n = self.bans.violation(ip, now, self.ban_after, self.ban_within, self.ban_duration)
            if n:
                self._ban(flow, ip, n)
                return
        _refuse(flow, ip, share, result)

    @errors.fail_closed
    async def _limit_shared(self, flow: http.HTTPFlow) -> None:
        ip = net.client_ip(flow)
        if self.has_exempt and self._exempt(ip):
            return
        limit = self._match(flow)
        if not limit.rate and not self.ban_after:
            return
        st = state.STATE
        keys = [st.key("rl", limit.id, ip), st.key("ban", ip), st.key("rlv", ip), st.key("bans")]
        args = [
            1e6 / limit.rate if limit.rate else 0,
            limit.burst,
            self.ban_after,
            max(1, round(self.ban_within * 1000)),
            max(1, round(self.ban_duration * 1000)),
            ip,
        ]
        answer = await st.call("ratelimit", lambda r: self._bucket_script(r)(keys, args))
        if flow.response or flow.error or not flow.live:
            return
        if answer is state.UNAVAILABLE:
            self._limit(flow)
            return
        kind, a, b, c = (int(x) for x in answer)
        if kind == 1:
            return
        if kind == 2:
            self._banned(flow, ip, a / 1000)
        elif kind == 3:
            self._ban(flow, ip, b)
        else:
            _refuse(flow, ip, limit, Take(False, 0.0, b, a / 1e6, c / 1e6))

    def _bucket_script(self, client: Any) -> Any:
        # redis-py's Script: EVALSHA, and on NOSCRIPT (a restarted or flushed Redis) SCRIPT
        # LOAD and EVALSHA again. Bound to one client: made again after a reconnect.
        if self._script is None or self._script.registered_client is not client:
            self._script = client.register_script(BUCKET_SCRIPT)
        return self._script

    # --- bans ---

    def _ban(self, flow: http.HTTPFlow, ip: str, violations: int) -> None:
        """This refusal banned the client: logged and counted once per ban."""
        wait = retry_after(self.ban_duration)
        if policy.decide(
            "ratelimit",
            "ban",
            ip,
            self.mode,
            flow,
            decision="ban",
            violations=violations,
            ban_seconds=wait,
        ):
            flow.response = _banned_response(flow, wait, self.ban_status)

    def _banned(self, flow: http.HTTPFlow, ip: str, left: float) -> None:
        """A banned client's request: counted, not logged (the ban was)."""
        enforce = self.mode != "shadow"
        metrics.count_decision("ratelimit", "banned" if enforce else "would_block", "ban")
        if not enforce:
            record(flow).setdefault("shadow", []).append("ratelimit:ban")
            return
        meta = record(flow)
        meta["decision"], meta["rule"], meta["policy"] = "banned", "ban", "ratelimit"
        policy.annotate(flow, policy.ENFORCED, "waypost ratelimit banned rule=ban", force=True)
        flow.response = _banned_response(flow, retry_after(left), self.ban_status)

    def management_routes(self) -> dict[str, Any]:
        return {"/admin/bans": self._admin_bans, "/admin/bans/*": self._admin_lift}

    async def _admin_bans(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", headers={"Allow": "GET"})
        now, wall = time.monotonic(), time.time()
        listed = self.bans.listing(now, wall)
        st = state.STATE
        shared = False
        if st.shared:
            found = await st.call("bans", lambda r: shared_bans(r, st))
            if found is not state.UNAVAILABLE:
                listed = [ban_entry(ip, wall + ms / 1000, ms / 1000, n) for ip, ms, n in found]
                shared = True
        # shared false: this process's own bans (memory, or Redis did not answer)
        return web.json_response({"bans": listed, "shared": shared})

    async def _admin_lift(self, request: web.Request) -> web.StreamResponse:
        if request.method != "DELETE":
            return errors.web_error(
                "METHOD_NOT_ALLOWED", "Use DELETE.", headers={"Allow": "DELETE"}
            )
        ip = request.path.rpartition("/")[2]
        lifted = self.bans.lift(ip)
        st = state.STATE
        if st.shared:
            deleted = await st.call("bans", lambda r: lift(r, st, ip))

            if deleted is state.UNAVAILABLE:
                return errors.web_error(
                    "INTERNAL_ERROR", "Redis did not answer; the ban may still hold.", status=503
                )
            lifted = lifted or deleted
        if not lifted:
            return errors.web_error("NOT_FOUND", f"{ip} is not banned.")
        log.info("ban lifted", extra={"waypost": {"policy": "ratelimit", "client_ip": ip}})
        return web.json_response({"lifted": ip})

    # --- explain ---

    def explain(self, flow: http.HTTPFlow) -> dict[str, object]:
        """POST /admin/explain: would this request be limited now by this process's buckets
        and bans? Read-only: `take` runs on the bucket as read, never written back. With
        Redis the request is decided on the shared bucket (`shared`), which this does not
        read: the local answer is what Redis being down would give."""
        ip = net.client_ip(flow)
        found: dict[str, object] = {
            "addon": "ratelimit", "decision": "allow", "client_ip": ip, "shared": self.shared
        }  # fmt: skip
        if not self.active:
            return found
        if self.has_exempt and self._exempt(ip):
            return found | {"exempt": True}
        now = time.monotonic()
        banned = self.bans.banned.get(ip) if self.ban_after else None
        if banned is not None and banned.until > now:
            return (
                found
                | policy.explained("ratelimit", "ban", self.mode, "banned")
                | {"retry_after": retry_after(banned.until - now)}
            )
        limit = self._match(flow)
        if not limit.rate:
            return found | {"rule": limit.id}
        if limit is self.default:
            key, share = ip, self.local_default
        else:
            key, share = f"{limit.id} {ip}", self.local[limit.id]
        result = take(self.buckets.table.get(key, now), now, share.rate, share.burst)
        refusing = None if result.allowed else limit.id
        return (
            found
            | policy.explained("ratelimit", refusing, limit.mode, "limit")
            | {
                "rule": limit.id,
                "remaining": result.remaining if result.allowed else 0,
                "retry_after": retry_after(result.retry_after),
            }
        )


def _banned_response(flow: http.HTTPFlow, wait: int, status: int) -> http.Response:
    return errors.make(
        "TEMPORARILY_BANNED",
        f"Too many requests over the limit: temporarily banned; retry in {wait} s.",
        flow,
        {"Retry-After": str(wait)},
        status=status,
    )


def _refuse(flow: http.HTTPFlow, ip: str, limit: Limit, result: Take) -> None:
    """429 RATE_LIMITED (or, in shadow mode, only the would_block record)."""
    wait = retry_after(result.retry_after)
    if policy.decide(
        "ratelimit", limit.id, ip, limit.mode, flow, decision="limit", retry_after=wait
    ):
        flow.response = errors.make(
            "RATE_LIMITED", f"Too many requests; retry in {wait} s.", flow, headers(limit, result)
        )


addons = [RateLimit()]
