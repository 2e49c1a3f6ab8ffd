"""`POST /cli/execute`: who may call it, what is refused, and one execution from head to log line.

- `Endpoint.direct`: the management port's handler (the client is the peer).
- `Endpoint.internal`: the loopback listener's handler; requests must carry the per-process
  secret header that only the proxy-port reroute adds (else 404), and name the client.
- `Endpoint.execute`: bearer token, method, media type, the plan, the concurrency cap; then the
  process runs (in a `cli.execute` span when traced: `kernel.spans`), its output streams, and
  once its group is gone it is counted and logged once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web

from addons import errors, policy
from addons.clirun import stream
from addons.clirun.plan import Plan, Refusal, Settings
from addons.clirun.runner import Execution
from addons.clirun.stats import STATS
from addons.kernel import spans
from addons.kernel.endpoints import bearer_status
from addons.kernel.options import spawn

log = logging.getLogger("waypost.cli")

PATH = "/cli/execute"
INTERNAL_HEADER = "X-Waypost-Cli-Internal"
CLIENT_HEADER = "X-Waypost-Cli-Client"
REQUEST_ID_HEADER = "X-Waypost-Cli-Request-Id"


def _stream_headers(content_type: str, rid: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Request-ID": rid,
    }


def _log_execution(ex: Execution, record: dict[str, Any], client: str, rid: str) -> None:
    fields = {
        "request_id": rid,
        "client_ip": client,
        "command": ex.plan.path,
        "args": list(ex.plan.argv),
        "env_names": sorted(k for k in ex.plan.env if k != "PATH"),  # never the values
        "stdin_bytes": ex.stdin_bytes,  # never the content
        "stdout_bytes": ex.bytes_out["stdout"],
        "stderr_bytes": ex.bytes_out["stderr"],
        "stream": ex.plan.stream,
        "pid": ex.pid,
        **{k: v for k, v in record.items() if k != "type"},
    }
    log.info("cli execution", extra={"waypost": fields})


class Endpoint:
    """The handlers, the settings they apply, and the executions running now."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.settings = Settings()
        self.in_flight = 0
        self.executions: set[Execution] = set()

    def abort_all(self) -> None:
        """The proxy is going away: nothing may outlive it."""
        for ex in list(self.executions):
            ex.abort("disconnected")

    async def internal(self, request: web.Request) -> web.StreamResponse:
        secret = request.headers.get(INTERNAL_HEADER, "")
        if not hmac.compare_digest(secret.encode("utf-8", "surrogateescape"), self.secret.encode()):
            return errors.web_error("NOT_FOUND", "Not found.")
        client = request.headers.get(CLIENT_HEADER, "-")
        rid = request.headers.get(REQUEST_ID_HEADER) or errors.new_request_id()
        return await self.execute(request, client, rid)

    async def direct(self, request: web.Request) -> web.StreamResponse:
        rid = errors.incoming_request_id(request.headers.get("X-Request-ID"))
        return await self.execute(request, request.remote or "-", rid)

    async def execute(self, request: web.Request, client: str, rid: str) -> web.StreamResponse:
        s = self.settings
        if not s.active:
            return errors.web_error("NOT_FOUND", "The CLI endpoint is off.", rid)
        auth = bearer_status(request.headers.get("Authorization"), s.token)
        if auth != 200:
            STATS.count("_none", "unauthorized")
            if auth == 401:
                return errors.web_error("UNAUTHORIZED", "Missing or malformed bearer token.", rid,
                                        {"WWW-Authenticate": "Bearer"})  # fmt: skip
            policy.decide("cli", "token", client, decision="block", request_id=rid)
            return errors.web_error("ACCESS_DENIED", "Wrong bearer token.", rid)
        if request.method != "POST":
            return errors.web_error("METHOD_NOT_ALLOWED", "Use POST.", rid, {"Allow": "POST"})
        if request.content_type != "application/json":
            return errors.web_error(
                "UNSUPPORTED_MEDIA_TYPE", "The body must be application/json.", rid
            )
        try:
            plan, rest = await stream.read_plan(request, s)
        except Refusal as r:
            STATS.count(r.command, "refused")
            if r.code == "COMMAND_NOT_ALLOWED":
                policy.decide("cli", r.rule, client, decision="block", request_id=rid,
                              command=r.command)  # fmt: skip
            return errors.web_error(r.code, r.message, rid)
        if self.in_flight >= s.max_concurrent:
            STATS.count(plan.path, "rate_limited")
            return errors.web_error("RATE_LIMITED",
                                    f"{s.max_concurrent} commands are running; retry later.",
                                    rid, {"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        STATS.in_flight += 1
        # _run releases the slot once the process group is gone.
        attributes = {"waypost.cli.command": plan.path, "waypost.request_id": rid}
        with spans.remote("cli.execute", request.headers, attributes):
            return await self._run(request, plan, rest, s, client, rid)

    async def _run(
        self,
        request: web.Request,
        plan: Plan,
        rest: bytearray,
        s: Settings,
        client: str,
        rid: str,
    ) -> web.StreamResponse:
        ex = Execution(plan, s)
        kind = "application/x-ndjson" if plan.stream else "application/json"
        resp = web.StreamResponse(headers=_stream_headers(kind, rid))
        resp.enable_chunked_encoding()
        start = asyncio.ensure_future(ex.start())
        runner: asyncio.Future[None] | None = None
        feeder: asyncio.Future[None] | None = None
        try:
            # The head leaves at once (aiohttp sends a StreamResponse's head in prepare): the
            # client knows it was accepted while the process is being spawned.
            await resp.prepare(request)
            try:
                # Shielded: if the client leaves meanwhile, _finish still gets the pid to kill.
                await asyncio.shield(start)
            except OSError as e:
                ex.fail(f"the process could not be started: {e.strerror or e}")
            else:
                self.executions.add(ex)
                runner = asyncio.ensure_future(ex.run())
                feeder = asyncio.ensure_future(stream.feed(ex, request, rest))
            if plan.stream:
                await stream.relay(request, ex, resp)
            else:
                await stream.collect(request, ex, resp)
            await resp.write_eof()
        except ConnectionError:
            ex.abort("disconnected")  # a write failed: the client is gone
        finally:
            if not ex.done.is_set():
                ex.abort("disconnected")  # also when aiohttp cancelled us on disconnect
            if feeder is not None:
                feeder.cancel()
            spawn(self._finish(ex, start, runner, client, rid))
        return resp

    async def _finish(
        self,
        ex: Execution,
        start: asyncio.Future[None],
        runner: asyncio.Future[None] | None,
        client: str,
        rid: str,
    ) -> None:
        """Once the process group is gone: free the slot, count, and log one event."""
        try:
            try:
                await start
            except OSError as e:
                ex.fail(f"the process could not be started: {e.strerror or e}")
            if runner is None and ex.proc is not None:
                # The client left while the process was being spawned: kill it now that the
                # pid is known, and reap it.
                ex.abort("disconnected")
                self.executions.add(ex)
                runner = asyncio.ensure_future(ex.run())
            if runner is not None:
                await runner
        except Exception:
            log.exception("cli execution of %s failed", ex.plan.path)
        finally:
            self.executions.discard(ex)
            self.in_flight -= 1
            STATS.in_flight -= 1
        record = ex.exit_record()
        STATS.count(ex.plan.path, record["outcome"])
        _log_execution(ex, record, client, rid)
