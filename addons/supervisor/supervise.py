"""The supervisor of N workers: starts them, restarts a crashed one, relays signals, and serves
the instance app on the management port.

- Each worker is `python -m addons.supervisor.worker [mitmdump arguments]` with the identity
  of `addons/kernel/instance.py` in its environment and its own management socket (bound here
  on 127.0.0.1:0, passed with pass_fds, kept across restarts so its address never changes).
  Workers inherit stdout and stderr: their lines reach the output as they write them.
  Worker 0 starts alone, the others once it listens: it creates what they share on a first
  start (mitmproxy's CA in confdir).
- The proxy listeners are not here: every worker binds them with SO_REUSEPORT
  (`addons/kernel/reuseport.py`) and the kernel spreads connections.
- A worker that exits when not told to is restarted at once (POLL). `CrashGuard` decides when
  restarting is pointless: a worker that exits before it ever listened (a port in use, a bad
  script) or RESTART_LIMIT exits within RESTART_WINDOW. Then every worker is stopped and the
  supervisor exits 1 with one line saying why.
- SIGHUP is relayed to every worker (each reloads its profile). SIGTERM and SIGINT are relayed
  (each drains, `addons/drain.py`); whoever is still running after server_shutdown_timeout +
  KILL_MARGIN is killed. Exit 0 when every worker drained and exited 0. A second signal is
  relayed too (the workers then exit at once).
- Workers run in their own process group, so a terminal's Ctrl-C reaches them once, through
  here, and die with the supervisor (PR_SET_PDEATHSIG: SIGTERM, they drain) if it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from addons.kernel import instance
from addons.kernel.endpoints import bind
from addons.supervisor.settings import Settings

if TYPE_CHECKING:
    from addons.supervisor import instance as instance_app

log = logging.getLogger("waypost.supervisor")

POLL = 0.1  # how often worker exits are looked for: a crashed worker is back well within 1 s
RESTART_LIMIT = 5
RESTART_WINDOW = 30.0
KILL_MARGIN = 5.0  # beyond server_shutdown_timeout, for the workers' own shutdown
_PR_SET_PDEATHSIG = 1
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


class CrashGuard:
    """Whether an unexpected worker exit is worth a restart; pure, the clock is passed in."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.exits: deque[float] = deque()

    def exited(self, now: float, *, listened: bool) -> str | None:
        """None: restart the worker; else why the instance stops."""
        if not listened:
            return "before it ever listened"
        self.exits.append(now)
        while self.exits and self.exits[0] <= now - self.window:
            self.exits.popleft()
        if len(self.exits) >= self.limit:
            return f"the {len(self.exits)}th worker exit within {self.window:g}s"
        return None


def describe(returncode: int) -> str:
    """A worker's exit status as a person reads it: `code 1`, `signal SIGKILL`."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"


def listening(pid: int, ignore: set[int]) -> bool:
    """Whether process `pid` holds a listening TCP socket other than the `ignore` inodes."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    except OSError:  # it exited meanwhile
        return False
    inodes -= ignore
    if not inodes:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if cols[3] == _TCP_LISTEN and int(cols[9]) in inodes:
                    return True
    return False


