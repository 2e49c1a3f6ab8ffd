"""The management app: health probes, Prometheus metrics and admin actions.

An aiohttp app inside mitmproxy's event loop on its own listener (`metrics_host`:`metrics_port`):

    GET  /health/liveness    200 while the event loop runs
    GET  /health/readiness   200 when the proxy listeners are up and the config (if the config
                             addon is loaded) is loaded, else 503
    GET  /health/startup     200 once startup finished (running hook done, listeners up), else 503
    GET  <metrics_path>      Prometheus text exposition of `addons.metrics.REGISTRY`
    POST /admin/reload       reload the config addon; `Authorization: Bearer <admin_token>`
    GET  /admin/config       the effective configuration: every key's value (secrets
                             redacted) and source (file:line, env, set, default)
    GET  /admin/version      Waypost's, mitmproxy's and Python's versions
    POST /admin/explain      what every policy and the router would decide for a request
                             ({method, url, client_ip, headers}), nothing sent or changed
    GET  /admin/openapi.json the admin API as an OpenAPI 3.1 document
    (the last four live in `addons/admin/`: routes, effective, explain, openapi, models)

Other addons extend the app without importing it, by duck typing (any loaded addon, found on
each request, so script reloads and late loads just work):

    management_routes() -> {path: async handler(aiohttp.web.Request) -> StreamResponse}
        Exact paths served by that addon; a key ending in `/*` serves any last path segment
        under it (`/admin/bans/*`: `/admin/bans/<ip>`, read from request.path). Paths under
        /admin/ get the admin bearer-token check (and 404 while admin_token is empty) before
        the handler runs; any other path (e.g. /cli/execute) does its own authentication.
    readiness_check() -> (name, value, ok)
        One more entry in /health/readiness's `checks` (`value`, any JSON: the cache shows
        "ok"/"disabled", the router a list of backends); not `ok` makes readiness answer 503.
    explain(flow) -> dict | None
        That addon's part of POST /admin/explain: what it would decide for the synthetic flow
        (never live, never sent), read-only (`addons/admin/explain.py`).
    management_openapi() -> {path: {method: OpenAPI operation}}
        Operations for /admin/openapi.json that `addons/admin/openapi.py` does not describe.

Every GET endpoint answers HEAD too (same status and headers, no body). Errors use the JSON
shape of `addons/errors.py`. With `admin_token` empty, `/admin/*` answers 404 (the admin API is
off).

The proxy port answers origin-form requests addressed to the proxy itself (PRD §11.3:
`curl -X POST http://localhost:8080/admin/reload`) for `/health/*`, the metrics path and
`/admin/*`, each switchable (`metrics_proxy_port_*`; off: 404 there). Health and metrics are
answered in `requestheaders` from the same functions as the management app. An admin request
is claimed in `requestheaders` (a 500 answer stands in, so the later addons leave it alone and
mitmproxy buffers its body) and answered in the async `request` hook by the management app
itself, handed the request over an in-process socket pair: the same routes, token check and
errors as on the management port, no port opened, the event loop never blocked.

A worker of a supervised instance (`addons/kernel/instance.py`, `addons/supervisor/`) serves
its management app on the loopback socket the supervisor bound and passed it
(WAYPOST_MANAGEMENT_FD), whatever metrics_enabled/host/port say and never rebound: the
supervisor's instance app owns the management port and reads every worker there. On the proxy
port, the metrics path and /admin/* are then relayed to the instance app
(WAYPOST_INSTANCE_MANAGEMENT), so they speak for the instance; /health/* stays this worker's.

Hooks: load, configure, running, done (all sync: the listener is bound synchronously, the
server runs as a task), requestheaders, request (awaitable for proxy-port admin requests, and
metrics requests relayed to the instance app, only).
Command: waypost.explain METHOD URL [CLIENT_IP] (mitmweb's command bar, mitmproxy's `:`
prompt): POST /admin/explain's answer as indented JSON.
Options: metrics_enabled, metrics_host, metrics_port, metrics_path, admin_token,
metrics_proxy_port_health, metrics_proxy_port_metrics, metrics_proxy_port_admin,
metrics_worker_label (read by the supervisor's instance app, declared here with its siblings).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from mitmproxy import command, ctx, exceptions, http
from mitmproxy.net.http import http1
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from addons import errors, state
from addons.admin import routes as admin_routes
from addons.kernel import net
from addons.kernel.endpoints import bearer_status, bind, meant_for_proxy, serve_paths
from addons.kernel.instance import Identity, identity
from addons.kernel.options import Option, declare, spawn
from addons.kernel.record import record
from addons.metrics import REGISTRY

log = logging.getLogger("waypost.management")

HEALTH_PREFIX = "/health/"
RESERVED_PREFIXES = (HEALTH_PREFIX, "/admin/")

OPTIONS: tuple[Option, ...] = (
    Option(
        "metrics_enabled",
        bool,
        True,
        "Run the management app (health probes, Prometheus metrics, admin API) on its own "
        "listener. When false nothing listens; the proxy port still answers /health/*.",
    ),
    Option(
        "metrics_host",
        str,
        "127.0.0.1",
        'IP address the management app listens on ("localhost" means 127.0.0.1; use '
        "0.0.0.0 for all interfaces, e.g. in a container scraped from outside).",
    ),
    Option(
        "metrics_port",
        int,
        9090,
        'TCP port of the management app; 0 picks a free port (the log line "management '
        'listening at http://HOST:PORT" shows it). Changing it at runtime rebinds.',
    ),
    Option(
        "metrics_path",
        str,
        "/metrics",
        "Path of the Prometheus metrics endpoint (on the management listener, and on the "
        "proxy port with metrics_proxy_port_metrics). Must start with / and not be under "
        "/health or /admin.",
    ),
    Option(
        "admin_token",
        str,
        "",
        "Bearer token required by /admin/* on the management listener and the proxy port "
        "(Authorization: Bearer <token>). Empty turns the admin API off: /admin/* answers "
        "404.",
    ),
    Option(
        "metrics_proxy_port_health",
        bool,
        True,
        "Answer /health/* on the proxy port (origin-form requests addressed to the proxy); "
        "off: 404 there.",
    ),
    Option(
        "metrics_proxy_port_metrics",
        bool,
        True,
        "Answer the metrics path on the proxy port (origin-form requests addressed to the "
        "proxy); off: 404 there.",
    ),
    Option(
        "metrics_proxy_port_admin",
        bool,
        True,
        "Answer /admin/* on the proxy port (origin-form requests addressed to the proxy; "
        "still needs admin_token); off: 404 there.",
    ),
    Option(
        "metrics_worker_label",
        bool,
        False,
        "With several workers: keep each worker's series apart on the instance's metrics "
        "path, with a worker label, instead of the instance's totals.",
    ),
)

_ALLOW_GET = {"Allow": "GET, HEAD"}
# Who sent a proxy-port admin request, for the app's logs (`request.remote`). Only the app that
# serves the socket pair trusts it; a client's own copy is dropped before the hand-over.
CLIENT_HEADER = b"X-Waypost-Proxy-Port-Client"
# Not handed to the app: this hop's framing, which `app_request` writes itself.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
     b"upgrade", b"content-length", b"expect", CLIENT_HEADER.lower()}
)  # fmt: skip
# How long the app may take over one proxy-port admin request (a reload validates a profile).
APP_TIMEOUT = 60.0
_UNANSWERED = "The request could not be answered by the management app."
# flow.metadata key: an admin request on the proxy port (or, in a supervised worker, a metrics
# request) waits for `request` to be answered.
_PENDING = "waypost_management_pending"

# --- pure decisions --------------------------------------------------------------------------


def parse_bind_host(value: str) -> str:
    """The IP literal to bind for `metrics_host` ("localhost" means 127.0.0.1); no DNS."""
    value = value.strip()
    if value == "localhost":
        return "127.0.0.1"
    return str(ipaddress.ip_address(value.strip("[]")))


def check_metrics_path(path: str) -> str:
    if not path.startswith("/") or any(c in path for c in "?# \t"):
        raise ValueError("must be an absolute path such as /metrics")
    if path.startswith(RESERVED_PREFIXES) or path in ("/health", "/admin"):
        raise ValueError("must not be under /health or /admin")
    return path


def endpoint_kind(path: str, metrics_path: str) -> str | None:
    """Which of the proxy port's own endpoint groups `path` belongs to, if any."""
    if path.startswith(HEALTH_PREFIX):
        return "health"
    if path == metrics_path:
        return "metrics"
    if path.startswith("/admin/"):
        return "admin"
    return None


