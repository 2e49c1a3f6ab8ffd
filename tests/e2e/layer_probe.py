"""Test-only addon: how many backend connections mitmproxy's HTTP layer still holds for the
client connection of a request carrying `X-Probe-Layer`, in the response header
`X-Backend-Connections` (found through the garbage collector: slow, so only when asked)."""

from __future__ import annotations

import gc

from mitmproxy import connection, http
from mitmproxy.proxy.layers.http import HttpLayer


class LayerProbe:
    def response(self, flow: http.HTTPFlow) -> None:
        if "x-probe-layer" not in flow.request.headers or flow.response is None:
            return
        held = sum(
            isinstance(conn, connection.Server)
            for layer in gc.get_objects()
            if isinstance(layer, HttpLayer) and layer.context.client is flow.client_conn
            for conn in layer.connections
        )
        flow.response.headers["X-Backend-Connections"] = str(held)


addons = [LayerProbe()]
