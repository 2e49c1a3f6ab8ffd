"""The instance app: the one management port of an instance that runs several workers.

The supervisor serves `make_app(workers, settings)` on metrics_host:metrics_port (aiohttp's
AppRunner, in the supervisor's own loop). Each worker's own management app serves the loopback
socket the supervisor handed it (`WorkerView.management`); this app reads every worker there:

    GET  /health/liveness   200 while the supervisor runs (it is the one serving this)
    GET  /health/readiness  200 when at least one worker is ready and the instance is not
                            draining: a worker that restarts does not take the pod out of the
                            Service; every worker's own answer in checks.workers.workers
    GET  /health/startup    200 once every worker has started (answered 200 to its own
                            startup probe) at least once
    GET  <metrics_path>     every live worker's exposition scraped concurrently and combined
                            (`combine`), plus waypost_workers, waypost_workers_up and
                            waypost_worker_restarts_total{worker}
    *    /admin/*           forwarded to every live worker (method, path, query, body,
                            Authorization, Content-Type); the answers combined (`merge_admin`).
                            The token is checked by the workers, which see the same header.
    *    anything else      to one live worker in turn, its answer streamed back: the routes
                            extensions add to the management app (`POST /cli/execute`), and
                            the worker's own 404 for an unknown path

Combining samples of equal name and labels (without `metrics_worker_label`): counters,
histogram buckets/_sum/_count, summaries and gauges of amounts (open connections, resident
memory, open fds, cache bytes) are summed. Gauges where a sum says nothing: the states in
`STATES` (a circuit not closed in any worker shows, a backend is healthy only if every worker
sees it so), `*_start_time_seconds` the earliest (the oldest worker), `*_timestamp_seconds` the
latest, `*_info` (waypost_build_info, stays 1) and `*_max_fds` (a per-process limit) the
largest; `*_created` the earliest. The summed counters never go backwards (`Carry`): a worker
that misses a scrape (PROBE_TIMEOUT; waypost_workers_up says how many were read) counts with
its last values, and a restarted worker's last values stay in the sums. With
`metrics_worker_label` every sample keeps its worker's value with a `worker` label instead
(a restarted worker's series reset, as Prometheus expects of a new process).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from addons import errors

log = logging.getLogger("waypost.supervisor")

# A scrape or probe of a worker on loopback: a worker slower than this counts as down for that
# request, so one stuck worker never stalls the instance's probe or scrape.
PROBE_TIMEOUT = 2.0
# An admin action may take long in a worker (a reload validates a profile): the proxy port's
# own admin hand-over allows the same.
ADMIN_TIMEOUT = 60.0
# How often a request streamed from one worker checks that its client is still there.
CLIENT_POLL = 0.2
# Headers an admin request carries to the workers (the token is checked there).
_FORWARDED = ("Authorization", "Content-Type", "Accept")
# Headers of a refusal every worker agreed on that the client needs (how to authenticate, which
# methods are allowed).
_KEPT = ("www-authenticate", "allow")
# Fields of an admin answer that are the instance's total when summed over workers.
SUMMED: dict[str, tuple[str, ...]] = {"/admin/cache": ("invalidated", "remaining")}
# Fields that list what each worker holds: the instance's list is their union (duplicates, the
# same entry read from shared state by every worker, once).
JOINED: dict[str, tuple[str, ...]] = {"/admin/bans": ("bans",)}
# Admin answers that are one document (a `workers` field would make the OpenAPI document
# invalid): answered as is when every worker's is the same.
WHOLE = frozenset({"/admin/openapi.json", "/admin/version"})
_ALLOW_GET = {"Allow": "GET, HEAD"}
# Not relayed between a client and a worker: each hop's own framing.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
     "content-length", "host"}
)  # fmt: skip


@dataclass(frozen=True)
class WorkerView:
    """One worker as the supervisor sees it (a new view each time `workers()` is called)."""

    index: int
    pid: int | None  # None while it restarts
    management: str  # http://127.0.0.1:PORT, that worker's own management app
    restarts: int = 0


@dataclass
class Settings:
    """What the instance app needs of the instance's configuration, read on every request: the
    supervisor may change it in place (a reload, the start of a drain)."""

    metrics_path: str = "/metrics"
    worker_label: bool = False  # the metrics_worker_label option
    draining: bool = False  # set by the supervisor once it drains (SIGTERM): readiness 503


@dataclass
class Answer:
    """A worker's answer to one forwarded request; status None: it did not answer."""

    worker: int
    status: int | None
    body: Any = None  # parsed JSON, else text
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def listed(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker, "status": self.status}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["body"] = self.body
        return out


# --- metrics ---------------------------------------------------------------------------------


