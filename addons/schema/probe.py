"""The container health check: GET /health/<kind> on the proxy port the profile configures.

    python -m addons.schema.probe [liveness|readiness|startup]    # exit 0 on 2xx, else 1

The port and address are resolved as the proxy resolves them at startup (`schema.choose`, then
`schema.load`): the profile named by WAYPOST_PROFILE (else profiles/default.yaml), with the
environment's overrides (PROXY_PORT, WAYPOST_SERVER__PORT, ...) applied. A port or profile
given with `--set` on the command line is not visible to a health check: set those through
the environment instead.
The Dockerfile's HEALTHCHECK runs this (slim images have no curl).
"""

from __future__ import annotations

import ipaddress
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

from addons.schema.loading import ProfileError, choose, load

KINDS = ("liveness", "readiness", "startup")
TIMEOUT = 4.0


def health_url(environ: Mapping[str, str], kind: str = "liveness") -> str:
    """The proxy port's /health/<kind> URL, on loopback when the proxy listens everywhere."""
    server = load(choose("", environ), environ).profile.server
    host = server.host
    try:
        wildcard = not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name such as localhost
        wildcard = False
    if wildcard:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}/health/{kind}"


def probe(url: str, timeout: float = TIMEOUT) -> str | None:
    """None when `url` answers 2xx within `timeout`, else why not."""
    # An empty ProxyHandler: HTTP_PROXY in the container's environment must not be used.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        return f"{url}: {e.code} {e.reason}"
    except (OSError, ValueError) as e:
        return f"{url}: {getattr(e, 'reason', None) or e}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] not in KINDS):
        print(f"usage: python -m addons.schema.probe [{'|'.join(KINDS)}]", file=sys.stderr)
        return 2
    try:
        url = health_url(os.environ, argv[0] if argv else "liveness")
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    problem = probe(url)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
