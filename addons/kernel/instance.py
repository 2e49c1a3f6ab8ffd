"""Which worker of which instance this process is, as the supervisor told it.

The supervisor (`python -m addons.supervisor`) starts each worker with these environment
variables; a mitmdump started any other way has none of them and is an instance of one.

    WAYPOST_WORKER              this worker's index, 0 .. WAYPOST_WORKERS-1
    WAYPOST_WORKERS             how many workers the instance runs
    WAYPOST_MANAGEMENT_FD       a listening socket, bound by the supervisor on 127.0.0.1, that
                                this worker's management app serves (the instance app on the
                                management port reads every worker through it)
    WAYPOST_INSTANCE_MANAGEMENT the instance app's URL, for endpoints answered on the proxy
                                port that must speak for the whole instance (/metrics, /admin)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

WORKER = "WAYPOST_WORKER"
WORKERS = "WAYPOST_WORKERS"
MANAGEMENT_FD = "WAYPOST_MANAGEMENT_FD"
INSTANCE_MANAGEMENT = "WAYPOST_INSTANCE_MANAGEMENT"


@dataclass(frozen=True)
class Identity:
    index: int = 0
    workers: int = 1
    management_fd: int | None = None
    instance_management: str = ""

    @property
    def supervised(self) -> bool:
        return self.workers > 1


def identity(environ: os._Environ[str] | dict[str, str] = os.environ) -> Identity:
    """This process's place in its instance; a standalone mitmdump is worker 0 of 1."""
    try:
        workers = max(1, int(environ.get(WORKERS, "1")))
        index = int(environ.get(WORKER, "0"))
        fd = environ.get(MANAGEMENT_FD)
        return Identity(
            index=index if 0 <= index < workers else 0,
            workers=workers,
            management_fd=int(fd) if fd else None,
            instance_management=environ.get(INSTANCE_MANAGEMENT, ""),
        )
    except ValueError:
        # Only the supervisor sets these; a hand-set garbage value means "not supervised".
        return Identity()