# Gauges that are a state, not an amount: the instance's value from its workers' values.
STATES: dict[str, Callable[[float, float], float]] = {
    "backend_circuit_state": max,  # not closed (1 open, 2 half-open) in any worker shows
    "backend_healthy": min,  # healthy (1) only while every worker sees it healthy
    "config_last_reload_successful": min,  # 0 while any worker runs a refused profile's old one
}


def _add(a: float, b: float) -> float:
    return a + b


def _reduce(name: str, typ: str) -> Callable[[float, float], float]:
    """How two workers' values of one series become the instance's."""
    if typ != "gauge":
        return _add
    if name in STATES:
        return STATES[name]
    if name.endswith("_start_time_seconds"):
        return min
    if name.endswith("_timestamp_seconds"):
        return max
    if name.endswith(("_info", "_max_fds")):
        return max
    return _add


def parse(text: str) -> list[Metric]:
    """A worker's exposition as metric families (ValueError when it is not one)."""
    return list(text_string_to_metric_families(text))


def combine(
    expositions: Iterable[tuple[int, Iterable[Metric]]], worker_label: bool = False
) -> list[Metric]:
    """The workers' parsed expositions (worker index, families) as the instance's families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], list[Any]]] = {}
    for index, worker_families in expositions:
        for fam in worker_families:
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            out = families[fam.name]
            family_reduce = _reduce(out.name, out.type)
            samples = values[fam.name]
            for s in fam.samples:
                reduce = min if s.name.endswith("_created") else family_reduce
                labels = dict(s.labels)
                if worker_label:
                    labels["worker"] = str(index)
                key = (s.name, frozenset(labels.items()))
                seen = samples.get(key)
                if seen is None:
                    samples[key] = [s.name, labels, s.value]
                else:
                    seen[2] = reduce(seen[2], s.value)
    # A label set new to a family arrives whole from one worker and is appended whole, so a
    # histogram's series stay together as the exposition format wants.
    for name, fam in families.items():
        for sample_name, labels, value in values[name].values():
            fam.add_sample(sample_name, labels, value)
    return list(families.values())


def counting(families: Iterable[Metric]) -> list[Metric]:
    """The samples of `families` that only grow: counters, histogram and summary counts and
    sums (no `_created`, no quantiles)."""
    out = []
    for fam in families:
        if fam.type not in ("counter", "histogram", "summary"):
            continue
        kept = Metric(fam.name, fam.documentation, fam.type)
        for s in fam.samples:
            if not s.name.endswith("_created") and "quantile" not in s.labels:
                kept.add_sample(s.name, s.labels, s.value)
        out.append(kept)
    return out


class Carry:
    """Keeps the instance's summed counters from going backwards.

    Prometheus reads any decrease of a counter as a reset to zero and counts the whole new
    value as increase: one worker's restart (its counters back at zero) or one missed scrape
    would show the other workers' entire totals as a spike in every rate(). So the last
    counter values of each worker are kept: a worker that misses a scrape counts with them,
    and when a worker comes back as a new process (another pid) its predecessor's last values
    join `retired`, which stays in the sums.
    """

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int | None, list[Metric]]] = {}  # worker: pid, counters
        self.retired: list[Metric] = []

    def expositions(
        self, read: Sequence[tuple[int, int | None, list[Metric]]]
    ) -> list[tuple[int, list[Metric]]]:
        """What to sum, from this scrape's answers (worker index, pid, families)."""
        out: list[tuple[int, list[Metric]]] = []
        for index, pid, families in read:
            previous = self.seen.get(index)
            if previous is not None and previous[0] != pid:
                self.retired = combine([(0, self.retired), (0, previous[1])])
            self.seen[index] = (pid, counting(families))
            out.append((index, families))
        answered = {index for index, _, _ in read}
        out += [(i, last) for i, (_, last) in self.seen.items() if i not in answered]
        if self.retired:
            out.append((-1, self.retired))
        return out


def instance_families(views: Sequence[WorkerView], up: int) -> list[Metric]:
    """The supervisor's own series: configured workers, workers scraped, restarts."""
    restarts = CounterMetricFamily(
        "waypost_worker_restarts_total",
        "Times the supervisor restarted a worker after it exited.",
        labels=["worker"],
    )
    for v in views:
        restarts.add_metric([str(v.index)], v.restarts)
    return [
        GaugeMetricFamily("waypost_workers", "Worker processes configured.", len(views)),
        GaugeMetricFamily(
            "waypost_workers_up", "Workers whose metrics this scrape could read.", up
        ),
        restarts,
    ]


