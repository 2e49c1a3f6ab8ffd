"""Runtime: the process's event loop and garbage collector, set up once and reported at start.

The event loop is chosen before mitmproxy starts it, by `addons/supervisor/worker.py` (the way
Waypost starts); this addon only reports which loop runs, and warns when the option asks for
one that a plain `mitmdump` could not give. The collector is tuned here: every object alive at startup
(about 116,000 with the prod profile: modules, the addons, indexes) is walked again by each
full collection, and with CPython's thresholds (700,10,10) a full collection came every
thousand cache misses or so, 20-100 ms each. docs/performance.md has the measurements.

Hooks:
- `configure`: `gc.set_threshold(...)` from `server_gc_threshold` (a reload applies it);
  refuses `cli_enabled` on uvloop (its subprocesses ignore `close_fds` and `user`, see the
  worker), so a reload cannot turn the CLI on in a worker that started without it.
- `running`: once, after the bundle and the profile loaded, `gc.collect()` then `gc.freeze()`
  (`server_gc_freeze`): what is alive now moves to the permanent generation, which later
  collections do not walk; then one INFO line with the loop, the freeze, the thresholds and
  PYTHONOPTIMIZE; and the memory trim task.

Memory trim (`server_memory_trim_interval`): glibc's allocator keeps what the process freed
and returns only the top of its heap to the system, so every burst of connections left RSS a
little higher: 1.2 MB per round of 440 slowloris connections, 0.6 MB per 132 CLI commands, with
no live object left behind (tracemalloc's traced memory flat). `malloc_trim(0)` releases the
free pages inside the heap too; called every minute it kept RSS flat through the same rounds
(113-114 MB against 112-129 MB), at 0.2-0.4 ms a call, in a thread. Not on other C libraries
(musl has no malloc_trim): the task is not started there.

Options:
- `server_event_loop` (auto|uvloop|asyncio, "asyncio"): read by the worker before mitmproxy
  starts; here it is only compared with the loop that runs.
- `server_gc_freeze` (bool, true): freeze the startup heap once the proxy runs.
- `server_gc_threshold` (str, "2000,10,100"): the collector's three thresholds;
  "700,10,10" is CPython's own.
- `server_memory_trim_interval` (str, "60s"): how often freed memory is given back; 0 never.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions

from addons.kernel.options import Option, declare, duration, spawn

log = logging.getLogger("waypost.runtime")

LOOPS = ("auto", "uvloop", "asyncio")

OPTIONS: tuple[Option, ...] = (
    Option(
        "server_event_loop",
        str,
        "asyncio",
        "Event loop of each worker: asyncio, uvloop, or auto (uvloop when installed). Chosen "
        "when the worker starts (python -m addons.supervisor), so a change needs a restart.",
        LOOPS,
    ),
    Option(
        "server_gc_freeze",
        bool,
        True,
        "Once the proxy runs, move every object alive after startup out of the garbage "
        "collector's reach (gc.freeze), so full collections do not walk it again.",
    ),
    Option(
        "server_gc_threshold",
        str,
        "2000,10,100",
        "The garbage collector's three thresholds (gc.set_threshold), e.g. 2000,10,100; "
        "700,10,10 is CPython's own.",
    ),
    Option(
        "server_memory_trim_interval",
        str,
        "60s",
        "How often memory the process freed is given back to the system (glibc malloc_trim), "
        "so RSS does not creep up after bursts of connections; 0: never.",
    ),
)


def parse_threshold(value: str) -> tuple[int, int, int]:
    """`2000,10,100` -> (2000, 10, 100); ValueError unless three whole numbers >= 1."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(
            f"expected three whole numbers of 1 or more, e.g. 700,10,10, got {value!r}"
        )
    first, second, third = map(int, parts)
    return first, second, third


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS). Looked up
    among the symbols the process has loaded (CDLL(None)): find_library would run ldconfig."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def running_loop() -> str:
    try:
        return loop_name(asyncio.get_running_loop())
    except RuntimeError:  # outside a loop (tests): mitmproxy configures addons inside it
        return "asyncio"


class Runtime:
    def __init__(self) -> None:
        self.frozen = 0  # objects moved to the permanent generation by this addon
        self.trim_interval = 60.0
        self.trimmer: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "server_gc_threshold" in updated:
            try:
                threshold = parse_threshold(ctx.options.server_gc_threshold)
            except ValueError as e:
                raise exceptions.OptionsError(f"server_gc_threshold: {e}") from None
            gc.set_threshold(*threshold)
        if "server_memory_trim_interval" in updated:
            self.trim_interval = duration(
                "server_memory_trim_interval", ctx.options.server_memory_trim_interval
            )
        if "cli_enabled" in updated and ctx.options.cli_enabled and running_loop() == "uvloop":
            raise exceptions.OptionsError(
                "cli_enabled: this worker runs uvloop, whose subprocesses would inherit the "
                "proxy's descriptors; the CLI needs a restart with server.event_loop auto or "
                "asyncio"
            )

    def running(self) -> None:
        trim = malloc_trim()
        if trim is not None and self.trimmer is None:
            self.trimmer = spawn(self._trim_every(trim))
        if ctx.options.server_gc_freeze and not self.frozen:
            # Garbage first: the collector never looks at frozen objects again, so a cycle
            # frozen now would never be freed.
            gc.collect()
            gc.freeze()
            self.frozen = gc.get_freeze_count()
        running = running_loop()
        wanted = ctx.options.server_event_loop
        cli = getattr(ctx.options, "cli_enabled", False)
        log.info(
            "runtime: event loop %s (server_event_loop=%s%s), gc.freeze %s, gc thresholds %s, "
            "PYTHONOPTIMIZE=%d, Python %s",
            running,
            wanted,
            ", the CLI is on" if cli else "",
            f"{self.frozen} objects" if self.frozen else "off",
            ",".join(map(str, gc.get_threshold())),
            sys.flags.optimize,
            sys.version.split()[0],
        )
        if wanted != "auto" and wanted != running:
            log.warning(
                "server_event_loop=%s, but this process runs %s: the loop is chosen when "
                "Waypost starts through python -m addons.supervisor (scripts/run, the image), "
                "not by a plain mitmdump or a reload",
                wanted,
                running,
            )

    def done(self) -> None:
        if self.trimmer is not None:
            self.trimmer.cancel()
            self.trimmer = None

    async def _trim_every(self, trim: Callable[[int], int]) -> None:
        while True:
            # Re-read each time: a reload may change the interval or turn trimming off (0).
            await asyncio.sleep(self.trim_interval or 60.0)
            if not self.trim_interval:
                continue
            if not log.isEnabledFor(logging.DEBUG):
                await asyncio.to_thread(trim, 0)
                continue
            before = rss_mb()
            await asyncio.to_thread(trim, 0)
            log.debug("runtime: malloc_trim: RSS %.1f -> %.1f MB", before, rss_mb())


addons = [Runtime()]
