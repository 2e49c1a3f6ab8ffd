"""The CLI addon: its hooks, and where `POST /cli/execute` is answered.

- the management port: `addons/management.py` finds `management_routes()` by duck typing;
- the proxy port: an origin-form `POST /cli/execute` addressed to the proxy itself, and the
  same path on reverse listeners. `requestheaders` reroutes such a flow to the CLI's own
  loopback listener (`clirun.listener`) with a per-process secret header, and marks it
  `record(flow)["local"] = "cli"`, which Egress lets through to exactly that listener.

Hooks:
- load: declares the `cli_` options (`clirun.options.OPTIONS`) and `forwarding_trusted_proxies`.
- configure: parses them into the endpoint's settings; opens or closes the listener.
- running / done (sync: the listener is bound synchronously): the listener; done aborts
  whatever still runs.
- requestheaders: the reroute, with request streaming on (the body is the process's stdin);
  the client it names is `kernel.net.client_ip` (behind trusted proxies, the forwarded one).
- responseheaders: response streaming on for rerouted flows.
- explain (POST /admin/explain): whether a request would be taken by the CLI endpoint.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs

from addons import errors
from addons.clirun import options
from addons.clirun.endpoint import (
    CLIENT_HEADER,
    INTERNAL_HEADER,
    PATH,
    REQUEST_ID_HEADER,
    Endpoint,
)
from addons.clirun.listener import Listener, serve_loopback
from addons.clirun.plan import Settings
from addons.clirun.stats import STATS
from addons.kernel import net
from addons.kernel.endpoints import meant_for_proxy, serve_paths
from addons.kernel.options import declare
from addons.kernel.record import record

log = logging.getLogger("waypost.cli")


class Cli:
    def __init__(self) -> None:
        self._secret = secrets.token_urlsafe(32)
        self.endpoint = Endpoint(self._secret)
        self.listen_addrs: list[tuple[str, int]] = []  # the proxy-port reroute target
        self._listener: Listener | None = None
        self._is_running = False

    @property
    def settings(self) -> Settings:
        return self.endpoint.settings

    def load(self, loader: Any) -> None:
        declare(loader, options.OPTIONS)
        net.load(loader)  # the client named in the audit and the log honours trusted proxies

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        if not any(k.startswith("cli_") for k in updated):
            return
        s = options.settings_from(ctx.options)
        options.log_warnings(s)
        self.endpoint.settings = s
        STATS.limit = s.max_concurrent
        if self._is_running:
            self._sync_listener()

    def running(self) -> None:
        self._is_running = True
        self._sync_listener()

    def done(self) -> None:
        self._is_running = False
        self.endpoint.abort_all()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self.listen_addrs = []
        serve_paths("cli", ())

    def _sync_listener(self) -> None:
        if self.settings.active and self._listener is None:
            self._listener = serve_loopback(PATH, self.endpoint.internal)
            self.listen_addrs = [self._listener.addr]
            serve_paths("cli", (PATH,))
            log.info("cli listening at %s:%d (proxy-port requests are rerouted here)",
                     *self._listener.addr)  # fmt: skip
        elif not self.settings.active and self._listener is not None:
            self._listener.stop()
            self._listener = None
            self.listen_addrs = []
            serve_paths("cli", ())

    def management_routes(
        self,
    ) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        return {PATH: self.endpoint.direct} if self.settings.active else {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        if req.path.partition("?")[0] != PATH or not self.listen_addrs:
            return
        if not isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            if not meant_for_proxy(flow):
                return
        meta = record(flow)
        meta["local"] = "cli"
        meta["backend"] = "cli"
        req.headers[INTERNAL_HEADER] = self._secret
        req.headers[CLIENT_HEADER] = net.client_ip(flow) or "-"
        req.headers[REQUEST_ID_HEADER] = errors.request_id(flow)
        req.scheme = "http"
        req.host, req.port = self.listen_addrs[0]
        # The body is the process's stdin: hand it over as it arrives.
        req.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and record(flow).get("local") == "cli":
            flow.response.stream = True

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any] | None:
        """POST /admin/explain: a request the CLI endpoint would take (and run, if its token
        and command pass); None for any other."""
        req = flow.request
        if req.path.partition("?")[0] != PATH or not self.listen_addrs:
            return None
        if not isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            if not meant_for_proxy(flow):
                return None
        return {"addon": "cli", "decision": "cli", "rule": PATH, "backend": "cli"}
