"""kernel/dispatch: the cached event dispatch calls exactly what mitmproxy's own walk calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow

from addons.kernel import dispatch, patching


class Rec:
    """An addon that records its `requestheaders` calls, with children of its own."""

    def __init__(self, log: list[str], name: str, *, fail: bool = False, halt: bool = False):
        self.log, self.name, self.fail, self.halt = log, name, fail, halt
        self.addons: list[Any] = []

    def requestheaders(self, flow: Any) -> None:
        self.log.append(self.name)
        if self.fail:
            raise ValueError(self.name)
        if self.halt:
            raise exceptions.AddonHalt()


class AsyncRec(Rec):
    async def requestheaders(self, flow: Any) -> None:  # type: ignore[override]
        self.log.append(self.name + " (async)")


class Other:
    def response(self, flow: Any) -> None:
        pass


def _chain(log: list[str]) -> list[Any]:
    a, b, c, d = Rec(log, "a"), Rec(log, "b"), Rec(log, "c", fail=True), Rec(log, "d")
    a.addons = [Rec(log, "a.1"), AsyncRec(log, "a.2")]
    c.addons = [Rec(log, "c.1")]  # skipped: its parent fails first, in the same safecall
    b.addons = [Other()]
    return [a, b, c, d, Rec(log, "e", halt=True), Rec(log, "f")]


@pytest.fixture
def installed() -> Iterator[None]:
    assert dispatch.install(by="test")
    yield
    dispatch.uninstall(by="test")
    assert not patching.installed("dispatch.trigger_event")


async def _run(patched: bool) -> list[str]:
    log: list[str] = []
    with taddons.context() as tctx:
        manager = tctx.master.addons
        if patched:
            dispatch.install(by="test")
        try:
            ours = _chain(log)
            manager.add(*ours)
            flow = tflow.tflow()
            await manager.trigger_event(HttpRequestHeadersHook(flow))
            log.append("--")
            late = Rec(log, "late")
            ours[0].addons.append(late)  # as a script's addons are: nested, then registered
            manager.register(late)
            await manager.trigger_event(HttpRequestHeadersHook(flow))
            log.append("--")
            manager.remove(late)
            ours[0].addons.remove(late)
            manager.chain = [a for a in manager.chain if getattr(a, "name", "") != "d"]
            await manager.trigger_event(HttpRequestHeadersHook(flow))
        finally:
            if patched:
                dispatch.uninstall(by="test")
    return log


async def test_the_same_calls_in_the_same_order_as_mitmproxy() -> None:
    want = await _run(patched=False)
    first = ["a", "a.1", "a.2 (async)", "b", "c", "d", "e"]  # c.1 skipped (c failed), f halted
    assert want == [*first, "--", *first[:3], "late", *first[3:], "--", "a", "a.1", "a.2 (async)",
                    "b", "c", "e"]  # fmt: skip
    assert await _run(patched=True) == want


async def test_a_hook_attribute_that_is_not_callable_takes_mitmproxy_s_path(
    installed, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        requestheaders = 3

    log: list[str] = []
    with taddons.context() as tctx:
        tctx.master.addons.add(Broken(), Rec(log, "after"))
        event = HttpRequestHeadersHook(tflow.tflow())
        await tctx.master.addons.trigger_event(event)
        assert log == ["after"]
        assert dispatch._memory.groups["requestheaders"] is None
    assert "not callable" in caplog.text
