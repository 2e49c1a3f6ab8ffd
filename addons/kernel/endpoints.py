"""What every endpoint the proxy serves itself needs: its socket, its token check, its address.

- `bind`: a listening TCP socket, bound synchronously so a busy port fails in the hook itself.
- `bearer_status`: 200, 401 or 403 for an `Authorization: Bearer <token>` header.
- `addressed_to_proxy`: whether a request on the proxy port is meant for the proxy itself
  (the management and CLI endpoints answer those) or for an origin behind it.
- `meant_for_proxy`: the same question for a flow, which hygiene, management and the CLI ask:
  also true for an origin-form request outside a tunnel to one of the proxy's endpoint paths.
- `serve_paths`/`own_path`: the path prefixes those endpoints answer on the proxy port,
  registered by the addons that serve them, so hygiene lets an origin-form request for one
  through without importing them.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Iterable
from typing import Any

from mitmproxy import ctx, http

from addons.kernel import wire
from addons.kernel.net import parse_ip

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _canonical(host: str) -> str:
    """An address as `parse_ip` writes it (`[::ffff:127.0.0.1]` is 127.0.0.1), else the name."""
    ip = parse_ip(host)
    return host.lower() if ip is None else str(ip)


def addressed_to_proxy(
    host: str,
    port: int,
    sockname: tuple[Any, ...] | None,
    listen_addrs: Iterable[tuple[Any, ...]],
) -> bool:
    """Whether a request's destination is the proxy itself (not an origin behind it).

    True when host:port is the address the client connected to, or a loopback name / listen
    address of ours with one of our listen ports.
    """
    host = _canonical(host)
    if (
        sockname
        and port == sockname[1]
        and (host in LOOPBACK_NAMES or host == _canonical(sockname[0]))
    ):
        return True
    for lhost, lport, *_ in listen_addrs:
        if port == lport and (host in LOOPBACK_NAMES or host == _canonical(lhost)):
            return True
    return False


def meant_for_proxy(flow: http.HTTPFlow) -> bool:
    """Whether a request on a proxy listener is addressed to the proxy itself.

    An origin-form request (`GET /path`) outside a CONNECT tunnel names no origin: while the
    forward listener refuses to relay those by their Host (limits_origin_form `refuse`, the
    default) it can only be meant for the proxy, under whatever name the client knows it (a
    Kubernetes Service, a load balancer), when its path is one of the proxy's endpoints.
    Otherwise its Host (or absolute-form authority) must name the proxy (`addressed_to_proxy`).
    """
    req = flow.request
    if wire.sent_authority(req) == b"" and own_path(req.path) and _origin_form_refused():
        return True
    ps = ctx.master.addons.get("proxyserver")
    addrs = ps.listen_addrs() if ps else []
    return addressed_to_proxy(req.host, req.port, flow.client_conn.sockname, addrs)


def _origin_form_refused() -> bool:
    # Declared by hygiene; without it mitmproxy relays origin-form requests by their Host.
    return getattr(ctx.options, "limits_origin_form", None) == "refuse"


# owner -> the path prefixes it answers on the proxy port.
_own_paths: dict[str, tuple[str, ...]] = {}


def serve_paths(owner: str, prefixes: Iterable[str]) -> None:
    """Register the path prefixes `owner` answers on the proxy port (none: withdraw them)."""
    prefixes = tuple(prefixes)
    if prefixes:
        _own_paths[owner] = prefixes
    else:
        _own_paths.pop(owner, None)


def own_path(path: str) -> bool:
    """Whether `path` is one the proxy's own endpoints answer on the proxy port."""
    return any(path.startswith(prefixes) for prefixes in _own_paths.values())


def bearer_status(header: str | None, token: str) -> int:
    """200 for the right bearer token, 401 without a usable header, 403 for a wrong token."""
    if not header:
        return 401
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return 401
    ok = hmac.compare_digest(value.encode("utf-8", "surrogateescape"), token.encode())
    return 200 if ok else 403


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound synchronously so failures surface in the hook itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
