"""A scripted origin for the cache tests: each path answers with what the test set for it.

origin.set("/a", lambda req: (200, {"Cache-Control": "max-age=60"}, b"body"))
origin.hits["/a"]         # requests that reached the origin for /a
origin.requests["/a"]     # their headers, as a list of lower-cased dicts

FlakyOrigin answers like an origin until told to fail in one of the ways an origin goes down.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate

from aiohttp import web

from tests.conftest import ThreadedServer, read_head, serve_app

Answer = tuple[int, dict[str, str] | list[tuple[str, str]], bytes]
Handler = Callable[[web.Request], Answer]


def http_date(offset: float = 0.0) -> str:
    import time

    return formatdate(time.time() + offset, usegmt=True)


@dataclass
class Origin:
    host: str = "127.0.0.1"
    port: int = 0
    handlers: dict[str, Handler] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    requests: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, path: str, handler: Handler | Answer, delay: float = 0.0) -> None:
        self.handlers[path] = handler if callable(handler) else (lambda _r, a=handler: a)
        self.delay[path] = delay

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        self.requests.setdefault(path, []).append(
            {k.lower(): v for k, v in request.headers.items()}
        )
        handler = self.handlers.get(path)
        if handler is None:  # "/prefix/*" answers every path under /prefix/
            handler = next(
                (
                    h
                    for k, h in self.handlers.items()
                    if k.endswith("*") and path.startswith(k[:-1])
                ),
                None,
            )
        if handler is None:
            return web.Response(status=404, text="no handler\n")
        if self.delay.get(path):
            await asyncio.sleep(self.delay[path])
        status, headers, body = handler(request)
        items = list(headers.items()) if isinstance(headers, dict) else list(headers)
        resp = web.Response(status=status, body=body if status not in (204, 304) else None)
        for k, v in items:
            resp.headers.add(k, v)
        return resp


def start_origin() -> Iterator[Origin]:
    state = Origin()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state._handle)
    with serve_app(app) as state.port:
        yield state


class FlakyOrigin(ThreadedServer):
    """A raw HTTP/1.1 origin. While `mode` is "ok" it answers each request with `headers` and
    `body` (and closes); "close" closes the connection once the request is read; "truncate"
    sends the head and half the body, then closes; "hang" answers nothing until the proxy
    gives up (at most 10 s). `close()` closes its port: connections are refused."""

    def __init__(self, headers: dict[str, str], body: bytes = b"stored body") -> None:
        self.mode = "ok"
        self.headers = headers
        self.body = body
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if read_head(conn) is None:
                    return
                if self.mode == "close":
                    return
                if self.mode == "hang":
                    conn.recv(1)  # returns when the proxy closes the connection
                    return
                fields = {**self.headers, "Content-Length": str(len(self.body))}
                head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
                body = self.body[: len(self.body) // 2] if self.mode == "truncate" else self.body
                conn.sendall(f"{head}Connection: close\r\n\r\n".encode() + body)
            except OSError:
                pass
