"""An ASGI origin for the TLS listener tests, served by hypercorn (h2 and HTTP/1.1 over TLS).

Every answer is JSON saying which protocol the request arrived with, so a test can check the
proxy-to-backend side of the negotiation: `{"http_version": "2", "path": "/x", ...}`.
"""

from __future__ import annotations

import json
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(
        {
            "http_version": scope["http_version"],
            "path": scope["path"],
            "scheme": scope["scheme"],
            "host": dict(scope["headers"]).get(b"host", b"").decode(),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
