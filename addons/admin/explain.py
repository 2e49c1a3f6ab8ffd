"""POST /admin/explain and the `waypost.explain` command: what every policy and the router would
decide for a request, in pipeline order, without sending it and without changing any state.

The request becomes a synthetic flow (`synthetic_flow`: a client at `client_ip`, never live,
never sent). Every loaded addon with an `explain(flow) -> dict | None` method answers, in the
order mitmproxy runs them (the bundle's pipeline order); an addon answers with plain data from
its own pure decision functions (no bucket token taken, no breaker or cache entry touched), at
least `decision`, and `refuses: true` when that decision (enforced) ends the request there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from mitmproxy import connection, http
from mitmproxy.proxy import mode_specs

from addons.admin.models import Decision, ExplainAnswer, ExplainRequest


def synthetic_flow(req: ExplainRequest) -> http.HTTPFlow:
    """A flow carrying `req`, as the proxy would see it arrive from `client_ip`."""
    client = connection.Client(
        peername=(req.client_ip, 0), sockname=("0.0.0.0", 0), timestamp_start=time.time()
    )
    headers = tuple((k.encode(), v.encode()) for k, v in req.headers.items())
    if req.method == "CONNECT":
        host, _, port = req.url.rpartition(":")
        host = host.strip("[]")
        request = http.Request(
            host, int(port), b"CONNECT", b"", req.url.encode(), b"", b"HTTP/1.1",
            http.Headers(headers), b"", None, time.time(), time.time(),
        )  # fmt: skip
    else:
        request = http.Request.make(req.method, req.url, b"", http.Headers(headers))
        if not any(k.lower() == b"host" for k, _ in headers):
            request.headers["Host"] = request.host_header or request.host
    if req.listener == "reverse" and req.method != "CONNECT":
        target = f"{request.scheme}://{request.host}:{request.port}"
        client.proxy_mode = mode_specs.ProxyMode.parse(f"reverse:{target}")
    flow = http.HTTPFlow(client, connection.Server(address=(request.host, request.port)))
    flow.request = request
    return flow


def explain(req: ExplainRequest, addons: Iterable[Any]) -> dict[str, Any]:
    """The answer (`ExplainAnswer`) from every addon in `addons` that has `explain`."""
    flow = synthetic_flow(req)
    decisions: list[dict[str, Any]] = []
    for addon in addons:
        method = getattr(addon, "explain", None)
        if method is None or not callable(method):
            continue
        found = method(flow)
        if found is not None:
            decisions.append(Decision.model_validate(found).model_dump(mode="json"))
    refusing = next((d for d in decisions if d.get("refuses")), None)
    answer = {
        "request": req.model_dump(mode="json"),
        "outcome": "block" if refusing else "allow",
        "refused_by": refusing["addon"] if refusing else None,
        "decisions": decisions,
    }
    return ExplainAnswer.model_validate(answer).model_dump(mode="json")
