from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons import management
from addons.kernel.record import record
from addons.management import Management

LISTEN = [("127.0.0.1", 8080)]


# --- pure functions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addrs,config,ready",
    [
        (LISTEN, None, True),
        ([], None, False),
        (LISTEN, (True, None), True),
        (LISTEN, (True, "reload failed: bad yaml"), True),  # old config still serves
        (LISTEN, (False, "bad yaml"), False),
        ([], (True, None), False),
    ],
)
def test_readiness(addrs: list, config: tuple | None, ready: bool) -> None:
    ok, checks = management.readiness(addrs, config)
    assert ok is ready
    assert checks["listeners"]["ok"] is bool(addrs)
    assert ("config" in checks) is (config is not None)
    if config is not None:
        assert checks["config"] == {"ok": config[0], "loaded": config[0], "error": config[1]}


@pytest.mark.parametrize(
    "running,addrs,ok", [(True, LISTEN, True), (False, LISTEN, False), (True, [], False)]
)
def test_startup(running: bool, addrs: list, ok: bool) -> None:
    assert management.startup(running, addrs)[0] is ok


@pytest.mark.parametrize(
    "value,result",
    [("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"),
     ("::1", "::1"), ("[::]", "::")],
)  # fmt: skip
def test_parse_bind_host(value: str, result: str) -> None:
    assert management.parse_bind_host(value) == result


@pytest.mark.parametrize("value", ["", "example.com", "127.0.0.1:9090", "1.2.3"])
def test_parse_bind_host_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        management.parse_bind_host(value)


@pytest.mark.parametrize("path", ["metrics", "/health/metrics", "/admin/m", "/m?x", "/health"])
def test_check_metrics_path_rejects(path: str) -> None:
    with pytest.raises(ValueError):
        management.check_metrics_path(path)


# --- the addon -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"metrics_host": "example.com"}, "metrics_host"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"metrics_path": "metrics"}, "metrics_path"),
        ({"metrics_path": "/health/x"}, "metrics_path"),
    ],
)
def test_configure_rejects(opts: dict, match: str) -> None:
    m = Management()
    with taddons.context(m) as tctx:
        with pytest.raises(exceptions.OptionsError, match=match):
            tctx.configure(m, **opts)


class FakeProxyserver:
    name = "proxyserver"

    def __init__(self, addrs: list) -> None:
        self.addrs = addrs

    def listen_addrs(self) -> list:
        return self.addrs


class FakeConfig:
    name = "config"

    def __init__(self, loaded: bool = True, reload_error: str | None = None) -> None:
        self.loaded, self.reload_error = loaded, reload_error
        self.result: Any = (True, "reloaded profiles/dev.yaml")

    async def reload_async(self) -> Any:
        return self.result


def _health_flow(host: str, port: int, path: str, sockname: tuple = ("127.0.0.1", 8080)) -> Any:
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.path = host, port, path
    f.client_conn.sockname = sockname
    return f


def test_requestheaders_answers_health_on_the_proxy_port() -> None:
    m = Management()
    with taddons.context(m, FakeProxyserver(LISTEN)) as tctx:
        tctx.configure(m, metrics_enabled=False)  # no listener: the proxy port still answers
        m.running()
        assert m.listen_addrs == []
        for path in ("/health/liveness", "/health/readiness", "/health/startup?x=1"):
            f = _health_flow("127.0.0.1", 8080, path)
            m.requestheaders(f)
            assert f.response is not None and f.response.status_code == 200, path
            assert f.response.headers["content-type"] == "application/json"
            assert json.loads(f.response.content)["status"] in ("ok", "ready", "started")
            assert record(f)["local"] == "health"
        unknown = _health_flow("127.0.0.1", 8080, "/health/other")
        m.requestheaders(unknown)
        assert unknown.response.status_code == 404
        assert json.loads(unknown.response.content)["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "host,port,path,method",
    [
        ("example.com", 80, "/health/liveness", "GET"),  # absolute-form: the origin's own path
        ("example.com", 80, "/admin/reload", "POST"),
        ("example.com", 80, "/metrics", "GET"),
        ("127.0.0.1", 8080, "/other", "GET"),
        ("127.0.0.1", 8080, "/admin", "GET"),
        ("127.0.0.1", 5000, "/health/liveness", "GET"),
    ],
)
def test_requestheaders_leaves_other_requests_alone(
    host: str, port: int, path: str, method: str
) -> None:
    m = Management()
    with taddons.context(m, FakeProxyserver(LISTEN)):
        f = _health_flow(host, port, path)
        f.request.method = method
        m.requestheaders(f)
        assert f.response is None


