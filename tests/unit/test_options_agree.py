"""One source for every option: the schema, the option map, the addons and the docs agree.

For every profile key mapped to a flat option, the profile's default (what an empty profile
maps to) equals the `add_option` default of the bundle addon that declares the option; every
option a Waypost addon declares is set by a profile key or listed as having none; and
docs/configuration.md lists every key with its default, env variable and flat option, and names
every flat option.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import optmanager
from mitmproxy.exceptions import OptionsError
from mitmproxy.options import Options
from mitmproxy.test import taddons
from pydantic import BaseModel

from addons import bundle, schema
from addons.config import Config
from addons.kernel.units import parse_duration, parse_size

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Differences on purpose, each said in docs/configuration.md: option -> (addon's default,
# the empty profile's). compress.py loaded alone compresses; a profile opts in.
DELIBERATE: dict[str, tuple[Any, Any]] = {"compress_enabled": (True, False)}
# Profile keys that are not one flat option: listeners become core `mode` (and two more),
# `mitmproxy:` holds core options by their own names, the requirements' `enabled: false` switches turn
# other options off, and the filter's answer is always 403.
NOT_FLAT = {
    ("routing", "listeners"),
    ("mitmproxy",),
    ("security", "filtering", "response", "status"),
    *schema.SWITCHES,
}
# Flat options no profile key sets.
NO_KEY = {"waypost_profile", "lean_chain", "listen_backlog"}
CORE = set(Options().keys())
# Options of mitmproxy's built-in addons (not in the test context) that a profile key sets.
BUILTIN = {"tls_version_client_min"}
KeyPath = tuple[str, ...]


def leaves(model: type[BaseModel], path: KeyPath = ()) -> Iterator[KeyPath]:
    """Every profile key that holds a value (sections are walked into, lists of rules are not)."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaves(field.annotation, path + (name,))
        else:
            yield path + (name,)


@contextmanager
def bundle_context(*, config: bool = True) -> Iterator[taddons.context]:
    """Fresh instances of the bundle's addons in a test context; `done` undoes their patches
    of mitmproxy (the upstream, cache and router patch it when loaded)."""
    addons = [type(a)() for a in bundle.addons if config or not isinstance(a, Config)]
    with taddons.context(*addons) as tctx:
        try:
            yield tctx
        finally:
            for addon in reversed(addons):
                if hasattr(addon, "done"):
                    addon.done()


@cache
def declared() -> dict[str, Any]:
    """Every option the bundle's addons declare that core mitmproxy does not, with its default."""
    with bundle_context() as tctx:
        return {k: tctx.options.default(k) for k in tctx.options.keys() if k not in CORE}


def empty_profile_options() -> dict[str, Any]:
    return schema.to_options(schema.load(None, {}).profile)


def same(addon_default: Any, mapped: Any) -> bool:
    """Equal as option values: sequences by items, sizes and durations by what they mean."""
    if isinstance(addon_default, list | tuple):
        return list(addon_default) == list(mapped)
    if addon_default == mapped:
        return True
    if isinstance(addon_default, str) and isinstance(mapped, str):
        for parse in (parse_size, parse_duration):
            try:
                return bool(parse(addon_default) == parse(mapped))
            except ValueError:
                continue
    return False


