"""Every patch of mitmproxy internals: one list of checked versions, one chain per function.

Waypost replaces a few mitmproxy functions where no hook lets an addon do the job (each
`Patch` says which hook is missing). They all go through here, so that:

- they apply only on `CHECKED_VERSIONS`, the mitmproxy releases whose code was read, which are
  exactly the ones pyproject.toml allows (tests/unit/test_kernel_patching.py checks both agree);
  on any other version `install` patches nothing and logs a WARNING saying what is lost;
- patches of one function form one chain, mitmproxy's own at the bottom: each replacement
  calls what it replaced as `replacement.__waypost_wrapped__` (`CHAIN`), the only link;
- the chain's order is the patches' `order` (lower runs first), not the order the addons
  load in; equal orders run newest first;
- a patch is known by its `key`: installing it again (a script reload re-executes a module and
  makes new functions) replaces the earlier copy in place, so wrappers never stack;
- a patch several addons need (errors.py's error page) is held by each (`by`), and leaves its
  chain when the last holder uninstalls it; when a chain is empty mitmproxy's own is back.

The registry lives in this module, which is imported once per process whatever the scripts do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mitmproxy import version

log = logging.getLogger("waypost.patching")

# The mitmproxy versions every patch was written against; pyproject.toml pins exactly these.
CHECKED_VERSIONS = ("11.0.2", "12.3.1")
CHAIN = "__waypost_wrapped__"

_ABSENT: Any = object()  # the patched attribute did not exist on the target itself


@dataclass(frozen=True)
class Patch:
    """One replaced attribute of a mitmproxy class or module.

    `replacement` is usually a function that calls `replacement.__waypost_wrapped__`; it may be
    any value (a property, a default) for an attribute mitmproxy does not define.
    """

    key: str  # unique per patch, e.g. "routing.retry.make_server_connection"
    target: Any  # the class or module
    name: str  # the attribute replaced
    replacement: Any
    missing: str  # the hook mitmproxy lacks, i.e. why this patch exists
    order: int = 0  # within one function's chain: lower runs first, mitmproxy's own last


@dataclass
class _Chain:
    original: Any  # what the bottom patch wraps (maybe inherited), or _ABSENT
    own: bool  # whether `original` was the target's own attribute, to put back on uninstall
    patches: list[Patch]  # top (runs first) to bottom


_chains: dict[tuple[Any, str], _Chain] = {}
_holders: dict[str, set[str]] = {}  # patch key -> who installed it


def checked(mitmproxy_version: str) -> bool:
    return mitmproxy_version in CHECKED_VERSIONS


def install(*patches: Patch, unchecked: str, by: str = "") -> bool:
    """Put `patches` in their functions' chains, held by `by`; idempotent per key.

    On a mitmproxy version not in CHECKED_VERSIONS nothing is patched, a WARNING says what does
    not work then (`unchecked`), and the result is False.
    """
    if not checked(version.VERSION):
        log.warning(
            "mitmproxy %s is not a version Waypost checked (%s): %s",
            version.VERSION,
            ", ".join(CHECKED_VERSIONS),
            unchecked,
        )
        return False
    for patch in patches:
        _holders.setdefault(patch.key, set()).add(by)
        slot = (patch.target, patch.name)
        chain = _chains.get(slot)
        if chain is None:
            chain = _chains[slot] = _new_chain(patch.target, patch.name)
        keys = [p.key for p in chain.patches]
        if patch.key in keys:  # reinstalled (a script reload): same place, new function
            chain.patches[keys.index(patch.key)] = patch
        else:
            at = next(
                (i for i, p in enumerate(chain.patches) if p.order >= patch.order),
                len(chain.patches),
            )
            chain.patches.insert(at, patch)
        _link(patch.target, patch.name, chain)
        log.debug(
            "patched %s.%s (%s): %s", _name(patch.target), patch.name, patch.key, patch.missing
        )
    return True


def uninstall(*keys: str, by: str = "") -> None:
    """Release `by`'s hold on these patches; those nobody holds leave their chains."""
    released = set()
    for key in keys:
        holders = _holders.get(key, set())
        holders.discard(by)
        if not holders:
            _holders.pop(key, None)
            released.add(key)
    for slot, chain in list(_chains.items()):
        kept = [p for p in chain.patches if p.key not in released]
        if len(kept) == len(chain.patches):
            continue
        chain.patches = kept
        target, name = slot
        if kept:
            _link(target, name, chain)
            continue
        del _chains[slot]
        if chain.own:
            setattr(target, name, chain.original)
        else:
            delattr(target, name)


def installed(key: str) -> bool:
    return key in _holders


def patches() -> list[Patch]:
    """Every installed patch, function by function, in the order they run."""
    return [p for chain in _chains.values() for p in chain.patches]


def _new_chain(target: Any, name: str) -> _Chain:
    if not isinstance(target, type):
        original = getattr(target, name, _ABSENT)
        return _Chain(original, original is not _ABSENT, [])
    # An inherited method is wrapped too, but uninstalling deletes the patch instead of
    # pinning the parent's function on the subclass.
    own = name in vars(target)
    original = next((vars(c)[name] for c in target.__mro__ if name in vars(c)), _ABSENT)
    return _Chain(original, own, [])


def _link(target: Any, name: str, chain: _Chain) -> None:
    below = chain.original
    for patch in reversed(chain.patches):
        if below is not _ABSENT:
            setattr(patch.replacement, CHAIN, below)
        below = patch.replacement
    setattr(target, name, below)


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
