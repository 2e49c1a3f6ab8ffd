"""The flow record: the accessor, and Record against every key the addons' code uses.

The scan reads addons/**/*.py with `ast`. A record is a `record(...)` call, a name a function
binds to one (`meta = record(flow)`, also as a branch of `... if ... else ...`), or a parameter
annotated `Record`. On a record it checks subscripts, `.get`/`.setdefault`/`.pop`/`.update`
and `"key" in`; a key must be a string literal.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest
from mitmproxy.test import tflow

from addons.kernel.record import Record, record

ROOT = Path(__file__).resolve().parents[2]
KEYS = Record.__optional_keys__ | Record.__required_keys__
_METHODS = {"get": False, "pop": False, "setdefault": True, "update": True}


class Use(NamedTuple):
    where: str
    key: str | None  # None: not a string literal, so not checkable
    write: bool


def _record_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    return isinstance(node.func, ast.Name) and node.func.id == "record"


def _record_value(node: ast.AST | None) -> bool:
    if isinstance(node, ast.IfExp):
        return _record_value(node.body) or _record_value(node.orelse)
    return node is not None and _record_call(node)


def _names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The names `func` binds to a record."""
    args = func.args
    names = {
        a.arg
        for a in args.posonlyargs + args.args + args.kwonlyargs
        if isinstance(a.annotation, ast.Name) and a.annotation.id == "Record"
    }
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and _record_value(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if _record_value(node.value) or (
                isinstance(node.annotation, ast.Name) and node.annotation.id == "Record"
            ):
                names.add(node.target.id)
    return names


def _is_record(node: ast.AST, names: set[str]) -> bool:
    return _record_call(node) or (isinstance(node, ast.Name) and node.id in names)


def _key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def uses(source: str, filename: str) -> set[Use]:
    """Every key access on a record in `source`."""
    found: set[Use] = set()
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        names = _names(func)
        for node in ast.walk(func):
            where = f"{filename}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Subscript) and _is_record(node.value, names):
                write = not isinstance(node.ctx, ast.Load)
                found.add(Use(where, _key(node.slice), write))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _METHODS
                and _is_record(node.func.value, names)
            ):
                write = _METHODS[node.func.attr]
                if node.func.attr != "update":
                    found.add(Use(where, _key(node.args[0]) if node.args else None, write))
                    continue
                found.update(Use(where, k.arg, write) for k in node.keywords)
                for arg in node.args:
                    keys = arg.keys if isinstance(arg, ast.Dict) else [None]
                    found.update(Use(where, _key(k) if k else None, write) for k in keys)
            elif (
                isinstance(node, ast.Compare)
                and isinstance(node.ops[0], ast.In | ast.NotIn)
                and _is_record(node.comparators[0], names)
            ):
                found.add(Use(where, _key(node.left), False))
    return found


def addon_uses() -> set[Use]:
    found: set[Use] = set()
    for path in sorted((ROOT / "addons").rglob("*.py")):
        found |= uses(path.read_text(), str(path.relative_to(ROOT)))
    return found


def test_record_is_the_plain_dict_in_flow_metadata() -> None:
    f = tflow.tflow()
    rec = record(f)
    assert rec == {} and type(rec) is dict
    rec["local"] = "health"
    assert record(f) is rec is f.metadata["waypost"]


def test_every_key_the_addons_use_is_declared() -> None:
    found = addon_uses()
    assert len({u.where.partition(":")[0] for u in found}) > 10  # the scan sees the addons
    assert sorted(u for u in found if u.key not in KEYS) == []


def test_every_declared_key_is_written_somewhere() -> None:
    written = {u.key for u in addon_uses() if u.write}
    assert sorted(KEYS - written) == []


def test_every_declared_key_is_documented() -> None:
    source = (ROOT / "addons" / "kernel" / "record.py").read_text()
    lines = source.splitlines()
    (cls,) = (
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Record"
    )
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign)]
    assert {f.target.id for f in fields if isinstance(f.target, ast.Name)} == KEYS
    assert [f.lineno for f in fields if not lines[f.lineno - 2].lstrip().startswith("#")] == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ('def f(flow):\n    record(flow)["k"] = 1', ("k", True)),
        ('def f(flow):\n    return record(flow).get("k")', ("k", False)),
        ('def f(flow):\n    m = record(flow)\n    m.setdefault("k", []).append(1)', ("k", True)),
        ('def f(flow):\n    m = record(flow) if flow else {}\n    return m.pop("k")', ("k", False)),
        ("def f(flow):\n    m = record(flow)\n    m.update(k=1)", ("k", True)),
        ('def f(flow):\n    record(flow).update({"k": 1})', ("k", True)),
        ('def f(flow):\n    m = record(flow)\n    del m["k"]', ("k", True)),
        ('def f(flow, m: Record):\n    return "k" not in m', ("k", False)),
        ("def f(flow, name):\n    return record(flow)[name]", (None, False)),
    ],
)
def test_the_scan_sees_each_kind_of_access(source: str, expected: tuple[str | None, bool]) -> None:
    assert {(u.key, u.write) for u in uses(source, "x.py")} == {expected}


def test_the_scan_ignores_other_dicts() -> None:
    source = 'def f(flow, meta: dict):\n    flow.metadata["k"] = meta.get("k")\n    m = {}\n    m["k"] = 1'
    assert uses(source, "x.py") == set()