class _Families:
    """What generate_latest reads: a fixed list of families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(families: list[Metric]) -> bytes:
    return generate_latest(_Families(families))  # type: ignore[arg-type]


# --- admin -----------------------------------------------------------------------------------


def _payload(code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return json.loads(errors.body(code, message, errors.new_request_id(), details))


def merge_admin(
    path: str, answers: Sequence[Answer], method: str = "GET"
) -> tuple[int, Any, dict[str, str]]:
    """The instance's answer (status, JSON body, headers) to an admin request every worker got.

    - Every worker answered the same success: that status; the body lifts the fields every
      worker answered alike, sums the fields that are totals (`SUMMED`: a purge's
      `invalidated`), joins the lists of what each worker holds (`JOINED`: bans), and lists
      each worker's answer under "workers"; a document (`WHOLE`) every worker answered alike
      is that document.
    - A DELETE that some workers answered with a success and the others with 404 succeeded:
      what it removed was held by some workers only (a ban in memory mode).
    - Every worker answered the same refusal (a wrong token, an unknown path): that answer.
    - Anything else (statuses differ, a worker did not answer): 207 Multi-Status with
      {"workers": [{"worker": i, "status": s, "body": ...} or {..., "error": why}]}.
    - No worker answered: 502, the error shape with the list in `error.workers`.
    """
    listed = [a.listed() for a in answers]
    statuses = {a.status for a in answers}
    if method == "DELETE" and 404 in statuses and len(statuses) == 2:
        found = [a for a in answers if a.status != 404]
        if found[0].status is not None and 200 <= found[0].status < 300:
            answers, statuses = found, {found[0].status}
    if statuses <= {None}:
        body = _payload("BACKEND_UNREACHABLE", "No worker answered.", {"workers": listed})
        return 502, body, {}
    if len(statuses) > 1:
        return 207, {"workers": listed}, {}
    first = answers[0]
    status = first.status
    assert status is not None
    if status >= 400:
        return status, first.body, {k: v for k, v in first.headers.items() if k.lower() in _KEPT}
    merged: dict[str, Any] = {}
    bodies = [a.body for a in answers]
    if path in WHOLE and all(b == bodies[0] for b in bodies):
        return status, bodies[0], {}
    if all(isinstance(b, dict) for b in bodies):
        for key, value in bodies[0].items():
            if key in SUMMED.get(path, ()):
                merged[key] = sum(b.get(key, 0) for b in bodies)
            elif key in JOINED.get(path, ()):
                joined: list[Any] = []
                for item in (i for b in bodies for i in b.get(key) or ()):
                    if item not in joined:
                        joined.append(item)
                merged[key] = joined
            elif all(key in b and b[key] == value for b in bodies):
                merged[key] = value
    merged["workers"] = listed
    return status, merged, {}


# --- the app ---------------------------------------------------------------------------------


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", "replace")
    if "json" in content_type:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


async def _until_gone(request: web.Request) -> None:
    """Returns once the client's connection is closed: aiohttp tells a handler only when a
    write fails (or by cancelling it, if the runner was made with handler_cancellation)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(CLIENT_POLL)


