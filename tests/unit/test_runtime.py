"""The runtime addon (collector thresholds, freeze, the startup line) and the worker's choice of
event loop (addons/supervisor/worker.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons

from addons import runtime
from addons.supervisor import worker


@pytest.fixture
def gc_state() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2000,10,100", (2000, 10, 100)),
        (" 700, 10 ,10 ", (700, 10, 10)),
        ("1,1,1", (1, 1, 1)),
    ],
)
def test_parse_threshold(text: str, expected: tuple[int, int, int]) -> None:
    assert runtime.parse_threshold(text) == expected


@pytest.mark.parametrize("text", ["", "700,10", "700,10,10,10", "0,10,10", "-1,10,10", "a,b,c"])
def test_parse_threshold_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="three whole numbers"):
        runtime.parse_threshold(text)


def test_configure_sets_the_thresholds(gc_state: None) -> None:
    addon = runtime.Runtime()
    with taddons.context(addon) as tctx:
        addon.configure(set(tctx.options.keys()))  # as a script load does
        assert gc.get_threshold() == (2000, 10, 100)
        tctx.configure(addon, server_gc_threshold="700,10,10")
        assert gc.get_threshold() == (700, 10, 10)
        with pytest.raises(OptionsError, match="server_gc_threshold"):
            tctx.configure(addon, server_gc_threshold="700")
        assert gc.get_threshold() == (700, 10, 10)


async def test_running_freezes_once_and_reports(gc_state: None, caplog) -> None:
    addon = runtime.Runtime()
    with taddons.context(addon) as tctx, caplog.at_level(logging.INFO, "waypost.runtime"):
        addon.configure(set(tctx.options.keys()))
        addon.running()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and addon.frozen == frozen
        addon.running()  # a second `running` (a script reload's) does not freeze again
        assert gc.get_freeze_count() == frozen
        addon.done()
    line = caplog.records[0].getMessage()
    assert line.startswith("runtime: event loop asyncio (server_event_loop=asyncio)")
    assert f"gc.freeze {frozen} objects" in line and "gc thresholds 2000,10,100" in line


async def test_freeze_off_and_a_loop_mitmdump_cannot_give(gc_state: None, caplog) -> None:
    addon = runtime.Runtime()
    with taddons.context(addon) as tctx, caplog.at_level(logging.INFO, "waypost.runtime"):
        tctx.configure(addon, server_gc_freeze=False, server_event_loop="uvloop")
        addon.running()
        addon.done()
    assert gc.get_freeze_count() == 0
    assert "gc.freeze off" in caplog.records[0].getMessage()
    assert caplog.records[1].levelname == "WARNING"
    assert "python -m addons.supervisor" in caplog.records[1].getMessage()


async def test_freed_memory_is_given_back_every_interval(
    gc_state: None, caplog, monkeypatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(runtime, "malloc_trim", lambda: calls.append)
    addon = runtime.Runtime()
    with taddons.context(addon) as tctx, caplog.at_level(logging.DEBUG, "waypost.runtime"):
        tctx.configure(addon, server_memory_trim_interval="20ms")
        addon.running()
        await asyncio.sleep(0.15)
        assert len(calls) >= 2 and set(calls) == {0}
        assert "runtime: malloc_trim: RSS" in caplog.text
        tctx.configure(addon, server_memory_trim_interval="0")  # off (a reload)
        await asyncio.sleep(0.05)
        done = len(calls)
        await asyncio.sleep(0.1)
        assert len(calls) == done
        with pytest.raises(OptionsError, match="server_memory_trim_interval"):
            tctx.configure(addon, server_memory_trim_interval="often")
        addon.done()
        assert addon.trimmer is None


def test_malloc_trim_is_glibcs_here() -> None:
    trim = runtime.malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim")
    assert trim(0) in (0, 1)  # 1: memory was released


def test_startup_settings_order(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("server: {event_loop: auto}\n")
    at = ["--set", f"waypost_profile={profile}"]
    assert worker.startup_settings(at, {}) == ("auto", False)
    assert worker.startup_settings([], {"WAYPOST_PROFILE": str(profile)}) == ("auto", False)
    # the environment over the file, --set over both (as for every option)
    env = {"WAYPOST_EVENT_LOOP": "uvloop", "CLI_ENABLED": "true"}
    assert worker.startup_settings(at, env) == ("uvloop", True)
    assert worker.startup_settings([*at, "--set", "server_event_loop=asyncio"], {}) == (
        "asyncio",
        False,
    )
    assert worker.startup_settings([*at, "--set", "cli_enabled"], {}) == ("auto", True)
    assert worker.startup_settings([*at, "--set", "cli_enabled=false"], env) == ("uvloop", False)
    # a profile that does not load is the config addon's to refuse; meanwhile the default
    profile.write_text("server: {event_loop: fast}\n")
    assert worker.startup_settings(at, {}) == ("asyncio", False)


def test_use_loop() -> None:
    policy = asyncio.get_event_loop_policy()
    try:
        assert worker.use_loop("asyncio") == "asyncio"
        assert asyncio.get_event_loop_policy() is policy
        assert worker.use_loop("auto") == "uvloop"  # uvloop is a dependency
        loop = asyncio.new_event_loop()
        try:
            assert runtime.loop_name(loop) == "uvloop"
        finally:
            loop.close()
        with pytest.raises(SystemExit, match="not one of"):
            worker.use_loop("fast")
        # uvloop's subprocesses ignore close_fds: the CLI keeps asyncio's
        asyncio.set_event_loop_policy(policy)
        assert worker.use_loop("auto", cli=True) == "asyncio"
        assert asyncio.get_event_loop_policy() is policy
        with pytest.raises(SystemExit, match="the CLI is enabled"):
            worker.use_loop("uvloop", cli=True)
    finally:
        asyncio.set_event_loop_policy(policy)


def test_a_reload_cannot_turn_the_cli_on_under_uvloop() -> None:
    import uvloop

    async def configure(enabled: bool) -> None:
        addon = runtime.Runtime()
        with taddons.context(addon) as tctx:
            tctx.options.add_option("cli_enabled", bool, False, "the CLI addon's option")
            tctx.configure(addon, cli_enabled=enabled)

    uvloop.run(configure(False))
    with pytest.raises(OptionsError, match="cli_enabled: this worker runs uvloop"):
        uvloop.run(configure(True))
    asyncio.run(configure(True))
