"""The kernel's endpoint helpers: whether a request is addressed to the proxy, bearer tokens."""

from __future__ import annotations

from typing import Any

import pytest

from addons.kernel import endpoints

LISTEN = [("127.0.0.1", 8080)]


@pytest.mark.parametrize(
    "host,port,sockname,addrs,local",
    [
        ("127.0.0.1", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("localhost", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("LOCALHOST", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("10.1.2.3", 8080, ("10.1.2.3", 8080), [("", 8080)], True),  # pod IP, wildcard listen
        ("10.1.2.3", 8080, ("::ffff:10.1.2.3", 8080, 0, 0), [("::", 8080)], True),
        ("[::1]", 8080, ("::1", 8080, 0, 0), [("::", 8080)], True),
        ("127.0.0.1", 8080, None, LISTEN, True),
        ("example.com", 80, ("127.0.0.1", 8080), LISTEN, False),  # absolute-form to an origin
        ("127.0.0.1", 9999, ("127.0.0.1", 8080), LISTEN, False),  # another local service
        ("10.9.9.9", 8080, ("10.1.2.3", 8080), [("", 8080)], False),
        ("127.0.0.1", 8080, ("", 0), [], False),
    ],
)
def test_addressed_to_proxy(host: str, port: int, sockname: Any, addrs: list, local: bool) -> None:
    assert endpoints.addressed_to_proxy(host, port, sockname, addrs) is local


@pytest.mark.parametrize(
    "header,status",
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        ("Basic c2VjcmV0", 401),
        ("Bearer secret", 200),
        ("bearer  secret ", 200),
        ("Bearer secreT", 403),
        ("Bearer secret2", 403),
        ("Bearer s\udcffcret", 403),
    ],
)
def test_bearer_status(header: str | None, status: int) -> None:
    assert endpoints.bearer_status(header, "secret") == status
