"""One worker of an instance: mitmdump in this process, on the event loop the profile chose.

`python -m addons.supervisor.worker [mitmdump arguments]` runs what `mitmdump` would, on
asyncio (the default: measured ahead of uvloop here, docs/performance.md) or on uvloop when
`server.event_loop` asks for it (`auto`: when installed). The loop has to be chosen before
mitmproxy starts it (`mitmproxy.tools.main.run` calls `asyncio.run(main())`), so this reads the
settings the way the profile loader does, before any addon is loaded: `--set
server_event_loop=...` wins, else the profile (`--set waypost_profile=`, `WAYPOST_PROFILE`, else
profiles/default.yaml) with the environment merged in (`WAYPOST_EVENT_LOOP`). A profile that
does not load leaves asyncio: the config addon refuses it a moment later with its own message.

`auto` runs asyncio when the CLI is enabled: uvloop 0.23's subprocesses ignore `close_fds`
(its loop.pyx: "TODO: Implement close_fds") and refuse `user`/`group`, so every inheritable
descriptor of the proxy (the supervisor's management socket among them) would reach the
commands. `uvloop` with the CLI enabled refuses to start; `addons/runtime.py` refuses a reload
that turns the CLI on under uvloop, reports the loop that runs and tunes the collector.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from mitmproxy.tools.main import mitmdump

from addons.kernel import reuseport
from addons.supervisor.settings import set_options

LOOPS = ("auto", "uvloop", "asyncio")


def startup_settings(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, bool]:
    """(`server_event_loop`, `cli_enabled`) as mitmdump will see them once the profile is
    applied: a `--set` wins over the profile, as it does for every option."""
    given = set_options(argv)
    loop, cli = given.get("server_event_loop"), given.get("cli_enabled")
    if loop is None or cli is None:
        from addons import schema

        try:
            path = schema.choose(given.get("waypost_profile", ""), environ)
            profile = schema.load(path, environ).profile
        except (schema.ProfileError, OSError):
            pass
        else:
            loop = loop or profile.server.event_loop
            cli = cli or str(profile.cli.enabled)
    return loop or "asyncio", (cli or "false").lower() == "true"  # the option's default


class UvloopPolicy(asyncio.DefaultEventLoopPolicy):
    """asyncio's policy with uvloop's loops: `asyncio.run` inside mitmproxy then runs on uvloop.
    uvloop.install() says the same but warns on Python 3.12; `uvloop.run()` would need the
    coroutine, which mitmproxy creates and runs itself. Policies are deprecated from Python
    3.14 (mitmproxy 11 and 12 run on 3.11 and 3.12 here)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        import uvloop

        return uvloop.new_event_loop()


def use_loop(setting: str, cli: bool = False) -> str:
    """Install the loop for `setting` (auto|uvloop|asyncio) with the CLI on or off; the name of
    the loop that will run."""
    if setting not in LOOPS:
        raise SystemExit(f"server_event_loop: {setting!r} is not one of {', '.join(LOOPS)}")
    if setting == "asyncio" or (setting == "auto" and cli):
        return "asyncio"
    if cli:
        raise SystemExit(
            "server_event_loop is uvloop, but the CLI is enabled: uvloop's subprocesses would "
            "inherit the proxy's descriptors (set server.event_loop to auto or asyncio)"
        )
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if setting == "uvloop":
            raise SystemExit(
                "server_event_loop is uvloop, but uvloop is not installed "
                "(pip install uvloop, or set server.event_loop to auto or asyncio)"
            ) from None
        return "asyncio"
    asyncio.set_event_loop_policy(UvloopPolicy())
    return "uvloop"


def main(argv: list[str]) -> int:
    # Workers share the supervisor's stdout: one write per line keeps their lines whole.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    reuseport.install()
    use_loop(*startup_settings(argv, os.environ))
    return mitmdump(argv) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
