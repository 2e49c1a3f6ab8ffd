"""One origin of the soak's pool: `python scripts/soak_origin.py PORT NAME`, on 127.0.0.1.

Its own process, so the soak can kill it by PID (SIGKILL, not a polite close) and start it
again on the same port. `/health` answers 200; `/static/...` answers a cacheable text;
`/slow?ms=N` answers after N ms; anything else a small JSON naming the origin.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


def app(name: str) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def static(request: web.Request) -> web.Response:
        body = f"/* {request.path} from {name} */\n" + "a{color:red}\n" * 64
        return web.Response(
            text=body, content_type="text/css", headers={"Cache-Control": "public, max-age=30"}
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
        return web.json_response({"origin": name, "slow": True})

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"origin": name, "path": request.path_qs})

    a = web.Application()
    a.router.add_get("/health", health)
    a.router.add_get("/static/{tail:.*}", static)
    a.router.add_get("/slow", slow)
    a.router.add_route("*", "/{tail:.*}", anything)
    return a


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    web.run_app(app(name), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
