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

Connections: `ratelimit_max_connections_per_ip` caps concurrent connections per peer address
(slowloris and connection floods). A connection over the cap is closed in `client_connected`
before any byte is read: a client that opens hundreds of connections is not owed an HTTP
answer, and reading one would spend what the cap protects. Trusted proxies and exempt clients
are not capped.

Hooks: running, done, client_connected, client_disconnected, http_connect, requestheaders.
Options: ratelimit_requests_per_second, ratelimit_burst, ratelimit_mode, ratelimit_exempt,
ratelimit_rules, ratelimit_max_connections_per_ip, ratelimit_max_clients;
forwarding_trusted_proxies (declared by `addons/kernel/net.py`); state_* (`addons/state.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pydantic
from mitmproxy import connection, ctx, exceptions, http
from prometheus_client.core import GaugeMetricFamily, Metric

from addons import errors, metrics, policy, state
from addons.kernel import hosts, net
from addons.kernel.options import Option, at_least, declare, once, spawn
from addons.schema import RateLimitRule

log = logging.getLogger("waypost.ratelimit")

DEFAULT_ID = "default"
SWEEP_SECONDS = 5.0
# Floating-point slack: `burst` requests at the same instant must all fit.
_EPS = 1e-9


# --- the bucket: pure -----------------------------------------------------------------------


class Take(NamedTuple):
    allowed: bool
    full_at: float  # the bucket's new state: when it will hold `burst` tokens again
    remaining: int  # whole tokens left after this request
    retry_after: float  # refused: seconds until one token is back; allowed: 0
    reset: float  # seconds until the bucket is full again


def take(full_at: float, now: float, rate: float, burst: int, cost: float = 1.0) -> Take:
    """Take `cost` tokens from a token bucket of `burst` tokens refilled at `rate` per second.

    The bucket is kept as one number, the moment it will be full again (`full_at`; anything
    not in the future means full): it holds `burst - (full_at - now) * rate` tokens. Taking a
    token pushes that moment 1/rate later; a request that would push it more than
    burst/rate past now finds the bucket empty and leaves it unchanged.
    """
    interval = 1.0 / rate
    if full_at < now:
        full_at = now
    capacity = burst * interval
    after = full_at + cost * interval
    if after - now > capacity + _EPS:
        return Take(
            False,
            full_at,
            int((capacity - (full_at - now)) * rate + _EPS),
            after - now - capacity,
            full_at - now,
        )
    return Take(True, after, int((capacity - (after - now)) * rate + _EPS), 0.0, after - now)


class Limit(NamedTuple):
    """One rate policy: the default one (id "default") or a rule."""

    id: str
    rate: float  # tokens per second; 0: unlimited
    burst: int
    mode: str
    host: hosts.Pattern | None = None  # exact name or `*.suffix`
    path: str | None = None  # prefix

    def window(self) -> int:
        return max(1, math.ceil(self.burst / self.rate))


def effective_burst(rate: float, burst: int) -> int:
    """An unset burst (0) is one second's worth of requests, at least one."""
    return burst if burst > 0 else max(1, math.ceil(rate))


def parse_rules(text: str, mode: str) -> tuple[Limit, ...]:
    """`ratelimit_rules` JSON (a list of rule objects) to limits; ValueError says what is wrong."""
    if not text.strip():
        return ()
    try:
        raw = json.loads(text)
        rules = pydantic.TypeAdapter(list[RateLimitRule]).validate_python(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise ValueError(problems) from None
    seen: set[str] = set()
    out = []
    for rule in rules:
        if rule.id in seen or rule.id == DEFAULT_ID:
            raise ValueError(f"rule id {rule.id!r} is used twice (or is the reserved 'default')")
        seen.add(rule.id)
        host = hosts.parse_pattern(rule.host) if rule.host else None
        out.append(
            Limit(
                rule.id,
                rule.requests_per_second,
                effective_burst(rule.requests_per_second, rule.burst),
                rule.mode or mode,
                host,
                rule.path,
            )
        )
    return tuple(out)


def parse_rate(value: str) -> float:
    """`ratelimit_requests_per_second` as a finite number >= 0; OptionsError otherwise."""
    try:
        rate = float(value)
        if not math.isfinite(rate) or rate < 0:
            raise ValueError
    except ValueError:
        raise exceptions.OptionsError(
            f"ratelimit_requests_per_second: {value!r} is "
            "not a number >= 0 (e.g. 10 or 0.5; 0 turns the default limit off)"
        ) from None
    return rate


def match(rules: Sequence[Limit], host: str, path: str | None) -> Limit | None:
    """The first rule whose host (exact, or `*.suffix`: any subdomain) and path prefix match;
    path rules never match a CONNECT (path None)."""
    for rule in rules:
        if rule.host is not None and not rule.host.matches(host):
            continue
        if rule.path is not None and (path is None or not path.startswith(rule.path)):
            continue
        return rule
    return None


def retry_after(seconds: float) -> int:
    """Retry-After is whole seconds (RFC 9110 §10.2.3): rounded up, at least 1."""
    return max(1, math.ceil(seconds - _EPS))


def headers(limit: Limit, result: Take) -> dict[str, str]:
    """The 429's headers: Retry-After and the draft-10 RateLimit-Policy / RateLimit fields."""
    return {
        "Retry-After": str(retry_after(result.retry_after)),
        "RateLimit-Policy": f'"{limit.id}";q={limit.burst};w={limit.window()}',
        "RateLimit": f'"{limit.id}";r={result.remaining};t={math.ceil(result.reset - _EPS)}',
    }


# --- the bucket table: bounded ---------------------------------------------------------------


class Buckets:
    """Bucket states by key (client IP, or rule id + client IP), least recently used first.

    At most `maxsize` entries; an entry whose bucket is full again is worth nothing and is
    removed by `sweep` (from the front, where the idle ones are).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.table: OrderedDict[str, float] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.table)

    def take(self, key: str, now: float, rate: float, burst: int) -> Take | None:
        """None when a token was taken; the refusal (from `take`) when the bucket is empty."""
        table = self.table
        full_at = table.get(key)
        # The allowed case of `take`, inlined: it is every request's path, and building the
        # NamedTuple costs more than the arithmetic. A unit test holds the two together.
        start = now if full_at is None or full_at < now else full_at
        after = start + 1.0 / rate
        if after - now > burst / rate + _EPS:
            return take(start, now, rate, burst)
        table[key] = after
        if full_at is None:
            if len(table) > self.maxsize:
                table.popitem(last=False)
                self.evicted += 1
        else:
            table.move_to_end(key)
        return None

    def resize(self, maxsize: int) -> None:
        """Bound the table to `maxsize`, dropping the least recently used beyond it."""
        self.maxsize = maxsize
        while len(self.table) > maxsize:
            self.table.popitem(last=False)

    def sweep(self, now: float, budget: int = 10_000) -> int:
        """Drop up to `budget` full buckets from the least recently used end; stop at the first
        that is still refilling (those behind it were used more recently)."""
        table = self.table
        dropped = 0
        while table and dropped < budget:
            key, full_at = next(iter(table.items()))
            if full_at > now:
                break
            del table[key]
            dropped += 1
        return dropped


# --- metrics -------------------------------------------------------------------------------


class _Collector:
    """ratelimit_buckets (tracked clients) and ratelimit_connections (open, counted) at scrape."""

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
        "Most client buckets kept in memory (about 175 bytes each); past it the least recently used bucket is dropped.",
    ),
)
_LIMITS = frozenset(
    {"ratelimit_requests_per_second", "ratelimit_burst", "ratelimit_mode", "ratelimit_rules"}
)


class RateLimit:
    def __init__(self) -> None:
        self.default = Limit(DEFAULT_ID, 0.0, 1, "enforce")
        self.rules: tuple[Limit, ...] = ()
        self.mode = "enforce"
        self.exempt = net.NO_NETWORKS
        self.has_exempt = False
        self._exempt_cache: dict[str, bool] = {}
        self.max_connections = 0
        self.buckets = Buckets(100_000)
        self.connections: dict[str, int] = {}  # peer IP -> open connections counted
        self.counted: dict[str, str] = {}  # client.id -> peer IP, for the decrement
        self.active = False
        self._sweeper: asyncio.Task[None] | None = None

    def load(self, loader: object) -> None:
        net.load(loader)
        state.load(loader)
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        state.configure(updated)
        opts = ctx.options
        if updated & _LIMITS:
            self._configure_limits()
        if "ratelimit_exempt" in updated:
            self.exempt = net.networks_option("ratelimit_exempt", opts.ratelimit_exempt)
            self._exempt_cache = {}
            self.has_exempt = bool(self.exempt)
        if "ratelimit_max_connections_per_ip" in updated:
            self.max_connections = at_least(
                "ratelimit_max_connections_per_ip", opts.ratelimit_max_connections_per_ip, 0
            )
        if "ratelimit_max_clients" in updated:
            self.buckets.resize(at_least("ratelimit_max_clients", opts.ratelimit_max_clients, 1))
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

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = spawn(self._sweep())

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        state.done()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.buckets.sweep(time.monotonic())

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
        if not ip or self._exempt(ip) or net.trusted_peer(client):
            return
        count = self.connections.get(ip, 0)
        if count >= self.max_connections and policy.decide(
            "ratelimit",
            "max_connections_per_ip",
            ip,
            self.mode,
            decision="refuse",
            connections=count,
        ):
            client.error = "Connection refused: too many connections from this address."
            return
        self.connections[ip] = count + 1
        self.counted[client.id] = ip

    def client_disconnected(self, client: connection.Client) -> None:
        ip = self.counted.pop(client.id, None)
        if ip is not None:
            left = self.connections.get(ip, 1) - 1
            if left > 0:
                self.connections[ip] = left
            else:
                self.connections.pop(ip, None)

    # --- requests ---

    @errors.fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.active and not (flow.response or flow.error or not flow.live):
            self._limit(flow, True)

    @errors.fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.active and not (flow.response or flow.error or not flow.live):
            self._limit(flow, False)

    def _limit(self, flow: http.HTTPFlow, tunnel: bool) -> None:
        ip = net.client_ip(flow)
        if self.has_exempt and self._exempt(ip):
            return
        limit = self.default
        key = ip
        if self.rules:
            req = flow.request
            rule = match(self.rules, hosts.host_key(req.host), None if tunnel else req.path)
            if rule is not None:
                limit = rule
                key = f"{rule.id} {ip}"
        if not limit.rate:
            return
        result = self.buckets.take(key, time.monotonic(), limit.rate, limit.burst)
        if result is not None:
            _refuse(flow, ip, limit, result)

    def explain(self, flow: http.HTTPFlow) -> dict[str, object]:
        """POST /admin/explain: would this request be limited now? Read-only: `take` runs on
        the bucket's state as read, which is never written back."""
        ip = net.client_ip(flow)
        found: dict[str, object] = {"addon": "ratelimit", "decision": "allow", "client_ip": ip}
        if not self.active:
            return found
        if self.has_exempt and self._exempt(ip):
            return found | {"exempt": True}
        req = flow.request
        limit, key = self.default, ip
        if self.rules:
            path = None if req.method == "CONNECT" else req.path
            rule = match(self.rules, hosts.host_key(req.host), path)
            if rule is not None:
                limit, key = rule, f"{rule.id} {ip}"
        if not limit.rate:
            return found | {"rule": limit.id}
        now = time.monotonic()
        result = take(self.buckets.table.get(key, now), now, limit.rate, limit.burst)
        refusing = None if result.allowed else limit.id
        return policy.explained("ratelimit", refusing, limit.mode, "limit", client_ip=ip) | {
            "rule": limit.id,
            "remaining": result.remaining if result.allowed else 0,
            "retry_after": retry_after(result.retry_after),
        }


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
