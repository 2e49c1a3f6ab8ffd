"""Config: choose the profile, validate it, apply it as flat options, reload it on change.

The profile never reaches the addons directly: it becomes their flat options
(`schema.to_options`), applied with one `ctx.options.update()`. That update is atomic: when
any addon's `configure` refuses a value, mitmproxy rolls every option back, so a bad reload
leaves the old config in force.

Precedence: an option set on the command line (or in mitmweb) > environment > profile > default.

An unknown `--set` option that looks like a Waypost one (a Waypost prefix such as `filter_`, or
close to a known name) stops startup with a did-you-mean: mitmproxy keeps unknown `--set`
values aside ("deferred") in case an addon declares them later, and says nothing once none did.
Checked when the profile is applied if every `-s` script is loaded by then (before anything
listens), else in `running`.

At startup (mitmdump or mitmweb, nothing listening yet) a refused profile or `--set` value prints
one line per problem, `file:line: key.path: message` (or `--set name: message`), and exits 1
before the listeners open: raised as an OptionsError it would arrive as a traceback from
mitmproxy's script loader, after a "listening" line. validate-config (`addons/schema/validate.py`)
runs this same load and apply in a master that never listens.

Hooks: load, configure (startup load), running (unknown options, file watcher, SIGHUP), done.
Secrets (`SECRETS`: admin_token, cli_token) are shown as "********" by mitmweb's option editor
(its options API goes through `optmanager.dump_dicts`, patched here: no hook hides an option's
value). `mitmdump --options` prints defaults only, never a value.
Command: waypost.reload (mitmweb's command bar, mitmproxy's `:` prompt), as POST /admin/reload.
Sources: `sources()` says where each option's value came from (file:line, environment variable,
--set or a runtime change, default): GET /admin/config, through the management app.
Options: waypost_profile.
Metrics: config_reloads_total{result="success"|"failure"} (reloads after startup),
config_last_reload_successful (0 while the running config is not the file's latest version),
config_last_reload_success_timestamp_seconds.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import Any, NamedTuple, NoReturn

from mitmproxy import command, ctx, exceptions, optmanager
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons import metrics, schema
from addons.kernel import patching
from addons.kernel.options import once, spawn

log = logging.getLogger("waypost.config")

WATCH_INTERVAL = 1.0
# Options that change the listeners; a profile's `mitmproxy: {mode: [...]}` (reverse
# listeners) needs the same late rebind on mitmproxy 12 as the listen address.
_LISTEN = {"listen_host", "listen_port", "mode"}


class ReloadStats:
    """Reload outcomes as plain numbers, made into Prometheus families when scraped."""

    def __init__(self) -> None:
        self.reloads = {"success": 0, "failure": 0}
        self.last_ok = True
        self.last_success = 0.0

    def applied(self, *, reload: bool) -> None:
        if reload:
            self.reloads["success"] += 1
        self.last_ok = True
        self.last_success = time.time()

    def refused(self) -> None:
        self.reloads["failure"] += 1
        self.last_ok = False

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "config_reloads_total",
            "Profile reloads after startup (file change, SIGHUP, /admin/reload), by result.",
            labels=["result"],
        )
        for result, n in self.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily(
            "config_last_reload_successful",
            "1 when the last load or reload of the profile was applied, 0 when it was refused.",
            1 if self.last_ok else 0,
        )
        yield GaugeMetricFamily(
            "config_last_reload_success_timestamp_seconds",
            "Unix time the running profile was applied.",
            self.last_success,
        )


def _stats() -> ReloadStats:
    stats = ReloadStats()
    metrics.REGISTRY.register(stats)
    return stats


# Once per process: the counts survive a reload of the script that imports this module.
STATS = once("config.reload_stats", _stats)


SECRETS = frozenset({"admin_token", "cli_token"})
HIDDEN = "********"


def _redacted_dicts(opts: Any, keys: Any = None) -> dict[str, Any]:
    dumped: dict[str, Any] = getattr(_redacted_dicts, patching.CHAIN)(opts, keys)
    for name in SECRETS & dumped.keys():
        for field in ("value", "default"):
            if dumped[name][field]:
                dumped[name][field] = HIDDEN
    return dumped


REDACT = patching.Patch(
    key="config.redact_secrets",
    target=optmanager,
    name="dump_dicts",
    replacement=_redacted_dicts,
    missing="mitmweb's options API (GET /options, its websocket updates) sends every option's "
    "value through optmanager.dump_dicts, and no hook lets an addon hide one",
)


class Config:
    def __init__(self) -> None:
        self.loaded = False
        self.reload_error: str | None = None
        self.current: schema.Loaded | None = None
        self._applied: dict[str, Any] = {}
        self._mtime: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rebind = False

    def load(self, loader: Any) -> None:
        patching.install(REDACT, unchecked="mitmweb shows admin_token and cli_token", by="config")
        loader.add_option(
            "waypost_profile",
            str,
            "",
            # One line: mitmproxy compares a reloaded script's help with the stored, flattened
            # text, and a multi-line help resets the option on every script reload.
            "Path of the YAML profile to run with. Empty: the WAYPOST_PROFILE environment "
            "variable, else profiles/default.yaml. The file is re-read when it changes, on SIGHUP "
            "and on POST /admin/reload; a bad new version is refused and the old one stays.",
        )

    def configure(self, updated: set[str]) -> None:
        if "waypost_profile" not in updated:
            return
        path = self.path()
        starting = self._starting()
        try:
            loaded = schema.load(path, os.environ)
        except schema.ProfileError as e:
            self.reload_error = str(e)
            STATS.refused()
            if starting:
                _refuse_startup(e.problems)
            raise exceptions.OptionsError(str(e)) from None
        try:
            self._apply(loaded)
        except exceptions.OptionsError as e:
            STATS.refused()
            if starting:
                _refuse_startup(str(e).splitlines())
            raise
        if starting and _startup_errors():
            # A bad `--set` was logged as an ERROR while the bundle loaded; mitmproxy would
            # only stop for it after the listeners are up.
            raise SystemExit(1)
        if starting and _scripts_loaded() and (unknown := unknown_options(ctx.options)):
            _refuse_startup(unknown)  # else `running` finds them, once every script declared
        self._mtime = _mtime(path)
        STATS.applied(reload=False)
        log.info("profile %s applied", loaded.source)

    def running(self) -> None:
        for problem in unknown_options(ctx.options):
            # ERROR during startup: mitmproxy's errorcheck stops the proxy with this line.
            log.error(problem)
        loop = asyncio.get_running_loop()
        if self._rebind:
            self._rebind = False
            _restart_listeners()
        self._spawn(self._watch())
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload_async()))
        except (NotImplementedError, RuntimeError):  # no signals on this platform/thread
            pass

    def done(self) -> None:
        patching.uninstall(REDACT.key, by="config")
        for task in self._tasks:
            task.cancel()
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError):
            pass

    def _starting(self) -> bool:
        """True while mitmdump or mitmweb start: the first load, no listener up yet, and
        mitmproxy's errorcheck set to stop startup on any ERROR (validate-config has none)."""
        master = ctx.master
        proxyserver = master.addons.get("proxyserver")
        return (
            not self.loaded
            and master.addons.get("errorcheck") is not None
            and proxyserver is not None
            and not proxyserver.is_running
        )

    def path(self) -> str | None:
        return schema.choose(ctx.options.waypost_profile, os.environ)

    def reload(self) -> tuple[bool, str]:
        """Re-read the profile now; on any error keep the running config. For /admin/reload."""
        path = self.path()
        try:
            loaded = schema.load(path, os.environ)
        except schema.ProfileError as e:
            return self._refused(str(e))
        return self._swap(loaded, path)

    @command.command("waypost.reload")
    def reload_command(self) -> str:
        """Re-read the Waypost profile now; a bad version is refused and the old one stays."""
        ok, message = self.reload()
        if not ok:
            raise exceptions.CommandError(f"profile reload refused: {message}")
        return message

    async def reload_async(self) -> tuple[bool, str]:
        """`reload` with the reading, parsing and validation off the event loop (20-30 ms for
        the soak's profile, which every connection would wait out); only the swap runs on it.
        File watcher, SIGHUP and POST /admin/reload."""
        path = self.path()
        try:
            loaded = await asyncio.to_thread(schema.load, path, dict(os.environ))
        except schema.ProfileError as e:
            return self._refused(str(e))
        return self._swap(loaded, path)

    def _swap(self, loaded: schema.Loaded, path: str | None) -> tuple[bool, str]:
        try:
            self._apply(loaded)
        except exceptions.OptionsError as e:
            return self._refused(str(e))
        self._mtime = _mtime(path)
        STATS.applied(reload=True)
        log.warning("profile %s reloaded", loaded.source)
        return True, f"profile {loaded.source} reloaded"

    def _refused(self, why: str) -> tuple[bool, str]:
        # WARNING, not ERROR: at startup an ERROR makes mitmdump exit, and this is recoverable.
        self.reload_error = why
        STATS.refused()
        log.warning("profile reload refused, keeping the running config: %s", why)
        return False, why

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            path = self.path()
            mtime = await asyncio.to_thread(_mtime, path)
            if mtime != self._mtime:
                self._mtime = mtime
                await self.reload_async()

    def _apply(self, loaded: schema.Loaded) -> None:
        wanted = schema.to_options(loaded.profile)
        for key in loaded.profile.mitmproxy:
            if key not in ctx.options:
                raise exceptions.OptionsError(
                    f"{loaded.where(('mitmproxy', key))}: mitmproxy.{key}: not a mitmproxy "
                    f"option (see `mitmdump --options`)"
                )
        updates = {
            key: value
            for key, value in wanted.items()
            # Options of addons that are not loaded are simply not there.
            if key in ctx.options and not self._set_by_user(key)
        }
        try:
            ctx.options.update(**updates)
        # TypeError: mitmproxy's type check of a `mitmproxy:` value (a string for an int).
        except (exceptions.OptionsError, TypeError) as e:
            raise exceptions.OptionsError(self._locate(loaded, str(e), updates)) from None
        if _LISTEN & updates.keys():
            self._rebind_listeners()
        self._applied = updates
        self.current = loaded
        self.loaded = True
        self.reload_error = None

    def _rebind_listeners(self) -> None:
        """Make a changed listen_host/listen_port/mode take effect: proxyserver only rebinds
        when `mode` or `server` change, and not before it runs."""
        ps = ctx.master.addons.get("proxyserver")
        if ps is None:
            return
        if getattr(ps, "is_running", False):
            drain = ctx.master.addons.get("drain")
            if not getattr(drain, "draining", False):  # shutting down: listeners stay closed
                _restart_listeners()
        elif ps.listen_addrs() or ps.servers.is_updating:
            # On Python 3.12 (mitmproxy 12) the -s script is loaded by a task that runs after
            # proxyserver has begun binding the command line's (or default) address: rebind
            # as soon as we are running.
            self._rebind = True

    def sources(self) -> list[Source]:
        """Every option a profile can set, with its profile key and where its value came from:
        `set` (command line, mitmweb, a runtime change), `env` (the variable), `file`
        (file:line) or `default`. In the option map's order, then the `mitmproxy:` section."""
        loaded = self.current
        # option -> (its key in the answer, the profile path its value comes from)
        keys: dict[str, tuple[str, tuple[str | int, ...]]] = {
            option: (".".join(path), path) for option, (path, _) in schema.OPTIONS.items()
        }
        if loaded is not None:
            for option in schema.listener_options(loaded.profile):
                keys[option] = (f"mitmproxy.{option}", ("routing", "listeners"))
            for option in loaded.profile.mitmproxy:
                keys[option] = (f"mitmproxy.{option}", ("mitmproxy", option))
        for option in schema.CORE_DEFAULTS:
            keys.setdefault(option, (f"mitmproxy.{option}", ("mitmproxy", option)))
        out = []
        for option, (key, path) in keys.items():
            if option not in ctx.options:
                continue  # its addon is not loaded
            if self._set_by_user(option):
                out.append(Source(key, option, "set", None))
            elif loaded is None:
                out.append(Source(key, option, "default", None))
            else:
                out.append(Source(key, option, *_origin(loaded, path)))
        return out

    def _set_by_user(self, key: str) -> bool:
        """True when someone other than this addon set the option (command line, mitmweb)."""
        if key in self._applied:
            return getattr(ctx.options, key) != self._applied[key]
        return ctx.options.has_changed(key)

    def _locate(self, loaded: schema.Loaded, message: str, updates: dict[str, Any]) -> str:
        """`file:line: key.path: message` for the option named in an addon's refusal."""
        # The `mitmproxy:` section is applied last, so its keys are the ones in force.
        paths = {option: ("mitmproxy", option) for option in loaded.profile.mitmproxy}
        for option, (path, _) in schema.OPTIONS.items():
            paths.setdefault(option, path)
        for option, path in paths.items():
            if re.search(rf"\b{option}\b", message):
                if option not in updates and ctx.options.has_changed(option):
                    # The command line's value, which the profile did not override.
                    return f"--set {option}: {message}"
                return f"{loaded.where(path)}: {'.'.join(path)}: {message}"
        return f"{loaded.source}: {message}"

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        # Kept here too: done() cancels what is still running.
        task = spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Source(NamedTuple):
    key: str  # the profile's key path, dotted
    option: str
    source: str  # file, env, set, default
    where: str | None  # file:line, or the variable


