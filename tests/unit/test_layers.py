"""The layers of docs/architecture.md, checked on the source: what each file may import.

- addons/kernel/: the base layer; imports no addon, only other kernel modules.
- errors, policy, metrics, state and schema/: the shared layer; import the kernel and each other.
- every other addon (an entry file such as cache.py and the package behind it, caching/):
  the kernel, the shared layer and its own package; never another addon.
- bundle.py: anything (it loads every addon in pipeline order).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADDONS = Path(__file__).resolve().parents[2] / "addons"
SHARED = {"errors", "policy", "metrics", "state", "schema"}
# Entry files and the package they stand in front of (a module and a package cannot share a name).
PACKAGES = {
    "cache": "caching",
    "cli": "clirun",
    "router": "routing",
    "management": "admin",
    "ratelimit": "ratelimiting",
}


def _unit(path: Path) -> str:
    """The import unit a file belongs to: kernel, an addon (entry and package together), or a
    shared module."""
    rel = path.relative_to(ADDONS)
    top = rel.parts[0].removesuffix(".py")
    return PACKAGES.get(top, top)


def _imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "addons":
                continue
            if len(parts) > 1:
                units.add(parts[1])
            else:  # from addons import errors, metrics
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "addons" and len(parts) > 1:
                    units.add(parts[1])
    return {PACKAGES.get(u, u) for u in units}


def _allowed(unit: str) -> set[str]:
    if unit == "kernel":
        return {"kernel"}
    if unit in SHARED:
        return {"kernel", *SHARED}
    return {"kernel", *SHARED, unit}


FILES = sorted(p for p in ADDONS.rglob("*.py") if p.name != "bundle.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ADDONS)))
def test_imports_stay_in_their_layer(path: Path) -> None:
    unit = _unit(path)
    if unit == "__init__":
        return
    assert _imported_units(path) - _allowed(unit) == set()


@pytest.mark.parametrize(
    "source, rel, expected",
    [
        ("from addons import errors, acl", "ratelimit.py", {"errors", "acl"}),
        ("from addons.kernel import net", "acl.py", {"kernel"}),
        ("import addons.caching.store", "cache.py", {"caching"}),
        ("def f():\n    from addons import tlslistener", "schema/models.py", {"tlslistener"}),
        ("from addons.cli import Cli", "bundle.py", {"clirun"}),
        ("from . import x\nimport os", "acl.py", set()),
    ],
)
def test_the_scan_sees_every_import(tmp_path: Path, source: str, rel: str, expected: set) -> None:
    path = tmp_path / "f.py"
    path.write_text(source)
    assert _imported_units(path) == expected


def test_every_addon_file_is_checked() -> None:
    names = {str(p.relative_to(ADDONS)) for p in FILES}
    assert {"kernel/net.py", "caching/addon.py", "acl.py", "schema/models.py"} <= names
