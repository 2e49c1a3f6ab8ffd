"""Per-call cost of the ACL, rate-limit and security-header hooks, in microseconds.

    .venv/bin/python scripts/hookcost.py [--calls N]

Each hook runs on a prepared flow through mitmproxy's test context (no network), N times,
best of 5 runs; a no-op method call is the baseline. The numbers are what the hook itself
adds to a request, not mitmproxy's event dispatch around it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import benchlib

sys.path.insert(0, str(benchlib.ROOT))
from mitmproxy.test import taddons, tflow  # noqa: E402

from addons import acl, forwarding, ratelimit, secheaders  # noqa: E402


def best(fn: Callable[[], None], calls: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    calls = parser.parse_args().calls
    results: list[tuple[str, float]] = []

    class Noop:
        def hook(self, flow: object) -> None:
            pass

    noop = Noop()
    f = tflow.tflow()
    results.append(("baseline: no-op method call", best(lambda: noop.hook(f), calls)))

    a, r, s, fwd = (
        acl.Acl(),
        ratelimit.RateLimit(),
        secheaders.SecHeaders(),
        forwarding.Forwarding(),
    )
    with taddons.context(fwd, a, r, s) as tctx:
        # ACL configured, client allowed (the common case): one dict lookup per request.
        tctx.configure(
            a, acl_allowed_ips=["127.0.0.0/8", "10.0.0.0/8"], acl_denied_ips=["10.6.0.0/16"]
        )
        allowed = tflow.tflow()
        a.client_connected(allowed.client_conn)
        results.append(
            ("acl.requestheaders (allowed client)", best(lambda: a.requestheaders(allowed), calls))
        )
        results.append(
            (
                "acl.client_connected (per connection)",
                best(lambda: a.client_connected(allowed.client_conn), calls),
            )
        )
        # Behind a trusted proxy: decided per request on X-Forwarded-For.
        tctx.configure(fwd, forwarding_trusted_proxies=["127.0.0.0/8"])
        proxied = tflow.tflow()
        proxied.request.headers["X-Forwarded-For"] = "10.1.2.3"
        a.client_connected(proxied.client_conn)

        def acl_proxied() -> None:
            proxied.metadata.clear()  # a new request each time: client IP derived again
            a.requestheaders(proxied)

        results.append(("acl.requestheaders (trusted proxy, XFF)", best(acl_proxied, calls)))
        tctx.configure(fwd, forwarding_trusted_proxies=[])

        # Rate limit: a generous limit, so every call takes a token and passes.
        tctx.configure(r, ratelimit_requests_per_second="1000000000", ratelimit_burst=1_000_000_000)
        rf = tflow.tflow()

        def rl() -> None:
            rf.metadata.clear()
            r.requestheaders(rf)

        results.append(("ratelimit.requestheaders (default limit)", best(rl, calls)))
        tctx.configure(
            r,
            ratelimit_rules='[{"id": "a", "host": "api.example.com", "requests_per_second": 1e9},'
            ' {"id": "b", "path": "/search", "requests_per_second": 1e9},'
            ' {"id": "c", "host": "*.cdn.example", "requests_per_second": 0}]',
        )
        results.append(("ratelimit.requestheaders (3 rules, none match)", best(rl, calls)))
        tctx.configure(r, ratelimit_max_connections_per_ip=100)
        conn = tflow.tclient_conn()

        def cap() -> None:
            r.client_connected(conn)
            r.client_disconnected(conn)

        results.append(("ratelimit.client_connected+disconnected (cap)", best(cap, calls)))
        tctx.configure(r, ratelimit_requests_per_second="0", ratelimit_rules="")
        results.append(("ratelimit.requestheaders (off)", best(rl, calls)))

        tctx.configure(
            s, secheaders_enabled=True, secheaders_content_security_policy="default-src 'self'"
        )
        sf = tflow.tflow(resp=True)
        sf.client_conn.tls = True
        fields = sf.response.headers.fields

        def sh() -> None:
            sf.response.headers.fields = fields
            s.responseheaders(sf)

        results.append(("secheaders.responseheaders (4 headers added)", best(sh, calls)))

    for name, us in results:
        print(f"{name:50s} {us:7.2f} us/call")


if __name__ == "__main__":
    main()
