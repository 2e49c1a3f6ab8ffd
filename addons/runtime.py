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
  PYTHONOPTIMIZE.

Options:
- `server_event_loop` (auto|uvloop|asyncio, "asyncio"): read by the worker before mitmproxy
  starts; here it is only compared with the loop that runs.
- `server_gc_freeze` (bool, true): freeze the startup heap once the proxy runs.
- `server_gc_threshold` (str, "2000,10,100"): the collector's three thresholds;
  "700,10,10" is CPython's own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import Any

from mitmproxy import ctx, exceptions

from addons.kernel.options import Option, declare

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

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "server_gc_threshold" in updated:
            try:
                threshold = parse_threshold(ctx.options.server_gc_threshold)
            except ValueError as e:
                raise exceptions.OptionsError(f"server_gc_threshold: {e}") from None
            gc.set_threshold(*threshold)
        if "cli_enabled" in updated and ctx.options.cli_enabled and running_loop() == "uvloop":
            raise exceptions.OptionsError(
                "cli_enabled: this worker runs uvloop, whose subprocesses would inherit the "
                "proxy's descriptors; the CLI needs a restart with server.event_loop auto or "
                "asyncio"
            )

    def running(self) -> None:
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


addons = [Runtime()]