def doc_rows() -> dict[KeyPath, list[str]]:
    """The reference tables' rows: key path -> [default, env var, flat option, meaning]."""
    rows: dict[KeyPath, list[str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 5 and (m := re.fullmatch(r"`([a-z_]+(?:\.[a-z_]+)*)`", cells[0])):
            rows[tuple(m.group(1).split("."))] = cells[1:]
    return rows


def first_code(cell: str) -> str | None:
    m = re.search(r"`([^`]+)`", cell)
    return m.group(1) if m else None


def at(obj: Any, path: KeyPath) -> Any:
    for key in path:
        obj = getattr(obj, key)
    return obj


def test_every_key_is_one_flat_option_or_says_why_not() -> None:
    paths = [path for path, _ in schema.OPTIONS.values()]
    assert len(set(paths)) == len(paths), "two options read the same key"
    keys = set(leaves(schema.Profile))
    assert keys - NOT_FLAT - set(paths) == set(), "keys no option reads"
    assert set(paths) - keys == set(), "options reading no key"


def test_every_declared_option_is_set_by_a_key_or_listed_without_one() -> None:
    mapped = set(schema.OPTIONS)
    assert mapped & CORE == {"listen_host", "listen_port"}
    assert set(declared()) - mapped - NO_KEY == set(), "options no profile key sets"
    assert (mapped - CORE - BUILTIN) - set(declared()) == set(), "mapped options no addon declares"


@pytest.mark.parametrize("option", sorted(set(schema.OPTIONS) - CORE - BUILTIN))
def test_profile_default_is_the_addon_default(option: str) -> None:
    addon_default, mapped = declared()[option], empty_profile_options()[option]
    if option in DELIBERATE:
        assert (addon_default, mapped) == DELIBERATE[option]
    else:
        assert same(addon_default, mapped), f"{option}: addon {addon_default!r}, {mapped!r}"


def test_addons_accept_what_the_empty_profile_maps_to() -> None:
    with bundle_context(config=False) as tctx:
        opts = {k: v for k, v in empty_profile_options().items() if k in tctx.options}
        tctx.options.update(**opts)


def test_docs_list_every_key_with_its_option_env_and_default() -> None:
    rows = doc_rows()
    assert set(leaves(schema.Profile)) - set(rows) == set(), "keys missing from the reference"
    options = {path: option for option, (path, _) in schema.OPTIONS.items()}
    env: dict[KeyPath, set[str]] = {}
    for var, path in schema.ENV_OVERRIDES.items():
        env.setdefault(path, set()).add(var)
    default = schema.Profile()
    for path, (shown, var, option, meaning) in rows.items():
        key = ".".join(path)
        assert meaning, key
        assert set(re.findall(r"`([^`]+)`", var)) == env.get(path, set()), f"{key}: env var"
        if path not in NOT_FLAT:
            assert first_code(option) == options[path], f"{key}: flat option"
        assert at(with_value(path, doc_default(key, shown)), path) == at(default, path), key


def doc_default(key: str, cell: str) -> Any:
    if cell in ("none", "empty"):
        return None if cell == "none" else ""
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"{key}: a default is none, empty or one `value`, not {cell!r}"
    return yaml.safe_load(m.group(1))


def with_value(path: KeyPath, value: Any) -> schema.Profile:
    data: dict[str, Any] = {}
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return schema.Profile.model_validate(data)


def test_docs_name_every_flat_option() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [o for o in [*declared(), *schema.CORE_DEFAULTS] if f"`{o}`" not in text]
    assert not missing


# Options whose addon checks the value itself (case-insensitively) instead of declaring choices.
CHECKED_BY_ADDON = {"secheaders_content_type_options", "secheaders_frame_options"}


def literal_choices(path: KeyPath) -> tuple[str, ...] | None:
    model: type[BaseModel] = schema.Profile
    for key in path[:-1]:
        model = model.model_fields[key].annotation  # type: ignore[assignment]
    annotation = model.model_fields[path[-1]].annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(c) for c in typing.get_args(annotation))
    return None


@cache
def declared_choices() -> dict[str, Any]:
    with bundle_context() as tctx:
        return {k: v["choices"] for k, v in optmanager.dump_dicts(tctx.options).items()}


def test_options_declare_the_choices_of_their_key() -> None:
    for option, (path, _) in schema.OPTIONS.items():
        choices = literal_choices(path)
        if option in CORE | BUILTIN | CHECKED_BY_ADDON or choices is None:
            continue
        if option == "compress_algorithms":  # compress.py lowercases and checks the list itself
            continue
        assert declared_choices()[option] is not None, f"{option}: no choices declared"
        assert set(declared_choices()[option]) == set(choices), option


@pytest.mark.parametrize(
    "option",
    sorted(o for o, c in declared_choices().items() if c and o not in CORE),
)
def test_a_value_outside_the_choices_is_refused_naming_them(option: str) -> None:
    with bundle_context(config=False) as tctx:
        before = getattr(tctx.options, option)
        with pytest.raises(OptionsError) as e:
            tctx.options.update(**{option: "bogus"})
        assert str(e.value).startswith(f"{option}: 'bogus' is not one of ")
        assert all(repr(c) in str(e.value) for c in declared_choices()[option])
        assert getattr(tctx.options, option) == before
