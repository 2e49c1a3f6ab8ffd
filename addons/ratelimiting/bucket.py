"""The token bucket, pure (`take` on one float per client), its rules, and the bounded table.

A bucket is the moment it will hold `burst` tokens again (`full_at`); a request takes one
token's worth of time from it. The table keeps one float per client in LRU order, at most
`maxsize` of them; a full bucket is the same as none, so idle ones are swept.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import pydantic
from mitmproxy import exceptions

from addons.kernel import hosts
from addons.schema import RateLimitRule

DEFAULT_ID = "default"
# Floating-point slack: `burst` requests at the same instant must all fit.
EPS = 1e-9


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
    if after - now > capacity + EPS:
        return Take(
            False,
            full_at,
            int((capacity - (full_at - now)) * rate + EPS),
            after - now - capacity,
            full_at - now,
        )
    return Take(True, after, int((capacity - (after - now)) * rate + EPS), 0.0, after - now)


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
    return max(1, math.ceil(seconds - EPS))


def headers(limit: Limit, result: Take) -> dict[str, str]:
    """The 429's headers: Retry-After and the draft-10 RateLimit-Policy / RateLimit fields."""
    return {
        "Retry-After": str(retry_after(result.retry_after)),
        "RateLimit-Policy": f'"{limit.id}";q={limit.burst};w={limit.window()}',
        "RateLimit": f'"{limit.id}";r={result.remaining};t={math.ceil(result.reset - EPS)}',
    }


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
        if after - now > burst / rate + EPS:
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


def divided(limit: Limit, workers: int) -> Limit:
    """One worker's share of a limit in memory mode: rate/N, a bucket of ceil(burst/N)."""
    if workers <= 1 or not limit.rate:
        return limit
    return limit._replace(rate=limit.rate / workers, burst=math.ceil(limit.burst / workers))