def instance_url(host: str, port: int) -> str:
    """How a worker on this machine reaches the instance app bound on host:port."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class Slot:
    """One worker place: its management socket outlives the processes that fill it."""

    index: int
    sock: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    listened: bool = False  # a process of this slot opened its listeners once
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def management(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.command = [sys.executable, "-m", "addons.supervisor.worker", *argv]
        self.slots = [Slot(i, bind("127.0.0.1", 0)) for i in range(settings.workers)]
        self.guard = CrashGuard()
        self.instance_management = ""
        self.stopping: int | None = None  # the signal that stops the instance
        self.failure = ""
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._app_settings: instance_app.Settings | None = None  # read live: draining

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.relay, signal.SIGHUP)
        try:
            if self.settings.metrics_enabled:
                try:
                    await self.serve_instance_app()
                except OSError as e:
                    where = f"{self.settings.metrics_host}:{self.settings.metrics_port}"
                    print(
                        f"waypost supervisor: the management port cannot listen on {where}: "
                        f"{e.strerror or e} (set metrics_port to a free port, or "
                        "metrics_enabled=false)",
                        file=sys.stderr,
                    )
                    return 1
            self.start(self.slots[0])  # the others once it listens: see watch()
            await self.watch()
            return await self.shutdown()
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
            for slot in self.slots:
                slot.sock.close()

    def instance_app(self) -> web.Application:
        """The management port's app (addons/supervisor/instance.py) over these workers."""
        # Imported here: it brings mitmproxy in (about 0.5 s and 23 MB), which a supervisor
        # without a management port never needs.
        from addons.supervisor import instance as instance_app

        def views() -> list[instance_app.WorkerView]:
            return [
                instance_app.WorkerView(s.index, s.pid, s.management, restarts=s.restarts)
                for s in self.slots
            ]

        self._app_settings = instance_app.Settings(
            metrics_path=self.settings.metrics_path,
            worker_label=self.settings.metrics_worker_label,
        )
        return instance_app.make_app(views, self._app_settings)

    async def serve_instance_app(self) -> None:
        host = self.settings.metrics_host
        host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        sock = bind(host, self.settings.metrics_port)
        self._runner = web.AppRunner(self.instance_app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        port = sock.getsockname()[1]
        self.instance_management = instance_url(host, port)
        shown = f"[{host}]" if ":" in host else host
        log.info("instance management listening at http://%s:%d", shown, port)

    def start(self, slot: Slot) -> None:
        fd = slot.sock.fileno()
        env = os.environ | {
            instance.WORKER: str(slot.index),
            instance.WORKERS: str(len(self.slots)),
            instance.MANAGEMENT_FD: str(fd),
            instance.INSTANCE_MANAGEMENT: self.instance_management,
        }
        slot.proc = subprocess.Popen(
            self.command,
            env=env,
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent,
        )

    async def watch(self) -> None:
        """Until a signal stops the instance or the crash guard does: restart exited workers."""
        ignore = {os.fstat(s.sock.fileno()).st_ino for s in self.slots}
        while self.stopping is None and not self.failure:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)
            if self.stopping is not None:
                return
            for slot in self.slots:
                if slot.proc is None:
                    # Worker 0 alone first: it creates what the workers share on first start
                    # (mitmproxy's CA in confdir, which a second worker would read half
                    # written), and a worker that cannot start fails once, not N times.
                    if self.slots[0].listened:
                        self.start(slot)
                    continue
                code = slot.proc.poll()
                if code is None:
                    if not slot.listened:
                        slot.listened = listening(slot.proc.pid, ignore)
                    continue
                why = self.guard.exited(time.monotonic(), listened=slot.listened)
                if why is not None:
                    self.failure = (
                        f"worker {slot.index} (pid {slot.proc.pid}) exited with "
                        f"{describe(code)} {why}: stopping the instance"
                    )
                    return
                old = slot.proc.pid
                slot.restarts += 1
                self.start(slot)
                log.warning(
                    "worker %d (pid %d) exited with %s; restarted as pid %d",
                    slot.index,
                    old,
                    describe(code),
                    slot.proc.pid,
                )

    def stop(self, sig: int) -> None:
        if self.stopping is None:
            self.stopping = sig
            if self._app_settings is not None:
                self._app_settings.draining = True  # readiness 503: out of the Service first
            log.info("%s: stopping %d workers", signal.Signals(sig).name, len(self.slots))
            self._wake.set()
        self.relay(sig)

    def relay(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig)

    async def shutdown(self) -> int:
        """Drain every worker (SIGTERM, or the signal received), kill the late ones; exit code."""
        if self.stopping is None:
            self.stopping = signal.SIGTERM
            self.relay(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + KILL_MARGIN
        procs = [(s.index, s.proc) for s in self.slots if s.proc is not None]
        while any(p.poll() is None for _, p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        clean = True
        for index, proc in procs:
            if proc.poll() is None:
                log.error("worker %d (pid %d) did not drain in time: killed", index, proc.pid)
                proc.kill()
                proc.wait()
            clean = clean and proc.returncode == 0
        if self.failure:
            print(f"waypost supervisor: {self.failure}", file=sys.stderr, flush=True)
            return 1
        log.info("all workers stopped%s", "" if clean else " (not all drained cleanly)")
        return 0 if clean else 1


_LIBC = ctypes.CDLL(None)


def _die_with_parent() -> None:
    # In the child between fork and exec: SIGTERM (a drain) when the supervisor dies, so an
    # orphaned worker never keeps serving the shared port.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
