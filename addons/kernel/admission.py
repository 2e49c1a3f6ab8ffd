"""Admission at accept: gates that refuse a proxy connection before mitmproxy sets it up.

mitmproxy spends about 0.4 ms of the event loop on every connection it accepts (a handler,
its tasks, the client_connected hooks, the close) before any addon can refuse it. A burst
over the per-IP connection cap from one address therefore cost as much as the connections let
in: 200 slowloris connections from one address (100 over the cap) held the loop twice as long
as the 100 let in alone. A gate is asked with the peer address as the connection is accepted
(`backlog.py` patches asyncio's accept for the proxy's listeners) and a connection it refuses
is closed there, as the addon's hook would have closed it.

A gate is a fast path, never the only check: the addon's hook still decides every connection a
gate lets through (connections accepted in the same loop turn are not counted yet), and
without `backlog.py` nothing changes but the cost. A gate records its refusal itself
(`policy.decide`), as the hook would.
"""

from __future__ import annotations

from collections.abc import Callable

Gate = Callable[[str], bool]  # peer IP (IPv4-mapped unwrapped) -> True: refuse the connection

_gates: dict[str, Gate] = {}


def register(name: str, gate: Gate) -> None:
    """Add `gate` under `name`, replacing an earlier one of that name (a reloaded script)."""
    _gates[name] = gate


def unregister(name: str) -> None:
    _gates.pop(name, None)


def gated() -> bool:
    return bool(_gates)


def refuses(peer_ip: str) -> bool:
    """Whether a gate refuses a new connection from `peer_ip`."""
    return any(gate(peer_ip) for gate in _gates.values())