@pytest.mark.parametrize(
    "path,kind",
    [("/health/liveness", "health"), ("/health/x", "health"), ("/metrics", "metrics"),
     ("/admin/reload", "admin"), ("/admin/cache/stats", "admin"), ("/admin", None),
     ("/metricsx", None), ("/", None), ("/cli/execute", None)],
)  # fmt: skip
def test_endpoint_kind(path: str, kind: str | None) -> None:
    assert management.endpoint_kind(path, "/metrics") == kind


def test_app_request_and_answer() -> None:
    f = tflow.tflow()
    f.request.method, f.request.path = "POST", "/admin/reload?x=1"
    f.request.headers["Authorization"] = "Bearer t"
    f.request.headers["Connection"] = "keep-alive"
    f.request.headers["X-Waypost-Proxy-Port-Client"] = "spoofed"
    f.request.content = b"abc"
    raw = management.app_request(f.request, "10.0.0.7")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /admin/reload?x=1 HTTP/1.0" and body == b"abc"
    assert b"Authorization: Bearer t" in lines and b"Content-Length: 3" in lines
    assert b"X-Waypost-Proxy-Port-Client: 10.0.0.7" in lines
    assert not any(b"spoofed" in line or b"keep-alive" in line for line in lines)
    resp = management.app_answer(
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
        "HTTP/1.1",
    )
    assert resp.status_code == 200 and resp.content == b"{}" and resp.http_version == "HTTP/1.1"
    assert "connection" not in resp.headers
    head_only = management.app_answer(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\n", "HTTP/1.1")
    assert head_only.content == b"" and head_only.headers["content-length"] == "9"
    with pytest.raises(ValueError):
        management.app_answer(b"HTTP/1.0 200 OK\r\n", "HTTP/1.1")


class FakeCheck:
    def __init__(self, name: str, value: Any, ok: bool) -> None:
        self.name, self.value, self.ok = f"fake_{name}", value, ok
        self.check_name = name

    def readiness_check(self) -> tuple[str, Any, bool]:
        return self.check_name, self.value, self.ok


@pytest.mark.parametrize("backends_ok", [True, False])
def test_readiness_shows_extension_checks_as_they_give_them(backends_ok: bool) -> None:
    m = Management()
    backends = [{"name": "a", "url": "http://a:80", "status": "healthy", "circuit": "closed"}]
    with taddons.context(
        m, FakeProxyserver(LISTEN), FakeCheck("cache", "ok", True),
        FakeCheck("backends", backends, backends_ok),
    ):  # fmt: skip
        status, body = m.health("/health/readiness")
        assert status == (200 if backends_ok else 503)
        assert body["status"] == ("ready" if backends_ok else "not_ready")
        assert body["checks"]["cache"] == "ok"
        assert body["checks"]["backends"] == backends
        assert body["checks"]["listeners"]["ok"] is True


def test_head_and_methods_on_the_proxy_port() -> None:
    m = Management()
    with taddons.context(m, FakeProxyserver(LISTEN)):
        for path in ("/health/liveness", "/health/readiness", "/metrics", "/health/nope"):
            get, head = _health_flow("127.0.0.1", 8080, path), _health_flow("127.0.0.1", 8080, path)
            head.request.method = "HEAD"
            m.requestheaders(get)
            m.requestheaders(head)
            assert head.response.status_code == get.response.status_code, path
            assert head.response.content == b"", path
            length = int(head.response.headers["content-length"])
            if path == "/metrics":  # the exposition changes between two scrapes
                assert length > 0
            else:
                assert length == len(get.response.content), path
            assert head.response.headers["content-type"] == get.response.headers["content-type"]
        post = _health_flow("127.0.0.1", 8080, "/health/liveness")
        post.request.method = "POST"
        m.requestheaders(post)
        assert post.response.status_code == 405 and post.response.headers["allow"] == "GET, HEAD"


def test_metrics_on_the_proxy_port() -> None:
    m = Management()
    with taddons.context(m, FakeProxyserver(LISTEN)) as tctx:
        f = _health_flow("127.0.0.1", 8080, "/metrics")
        m.requestheaders(f)
        assert f.response.status_code == 200
        assert f.response.headers["content-type"].startswith("text/plain")
        assert record(f)["local"] == "metrics"
        tctx.configure(m, metrics_path="/prom")
        f = _health_flow("127.0.0.1", 8080, "/prom")
        m.requestheaders(f)
        assert f.response.status_code == 200


@pytest.mark.parametrize(
    "option,path,method",
    [("metrics_proxy_port_health", "/health/liveness", "GET"),
     ("metrics_proxy_port_metrics", "/metrics", "GET"),
     ("metrics_proxy_port_admin", "/admin/reload", "POST")],
)  # fmt: skip
def test_switched_off_on_the_proxy_port_is_404(option: str, path: str, method: str) -> None:
    m = Management()
    with taddons.context(m, FakeProxyserver(LISTEN)) as tctx:
        tctx.configure(m, **{option: False})
        f = _health_flow("127.0.0.1", 8080, path)
        f.request.method = method
        m.requestheaders(f)
        assert f.response.status_code == 404
        assert json.loads(f.response.content)["error"]["code"] == "NOT_FOUND"


async def test_admin_on_the_proxy_port_goes_through_the_app() -> None:
    m = Management()
    cfg = FakeConfig()
    with taddons.context(m, FakeProxyserver(LISTEN), cfg) as tctx:
        tctx.configure(m, metrics_enabled=False, admin_token="s3cret")

        async def ask(method: str, path: str, auth: str | None = None) -> Any:
            f = _health_flow("127.0.0.1", 8080, path)
            f.request.method = method
            if auth:
                f.request.headers["Authorization"] = auth
            m.requestheaders(f)
            assert f.response is not None and record(f)["local"] == "admin"
            assert f.response.status_code == 500  # the stand-in until `request`
            await m.request(f)
            return f.response

        r = await ask("POST", "/admin/reload")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert (await ask("POST", "/admin/reload", "Bearer wrong")).status_code == 403
        r = await ask("POST", "/admin/reload", "Bearer s3cret")
        assert r.status_code == 200 and json.loads(r.content)["reloaded"] is True
        assert r.http_version == "HTTP/1.1" and "connection" not in r.headers
        assert (await ask("GET", "/admin/nothing", "Bearer s3cret")).status_code == 404
        tctx.configure(m, admin_token="")
        assert (await ask("POST", "/admin/reload", "Bearer s3cret")).status_code == 404
        tctx.configure(m, admin_token="s3cret", metrics_proxy_port_admin=False)
        off = _health_flow("127.0.0.1", 8080, "/admin/reload")
        off.request.headers["Authorization"] = "Bearer s3cret"
        m.requestheaders(off)
        assert m.request(off) is None and off.response.status_code == 404
        m.done()
        await asyncio.sleep(0.05)


def test_readiness_reports_config_and_listeners() -> None:
    m = Management()
    cfg = FakeConfig(loaded=False, reload_error="profiles/x.yaml: line 3: unknown key")
    with taddons.context(m, FakeProxyserver([]), cfg):
        status, body = m.health("/health/readiness")
        assert status == 503 and body["status"] == "not_ready"
        assert body["checks"]["config"]["error"].startswith("profiles/x.yaml")
        assert body["checks"]["listeners"]["ok"] is False
        status, body = m.health("/health/startup")
        assert status == 503 and body["status"] == "starting"


# --- the listener (in the test's event loop) -------------------------------------------------


async def _get(port: int, method: str, path: str, headers: dict | None = None) -> tuple:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n"
        f"{head}\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, head_bytes.decode(), body


async def test_listener_serves_endpoints_and_stops() -> None:
    m = Management()
    cfg = FakeConfig()
    with taddons.context(m, FakeProxyserver(LISTEN), cfg) as tctx:
        tctx.configure(m, metrics_port=0, admin_token="s3cret")
        m.running()
        port = m.listen_addrs[0][1]
        assert m.listen_addrs == [("127.0.0.1", port)]
        status, _, body = await _get(port, "GET", "/health/liveness")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, head, body = await _get(port, "HEAD", "/health/liveness")
        assert status == 200 and body == b"" and "Content-Length: " in head
        status, _, body = await _get(port, "GET", "/health/readiness")
        assert status == 200 and json.loads(body)["checks"]["config"]["ok"] is True
        status, head, body = await _get(port, "GET", "/metrics")
        assert status == 200 and "text/plain" in head and b"# TYPE" in body or body == b""
        status, _, body = await _get(port, "GET", "/nope")
        assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
        status, _, _ = await _get(port, "POST", "/health/liveness")
        assert status == 405
        status, head, body = await _get(port, "POST", "/admin/reload")
        assert status == 401 and "WWW-Authenticate: Bearer" in head
        assert json.loads(body)["error"]["code"] == "UNAUTHORIZED"
        auth = {"Authorization": "Bearer wrong"}
        assert (await _get(port, "POST", "/admin/reload", auth))[0] == 403
        auth = {"Authorization": "Bearer s3cret"}
        assert (await _get(port, "GET", "/admin/reload", auth))[0] == 405
        status, _, body = await _get(port, "POST", "/admin/reload", auth)
        assert status == 200
        assert json.loads(body) == {"reloaded": True, "message": "reloaded profiles/dev.yaml"}
        cfg.result = (False, "profiles/dev.yaml: line 2: bad duration")
        status, _, body = await _get(port, "POST", "/admin/reload", auth)
        assert status == 422 and json.loads(body)["error"]["code"] == "CONFIG_INVALID"
        cfg.result = (True, "reloaded profiles/dev.yaml")
        assert (await _get(port, "POST", "/admin/reload", auth))[0] == 200
        tctx.configure(m, metrics_path="/prom")
        assert (await _get(port, "GET", "/prom"))[0] == 200
        assert (await _get(port, "GET", "/metrics"))[0] == 404
        tctx.configure(m, admin_token="")
        assert (await _get(port, "POST", "/admin/reload", auth))[0] == 404
        m.done()
        assert m.listen_addrs == []
        with pytest.raises(OSError):
            await _get(port, "GET", "/health/liveness")
        await asyncio.sleep(0.05)  # let the scheduled runner cleanup finish


async def test_rebind_on_port_change_and_disable() -> None:
    m = Management()
    with taddons.context(m) as tctx:
        tctx.configure(m, metrics_port=0)
        m.running()
        first = m.listen_addrs[0][1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        tctx.configure(m, metrics_port=free)
        assert m.listen_addrs == [("127.0.0.1", free)]
        assert (await _get(free, "GET", "/health/liveness"))[0] == 200
        with pytest.raises(OSError):
            await _get(first, "GET", "/health/liveness")
        # Rebinding the same port after a stop works at once (sync close), like a script reload.
        m.done()
        m.running()
        assert m.listen_addrs == [("127.0.0.1", free)]
        tctx.configure(m, metrics_enabled=False)
        assert m.listen_addrs == []
        m.done()
        await asyncio.sleep(0.05)


async def test_port_in_use_at_startup_logs_error(caplog: pytest.LogCaptureFixture) -> None:
    m = Management()
    with socket.socket() as busy, taddons.context(m) as tctx:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        tctx.configure(m, metrics_port=port)
        with caplog.at_level(logging.ERROR, logger="waypost.management"):
            m.running()
        assert m.listen_addrs == []
        assert any(
            r.levelno == logging.ERROR and "already in use" in r.getMessage()
            and "metrics_port" in r.getMessage()
            for r in caplog.records
        )  # fmt: skip
        # At runtime a taken port is an OptionsError (rolled back), not a crash.
        tctx.configure(m, metrics_port=0)
        good = m.listen_addrs[0][1]
        with pytest.raises(exceptions.OptionsError, match="metrics_port"):
            tctx.configure(m, metrics_port=port)
        assert m.listen_addrs == [("127.0.0.1", good)]
        m.done()
        await asyncio.sleep(0.05)


async def test_a_worker_serves_the_socket_the_supervisor_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    port = inherited.getsockname()[1]
    monkeypatch.setenv("WAYPOST_WORKERS", "2")
    monkeypatch.setenv("WAYPOST_WORKER", "1")
    monkeypatch.setenv("WAYPOST_MANAGEMENT_FD", str(inherited.fileno()))
    m = Management()
    try:
        with taddons.context(m) as tctx:
            tctx.configure(m, metrics_port=0, metrics_enabled=False)
            m.running()
            assert m.listen_addrs == [("127.0.0.1", port)]
            assert (await _get(port, "GET", "/health/liveness"))[0] == 200
            # The instance app owns the management port: the worker never rebinds.
            tctx.configure(m, metrics_port=0, metrics_enabled=True, metrics_host="::1")
            assert m.listen_addrs == [("127.0.0.1", port)]
            # A script reload: the next addon instance serves the same socket.
            m.done()
            m.running()
            assert (await _get(port, "GET", "/health/liveness"))[0] == 200
            m.done()
            await asyncio.sleep(0.05)
    finally:
        inherited.close()


async def test_metrics_and_admin_on_the_proxy_port_speak_for_the_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: list[tuple[str, str, str | None, bytes]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(
            (request.method, request.path_qs, request.headers.get("Authorization"),
             await request.read())
        )  # fmt: skip
        if request.path == "/metrics":
            return web.Response(text="instance_total 3\n", content_type="text/plain")
        return web.json_response({"invalidated": 2, "workers": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app)
    await server.start_server()
    monkeypatch.setenv("WAYPOST_WORKERS", "2")
    monkeypatch.setenv("WAYPOST_INSTANCE_MANAGEMENT", f"http://127.0.0.1:{server.port}")
    m = Management()
    try:
        with taddons.context(m, FakeProxyserver(LISTEN)) as tctx:
            tctx.configure(m, metrics_enabled=False, admin_token="s3cret")
            f = _health_flow("127.0.0.1", 8080, "/metrics")
            f.request.content = b""
            m.requestheaders(f)
            assert f.response.status_code == 500  # the stand-in until `request`
            await m.request(f)
            assert f.response.status_code == 200 and f.response.content == b"instance_total 3\n"
            f = _health_flow("127.0.0.1", 8080, "/admin/cache?pattern=*")
            f.request.method = "DELETE"
            f.request.headers["Authorization"] = "Bearer s3cret"
            f.request.content = b"{}"
            m.requestheaders(f)
            await m.request(f)
            assert f.response.status_code == 200
            assert json.loads(f.response.content)["invalidated"] == 2
            assert seen == [
                ("GET", "/metrics", None, b""),
                ("DELETE", "/admin/cache?pattern=*", "Bearer s3cret", b"{}"),
            ]
            # Health stays this worker's own, answered at once.
            f = _health_flow("127.0.0.1", 8080, "/health/liveness")
            m.requestheaders(f)
            assert f.response.status_code == 200 and m.request(f) is None
            assert len(seen) == 2
            m.done()
    finally:
        await server.close()
