"""kernel.patching: the checked versions agree with pyproject, and the chains' order and undo."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import version
from packaging.requirements import Requirement

from addons.kernel import patching

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_checked_versions_are_exactly_what_pyproject_allows() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = set()
    for req in map(Requirement, deps):
        if req.name != "mitmproxy":
            continue
        (spec,) = req.specifier  # one exact version per line, nothing looser
        assert spec.operator == "==", req
        pins.add(spec.version)
    assert pins == set(patching.CHECKED_VERSIONS)


def test_the_tests_run_on_a_checked_version() -> None:
    assert patching.checked(version.VERSION)


@pytest.mark.parametrize(
    ("v", "ok"),
    [
        ("11.0.2", True),
        ("11.0.0", False),
        ("11.1.0", False),
        ("12.3.1", True),
        ("12.0.0", False),
        ("13.0.0", False),
        ("10.4.2", False),
        ("13.0.0.dev", False),
    ],
)
def test_checked(v: str, ok: bool) -> None:
    assert patching.checked(v) is ok


class Base:
    def handle(self, calls: list[str]) -> str:
        calls.append("mitmproxy")
        return "mitmproxy"


class Stream(Base):
    def own(self) -> str:
        return "own"


def _wrapper(name: str) -> Any:
    def handle(self: Any, calls: list[str]) -> str:
        calls.append(name)
        return handle.__waypost_wrapped__(self, calls)  # type: ignore[attr-defined,no-any-return]

    return handle


def _patch(key: str, order: int = 0, fn: Any = None) -> patching.Patch:
    return patching.Patch(key, Stream, "handle", fn or _wrapper(key), "test", order)


def _calls() -> list[str]:
    calls: list[str] = []
    Stream().handle(calls)
    return calls


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    for key in ("router", "cache", "other", "own"):
        patching.uninstall(key)
    assert "handle" not in vars(Stream)


@pytest.mark.parametrize("first_router", [True, False])
def test_order_does_not_depend_on_install_order(first_router: bool) -> None:
    router, cache = _patch("router"), _patch("cache", order=1)
    for p in (router, cache) if first_router else (cache, router):
        assert patching.install(p, unchecked="-")
    assert _calls() == ["router", "cache", "mitmproxy"]
    patching.uninstall("cache")
    assert _calls() == ["router", "mitmproxy"]
    patching.uninstall("router")
    assert "handle" not in vars(Stream)  # inherited: deleted, not pinned on the subclass
    assert _calls() == ["mitmproxy"]


def test_equal_orders_run_newest_first() -> None:
    patching.install(_patch("router"), unchecked="-")
    patching.install(_patch("other"), unchecked="-")
    assert _calls() == ["other", "router", "mitmproxy"]


def test_reinstalling_a_key_replaces_it_in_place() -> None:
    patching.install(_patch("router"), _patch("cache", order=1), unchecked="-")
    reloaded = _wrapper("router again")
    patching.install(_patch("router", fn=reloaded), unchecked="-")
    patching.install(_patch("cache", order=1), unchecked="-")
    assert _calls() == ["router again", "cache", "mitmproxy"]
    assert Stream.handle is reloaded
    assert [p.key for p in patching.patches() if p.target is Stream] == ["router", "cache"]


def test_an_own_attribute_is_put_back() -> None:
    original = Stream.own
    patching.install(
        patching.Patch("own", Stream, "own", lambda self: "patched", "test"), unchecked="-"
    )
    assert Stream().own() == "patched"
    assert Stream.own.__waypost_wrapped__ is original  # type: ignore[attr-defined]
    patching.uninstall("own")
    assert Stream.own is original


def test_a_patch_stays_while_anyone_holds_it() -> None:
    patching.install(_patch("router"), unchecked="-", by="hygiene")
    patching.install(_patch("router"), unchecked="-", by="upstream")
    patching.uninstall("router", by="upstream")
    assert patching.installed("router") and _calls() == ["router", "mitmproxy"]
    patching.uninstall("router", by="hygiene")
    assert not patching.installed("router") and _calls() == ["mitmproxy"]


def test_unchecked_version_patches_nothing(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(version, "VERSION", "99.0.0")
    assert not patching.install(_patch("router"), unchecked="no retries")
    assert not patching.installed("router") and _calls() == ["mitmproxy"]
    assert "mitmproxy 99.0.0 is not a version Waypost checked" in caplog.text
    assert "no retries" in caplog.text
