"""The router's pure parts: rule matching, load balancing, circuit breaker, health, retry budget.

No mitmproxy and no clock of their own (callers pass `now`, monotonic seconds), so each is a
page of code with a table of tests (`tests/unit/test_balance.py`). `addons/router.py` is the
addon that drives them from mitmproxy's hooks.
"""

from __future__ import annotations

import fnmatch
import functools
import random
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from addons.kernel import hosts

# --- rule matching ----------------------------------------------------------------------------


def host_matcher(pattern: str) -> Callable[[str], bool]:
    """`api.example.com` exactly, `*.example.com` any subdomain (not the apex), `*` anything."""
    return hosts.parse_pattern(pattern, star=True).matches


def path_matcher(pattern: str) -> Callable[[str], bool]:
    """A glob when the pattern has `*`, `?` or `[` (`/static/*`: `*` crosses `/`), else a prefix
    on segment boundaries (`/api` matches `/api`, `/api/x`, not `/apix`)."""
    if any(c in pattern for c in "*?["):
        rx = re.compile(fnmatch.translate(pattern))
        return lambda path: rx.match(path) is not None
    if pattern.endswith("/"):
        return lambda path: path.startswith(pattern)
    segment = pattern + "/"
    return lambda path: path == pattern or path.startswith(segment)


def header_matcher(name: str, value: str | None, regex: str | None) -> Callable[[Any], bool]:
    """Against mitmproxy `Headers` (case-insensitive names): present, equal to value, or any
    value matching regex (`re.search`)."""
    if regex is not None:
        rx = re.compile(regex)
        return lambda headers: any(rx.search(v) for v in headers.get_all(name))
    if value is not None:
        return lambda headers: value in headers.get_all(name)
    return lambda headers: name in headers


@dataclass(frozen=True)
class Matcher:
    host: Callable[[str], bool] | None = None
    path: Callable[[str], bool] | None = None
    headers: tuple[Callable[[Any], bool], ...] = ()
    methods: frozenset[str] = frozenset()

    def matches(self, method: str, host: str, path: str, headers: Any) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.host is not None and not self.host(host):
            return False
        if self.path is not None and not self.path(path):
            return False
        return all(h(headers) for h in self.headers)


def compile_match(match: Mapping[str, Any]) -> Matcher:
    """A `RouteMatch` (as a dict) compiled once, at configure."""
    return Matcher(
        host=host_matcher(match["host"]) if match.get("host") else None,
        path=path_matcher(match["path"]) if match.get("path") else None,
        headers=tuple(
            header_matcher(h["name"], h.get("value"), h.get("regex"))
            for h in match.get("headers", ())
        ),
        methods=frozenset(m.upper() for m in match.get("method", ())),
    )


def request_host(host_header: str | None, host: str) -> str:
    """The host a client asked for, lowercased, without port: the Host header, else the URL's."""
    value = (host_header or host).strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def strip_prefix(path: str, prefix: str) -> str:
    """`/api/users?x` without `/api` is `/users?x`; a path that is only the prefix becomes `/`."""
    prefix = prefix.rstrip("/")
    if not prefix or not path.startswith(prefix):
        return path
    rest = path[len(prefix) :]
    if rest and rest[0] not in "/?":
        return path  # /apix is not under /api
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


# --- circuit breaker --------------------------------------------------------------------------

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[str, int] = {"closed": 0, "open": 1, "half_open": 2}


