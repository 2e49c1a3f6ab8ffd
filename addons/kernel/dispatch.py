"""Hook dispatch: mitmproxy's `AddonManager.trigger_event`, with the chain walked once per hook.

For every event (a proxied request fires about ten, each followed by an `update`) mitmproxy
walks the whole addon chain, the bundle's addons nested below the script loader included: per
addon a generator, a `safecall` context manager, a getattr, and per call `Hook.args()`
(`dataclasses.fields`), whether the addon implements the hook or not. That walk was about a
third of the proxy's CPU per request. The replacement remembers, per hook name, the callables
mitmproxy's own walk finds (`traverse`, getattr), grouped by top-level addon, and calls them as
mitmproxy does: one `safecall` per top-level addon (an exception skips the rest of that addon's
children, as before), `AddonHalt` stops the chain, awaitables are awaited, arguments are read
once per event. Measured with scripts/bench --baseline (quiet, 10/100/1000 connections): 0.88 ->
0.63, 0.92 -> 0.74, 1.00 -> 0.71 CPU ms per request (docs/performance.md).

The memory is dropped whenever the chain can have changed: `register` and `remove` (which
`add`, `clear` and every script load and reload go through) are wrapped, and a chain list that
was replaced or grew (LeanChain's pruning) is noticed by identity and length on the next event.
A hook attribute that is neither callable nor a module (an error mitmproxy reports) keeps
mitmproxy's own path. `trigger` (synchronous: load, configure, done) is not touched.

Not an addon: LeanChain installs it (option `lean_chain`), so it goes with that escape hatch.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks

from addons.kernel import patching

Groups = list[list[Callable[..., Any]]]  # per top-level addon with the hook, its callables


class _Memory:
    def __init__(self) -> None:
        self.chain: list[Any] | None = None  # the list the groups were read from, held
        self.length = 0
        self.groups: dict[str, Groups | None] = {}  # None: mitmproxy's own path

    def clear(self) -> None:
        self.chain = None
        self.groups.clear()

    def groups_for(self, manager: Any, name: str) -> Groups | None:
        chain = manager.chain
        if chain is not self.chain or len(chain) != self.length:
            self.groups.clear()
            self.chain, self.length = chain, len(chain)
        if name not in self.groups:
            self.groups[name] = _walk(chain, name)
        return self.groups[name]


_memory = _Memory()


def _walk(chain: list[Any], name: str) -> Groups | None:
    groups: Groups = []
    for top in chain:
        found = []
        for addon in addonmanager.traverse([top]):
            func = getattr(addon, name, None)
            if not func or isinstance(func, types.ModuleType):
                continue
            if not callable(func):
                return None
            found.append(func)
        if found:
            groups.append(found)
    return groups


async def _trigger_event(self: Any, event: hooks.Hook) -> None:
    groups = _memory.groups_for(self, event.name)
    if groups is None:
        wrapped = _trigger_event.__waypost_wrapped__  # type: ignore[attr-defined]
        return await wrapped(self, event)
    args = event.args()
    for funcs in groups:
        try:
            with addonmanager.safecall():
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
        except exceptions.AddonHalt:
            return None
    return None


def _register(self: Any, addon: Any) -> Any:
    _memory.clear()
    return _register.__waypost_wrapped__(self, addon)  # type: ignore[attr-defined]


def _remove(self: Any, addon: Any) -> None:
    _memory.clear()
    _remove.__waypost_wrapped__(self, addon)  # type: ignore[attr-defined]


_WHY = "mitmproxy walks every addon for every event; no option caches it"
PATCHES = (
    patching.Patch(
        "dispatch.trigger_event", addonmanager.AddonManager, "trigger_event", _trigger_event, _WHY
    ),
    patching.Patch("dispatch.register", addonmanager.AddonManager, "register", _register, _WHY),
    patching.Patch("dispatch.remove", addonmanager.AddonManager, "remove", _remove, _WHY),
)


def install(by: str) -> bool:
    _memory.clear()
    return patching.install(*PATCHES, unchecked="hook dispatch is not cached", by=by)


def uninstall(by: str) -> None:
    patching.uninstall(*(p.key for p in PATCHES), by=by)
    _memory.clear()
