"""LeanChain: take mitmdump's built-in addons that have nothing to do out of the event chain.

mitmproxy hands every event (requestheaders, request, response, ...) to every addon in its
chain, about 36 built-ins in mitmdump, whether they implement the hook or not. Measured on
mitmproxy 12 (py-spy; docs/performance.md): that dispatch is about 45% of the CPU per proxied
request, and dropping the built-ins a policy proxy does not use made bare mitmdump 1.33x faster.
This addon removes a built-in only while its options leave it nothing to do (map_remote
empty, flow_detail 0, no reverse mode for updatealtsvc, ...), and puts it back (at the end of
the chain) as soon as one of its options is turned on, so `--set`, mitmweb-free option edits
and profile reloads keep working.

Only under mitmdump: mitmweb and mitmproxy's console use several of these addons for their
own commands and views, so there it does nothing.

The same option installs `kernel/dispatch.py` everywhere (mitmweb too): mitmproxy's event
dispatch with the chain walked once per hook instead of once per event.

Hooks: load, running (prune), configure (put back; dispatch on or off), done. Options: lean_chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, hooks
from mitmproxy.addonmanager import _get_name

from addons.kernel import dispatch
from addons.kernel.options import Option, declare

log = logging.getLogger("waypost.leanchain")


def _modes(options: Any, prefix: str) -> bool:
    return any(m.startswith(prefix) for m in getattr(options, "mode", ()))


def _unset(*names: str) -> Callable[[Any], bool]:
    return lambda o: not any(getattr(o, n, None) for n in names)


# Built-in addon name -> "has nothing to do under these options". Addons that only provide
# commands for an interactive UI (browser, comment, cut, export, commandhistory) always qualify
# under mitmdump. Not listed, so never removed: core, termlog, block, disableh2c, proxyserver,
# nextlayer, tlsconfig, scriptloader (our own addons hang below it), dnsresolver, keepserving,
# errorcheck.
INERT: dict[str, Callable[[Any], bool]] = {
    "browser": lambda o: True,
    "commandhistory": lambda o: True,
    "comment": lambda o: True,
    "cut": lambda o: True,
    "export": lambda o: True,
    "stripdnshttpsrecords": lambda o: not _modes(o, "dns"),
    "blocklist": _unset("block_list"),
    "anticache": _unset("anticache"),
    "anticomp": _unset("anticomp"),
    "clientplayback": _unset("client_replay"),
    "serverplayback": _unset("server_replay"),
    "onboarding": _unset("onboarding"),
    "proxyauth": _unset("proxyauth"),
    "mapremote": _unset("map_remote"),
    "maplocal": _unset("map_local"),
    "modifybody": _unset("modify_body"),
    "modifyheaders": _unset("modify_headers"),
    "stickyauth": _unset("stickyauth"),
    "stickycookie": _unset("stickycookie"),
    "save": _unset("save_stream_file"),
    "savehar": _unset("hardump"),
    "upstreamauth": _unset("upstream_auth"),
    "updatealtsvc": lambda o: not _modes(o, "reverse"),
    "dumper": _unset("flow_detail"),
    "readfilestdin": lambda o: getattr(o, "rfile", None) != "-",
}


def inert(names: list[str], options: Any) -> list[str]:
    """Which of these built-in addon names have nothing to do under `options`."""
    return [n for n in names if n in INERT and INERT[n](options)]


OPTIONS: tuple[Option, ...] = (
    Option(
        "lean_chain",
        bool,
        True,
        "Under mitmdump, take built-in addons whose options leave them nothing to do "
        "(map_remote, modify_headers, save_stream_file, ... unset) out of the event chain, "
        "which makes every request cheaper; a removed addon comes back when one of its "
        "options is turned on (mitmdump only). Also walks the chain once per hook, not once "
        "per event.",
    ),
)


class LeanChain:
    def __init__(self) -> None:
        self.removed: dict[str, Any] = {}
        self.order: list[Any] = []
        self.active = False

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def running(self) -> None:
        from mitmproxy.tools.dump import DumpMaster

        if not ctx.options.lean_chain or not isinstance(ctx.master, DumpMaster):
            return
        self.active = True
        manager = ctx.master.addons
        self.order = list(manager.chain)
        names = {_get_name(a): a for a in self.order}
        self.removed = {name: names[name] for name in inert(list(names), ctx.options)}
        # Only out of the chain: they stay registered (addons.get() finds them, their options
        # stay declared) and are not torn down, so putting one back is just re-inserting it.
        gone = set(map(id, self.removed.values()))
        manager.chain = [a for a in manager.chain if id(a) not in gone]
        if self.removed:
            log.info("lean chain: removed inert built-in addons: %s", ", ".join(self.removed))

    def configure(self, updated: set[str]) -> None:
        if "lean_chain" in updated:
            if ctx.options.lean_chain:
                dispatch.install(by="leanchain")
            else:
                dispatch.uninstall(by="leanchain")
        if not self.active:
            return
        if "lean_chain" in updated and not ctx.options.lean_chain:
            self._restore(list(self.removed))
        else:
            self._restore([n for n in self.removed if not INERT[n](ctx.options)])

    def done(self) -> None:
        dispatch.uninstall(by="leanchain")

    def _restore(self, names: list[str]) -> None:
        if not names:
            return
        manager = ctx.master.addons
        back = [self.removed.pop(n) for n in names]
        present = set(map(id, manager.chain)) | set(map(id, back))
        # Original order for the built-ins, then anything added to the chain since.
        chain = [a for a in self.order if id(a) in present]
        known = set(map(id, self.order))
        manager.chain = chain + [a for a in manager.chain if id(a) not in known]
        for addon in back:
            # Removed addons missed every configure event meanwhile.
            manager.invoke_addon_sync(addon, hooks.ConfigureHook(set(ctx.options.keys())))
        log.info("lean chain: put back %s (an option now needs it)", ", ".join(names))


addons = [LeanChain()]