@dataclass
class Breaker:
    """Per-backend circuit breaker.

    closed: requests pass; `failure_threshold` consecutive failures open it.
    open: requests are refused until `timeout` has passed, then it is half-open.
    half_open: one trial request at a time passes; `success_threshold` consecutive successes
    close it, any failure opens it again. A trial that never reports back frees its slot
    after `timeout`.
    """

    failure_threshold: int = 5
    timeout: float = 30.0
    success_threshold: int = 2
    state: State = "closed"
    failures: int = 0
    successes: int = 0
    opened_at: float = 0.0
    trial_since: float | None = None
    # Set when `allow` moved open -> half_open (a read-only check cannot log it); the caller
    # reports and clears it.
    half_opened: bool = False

    def allow(self, now: float) -> bool:
        """Whether a request may go to this backend now (moves open -> half_open on time)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if now - self.opened_at < self.timeout:
                return False
            self._to("half_open", now)
            self.half_opened = True
        return self.trial_since is None or now - self.trial_since >= self.timeout

    def peek(self, now: float) -> bool:
        """`allow` without side effects (for listings and readiness)."""
        if self.state == "open":
            return now - self.opened_at >= self.timeout
        return True

    def start_trial(self, now: float) -> bool:
        """A request goes to the backend now; True when it is the half-open trial."""
        if self.state != "half_open":
            return False
        self.trial_since = now
        return True

    def cancel_trial(self) -> None:
        """The trial request ended without an outcome: another may be tried at once."""
        if self.state == "half_open":
            self.trial_since = None

    def record(self, ok: bool, now: float) -> tuple[State, State] | None:
        """One outcome; returns (old, new) when the state changed."""
        old = self.state
        if ok:
            self.failures = 0
            if self.state == "half_open":
                self.trial_since = None
                self.successes += 1
                if self.successes >= self.success_threshold:
                    self._to("closed", now)
        else:
            self.successes = 0
            if self.state == "half_open":
                self._to("open", now)
            elif self.state == "closed":
                self.failures += 1
                if self.failures >= self.failure_threshold:
                    self._to("open", now)
        return (old, self.state) if self.state != old else None

    def open_for(self, seconds: float, now: float) -> tuple[State, State] | None:
        """Another process opened this backend's circuit for `seconds` more: open it here too,
        without counting a failure; the half-open trial follows once they have passed. An open
        circuit is only ever lengthened. Returns (old, new) when the state changed."""
        until = now + seconds
        if self.state == "open":
            self.opened_at = max(self.opened_at, until - self.timeout)
            return None
        old = self.state
        self._to("open", now)
        self.opened_at = until - self.timeout
        return (old, "open")

    def close(self, now: float) -> tuple[State, State] | None:
        """Another process's trial succeeded: the backend is back, close the circuit here too."""
        if self.state == "closed":
            return None
        old = self.state
        self._to("closed", now)
        return (old, "closed")

    def _to(self, state: State, now: float) -> None:
        self.state = state
        self.failures = self.successes = 0
        self.trial_since = None
        if state == "open":
            self.opened_at = now


# --- health -----------------------------------------------------------------------------------


@dataclass
class Health:
    """Active checks and passive failures: `unhealthy_threshold` consecutive failures make a
    backend unhealthy, `healthy_threshold` consecutive successful checks healthy again."""

    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    healthy: bool = True
    failures: int = 0
    successes: int = 0

    def record(self, ok: bool) -> bool | None:
        """One check (or passive) outcome; returns the new `healthy` when it changed."""
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= self.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.healthy and self.failures >= self.unhealthy_threshold:
                self.healthy = False
                return False
        return None

    def served(self) -> None:
        """A passive success (the backend answered a request): the consecutive failures start
        again. Only active checks make an unhealthy backend healthy: it gets no traffic."""
        self.failures = 0


# --- what counts against a backend ------------------------------------------------------------

# Failures that are the backend's whatever the request: it could not be reached, did not
# answer in time, or broke the exchange. A client's mistakes (a malformed or oversized request,
# leaving early), policy kills, a response over the proxy's own limit are not among them.
BACKEND_FAULTS = frozenset(
    {
        "connect_timeout",
        "connect_failed",
        "connection_refused",
        "dns_failure",
        "unreachable",
        "read_timeout",
        "closed",
        "invalid_response",
    }
)
# Of those, the ones that can only come from dialling the backend: they count even while the
# request is still being read (a streamed upload connects first).
CONNECT_FAULTS = frozenset(
    {"connect_timeout", "connect_failed", "connection_refused", "dns_failure", "unreachable"}
)
# Statuses from a backend that count as its failure (gateway errors, overload).
FAILURE_STATUSES = frozenset({502, 503, 504})


def backend_fault(reason: str, request_complete: bool, response_started: bool) -> str | None:
    """The reason to count against the backend for a failed exchange, or None when the failure
    is not the backend's.

    `reason` is errors.reason_of's (or "read_timeout"); `request_complete`: the client's request
    was read to its end (only then does a buffered request reach the backend, so an error before
    it, "peer closed" included, is about the client's side); `response_started`: the backend's
    response head had arrived (a protocol error then is in the backend's body).
    """
    if not request_complete:
        return reason if reason in CONNECT_FAULTS else None
    if reason == "error" and response_started:
        return "invalid_response"
    return reason if reason in BACKEND_FAULTS else None


# --- load balancing ---------------------------------------------------------------------------


