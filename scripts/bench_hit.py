"""Benchmark helper, not an addon of Waypost: answers requests from memory as a cache hit does.

The first response per URL is kept; later requests for it are answered in `request` with a
copy (`Response.copy()` shares the body's bytes object, as a cache hands out its stored body),
so addons after it in `response` see what they would see on a cache hit.
`scripts/bench_compress.py` loads it before addons/compress.py.
"""

from __future__ import annotations

from mitmproxy import http


class Hit:
    def __init__(self) -> None:
        self.stored: dict[str, http.Response] = {}

    def request(self, flow: http.HTTPFlow) -> None:
        found = self.stored.get(flow.request.url)
        if found is not None and flow.response is None:
            flow.response = found.copy()

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        url = flow.request.url
        if url not in self.stored and resp is not None and resp.status_code == 200:
            if "content-encoding" not in resp.headers:
                self.stored[url] = resp.copy()


addons = [Hit()]
