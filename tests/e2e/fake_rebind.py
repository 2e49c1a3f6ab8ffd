"""Test-only addon simulating DNS rebinding: after egress's early check passed, the name now
resolves to a private address (written straight into egress's DNS cache), so only egress's
`server_connect` check stands between the client and the internal network.
"""

from __future__ import annotations

import ipaddress

from mitmproxy import ctx, http


class FakeRebind:
    def _rebind(self, flow: http.HTTPFlow) -> None:
        egress = ctx.master.addons.get("egress")
        egress._dns[flow.request.host] = (ipaddress.ip_address("10.9.9.9"),)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._rebind(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._rebind(flow)


addons = [FakeRebind()]