def make_app(workers: Callable[[], Sequence[WorkerView]], settings: Settings) -> web.Application:
    """The instance's management app over the supervisor's current view of its workers."""
    started: set[int] = set()  # workers that answered their startup probe once
    turn = itertools.count()  # which live worker answers the next single-worker request
    carry = Carry()
    session: aiohttp.ClientSession | None = None

    async def client(app: web.Application) -> AsyncIterator[None]:
        nonlocal session
        # A connection per request: a restarted worker never meets a stale kept-alive one.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False
        )
        yield
        await session.close()

    async def ask(
        view: WorkerView,
        method: str,
        path: str,
        timeout: float,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        if view.pid is None:
            return Answer(view.index, None, error="restarting")
        assert session is not None
        try:
            async with session.request(
                method,
                view.management + path,
                data=body or None,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
                return Answer(
                    view.index,
                    resp.status,
                    _decode(raw, resp.headers.get("Content-Type", "")),
                    dict(resp.headers),
                )
        except (aiohttp.ClientError, TimeoutError) as e:
            return Answer(view.index, None, error=f"no answer: {type(e).__name__} {e}".strip())

    async def each(
        method: str,
        path: str,
        timeout: float,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[list[WorkerView], list[Answer]]:
        views = list(workers())
        answers = await asyncio.gather(
            *(ask(v, method, path, timeout, body, headers) for v in views)
        )
        return views, list(answers)

    def health(status: int, state: str, checks: dict[str, Any]) -> web.Response:
        payload = {"status": state, "timestamp": errors.timestamp(), "checks": checks}
        return web.json_response(payload, status=status, headers={"Cache-Control": "no-store"})

    async def liveness(request: web.Request) -> web.Response:
        payload = {"status": "ok", "timestamp": errors.timestamp()}
        return web.json_response(payload, headers={"Cache-Control": "no-store"})

    async def readiness(request: web.Request) -> web.Response:
        views, answers = await each("GET", "/health/readiness", PROBE_TIMEOUT)
        listed = []
        for v, a in zip(views, answers, strict=True):
            entry: dict[str, Any] = {"worker": v.index, "pid": v.pid, "ok": a.status == 200}
            if a.status is None:
                entry["status"] = "down"
                entry["error"] = a.error
            elif isinstance(a.body, dict):
                entry["status"] = a.body.get("status")
                entry["checks"] = a.body.get("checks", {})
            else:
                entry["status"] = f"HTTP {a.status}"
            if a.status == 200:
                started.add(v.index)
            listed.append(entry)
        ready = sum(1 for e in listed if e["ok"])
        checks = {
            "workers": {"ok": ready > 0, "ready": ready, "configured": len(views),
                        "workers": listed},
            "draining": {"ok": not settings.draining},
        }  # fmt: skip
        ok = ready > 0 and not settings.draining
        return health(200 if ok else 503, "ready" if ok else "not_ready", checks)

    async def startup(request: web.Request) -> web.Response:
        views = list(workers())
        answers = await asyncio.gather(
            *(
                ask(v, "GET", "/health/startup", PROBE_TIMEOUT)
                for v in views
                if v.index not in started
            )
        )
        started.update(a.worker for a in answers if a.status == 200)
        indices = {v.index for v in views}
        ok = indices <= started
        checks = {
            "workers": {"ok": ok, "started": sorted(started & indices), "configured": len(views)}
        }
        return health(200 if ok else 503, "started" if ok else "starting", checks)

    async def metrics(request: web.Request) -> web.Response:
        views, answers = await each("GET", settings.metrics_path, PROBE_TIMEOUT)
        pids = {v.index: v.pid for v in views}
        read: list[tuple[int, int | None, list[Metric]]] = []
        for a in answers:
            if a.status is None:
                continue
            try:
                if a.status != 200 or not isinstance(a.body, str):
                    raise ValueError(f"HTTP {a.status}")
                read.append((a.worker, pids[a.worker], parse(a.body)))
            except ValueError as e:  # that worker counts as not scraped; the others still do
                log.warning("worker %d: its metrics could not be read: %s", a.worker, e)
        if settings.worker_label:
            families = combine([(i, f) for i, _, f in read], worker_label=True)
        else:
            families = combine(carry.expositions(read))
        body = exposition(families + instance_families(views, len(read)))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k in _FORWARDED if (v := request.headers.get(k))}
        _, answers = await each(request.method, request.path_qs, ADMIN_TIMEOUT, body, headers)
        status, payload, extra = merge_admin(request.path, answers, request.method)
        if isinstance(payload, str):
            return web.Response(status=status, text=payload, headers=extra)
        return web.Response(
            status=status,
            body=json.dumps(payload),
            content_type="application/json",
            headers={"Cache-Control": "no-store", **extra},
        )

    async def one(request: web.Request) -> web.StreamResponse:
        live = [v for v in workers() if v.pid is not None]
        if not live:
            return errors.web_error("BACKEND_UNREACHABLE", "No worker is running.")
        view = live[next(turn) % len(live)]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        assert session is not None
        try:
            upstream = await session.request(
                request.method,
                view.management + request.path_qs,
                # Streamed as it arrives: a CLI run reads its stdin from a chunked body.
                data=request.content.iter_any() if request.can_read_body else None,
                headers=headers,
                allow_redirects=False,
                # A CLI run streams for as long as its process runs: no total limit.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=PROBE_TIMEOUT),
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("worker %d did not take %s: %s", view.index, request.path, e)
            return errors.web_error("BACKEND_UNREACHABLE", "The worker did not answer.")
        # A client that leaves closes the worker's connection too, so the worker ends what it
        # ran for it (a CLI process) at once, not at its next write.
        gone = asyncio.ensure_future(_until_gone(request))
        gone.add_done_callback(lambda _: upstream.close())
        try:
            async with upstream:
                out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        out.headers.add(k, v)
                await out.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                except (aiohttp.ClientError, ConnectionError) as e:
                    # The client left, or the worker broke off: the client's connection ends
                    # without the last chunk, so a cut answer never looks complete.
                    if not gone.done():
                        log.warning("worker %d broke off %s: %s", view.index, request.path, e)
                    if request.transport is not None:
                        request.transport.close()
                return out
        finally:
            gone.cancel()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/admin/"):
            return await admin(request)
        handler = {
            "/health/liveness": liveness,
            "/health/readiness": readiness,
            "/health/startup": startup,
            settings.metrics_path: metrics,
        }.get(path)
        if handler is None:
            return await one(request)
        if request.method not in ("GET", "HEAD"):
            return errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", headers=_ALLOW_GET)
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024)
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
