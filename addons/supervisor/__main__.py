"""`python -m addons.supervisor [mitmdump arguments]`: start one Waypost instance.

Resolves `server.workers` from the profile, the environment and `--set server_workers=N`
(`settings.resolve`; a bad profile stops here, exit 1). One worker: this process becomes the
worker (`os.execv`), exactly a plain mitmdump. More: `supervise.Supervisor` runs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from addons.kernel import instance
from addons.kernel.logformat import JsonFormatter, TextFormatter
from addons.supervisor.settings import SettingsError, resolve, usable_cores
from addons.supervisor.supervise import Supervisor

USAGE = """\
usage: python -m addons.supervisor [mitmdump arguments...]

Start one Waypost instance: server.workers mitmdump workers (profile key server.workers,
env WAYPOST_SERVER__WORKERS, or --set server_workers=N; a number or auto = one per usable
core; default 1), each running `mitmdump [mitmdump arguments...]`.

  1 worker   this process becomes mitmdump itself (exec): no supervisor is left.
  N workers  this process supervises them: they share the proxy listeners (SO_REUSEPORT,
             the kernel spreads connections), a crashed worker is restarted at once,
             SIGHUP reloads every worker, SIGTERM/SIGINT drains them all; the management
             port (metrics_host:metrics_port) serves the whole instance.

The profile is checked first (as scripts/validate-config does): an error exits 1.
Example: python -m addons.supervisor -s addons/bundle.py --set server_workers=auto
mitmdump's own options: python -m addons.supervisor.worker --help
"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    try:
        settings = resolve(argv, os.environ, usable_cores())
    except SettingsError as e:
        print(e, file=sys.stderr)
        return 1
    if settings.workers == 1:
        for name in (
            instance.WORKER,
            instance.WORKERS,
            instance.MANAGEMENT_FD,
            instance.INSTANCE_MANAGEMENT,
        ):
            os.environ.pop(name, None)
        os.execv(sys.executable, [sys.executable, "-m", "addons.supervisor.worker", *argv])
    handler = logging.StreamHandler(sys.stdout)
    json_mode = settings.options.get("log_format") == "json"
    handler.setFormatter(JsonFormatter() if json_mode else TextFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return asyncio.run(Supervisor(settings, argv).run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