def without_body(resp: http.Response) -> None:
    """Turn a GET answer into the HEAD answer: same status and headers, no body."""
    length = resp.headers.get("content-length")
    resp.content = b""
    if length is not None:
        resp.headers["content-length"] = length


def app_request(req: http.Request, client: str) -> bytes:
    """`req` as an HTTP/1.0 request for the management app: one request per connection, and
    an answer that ends when the connection closes (never chunked)."""
    lines = [b"%s %s HTTP/1.0" % (req.data.method, req.data.path)]
    lines += [b"%s: %s" % (k, v) for k, v in req.headers.fields if k.lower() not in _HOP_BY_HOP]
    body = req.raw_content or b""
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"%s: %s" % (CLIENT_HEADER, client.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def app_answer(raw: bytes, http_version: str) -> http.Response:
    """The app's answer as mitmproxy's response to the client (ValueError if malformed)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"incomplete answer from the management app ({len(raw)} bytes)")
    resp = http1.read_response_head(head.split(b"\r\n"))
    for name in ("connection", "keep-alive", "transfer-encoding"):
        resp.headers.pop(name, None)
    resp.http_version = http_version
    resp.data.content = body  # Content-Length stays as the app sent it (HEAD: no body)
    return resp


def readiness(
    listen_addrs: Iterable[tuple[Any, ...]], config: tuple[bool, str | None] | None
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Ready when the proxy has listeners and, if a config addon exists, its config is loaded.

    A failed reload that kept the previous config (loaded, with an error) stays ready: the
    proxy still serves with a valid config; the error is reported in the check.
    """
    addrs = [f"{a[0]}:{a[1]}" for a in listen_addrs]
    checks: dict[str, dict[str, Any]] = {"listeners": {"ok": bool(addrs), "addresses": addrs}}
    if config is not None:
        loaded, error = config
        checks["config"] = {"ok": loaded, "loaded": loaded, "error": error}
    return all(c["ok"] for c in checks.values()), checks


def startup(
    running: bool, listen_addrs: Iterable[tuple[Any, ...]]
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Startup is complete once the running hook has finished and the proxy listens."""
    _, checks = readiness(listen_addrs, None)
    checks["running"] = {"ok": running}
    return all(c["ok"] for c in checks.values()), checks


# --- the addon -------------------------------------------------------------------------------


@web.middleware
async def _client_from_header(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The proxy-port app's requests come over a socket pair: their client is in a header."""
    client = request.headers.get(CLIENT_HEADER.decode(), "-")
    return await handler(request.clone(remote=client))


async def _exchange(
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes, flow: http.HTTPFlow
) -> http.Response:
    """Send an `app_request` and read the answer, which ends when the app closes."""
    reader, writer = stream
    try:
        writer.write(data)
        raw = await asyncio.wait_for(reader.read(), APP_TIMEOUT)
    finally:
        writer.close()
    return app_answer(raw, flow.request.http_version)


def json_response(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload), content_type="application/json")


class _Listener:
    """One bound socket and the aiohttp server started on it."""

    def __init__(self, sock: socket.socket, app: web.Application) -> None:
        self.sock = sock
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.server: asyncio.Server | None = None
        self.runner: web.AppRunner | None = None
        self.stopped = False
        self.creating = False
        self.task = spawn(self._serve(app))

    async def _serve(self, app: web.Application) -> None:
        runner = self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        if self.stopped:
            await runner.cleanup()
            return
        self.creating = True
        server = await asyncio.get_running_loop().create_server(
            runner.server,  # type: ignore[arg-type]
            sock=self.sock,
        )
        self.creating = False
        self.server = server
        if self.stopped:  # stop() came while the server was being created
            server.close()
            await runner.cleanup()

    def stop(self) -> None:
        """Release the port now (sync); the connection cleanup runs as a task."""
        self.stopped = True
        if self.server is not None:
            self.server.close()
            if self.runner is not None:
                spawn(self.runner.cleanup())
        elif not self.creating:
            # Nothing is registered with the loop yet: closing the socket frees the port.
            self.task.cancel()
            self.sock.close()
            if self.runner is not None:
                spawn(self.runner.cleanup())


class Management:
    def __init__(self) -> None:
        self.listen_addrs: list[tuple[str, int]] = []
        self.is_running = False
        self._listener: _Listener | None = None
        self._bind_host = "127.0.0.1"
        self._spec: tuple[str, int] = ("", -1)  # (host, metrics_port) the listener was made for
        self._proxy_app: asyncio.Task[web.AppRunner] | None = None
        self._metrics_path = "/metrics"
        # Every request on the proxy port is tested against these first: one startswith.
        self._own_prefixes: tuple[str, ...] = (*RESERVED_PREFIXES, self._metrics_path)
        self._identity = Identity()
        self._instance: tuple[str, int] | None = None  # the instance app, in a worker

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)
        self._identity = identity()
        url = urlsplit(self._identity.instance_management)
        self._instance = (url.hostname, url.port) if url.hostname and url.port else None

    def configure(self, updated: set[str]) -> None:
        if "metrics_host" in updated:
            try:
                self._bind_host = parse_bind_host(ctx.options.metrics_host)
            except ValueError as e:
                raise exceptions.OptionsError(
                    f"metrics_host: {ctx.options.metrics_host!r} is not an IP address "
                    "(use e.g. 127.0.0.1, 0.0.0.0 or ::1)"
                ) from e
        if "metrics_port" in updated and not 0 <= ctx.options.metrics_port <= 65535:
            raise exceptions.OptionsError(
                f"metrics_port: {ctx.options.metrics_port} is not a TCP port (0-65535; 0 = any)"
            )
        if "metrics_path" in updated:
            try:
                check_metrics_path(ctx.options.metrics_path)
            except ValueError as e:
                raise exceptions.OptionsError(
                    f"metrics_path: {ctx.options.metrics_path!r} {e}"
                ) from e
            self._metrics_path = ctx.options.metrics_path
            self._own_prefixes = (*RESERVED_PREFIXES, self._metrics_path)
            serve_paths("management", self._own_prefixes)
        if (
            self.is_running
            and self._identity.management_fd is None
            and updated & {"metrics_enabled", "metrics_host", "metrics_port"}
        ):
            self._rebind()

    def running(self) -> None:
        self.is_running = True
        fd = self._identity.management_fd
        if fd is not None:
            # A duplicate: closing ours (done, a script reload) leaves the supervisor's socket
            # open for the next instance of this addon.
            self._start(socket.socket(fileno=os.dup(fd)))
        elif ctx.options.metrics_enabled:
            try:
                self._start(bind(self._bind_host, ctx.options.metrics_port))
            except OSError as e:
                # An ERROR during startup makes mitmdump exit 1 (errorcheck addon).
                log.error("%s", self._bind_failure(e))

    def done(self) -> None:
        self.is_running = False
        self._stop()
        self._stop_proxy_port_app()
        serve_paths("management", ())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        if not req.path.startswith(self._own_prefixes):
            return
        path = req.path.partition("?")[0]
        kind = endpoint_kind(path, self._metrics_path)
        if kind is None:
            return
        if not meant_for_proxy(flow):
            return
        record(flow)["local"] = kind  # not proxied traffic: metrics skip it
        if not getattr(ctx.options, f"metrics_proxy_port_{kind}"):
            # Never proxied to ourselves either: that would only loop back here.
            flow.response = errors.make(
                "NOT_FOUND", f"{path} is not served on the proxy port.", flow, status=404
            )
            return
        if kind == "admin" or (kind == "metrics" and self._instance is not None):
            # The app may read the body: mitmproxy buffers it before `request` (a streamed
            # body and a set response cannot go together). The stand-in answer makes every
            # later addon leave the flow alone; `request` replaces it.
            req.stream = False
            flow.metadata[_PENDING] = True
            flow.response = errors.make("INTERNAL_ERROR", _UNANSWERED, rid=errors.request_id(flow))
            return
        if req.method not in ("GET", "HEAD"):
            flow.response = errors.make(
                "METHOD_NOT_ALLOWED", "Use GET.", flow, status=405, headers=_ALLOW_GET
            )
            return
        if kind == "metrics":
            resp = http.Response.make(
                200, generate_latest(REGISTRY), {"Content-Type": CONTENT_TYPE_LATEST}
            )
        else:
            status, payload = self.health(path)
            if status == 404:
                resp = errors.make("NOT_FOUND", "Unknown health endpoint.", flow, status=404)
            else:
                resp = http.Response.make(
                    status,
                    json.dumps(payload).encode(),
                    {"Content-Type": "application/json", "Cache-Control": "no-store"},
                )
                resp.reason = "OK" if status == 200 else "Service Unavailable"
        if req.method == "HEAD":
            without_body(resp)
        flow.response = resp

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Sync, returning an awaitable only for the pending ones (admin, relayed metrics):
        # mitmproxy awaits it, and every other flow pays no coroutine.
        if not flow.metadata.pop(_PENDING, False) or flow.error or not flow.live:
            return None
        return self._answer_pending(flow)

    async def _answer_pending(self, flow: http.HTTPFlow) -> None:
        try:
            if self._instance is not None:
                flow.response = await self._from_instance(flow, *self._instance)
            else:
                flow.response = await self._through_app(flow)
        except (OSError, ValueError, TimeoutError) as e:
            log.error("%s on the proxy port failed: %s", flow.request.path, e)
            flow.response = errors.make("INTERNAL_ERROR", _UNANSWERED, flow)

    # --- endpoints -------------------------------------------------------------------------

    def health(self, path: str) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of a /health/* endpoint (404 for unknown ones)."""
        now = errors.timestamp()
        if path == "/health/liveness":
            return 200, {"status": "ok", "timestamp": now}
        ps = ctx.master.addons.get("proxyserver")
        addrs = ps.listen_addrs() if ps else []
        if path == "/health/readiness":
            cfg = ctx.master.addons.get("config")
            config = None
            if cfg is not None:
                config = (bool(getattr(cfg, "loaded", False)), getattr(cfg, "reload_error", None))
            ok, checks = readiness(addrs, config)
            for name, value, check_ok in self._readiness_checks():
                checks[name] = value
                ok = ok and bool(check_ok)
            status = "ready" if ok else "not_ready"
        elif path == "/health/startup":
            ok, checks = startup(self.is_running, addrs)
            status = "started" if ok else "starting"
        else:
            return 404, {}
        return (200 if ok else 503), {"status": status, "timestamp": now, "checks": checks}

    async def _health(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", headers=_ALLOW_GET)
        status, payload = self.health(request.path)
        if status == 404:
            return errors.web_error("NOT_FOUND", "Unknown health endpoint.")
        return json_response(status, payload)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == ctx.options.metrics_path:
            return await self._metrics(request)
        handler = self._extension_route(request.path)
        if handler is None:
            return errors.web_error("NOT_FOUND", "Not found.")
        if request.path.startswith("/admin/"):
            refusal = self._admin_refusal(request)
            if refusal is not None:
                return refusal
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return errors.web_error("METHOD_NOT_ALLOWED", "Use GET.", headers=_ALLOW_GET)
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        """The error answer for an /admin/* request without the right token, else None."""
        token = ctx.options.admin_token
        if not token:
            return errors.web_error("NOT_FOUND", "The admin API is off (admin_token is not set).")
        auth = bearer_status(request.headers.get("Authorization"), token)
        if auth == 401:
            return errors.web_error(
                "UNAUTHORIZED",
                "Missing or malformed bearer token.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if auth == 403:
            log.warning(
                "admin %s refused: wrong bearer token from %s", request.path, request.remote
            )
            return errors.web_error("ACCESS_DENIED", "Wrong bearer token.")
        return None

    def _extension_route(
        self, path: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]] | None:
        for addon in list(ctx.master.addons.lookup.values()):
            routes = getattr(addon, "management_routes", None)
            if routes is None or addon is self:
                continue
            table = routes()
            handler = table.get(path) or table.get(path.rpartition("/")[0] + "/*")
            if handler is not None:
                return handler
        return None

    def _readiness_checks(self) -> list[tuple[str, Any, bool]]:
        # Shared state is no addon's: "degraded" while Redis is away, never a failed probe.
        out = [state.STATE.readiness()] if state.STATE.shared else []
        for addon in list(ctx.master.addons.lookup.values()):
            check = getattr(addon, "readiness_check", None)
            if check is not None and addon is not self:
                out.append(check())
        return out

    async def _reload(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return errors.web_error("METHOD_NOT_ALLOWED", "Use POST.", headers={"Allow": "POST"})
        refusal = self._admin_refusal(request)
        if refusal is not None:
            return refusal
        cfg = ctx.master.addons.get("config")
        reload: Callable[[], Awaitable[tuple[bool, str]]] | None
        reload = getattr(cfg, "reload_async", None) if cfg is not None else None
        if reload is None:
            return errors.web_error("NOT_FOUND", "No config addon is loaded; nothing to reload.")
        ok, message = await reload()
        if not ok:
            log.warning("admin reload failed: %s", message)
            return errors.web_error("CONFIG_INVALID", message)
        log.info("admin reload done: %s", message)
        return json_response(200, {"reloaded": True, "message": message})

    def _own_admin(self, method: str, handler: admin_routes.Handler) -> admin_routes.Handler:
        """`handler` behind the method and token checks (a GET route answers HEAD too)."""
        allowed = ("GET", "HEAD") if method == "GET" else (method,)
        allow = {"Allow": ", ".join(allowed)}

        async def checked(request: web.Request) -> web.Response:
            if request.method not in allowed:
                return errors.web_error("METHOD_NOT_ALLOWED", f"Use {method}.", headers=allow)
            refusal = self._admin_refusal(request)
            if refusal is not None:
                return refusal
            return await handler(request)

        return checked

    @command.command("waypost.explain")
    def explain_command(self, method: str, url: str, client_ip: str = "127.0.0.1") -> str:
        """What every Waypost policy and the router would decide for METHOD URL (nothing is
        sent, no state changes), as POST /admin/explain answers."""
        try:
            answer = admin_routes.explain_answer(
                {"method": method, "url": url, "client_ip": client_ip}
            )
        except ValueError as e:  # pydantic's ValidationError is one
            raise exceptions.CommandError(str(e)) from None
        return json.dumps(answer, indent=2)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            return errors.web_error(
                errors.code_of(e.status)
                or ("INTERNAL_ERROR" if e.status >= 500 else "BAD_REQUEST"),
                e.reason,
                status=e.status,
            )
        except Exception:
            log.exception("management endpoint %s failed", request.path)
            return errors.web_error(
                "INTERNAL_ERROR", "The management app could not process this request."
            )

    def _make_app(self, proxy_port: bool = False) -> web.Application:
        middlewares = [self._errors, _client_from_header] if proxy_port else [self._errors]
        app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
        for name in ("liveness", "readiness", "startup"):
            app.router.add_route("*", f"/health/{name}", self._health)
        app.router.add_route("*", "/admin/reload", self._reload)
        for path, (method, handler) in admin_routes.ROUTES.items():
            app.router.add_route("*", path, self._own_admin(method, handler))
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    # --- admin requests on the proxy port --------------------------------------------------

    async def _proxy_port_runner(self) -> web.AppRunner:
        """The app that answers the proxy port's admin requests (made on first use)."""
        task = self._proxy_app
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            self._proxy_app = spawn(self._setup_proxy_port_app())
        return await asyncio.shield(self._proxy_app)

    async def _setup_proxy_port_app(self) -> web.AppRunner:
        runner = web.AppRunner(
            self._make_app(proxy_port=True), access_log=None, handle_signals=False
        )
        await runner.setup()
        return runner

    async def _through_app(self, flow: http.HTTPFlow) -> http.Response:
        """The management app's answer to `flow`'s request, handed over a socket pair."""
        runner = await self._proxy_port_runner()
        data = app_request(flow.request, net.client_ip(flow) or "-")
        ours, theirs = socket.socketpair()
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                runner.server,  # type: ignore[arg-type]
                theirs,
            )
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return await _exchange(await asyncio.open_connection(sock=ours), data, flow)

    async def _from_instance(self, flow: http.HTTPFlow, host: str, port: int) -> http.Response:
        """The instance app's answer to `flow`'s request: it speaks for every worker."""
        data = app_request(flow.request, net.client_ip(flow) or "-")
        return await _exchange(await asyncio.open_connection(host, port), data, flow)

    def _stop_proxy_port_app(self) -> None:
        task, self._proxy_app = self._proxy_app, None
        if task is None:
            return
        if task.done() and not task.cancelled() and task.exception() is None:
            spawn(task.result().cleanup())
        else:
            task.cancel()

    # --- listener lifecycle ----------------------------------------------------------------

    def _bind_failure(self, e: OSError) -> str:
        where = f"{self._bind_host}:{ctx.options.metrics_port}"
        if e.errno == errno.EADDRINUSE:
            why = "the address is already in use"
        else:
            why = e.strerror or str(e)
        return (
            f"management app cannot listen on {where}: {why} (set metrics_port to a free port, "
            "metrics_port=0 for any free port, or metrics_enabled=false)"
        )

    def _start(self, sock: socket.socket) -> None:
        # An aiohttp Application runs once (it freezes), so every listener gets a new one.
        self._listener = _Listener(sock, self._make_app())
        self._spec = (self._bind_host, ctx.options.metrics_port)
        host, port = self._listener.addr
        self.listen_addrs = [(host, port)]
        shown = f"[{host}]" if ":" in host else host
        inherited = self._identity.management_fd is not None
        whose = " (this worker's, for the instance app)" if inherited else ""
        log.info("management listening at http://%s:%d%s", shown, port, whose)

    def _stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self.listen_addrs = []

    def _rebind(self) -> None:
        old = self._listener
        if not ctx.options.metrics_enabled:
            self._stop()
            return
        want = (self._bind_host, ctx.options.metrics_port)
        if old is not None and want == self._spec:
            return  # e.g. a rollback to the values we listen with
        try:
            sock = bind(*want)
        except OSError as e:
            if old is None or old.addr[1] != want[1]:
                raise exceptions.OptionsError(self._bind_failure(e)) from e
            # Same port on another address of ours: free it first.
            self._stop()
            try:
                sock = bind(*want)
            except OSError as e2:
                raise exceptions.OptionsError(self._bind_failure(e2)) from e2
        self._stop()
        self._start(sock)


addons = [Management()]
