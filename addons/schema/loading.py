"""Loading a profile: read the YAML, keep the line of every key, merge the environment,
validate, and report every problem at once as `file:line: key.path: message (hint)`.

    load("profiles/prod.yaml", os.environ) -> Loaded     # raises ProfileError
    choose(ctx.options.waypost_profile, os.environ) -> the path startup loads (or None)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from addons.schema import env
from addons.schema.models import ALIASES, Profile

Lines = dict[tuple[str | int, ...], int]
DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "default.yaml"


class ProfileError(ValueError):
    """Every problem of one profile, each as `file:line: key.path: message (hint)`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        super().__init__(
            f"{source}: {n} problem{'s' if n != 1 else ''}:\n"
            + "\n".join(f"  {p}" for p in problems)
        )


@dataclass(frozen=True)
class Loaded:
    profile: Profile
    source: str
    lines: Mapping[tuple[str | int, ...], int]
    env: Mapping[tuple[str, ...], str]

    def where(self, path: tuple[str | int, ...]) -> str:
        """`file:line` (or the env var) that set the value at `path`, for error messages."""
        for target, var in self.env.items():
            if path[: len(target)] == target:
                return f"environment variable {var}"
        line = _nearest_line(self.lines, path)
        return f"{self.source}:{line}" if line else self.source


def choose(option: str, environ: Mapping[str, str]) -> str | None:
    """The profile to run: the `waypost_profile` option, else WAYPOST_PROFILE, else
    profiles/default.yaml when it exists (None: defaults + env)."""
    chosen = option or environ.get("WAYPOST_PROFILE", "")
    if chosen:
        return chosen
    return str(DEFAULT_PROFILE) if DEFAULT_PROFILE.exists() else None


def load(path: str | Path | None, environ: Mapping[str, str]) -> Loaded:
    """Read, merge env overrides into, and validate one profile (None: defaults + env)."""
    source = str(path) if path else "<defaults>"
    data: Any = {}
    lines: Lines = {}
    problems: list[str] = []
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ProfileError(source, [f"{source}: cannot read the profile: {e.strerror}"]) from e
        data, lines, problems = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ProfileError(source, problems)
    problems += _other_names(data, lines, source)
    env_paths, env_problems = env.apply(data, environ)
    problems += env_problems
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        problems += [_describe(err, source, lines, env_paths) for err in e.errors()]
        raise ProfileError(source, problems) from None
    if problems:
        raise ProfileError(source, problems)
    return Loaded(profile, source, lines, env_paths)


def _other_names(data: dict[str, Any], lines: Lines, source: str) -> list[str]:
    """Move the aliases (the product requirements' spellings) to the keys they stand for, with
    their lines; sections the moves empty are dropped."""
    problems: list[str] = []
    for alias, target in ALIASES.items():
        value = _pop(data, alias)
        if value is _MISSING:
            continue
        parent = data
        for key in target[:-1]:
            parent = parent.setdefault(key, {})
            if not isinstance(parent, dict):
                break
        else:
            if target[-1] in parent:
                where = f"{source}:{lines.get(alias, 0)}"
                problems.append(
                    f"{where}: {'.'.join(alias)}: another name for {'.'.join(target)}, "
                    "which is also given: keep one"
                )
                continue
            parent[target[-1]] = value
            for path in [p for p in lines if p[: len(alias)] == alias]:
                lines[target + path[len(alias) :]] = lines[path]
    return problems


_MISSING = object()


def _pop(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """Remove and return the value at `path` (`_MISSING` if absent), then any emptied parent."""
    parents = [data]
    for key in path[:-1]:
        child = parents[-1].get(key)
        if not isinstance(child, dict):
            return _MISSING
        parents.append(child)
    value = parents[-1].pop(path[-1], _MISSING)
    if value is not _MISSING:
        for depth in range(len(path) - 1, 0, -1):
            if parents[depth]:
                break
            del parents[depth - 1][path[depth - 1]]
    return value


def _parse_yaml(text: str, source: str) -> tuple[Any, Lines, list[str]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        return None, {}, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]
    if root is None:
        return {}, {}, []
    lines: Lines = {}
    problems: list[str] = []
    _walk(root, (), lines, problems, source)
    if not isinstance(root, yaml.MappingNode):
        return (
            [],
            lines,
            [f"{source}:{root.start_mark.line + 1}: a profile is a mapping of sections"],
        )
    data = yaml.safe_load(text)
    return data, lines, problems


def _walk(
    node: yaml.Node,
    path: tuple[str | int, ...],
    lines: Lines,
    problems: list[str],
    source: str,
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                # PyYAML silently keeps the last duplicate; a profile that says two things is wrong.
                dotted = ".".join(map(str, path + (key,)))
                problems.append(f"{source}:{key_node.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(key)
            _walk(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, problems, source)


def _nearest_line(lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 0


def _describe(
    err: Any,
    source: str,
    lines: Mapping[tuple[str | int, ...], int],
    env_paths: Mapping[tuple[str, ...], str],
) -> str:
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    dotted = ".".join(map(str, loc)) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    hint = ""
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
    elif "input" in err and not isinstance(err["input"], dict) and repr(err["input"]) not in msg:
        hint = f" (got {err['input']!r})"
    for target, var in env_paths.items():
        # A section's own check (loc a prefix of the key) is the variable's when the file
        # does not write that section.
        if loc[: len(target)] == target or (target[: len(loc)] == loc and loc not in lines):
            return f"environment variable {var}: {dotted}: {msg}{hint}"
    line = _nearest_line(lines, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: {dotted}: {msg}{hint}"


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] = Profile
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)
