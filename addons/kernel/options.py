"""Turning flat option values into checked values, and what every addon's lifecycle needs.

- `Option`, `declare`: an addon's options as one table, declared in `load` with one call; an
  option with `choices` refuses any other value (mitmproxy itself never checks `choices`: its
  `OptManager` only type-checks, and uses them for help and the console's pickers).
- `size`, `duration`, `choice`, `at_least`: parse one option value or raise `OptionsError`
  naming the option, so `--set` and a profile fail with the same readable message.
- `spawn`: start a background task the event loop keeps alive (it holds only weak references).
- `once`: one object per process (a Prometheus collector, a hook class) however often a
  script is reloaded: `-s addons/x.py` re-executes the module, the kernel is imported once.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from mitmproxy import exceptions

from addons.kernel.units import parse_duration, parse_size

T = TypeVar("T")
log = logging.getLogger("waypost.options")

_tasks: set[asyncio.Task[Any]] = set()
_singletons: dict[str, Any] = {}
# The choice checks of each live OptManager (by id): its subscriptions hold weak references.
_choice_checks: dict[int, dict[str, Callable[[Any, set[str]], None]]] = {}


class Option(NamedTuple):
    """One flat option; `help` stays on one line (mitmproxy resets an option whose stored,
    flattened help differs from the raw one on a script reload)."""

    name: str
    typespec: Any
    default: Any
    help: str
    choices: Sequence[str] | None = None


def declare(loader: Any, table: Iterable[Option]) -> None:
    table = list(table)
    for o in table:
        loader.add_option(o.name, o.typespec, o.default, o.help, o.choices)
    options = loader.master.options
    if id(options) not in _choice_checks:
        _choice_checks[id(options)] = {}
        weakref.finalize(options, _choice_checks.pop, id(options), None)
    for o in table:
        if not o.choices:
            continue
        _refuse_deferred(options, o.name, o.choices)
        check = _choices_check(o.name, o.choices)
        _choice_checks[id(options)][o.name] = check
        # Subscribers run before any addon's configure, so no addon sees a bad value, and
        # the OptionsError rolls the whole update back.
        options.subscribe(check, [o.name])


def _refuse_deferred(options: Any, name: str, choices: Collection[str]) -> None:
    """A `--set` value outside the choices, waiting for this option to be declared, is logged
    as an ERROR (which stops mitmproxy during startup) and dropped. Raising here instead would
    abort the script's registration, which mitmproxy 11/12 do not report when the script is
    loaded by its watcher task: the proxy would run without the addons."""
    if name not in options.deferred:
        return
    # mitmproxy keeps --set values unparsed until the option exists (_UnconvertedStrings.val).
    raw = options.deferred[name]
    values = getattr(raw, "val", raw)
    for value in values if isinstance(values, list | tuple) else [values]:
        try:
            choice(name, value, choices)
        except exceptions.OptionsError as e:
            del options.deferred[name]
            log.error("--set %s", e)
            return


def _choices_check(name: str, choices: Collection[str]) -> Callable[[Any, set[str]], None]:
    def check(options: Any, updated: set[str]) -> None:
        value = getattr(options, name)
        for item in value if isinstance(value, list | tuple) else [value]:
            choice(name, item, choices)

    return check


def size(option: str, value: str | int, minimum: int = 0) -> int:
    """Bytes from `10MB`, `512k` or a number; `OptionsError` naming `option` otherwise."""
    try:
        n = parse_size(value)
    except ValueError as e:
        raise exceptions.OptionsError(f"{option}: {e}") from None
    return at_least(option, n, minimum)


def duration(option: str, value: str | float, minimum: float = 0.0) -> float:
    """Seconds from `30s`, `500ms`, `2m` or a number; `OptionsError` naming `option` otherwise."""
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise exceptions.OptionsError(f"{option}: {e}") from None
    return at_least(option, seconds, minimum)


def at_least(option: str, value: T, minimum: Any) -> T:
    if value < minimum:  # type: ignore[operator]
        raise exceptions.OptionsError(f"{option}: must be {minimum} or more, got {value}")
    return value


def choice(option: str, value: str, choices: Collection[str]) -> str:
    """`value` if it is one of `choices`, else an `OptionsError` naming the allowed ones."""
    if value not in choices:
        raise exceptions.OptionsError(
            f"{option}: {value!r} is not one of {', '.join(map(repr, choices))}"
        )
    return value


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run `coro` as a task that is not garbage-collected before it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


def once(name: str, factory: Callable[[], T]) -> T:
    """The process's one object called `name`, made by `factory` the first time it is asked for."""
    try:
        return _singletons[name]  # type: ignore[no-any-return]
    except KeyError:
        obj = _singletons[name] = factory()
        return obj
