"""The management app: health probes, Prometheus metrics and admin actions.

An aiohttp app inside mitmproxy's event loop on its own listener (`metrics_host`:`metrics_port`):

    GET  /health/liveness    200 while the event loop runs
    GET  /health/readiness   200 when the proxy listeners are up and the config (if the config
                             addon is loaded) is loaded, else 503
    GET  /health/startup     200 once startup finished (running hook done, listeners up), else 503
    GET  <metrics_path>      Prometheus text exposition of `addons.metrics.REGISTRY`
    POST /admin/reload       reload the config addon; `Authorization: Bearer <admin_token>`

Other addons extend the app without importing it, by duck typing (any loaded addon, found on
each request, so script reloads and late loads just work):

    management_routes() -> {path: async handler(aiohttp.web.Request) -> StreamResponse}
        Exact paths served by that addon. Paths under /admin/ get the admin bearer-token check
        (and 404 while admin_token is empty) before the handler runs; any other path (e.g.
        /cli/execute) does its own authentication.
    readiness_check() -> (name, {"ok": bool, ...})
        One more entry in /health/readiness's `checks`; not ok makes readiness answer 503.

Errors use the JSON shape of `addons/errors.py`. With `admin_token` empty, `/admin/*` answers
404 (the admin API is off). The proxy port also answers origin-form `GET /health/*` requests
addressed to the proxy itself (Kubernetes probes), in `requestheaders`; `/metrics` and
`/admin/*` are never served there.

Hooks: load, configure, running, done (all sync: the listener is bound synchronously, the
server runs as a task), requestheaders.
Options: metrics_enabled, metrics_host, metrics_port, metrics_path, admin_token.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from mitmproxy import ctx, exceptions, http
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from addons import errors
from addons.kernel.endpoints import addressed_to_proxy, bearer_status, bind
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
        "Path of the Prometheus metrics endpoint on the management listener (never served "
        "on the proxy port). Must start with / and not be under /health or /admin.",
    ),
    Option(
        "admin_token",
        str,
        "",
        "Bearer token required by POST /admin/* on the management listener "
        "(Authorization: Bearer <token>). Empty turns the admin API off: /admin/* answers "
        "404.",
    ),
)

_ALLOW_GET = {"Allow": "GET, HEAD"}

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

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

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
        if self.is_running and updated & {"metrics_enabled", "metrics_host", "metrics_port"}:
            self._rebind()

    def running(self) -> None:
        self.is_running = True
        if ctx.options.metrics_enabled:
            try:
                self._start(bind(self._bind_host, ctx.options.metrics_port))
            except OSError as e:
                # An ERROR during startup makes mitmdump exit 1 (errorcheck addon).
                log.error("%s", self._bind_failure(e))

    def done(self) -> None:
        self.is_running = False
        self._stop()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        path = req.path
        if not path.startswith(HEALTH_PREFIX) or req.method != "GET":
            return
        ps = ctx.master.addons.get("proxyserver")
        addrs = ps.listen_addrs() if ps else []
        if not addressed_to_proxy(req.host, req.port, flow.client_conn.sockname, addrs):
            return
        record(flow)["local"] = "health"  # not proxied traffic: metrics skip it
        status, payload = self.health(path.partition("?")[0])
        if status == 404:
            flow.response = errors.make("NOT_FOUND", "Unknown health endpoint.", flow, status=404)
            return
        flow.response = http.Response.make(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
        )
        flow.response.reason = "OK" if status == 200 else "Service Unavailable"

    # --- endpoints -------------------------------------------------------------------------

    def health(self, path: str) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of a /health/* endpoint (404 for unknown ones)."""
        now = errors.timestamp()
        if path == "/health/liveness":
            return 200, {"status": "healthy", "timestamp": now}
        ps = ctx.master.addons.get("proxyserver")
        addrs = ps.listen_addrs() if ps else []
        if path == "/health/readiness":
            cfg = ctx.master.addons.get("config")
            config = None
            if cfg is not None:
                config = (bool(getattr(cfg, "loaded", False)), getattr(cfg, "reload_error", None))
            ok, checks = readiness(addrs, config)
            for name, check in self._readiness_checks():
                checks[name] = check
                ok = ok and bool(check.get("ok"))
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
            handler = routes().get(path)
            if handler is not None:
                return handler
        return None

    def _readiness_checks(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
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
        reload: Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]] | None
        reload = getattr(cfg, "reload", None) if cfg is not None else None
        if reload is None:
            return errors.web_error("NOT_FOUND", "No config addon is loaded; nothing to reload.")
        result = reload()
        if isinstance(result, Awaitable):
            result = await result
        ok, message = result
        if not ok:
            log.warning("admin reload failed: %s", message)
            return errors.web_error("CONFIG_INVALID", message)
        log.info("admin reload done: %s", message)
        return json_response(200, {"reloaded": True, "message": message})

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

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        for name in ("liveness", "readiness", "startup"):
            app.router.add_route("*", f"/health/{name}", self._health)
        app.router.add_route("*", "/admin/reload", self._reload)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

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
        log.info("management listening at http://%s:%d", shown, port)

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
