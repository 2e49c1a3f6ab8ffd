"""Temporary bans: the in-memory table, and their Redis side (the shared bucket script, which
checks and sets bans in the same round trip as the token, the index /admin/bans reads, lifting).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, NamedTuple

from addons import state
from addons.ratelimiting.bucket import EPS


class Ban(NamedTuple):
    until: float  # time.monotonic() when the ban ends
    violations: int


class Bans:
    """Temporary bans and the violations counted towards them, by client IP (memory backend,
    and the local decisions while Redis is down). Both tables hold at most `maxsize` entries:
    past it the oldest goes (a flood of addresses can shorten bans, never grow memory)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.banned: OrderedDict[str, Ban] = OrderedDict()
        # ip -> (end of the counting window, violations in it)
        self.violations: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def left(self, ip: str, now: float) -> float:
        """Seconds left of the client's ban; 0 when it is not banned."""
        ban = self.banned.get(ip)
        if ban is None:
            return 0.0
        if ban.until <= now:
            del self.banned[ip]
            return 0.0
        return ban.until - now

    def violation(self, ip: str, now: float, after: int, within: float, duration: float) -> int:
        """Count one refused request; the violation count when it bans the client, else 0."""
        end, n = self.violations.pop(ip, (0.0, 0))
        if end <= now:
            end, n = now + within, 0
        n += 1
        if n >= after:
            self.banned.pop(ip, None)
            self.banned[ip] = Ban(now + duration, n)
            bound(self.banned, self.maxsize)
            return n
        self.violations[ip] = (end, n)
        bound(self.violations, self.maxsize)
        return 0

    def lift(self, ip: str) -> bool:
        self.violations.pop(ip, None)
        return self.banned.pop(ip, None) is not None

    def sweep(self, now: float) -> None:
        for ip in [ip for ip, ban in self.banned.items() if ban.until <= now]:
            del self.banned[ip]
        for ip in [ip for ip, (end, _) in self.violations.items() if end <= now]:
            del self.violations[ip]

    def listing(self, now: float, wall: float) -> list[dict[str, object]]:
        return [
            ban_entry(ip, wall + ban.until - now, ban.until - now, ban.violations)
            for ip, ban in self.banned.items()
            if ban.until > now
        ]


def bound(table: OrderedDict[str, object], maxsize: int) -> None:
    while len(table) > maxsize:
        table.popitem(last=False)


def ban_entry(ip: str, until: float, left: float, violations: int | None) -> dict[str, object]:
    entry: dict[str, object] = {
        "ip": ip,
        "until": datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds"),
        "seconds_left": math.ceil(left - EPS),
    }
    if violations is not None:
        entry["violations"] = violations
    return entry


# KEYS: the bucket, the client's ban, the client's violation count, the index of bans.
# ARGV: microseconds per token (0: only the ban check), burst, ban after N violations (0: no
# bans), the violation window (ms), the ban's duration (ms), the client IP.
# Returns {kind, a, b, c}: kind 1 allowed; 0 refused (a retry in us, b tokens left, c reset in
# us); 2 banned (a ms left); 3 banned by this refusal (a ms, b violations).
# The bucket is `take`'s `full_at` in microseconds of Redis's own clock (TIME, so instances'
# clocks do not matter), kept only while it is refilling (PX: a full bucket is no key).
BUCKET_SCRIPT = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {2, left, 0, 0} end
local interval = tonumber(ARGV[1])
if interval == 0 then return {1, 0, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local full_at = tonumber(redis.call('GET', KEYS[1])) or now
if full_at < now then full_at = now end
local capacity = tonumber(ARGV[2]) * interval
local after = full_at + interval
if after - now <= capacity + 0.001 then
  redis.call('SET', KEYS[1], after, 'PX', math.max(1, math.ceil((after - now) / 1000)))
  return {1, 0, 0, 0}
end
local ban_after = tonumber(ARGV[3])
if ban_after > 0 then
  local n = redis.call('INCR', KEYS[3])
  if n == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
  if n >= ban_after then
    redis.call('DEL', KEYS[3])
    redis.call('SET', KEYS[2], n, 'PX', ARGV[5])
    -- The index lists bans without a SCAN: scored by their end, pruned as they end, and gone
    -- when the last one ends.
    local ends = math.floor(now / 1000) + tonumber(ARGV[5])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', math.floor(now / 1000))
    redis.call('ZADD', KEYS[4], ends, ARGV[6])
    if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[4], ARGV[5]) end
    return {3, tonumber(ARGV[5]), n, 0}
  end
end
return {0, math.floor(after - now - capacity), math.floor((capacity - (full_at - now)) / interval + 1e-6), math.floor(full_at - now)}
"""
# /admin/bans lists at most this many bans (the ones ending last first).
MAX_LISTED = 1000


async def lift(client: Any, st: state.SharedState, ip: str) -> bool:
    """Delete a ban, the violations counted towards the next and its index entry; whether
    there was a ban."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(st.key("ban", ip))
    pipe.delete(st.key("rlv", ip))
    pipe.zrem(st.key("bans"), ip)
    found, _, _ = await pipe.execute()
    return bool(found)


async def shared_bans(client: Any, st: state.SharedState) -> list[tuple[str, int, int | None]]:
    """The bans in Redis: (ip, ms left, violations), at most MAX_LISTED, from the index (two
    round trips, however many keys Redis holds)."""
    index = st.key("bans")
    members = await client.zrevrange(index, 0, MAX_LISTED - 1)
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for ip in members:
        pipe.pttl(st.key("ban", ip.decode()))
        pipe.get(st.key("ban", ip.decode()))
    answers = await pipe.execute()
    out = []
    for ip, ms, n in zip(members, answers[::2], answers[1::2], strict=True):
        if ms > 0:  # an entry whose ban ended or was lifted is pruned by the next ban
            out.append((ip.decode(), int(ms), int(n) if n is not None else None))
    return out
