"""One command's process: spawned under its limits in a group of its own, killed as a group.

How a process runs (no `preexec_fn`: it is unsafe in mitmproxy's threaded process):
`asyncio.create_subprocess_exec` gets the argv `[setpriv --reuid --regid --clear-groups --]
prlimit --core=0 --as=.. --cpu=.. --fsize=.. --nproc=.. -- /allow-listed/path ARG...`
(util-linux: setpriv drops to `cli_run_as_user` when the proxy is root, prlimit sets the limits
on itself, each then execs the next: no shell, no PATH search, and no fork of the proxy, since
Python can vfork without user=/preexec_fn), with `start_new_session` (its own session and
process group), `close_fds`, the fixed working directory and the scrubbed environment.
Timeout: SIGTERM to the process group, SIGKILL after the grace period; client disconnect:
SIGKILL at once; when the command exits, what is left of its group is killed (no orphans; a
program that calls setsid()/setpgid() itself leaves the group and is not tracked).
The exit record's max_rss_kb and cpu_ms are sampled from /proc while the process runs (peak
RSS is a high-water mark; CPU includes reaped children): asyncio reaps the child itself, so
wait4's exact rusage is not available without a helper process per command, which cost 40 ms
of CPU per spawn (measured) against about 1 ms for prlimit.

- `Execution`: spawn, output pumps under the output cap, timeout, abort, the exit record.
- `read_usage`, `exit_fields`, `outcome_of`: pure helpers for the exit record.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from typing import Any

from addons.clirun.plan import Plan, Settings, limit_argv

READ_CHUNK = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.05  # seconds between /proc samples of a process's CPU time and peak RSS


def read_usage(pid: int) -> tuple[int | None, int | None]:
    """(peak RSS in KiB, CPU ms incl. reaped children) of a live or zombie process, from /proc.

    procfs reads are in-memory and take microseconds; a zombie has no VmHWM any more.
    """
    rss = cpu = None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        cpu = sum(int(x) for x in fields[11:15]) * 1000 // CLK_TCK  # utime stime cutime cstime
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    rss = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, cpu


def exit_fields(returncode: int | None) -> tuple[int | None, str | None]:
    """(exit code, signal name) from a returncode (negative: killed by that signal)."""
    if returncode is None:
        return None, None
    if returncode < 0:
        try:
            return None, signal.Signals(-returncode).name
        except ValueError:
            return None, f"SIG{-returncode}"
    return returncode, None


def outcome_of(code: int | None, sig: str | None, reason: str | None, error: str | None) -> str:
    if reason in ("timeout", "output_limit", "disconnected"):
        return reason
    if error:
        return "error"
    if sig:
        return "signaled"
    return "ok" if code == 0 else "failed"


class Execution:
    """A running command: its process group, its output and how it ended."""

    def __init__(self, plan: Plan, s: Settings) -> None:
        self.plan = plan
        self.settings = s
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None  # the command's pid, also its process group id
        self.reason: str | None = None  # timeout | output_limit | disconnected
        self.error: str | None = None
        self.returncode: int | None = None
        self.max_rss_kb: int | None = None
        self.cpu_ms: int | None = None
        self.truncated = False
        self.output_left = s.max_output
        self.bytes_out = {"stdout": 0, "stderr": 0}
        self.stdin_bytes = 0
        self.stdin_error: str | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        # Output pieces in arrival order ((stream, bytes); None: the end), and a wake-up.
        self.pending: collections.deque[tuple[str, bytes] | None] = collections.deque()
        self.wake = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._gone = False  # the group was cleaned up after the command ended
        self._sampled = 0.0
        self.done = asyncio.Event()

    async def start(self) -> None:
        """Spawn the command; raises OSError."""
        s = self.settings
        user: dict[str, Any] = {}
        if s.user is not None and not s.setpriv:
            # subprocess drops privileges in the child itself (setgroups, setgid, setuid).
            user = {"user": s.user[0], "group": s.user[1], "extra_groups": []}
        # The argv goes to exec as a list: no shell, no PATH search (the path is absolute).
        self.proc = await asyncio.create_subprocess_exec(
            *limit_argv(s.prlimit, s), self.plan.path, *self.plan.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            close_fds=True,
            start_new_session=True,  # its own session and process group: pgid == pid
            cwd=s.working_directory,
            env=self.plan.env,
            **user,
        )  # fmt: skip
        self.pid = self.proc.pid
        self.sample(force=True)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.plan.timeout, self._timeout))

    def sample(self, force: bool = False) -> None:
        """Update peak RSS and CPU from /proc (at most every SAMPLE_EVERY seconds)."""
        now = time.monotonic()
        if self.pid is None or self._gone or (not force and now - self._sampled < SAMPLE_EVERY):
            return
        self._sampled = now
        rss, cpu = read_usage(self.pid)
        if rss is not None:
            self.max_rss_kb = max(rss, self.max_rss_kb or 0)
        if cpu is not None:
            self.cpu_ms = max(cpu, self.cpu_ms or 0)

    def _timeout(self) -> None:
        if self.ended is None:
            self.reason = self.reason or "timeout"
            self.kill(signal.SIGTERM)
            grace = self.settings.grace_period
            self._timers.append(
                asyncio.get_running_loop().call_later(grace, self.kill, signal.SIGKILL)
            )

    def kill(self, sig: int) -> None:
        """Signal the command's whole process group (never after it was cleaned up)."""
        if self.pid is None or self._gone:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def abort(self, reason: str) -> None:
        """Kill at once (client gone): SIGKILL the group (once its pid is known)."""
        if self.ended is None:
            self.reason = self.reason or reason
        self.kill(signal.SIGKILL)

    def fail(self, error: str) -> None:
        """No process: end with this error."""
        if not self.done.is_set():
            self.error = error
            self.ended = time.monotonic()
            self._put(None)
            self.done.set()

    def take_output(self, chunk: bytes) -> bytes:
        """The part of `chunk` within the output cap; over it: truncate and stop the command."""
        if len(chunk) <= self.output_left:
            self.output_left -= len(chunk)
            return chunk
        kept = chunk[: self.output_left]
        self.output_left = 0
        if not self.truncated:
            self.truncated = True
            if self.ended is None:
                self.reason = self.reason or "output_limit"
                self.kill(signal.SIGTERM)
                self._timers.append(
                    asyncio.get_running_loop().call_later(
                        self.settings.grace_period, self.kill, signal.SIGKILL
                    )
                )
        return kept

    def _put(self, item: tuple[str, bytes] | None) -> None:
        self.pending.append(item)
        self.wake.set()

    async def _pump(self, stream: asyncio.StreamReader, kind: str) -> None:
        while chunk := await stream.read(READ_CHUNK):
            self.sample()
            kept = self.take_output(chunk)
            if kept:
                self.bytes_out[kind] += len(kept)
                self._put((kind, kept))
        self.sample(force=True)  # pipes close at exit: often the last look at the process

    async def run(self) -> None:
        """Relay output into `pending` until the command ended and its group is gone."""
        assert self.proc is not None and self.proc.stdout and self.proc.stderr
        pumps = [
            asyncio.ensure_future(self._pump(self.proc.stdout, "stdout")),
            asyncio.ensure_future(self._pump(self.proc.stderr, "stderr")),
        ]
        try:
            # Process.wait() on Python 3.11 returns only once the pipes are closed too, which
            # a background child holding them would delay forever: watch the exit itself.
            outputs = asyncio.gather(*pumps)
            while self.proc.returncode is None:
                await asyncio.wait([outputs], timeout=0.1)
                if outputs.done():
                    await self.proc.wait()
            self.returncode = self.proc.returncode
            self.ended = time.monotonic()
            # Whatever the command left in its group (background children) goes too, so
            # nothing outlives the request and the pipes reach EOF.
            self.kill(signal.SIGKILL)
            self._gone = True
            await asyncio.wait(pumps, timeout=5)
        finally:
            for t in self._timers:
                t.cancel()
            for p in pumps:
                p.cancel()
            if self.ended is None:
                self.ended = time.monotonic()
            self._put(None)
            self.done.set()

    def exit_record(self) -> dict[str, Any]:
        code, sig = exit_fields(self.returncode)
        end = self.ended if self.ended is not None else time.monotonic()
        record: dict[str, Any] = {
            "type": "exit",
            "code": code,
            "signal": sig,
            "duration_ms": round((end - self.started) * 1000, 1),
            "max_rss_kb": self.max_rss_kb,
            "cpu_ms": self.cpu_ms,
            "truncated": self.truncated,
            "timed_out": self.reason == "timeout",
            "outcome": self.outcome,
        }
        if self.error:
            record["error"] = self.error
        if self.stdin_error:
            record["stdin_error"] = self.stdin_error
        return record

    @property
    def outcome(self) -> str:
        code, sig = exit_fields(self.returncode)
        return outcome_of(code, sig, self.reason, self.error)