def _origin(loaded: schema.Loaded, path: tuple[str | int, ...]) -> tuple[str, str | None]:
    for target, var in loaded.env.items():
        if path[: len(target)] == target or target[: len(path)] == path:
            return "env", var
    line = loaded.lines.get(path)
    if line is None:
        # A list or mapping value: the first line written under the key.
        found = [n for p, n in loaded.lines.items() if p[: len(path)] == path]
        line = min(found) if found else None
    if line is None:
        return "default", None
    return "file", f"{loaded.source}:{line}"


def unknown_options(options: Any) -> list[str]:
    """One line per `--set` name no addon declared that looks like a Waypost option."""
    known = [*options.keys(), *schema.OPTIONS]
    prefixes = tuple({name.split("_", 1)[0] + "_" for name in known if name in schema.OPTIONS})
    problems = []
    for name in sorted(options.deferred):
        if name in schema.OPTIONS:
            problems.append(f"--set {name}: the addon that declares it is not loaded")
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close or name.startswith((*prefixes, "waypost_")):
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"--set {name}: not an option of any loaded addon{hint}")
    return problems


def _refuse_startup(problems: list[str]) -> NoReturn:
    """Print one line per problem and exit before anything listens: raised as an OptionsError,
    the problem would be logged with a traceback by mitmproxy's script loader, after which the
    proxy binds its listeners and only then exits."""
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(1)


def _scripts_loaded() -> bool:
    """True when every `-s` script is loaded, so every option that will exist is declared."""
    loader = ctx.master.addons.get("scriptloader")
    return loader is not None and all(getattr(s, "ns", None) for s in loader.addons)


def _startup_errors() -> bool:
    errorcheck = ctx.master.addons.get("errorcheck")
    return bool(errorcheck and errorcheck.logger.has_errored)


def _restart_listeners() -> None:
    ctx.options.update(server=False)
    ctx.options.update(server=True)


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


addons = [Config()]