class Failure(NamedTuple):
    at: float  # epoch seconds, for display
    reason: str


@dataclass(eq=False)
class Backend:
    """One backend with its state; shared by every rule that names the same backend."""

    name: str
    scheme: str
    host: str
    port: int
    breaker: Breaker = field(default_factory=Breaker)
    health: Health = field(default_factory=Health)
    active: int = 0
    unavailable_until: float = 0.0  # a 503 Retry-After from this backend
    requests: int = 0
    failures: deque[Failure] = field(default_factory=lambda: deque(maxlen=10))

    @functools.cached_property
    def hostport(self) -> str:
        """The Host header for this backend (the port only when not the scheme's default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def available(self, now: float, breaker_enabled: bool = True) -> bool:
        if not self.health.healthy or now < self.unavailable_until:
            return False
        return not breaker_enabled or self.breaker.allow(now)


Strategy = Literal["round_robin", "weighted_round_robin", "least_connections"]


class Pool:
    """Backends of one rule and how to pick among the available ones.

    round_robin: in turn; weighted_round_robin: smooth weighted round robin as nginx does it
    (each pick adds every peer's weight to its current value, takes the largest and subtracts
    the total from it: weights 5,1,1 give a a b a c a a, never a burst of one peer);
    least_connections: fewest in-flight requests relative to weight, ties in turn.
    """

    def __init__(
        self, backends: Sequence[Backend], weights: Sequence[int], strategy: Strategy
    ) -> None:
        self.backends = list(backends)
        self.weights = list(weights)
        self.strategy = strategy
        self._current = [0] * len(self.backends)
        self._next = 0

    def choose(
        self, now: float, exclude: Sequence[Backend] = (), breaker: bool = True
    ) -> Backend | None:
        n = len(self.backends)
        if self.strategy == "round_robin":
            for k in range(n):  # the common case without building lists
                i = (self._next + k) % n
                b = self.backends[i]
                if b not in exclude and b.available(now, breaker):
                    self._next = (i + 1) % n
                    return b
            return None
        ok = [
            i
            for i in range(n)
            if self.backends[i] not in exclude and self.backends[i].available(now, breaker)
        ]
        if not ok:
            return None
        if self.strategy == "weighted_round_robin":
            total, best = 0, -1
            for i in ok:
                self._current[i] += self.weights[i]
                total += self.weights[i]
                if best < 0 or self._current[i] > self._current[best]:
                    best = i
            self._current[best] -= total
            return self.backends[best]
        start = self._next
        ordered = sorted(ok, key=lambda i: (i - start) % n)
        pick = ordered[0]
        if self.strategy == "least_connections":
            pick = min(ordered, key=lambda i: self.backends[i].active / self.weights[i])
        # Continue after the one picked, so an unavailable peer's turn is not inherited by
        # its successor (which would get twice the share).
        self._next = (pick + 1) % n
        return self.backends[pick]


# --- retries ----------------------------------------------------------------------------------

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def backoff(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry number `attempt` (1, 2, ...): exponential with full jitter."""
    return rand() * min(cap, base * (2 ** (attempt - 1)))


class RetryBudget:
    """Retries allowed in a sliding window: `percent` of the requests, at least `minimum` per
    second (Envoy's retry budget), so retries cannot multiply load on a failing fleet."""

    WINDOW = 10

    def __init__(self, percent: float, minimum: int) -> None:
        self.percent = percent
        self.minimum = minimum
        self._slots: deque[list[int]] = deque()  # [second, requests, retries]

    def _slot(self, now: float) -> list[int]:
        second = int(now)
        while self._slots and self._slots[0][0] <= second - self.WINDOW:
            self._slots.popleft()
        if not self._slots or self._slots[-1][0] != second:
            self._slots.append([second, 0, 0])
        return self._slots[-1]

    def request(self, now: float) -> None:
        self._slot(now)[1] += 1

    def try_retry(self, now: float) -> bool:
        slot = self._slot(now)
        requests = sum(s[1] for s in self._slots)
        retries = sum(s[2] for s in self._slots)
        allowed = max(self.minimum * self.WINDOW, requests * self.percent / 100)
        if retries + 1 > allowed:
            return False
        slot[2] += 1
        return True


def retry_after(value: str | None, cap: float = 300.0) -> float | None:
    """Seconds from a Retry-After header given in seconds (HTTP dates are ignored), capped."""
    if not value or not value.strip().isdigit():
        return None
    return min(float(value.strip()), cap)
