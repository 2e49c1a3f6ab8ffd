"""Fault-injection soak: the bundle under a paced load while faults are injected on schedule.

`scripts/soak --help`. By hand (and, 3 minutes of it, in CI: tests/e2e/test_soak.py), bounded
by `--duration`, loopback only. Starts three origins (scripts/soak_origin.py, one process each)
in a pool behind the bundle's reverse listener and its forward listener (a routing rule for
`pool.internal`), with the cache, rate limiting and the CLI on. A paced asyncio load (`--rate`
requests/s over at most `--connections`, spread over 8 client addresses in 127.0.1.0/24) asks
for JSON, cacheable and forward-proxied pages while each cycle (`--cycle`, 300 s; shorter runs
have one) injects, in turn:
an origin killed (SIGKILL) and restarted, slowloris and garbage connections, a malformed-request
flood from one client, config reloads (a good one, a bad one that must be refused with the
old config kept, the good one again), a CLI stream storm and a second origin kill. The last
fifth of the last cycle is quiet. At the end, SIGTERM with slow requests in flight. The faults
that are many client connections (slowloris, garbage, flood, CLI storm) run in processes of
their own (`Attacker`), so that their work does not delay the load's requests in this process
and count as the proxy's latency.

Reported per fault window (the window is the fault plus a few seconds of recovery): the load
requests that failed (never more than one origin is down, so every failure is a defect: target
0) and the fault's own result (hanging connections, answers that were not 4xx, a reload not
refused, a CLI answer neither 200 nor 429: defects too); RSS and open FDs over time (target:
RSS, and the FDs that are not established connections (those follow the load's connection
pool), no higher at the end than after the first cycle's faults, or after warm-up in a
one-cycle run, plus `--rss-slack`/`--fd-slack`); latency percentiles per minute; the drain (every request in flight at SIGTERM answered, exit 0
within the shutdown timeout). A table on stdout, everything as JSON with `--json FILE`; exit 1
when a target is missed (`--max-p99-ms` adds a latency target). Everything started here is
stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402 - the scripts directory is not a package
from benchlib import BenchError, Child  # noqa: E402

ORIGINS = ("a", "b", "c")
LOAD_ADDRS = [f"127.0.1.{i}" for i in range(1, 9)]  # the paced load's client addresses
SLOWLORIS_ADDR = "127.0.0.3"
GARBAGE_ADDR = "127.0.0.7"
FLOOD_ADDR = "127.0.0.4"
CLI_ADDR = "127.0.0.5"
DRAIN_ADDR = "127.0.0.6"
TOKEN = "soak"
HEADER_TIMEOUT = 3.0
LINGER = 2.0  # kernel/wire.py closes a refused connection fully this long after its answer
SHUTDOWN_TIMEOUT = 10.0
MAX_BODY = 65536
CLI_CONCURRENT = 4
RECOVERY = 3.0  # seconds after a fault that still count as its window
# When in a cycle (fractions of it) each fault starts and ends.
SCHEDULE = (
    ("kill", 0.10, 0.18),
    ("slowloris", 0.22, 0.30),
    ("flood", 0.34, 0.42),
    ("reload", 0.46, 0.56),
    ("cli-storm", 0.60, 0.68),
    ("kill", 0.70, 0.78),
)
WARMUP = 0.08  # of a single cycle: the reference for memory and fds ends here

PROFILE = """\
server:
  host: 127.0.0.1
  port: {fport}
  shutdown_timeout: {shutdown}s
  timeouts: {{connect: 1s, read: 5s}}
logging: {{level: info, format: json, output: file, file: {log}}}
metrics: {{enabled: true, host: 127.0.0.1, port: {mport}}}
admin: {{token: {token}}}
security:
  egress: {{allowed_networks: [127.0.0.1/32]}}
  rate_limiting: {{requests_per_second: {rps}, burst: {burst}, max_connections_per_ip: 100}}
limits: {{header_timeout: {header_timeout}s, max_body_size: {max_body}}}
cache: {{max_memory: 32MB, patterns: ["/static/*"]}}
cli:
  enabled: true
  token: {token}
  allowed_commands: [/usr/bin/seq]
  max_concurrent: {cli_concurrent}
  working_directory: {tmp}
routing:
  listeners:
    - {{mode: forward}}
    - {{mode: reverse, port: {rport}}}
  rules:
    - {{name: static, match: {{path: /static/*}}, forward: {{backends: {pool}}}, cache: true}}
    - {{name: pool, forward: {{backends: {pool}}}}}
  retries: {{max_attempts: 3, backoff: 10ms, max_backoff: 100ms}}
health_checks: {{interval: 1s, timeout: 500ms, path: /health, unhealthy_threshold: 2,
                healthy_threshold: 1}}
circuit_breaker: {{failure_threshold: 5, timeout: 5s, success_threshold: 1}}
"""
BAD_PROFILE_TAIL = "limits: {max_body_size: plenty}\n"  # a second `limits` key: refused


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- results -------------------------------------------------------------------------------


@dataclass
class Window:
    """One fault (or the steady state between faults) and what happened in it."""

    name: str
    start: float
    end: float
    requests: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # what failed: status or error
    result: dict[str, Any] = field(default_factory=dict)  # the fault's own counters
    defects: int = 0  # the fault's own defects (hangs, wrong answers)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        del d["latencies"]
        d["p50_ms"] = percentile(self.latencies, 50)
        d["p99_ms"] = percentile(self.latencies, 99)
        return d


class Recorder:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.windows: list[Window] = []
        self.steady = Window("steady", 0, 0)
        self.minutes: dict[int, list[float]] = {}
        self.minute_failures: dict[int, int] = {}
        self.samples: list[dict[str, float]] = []
        self.shed = 0  # requests not sent: the in-flight cap was reached

    def now(self) -> float:
        return time.monotonic() - self.t0

    def window_at(self, t: float) -> Window:
        for w in self.windows:
            if w.start <= t <= w.end + RECOVERY:
                return w
        return self.steady

    def request(self, started: float, latency: float, failure: str | None) -> None:
        w = self.window_at(started)
        minute = int(started // 60)
        w.requests += 1
        if failure:
            w.failed += 1
            w.failures[failure] = w.failures.get(failure, 0) + 1
            self.minute_failures[minute] = self.minute_failures.get(minute, 0) + 1
        else:
            w.latencies.append(latency * 1000)
            self.minutes.setdefault(minute, []).append(latency * 1000)


# --- the setup -----------------------------------------------------------------------------


class Origins:
    """The pool's three origins, each its own process, killed and restarted by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {name: benchlib.free_port() for name in ORIGINS}
        self.children: dict[str, Child] = {}
        self.starts = 0

    def start(self, name: str) -> None:
        args = [sys.executable, str(Path(__file__).with_name("soak_origin.py"))]
        log_path = self.tmp / f"origin-{name}-{self.starts}.out"
        self.starts += 1
        child = Child(f"origin {name}", [*args, str(self.ports[name]), name], log_path)
        self.children[name] = child
        url = f"http://127.0.0.1:{self.ports[name]}/health"
        if benchlib.wait_http(child, url, 20) is None:
            raise BenchError(f"origin {name} did not start:\n{child.tail()}")

    def kill(self, name: str) -> None:
        child = self.children[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(5)
        child.stop()

    def pool(self) -> str:
        return json.dumps(
            [{"url": f"http://127.0.0.1:{p}", "name": n} for n, p in self.ports.items()]
        )

    def stop(self) -> None:
        benchlib.stop_all(self.children.values())


@dataclass
class Ports:
    forward: int
    reverse: int
    management: int


def write_profile(
    path: Path, tmp: Path, ports: Ports, origins: Origins, rate: float, n: int
) -> None:
    """The soak's profile; `n` varies the burst so that each good reload changes something."""
    path.write_text(
        PROFILE.format(
            fport=ports.forward,
            rport=ports.reverse,
            mport=ports.management,
            shutdown=SHUTDOWN_TIMEOUT,
            log=tmp / "waypost.log",
            token=TOKEN,
            rps=max(10, int(rate)),
            burst=max(20, int(rate)) + n,
            header_timeout=HEADER_TIMEOUT,
            max_body=MAX_BODY,
            cli_concurrent=CLI_CONCURRENT,
            tmp=tmp,
            pool=origins.pool(),
        )
    )


def start_bundle(tmp: Path, profile: Path, ports: Ports) -> Child:
    args = benchlib.mitmdump_args(
        tmp / "confdir", "-s", str(benchlib.ROOT / "addons" / "bundle.py"),
        "--set", f"waypost_profile={profile}",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    child = Child("bundle", args, tmp / "bundle.out", env=env)
    ready = f"http://127.0.0.1:{ports.management}/health/readiness"
    if benchlib.wait_http(child, ready, 60) is None:
        raise BenchError(f"the bundle did not become ready:\n{child.tail()}")
    exposed = [
        f"{a}:{p}" for a, p in benchlib.listening_sockets(child.pid) if not benchlib.is_loopback(a)
    ]
    if exposed:
        child.stop()
        raise BenchError(f"the bundle listens beyond loopback on {exposed}; stopped it")
    log(f"bundle pid {child.pid}: forward {ports.forward}, reverse {ports.reverse}, "
        f"management {ports.management}")  # fmt: skip
    return child


# --- the soak ------------------------------------------------------------------------------


class Soak:
    """One run: the processes, the load, the faults and what was recorded."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.origins = Origins(tmp)
        self.ports = Ports(benchlib.free_port(), benchlib.free_port(), benchlib.free_port())
        self.profile = tmp / "profile.yaml"
        self.bundle: Child | None = None
        self.rec = Recorder(time.monotonic())  # restarted when the load starts
        self.inflight: set[asyncio.Task[None]] = set()
        self.reloads = 0
        self.kills = 0
        self.drain: dict[str, Any] = {}
        # Spawned, not forked (this process runs an event loop and threads); three, because in
        # a short run a fault's window can overlap the next one's.
        self.attackers = ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn"))

    # -- setup and teardown --

    def start(self) -> None:
        for name in ORIGINS:
            self.origins.start(name)
        write_profile(self.profile, self.tmp, self.ports, self.origins, self.args.rate, 0)
        self.bundle = start_bundle(self.tmp, self.profile, self.ports)
        for f in [self.attackers.submit(int) for _ in range(3)]:
            f.result()  # the attacker processes start now, not in the first fault's window

    def stop(self) -> None:
        if self.bundle:
            self.bundle.stop(SHUTDOWN_TIMEOUT + 5)
        self.origins.stop()
        self.attackers.shutdown(cancel_futures=True)

    # -- the load --

    def sessions(self) -> list[tuple[aiohttp.ClientSession, str]]:
        """One session per load address: (session, listener); a quarter of them forward.

        The sessions share `--connections` between them. aiohttp opens a connection for each
        request in flight up to its limit and keeps it, so a looser cap let the first storm
        that slowed answers decide how many connections the proxy served for the rest of the
        run (86-533 in earlier hours), and with them its CPU and the latencies measured."""
        out = []
        timeout = aiohttp.ClientTimeout(total=10)
        per_addr = max(1, self.args.connections // len(LOAD_ADDRS))
        for i, addr in enumerate(LOAD_ADDRS):
            conn = aiohttp.TCPConnector(local_addr=(addr, 0), limit=per_addr)
            s = aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False)
            out.append((s, "forward" if i % 4 == 3 else "reverse"))
        return out

    async def one(self, session: aiohttp.ClientSession, kind: str, i: int) -> None:
        started = self.rec.now()
        if kind == "forward":
            url, proxy = f"http://pool.internal/api/{i % 50}", self.proxy_url
        elif i % 4 == 0:
            url, proxy = f"http://127.0.0.1:{self.ports.reverse}/static/{i % 20}.css", None
        else:
            url, proxy = f"http://127.0.0.1:{self.ports.reverse}/api/{i % 50}?n={i}", None
        failure = None
        try:
            async with session.get(url, proxy=proxy) as r:
                await r.read()
                if r.status != 200:
                    failure = str(r.status)
                    with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                        code = (await r.json()).get("error", {}).get("code")
                        failure = f"{r.status} {code}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            failure = type(e).__name__
        self.rec.request(started, self.rec.now() - started, failure)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.forward}"

    async def load(self, until: Callable[[], bool]) -> None:
        """Start `--rate` requests a second, paced on the clock, until `until()`."""
        sessions = self.sessions()
        sent = 0
        start = time.monotonic()
        try:
            while not until():
                due = int((time.monotonic() - start) * self.args.rate)
                while sent < due:
                    if len(self.inflight) >= self.args.max_inflight:
                        self.rec.shed += due - sent
                        sent = due
                        break
                    session, kind = sessions[sent % len(sessions)]
                    self.track(self.one(session, kind, sent))
                    sent += 1
                await asyncio.sleep(0.005)
            await self.settle(SHUTDOWN_TIMEOUT + 10)
        finally:
            for s, _ in sessions:
                await s.close()

    def track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def settle(self, timeout: float) -> None:
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=timeout)

    # -- sampling --

    async def sample(self, until: Callable[[], bool]) -> None:
        """RSS and FDs of the bundle; `other_fds` are its FDs but its established TCP
        connections (those follow the load's connection pool): what a leak makes grow."""
        assert self.bundle
        every = max(1.0, min(10.0, self.args.duration / 100))
        while not until():
            with contextlib.suppress(OSError):
                # In a thread: /proc/net/tcp with hundreds of connections takes milliseconds.
                s = await asyncio.to_thread(benchlib.proc_stat, self.bundle.pid)
                conns = await asyncio.to_thread(established, self.bundle.pid)
                self.rec.samples.append(
                    {"t": round(self.rec.now(), 1), "rss_mb": round(s["rss_mb"], 1),
                     "fds": s["fds"], "established": conns, "other_fds": s["fds"] - conns,
                     "cpu_s": round(s["cpu_s"], 2)}
                )  # fmt: skip
            await asyncio.sleep(every)

    # -- the faults --

    def schedule(self) -> list[tuple[Window, Callable[[Window], Awaitable[None]]]]:
        d = self.args.duration
        cycles = max(1, round(d / self.args.cycle))
        length = d / cycles
        faults = {
            "kill": self.kill,
            "slowloris": self.slowloris,
            "flood": self.flood,
            "reload": self.reload,
            "cli-storm": self.cli_storm,
        }
        out = []
        for c in range(cycles):
            for name, a, b in SCHEDULE:
                if self.args.faults and name not in self.args.faults:
                    continue
                w = Window(f"{c + 1}:{name}", c * length + a * length, c * length + b * length)
                out.append((w, faults[name]))
        return out

    async def run_faults(self) -> None:
        plan = self.schedule()
        self.rec.windows = [w for w, _ in plan]
        tasks = []
        for w, fault in plan:
            await asyncio.sleep(max(0.0, w.start - self.rec.now()))
            log(f"{w.start:7.1f}s {w.name}")
            tasks.append(asyncio.ensure_future(self.guard(w, fault)))
        await asyncio.gather(*tasks)

    async def guard(self, w: Window, fault: Callable[[Window], Awaitable[None]]) -> None:
        try:
            await fault(w)
        except Exception as e:  # the soak goes on; the fault counts as missed
            w.defects += 1
            w.result["error"] = f"{type(e).__name__}: {e}"
            log(f"{w.name} failed: {w.result['error']}")

    async def until_end(self, w: Window) -> None:
        await asyncio.sleep(max(0.0, w.end - self.rec.now()))

    async def kill(self, w: Window) -> None:
        name = ORIGINS[self.kills % len(ORIGINS)]
        self.kills += 1
        await asyncio.to_thread(self.origins.kill, name)
        w.result["killed"] = name
        await self.until_end(w)
        await asyncio.to_thread(self.origins.start, name)
        w.result["restarted"] = True

    async def slowloris(self, w: Window) -> None:
        await self.attack(w, "slowloris")

    async def flood(self, w: Window) -> None:
        await self.attack(w, "flood")

    async def cli_storm(self, w: Window) -> None:
        await self.attack(w, "cli_storm")

    async def attack(self, w: Window, fault: str) -> None:
        """Run a fault's clients in the attacker processes, so that their connection work does
        not delay the load's requests in this process (which would count as the proxy's)."""
        attacker = Attacker(self.ports, self.args, self.rec.t0 + w.end)
        loop = asyncio.get_running_loop()
        result, defects = await loop.run_in_executor(self.attackers, attacker.run, fault)
        w.result.update(result)
        w.defects += defects

    async def reload(self, w: Window) -> None:
        """A good reload, a bad one (refused: 422, the old config running), the good one again."""
        third = (w.end - w.start) / 3
        self.reloads += 1
        write_profile(
            self.profile, self.tmp, self.ports, self.origins, self.args.rate, self.reloads
        )
        w.result["good"] = await self.admin_reload()
        await asyncio.sleep(third)
        good = self.profile.read_text()
        self.profile.write_text(good + BAD_PROFILE_TAIL)
        w.result["bad"] = await self.admin_reload()
        w.result["ready_after_bad"] = await self.get_status(
            f"http://127.0.0.1:{self.ports.management}/health/readiness"
        )
        await asyncio.sleep(third)
        self.profile.write_text(good)
        w.result["restored"] = await self.admin_reload()
        want = {"good": 200, "bad": 422, "ready_after_bad": 200, "restored": 200}
        w.defects += sum(w.result[k] != v for k, v in want.items())

    async def admin_reload(self) -> int:
        url = f"http://127.0.0.1:{self.ports.management}/admin/reload"
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with s.post(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                return r.status

    async def get_status(self, url: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            await r.read()
            return r.status

    # -- the end --

    async def sigterm(self, stop: asyncio.Event) -> None:
        """Slow requests in flight, then SIGTERM: all must be answered, the proxy must exit 0
        within the shutdown timeout."""
        assert self.bundle
        n = self.args.drain_requests
        url = f"http://127.0.0.1:{self.ports.reverse}/slow?ms=2000"
        conn = aiohttp.TCPConnector(local_addr=(DRAIN_ADDR, 0), limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def slow() -> str:
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                        await r.read()
                        return str(r.status)
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    return type(e).__name__

            slows = [asyncio.ensure_future(slow()) for _ in range(n)]
            await asyncio.sleep(0.5)
            load_inflight = list(self.inflight)
            t = time.monotonic()
            os.kill(self.bundle.pid, signal.SIGTERM)
            stop.set()  # no new load requests: the listeners are closing
            code = await asyncio.to_thread(self.bundle.proc.wait, SHUTDOWN_TIMEOUT + 10)
            exit_s = time.monotonic() - t
            answers = await asyncio.gather(*slows)
        done, _ = await asyncio.wait(load_inflight, timeout=1) if load_inflight else (set(), set())
        self.drain = {
            "slow_requests": n,
            "slow_answered_200": answers.count("200"),
            "slow_answers": {a: answers.count(a) for a in sorted(set(answers))},
            "load_in_flight": len(load_inflight),
            "exit_code": code,
            "exit_seconds": round(exit_s, 2),
            "shutdown_timeout": SHUTDOWN_TIMEOUT,
        }
        self.drain["clean"] = (
            code == 0 and answers.count("200") == n and exit_s <= SHUTDOWN_TIMEOUT + 2
        ) and len(done) == len(load_inflight)

    async def main(self) -> None:
        stop = asyncio.Event()
        self.rec = Recorder(time.monotonic())
        load = asyncio.ensure_future(self.load(stop.is_set))
        sampler = asyncio.ensure_future(self.sample(stop.is_set))
        await self.run_faults()
        await asyncio.sleep(max(0.0, self.args.duration - self.rec.now()))
        await self.sigterm(stop)
        await load
        await sampler


def established(pid: int) -> int:
    """The process's TCP sockets in state ESTABLISHED (its fds + /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            n += sum(1 for line in f if (c := line.split())[3] == "01" and c[9] in inodes)
    return n


# --- the attacker: the faults that are many client connections, in processes of their own -----


class Attacker:
    """Slowloris, flood and CLI-storm clients, run by `run` in a process of the soak's pool
    until `end` (time.monotonic(), the same clock in every process); each fault returns its
    counters and its defects."""

    def __init__(self, ports: Ports, args: argparse.Namespace, end: float) -> None:
        self.ports = ports
        self.args = args
        self.end = end

    def run(self, fault: str) -> tuple[dict[str, int], int]:
        result: tuple[dict[str, int], int] = asyncio.run(getattr(self, fault)())
        return result

    async def slowloris(self) -> tuple[dict[str, int], int]:
        """Waves of connections dribbling a head and of 4 KiB of random bytes, until the window
        ends; every one must be closed by the proxy within the header timeout (plus its linger
        and a margin), else it hangs (a defect)."""
        conns: list[asyncio.Task[str]] = []
        n = self.args.slowloris
        while True:
            conns += [asyncio.ensure_future(self.dribble()) for _ in range(n)]
            conns += [asyncio.ensure_future(self.garbage()) for _ in range(max(1, n // 10))]
            if time.monotonic() + HEADER_TIMEOUT + 1 > self.end:
                break
            await asyncio.sleep(HEADER_TIMEOUT + 1)
        outcomes = await asyncio.gather(*conns)
        counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        return {"connections": len(outcomes), **counts}, counts.get("hung", 0)

    async def dribble(self) -> str:
        deadline = time.monotonic() + HEADER_TIMEOUT + LINGER + 3
        try:
            r, wr = await asyncio.open_connection(
                "127.0.0.1", self.ports.reverse, local_addr=(SLOWLORIS_ADDR, 0)
            )
        except OSError:
            return "refused"
        try:
            wr.write(b"GET /slowloris HTTP/1.1\r\nHost: soak\r\n")
            while time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError):
                    data = await asyncio.wait_for(r.read(65536), 0.5)
                    if not data:
                        return "closed"
                    if data.startswith(b"HTTP/1.1 408"):
                        return "408" if await self.closes(r, deadline) else "hung"
                    return "answered " + data[9:12].decode(errors="replace")
                wr.write(b"X-Slow: 1\r\n")
            return "hung"
        except OSError:
            return "reset"
        finally:
            wr.close()

    async def closes(self, r: asyncio.StreamReader, deadline: float) -> bool:
        """Whether the peer closes the connection before `deadline`."""
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            while await asyncio.wait_for(r.read(65536), max(0.0, deadline - time.monotonic())):
                pass
            return True
        return False

    async def garbage(self) -> str:
        deadline = time.monotonic() + LINGER + 3
        try:
            r, wr = await asyncio.open_connection(
                "127.0.0.1", self.ports.forward, local_addr=(GARBAGE_ADDR, 0)
            )
        except OSError:
            return "refused"
        try:
            wr.write(random.randbytes(4096))
            with contextlib.suppress(asyncio.TimeoutError):
                data = await asyncio.wait_for(r.read(65536), deadline - time.monotonic())
                if not data:
                    return "closed"
                status = data[9:12].decode(errors="replace")
                return f"garbage {status}" if await self.closes(r, deadline) else "hung"
            return "hung"
        except OSError:
            return "reset"
        finally:
            wr.close()

    async def flood(self) -> tuple[dict[str, int], int]:
        """Malformed requests from one client to both listeners, until the window ends: each
        must get a 4xx (or be closed); anything else is a defect."""
        answers: dict[str, int] = {}
        i = 0
        while time.monotonic() < self.end:
            data = malformed(i)
            port = self.ports.forward if i % 2 else self.ports.reverse
            got = await exchange(port, data, FLOOD_ADDR, HEADER_TIMEOUT + LINGER + 2)
            answers[got] = answers.get(got, 0) + 1
            i += 1
            await asyncio.sleep(1 / self.args.flood_rate)
        return answers, sum(n for a, n in answers.items() if not (a[0] == "4" or a == "closed"))

    async def cli_storm(self) -> tuple[dict[str, int], int]:
        """Waves of 4x `cli.max_concurrent` streamed commands through the forward listener:
        each gets its whole stream (exit outcome ok) or 429; anything else is a defect."""
        outcomes: dict[str, int] = {}
        conn = aiohttp.TCPConnector(local_addr=(CLI_ADDR, 0), limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            while time.monotonic() < self.end:
                got = await asyncio.gather(*(self.cli(s) for _ in range(4 * CLI_CONCURRENT)))
                for g in got:
                    outcomes[g] = outcomes.get(g, 0) + 1
                await asyncio.sleep(0.2)
        return outcomes, sum(n for o, n in outcomes.items() if o not in ("ok", "429"))

    async def cli(self, s: aiohttp.ClientSession) -> str:
        body = {"command": "seq", "args": ["1", str(self.args.cli_lines)], "stream": True}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            async with s.post(
                f"http://127.0.0.1:{self.ports.forward}/cli/execute",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as r:
                data = await r.read()
                if r.status != 200:
                    return str(r.status)
                last = json.loads(data.splitlines()[-1])
                return "ok" if last.get("outcome") == "ok" else f"exit {last.get('outcome')}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            return type(e).__name__


# --- requests that are not the load --------------------------------------------------------


def malformed(i: int) -> bytes:
    """The i-th request of the flood: framing, limit and syntax errors of the security
    table, and 4 KiB of random bytes; odd ones absolute-form (forward), even ones origin-form."""
    target = "http://pool.internal/upload" if i % 2 else "/upload"
    head = f"POST {target} HTTP/1.1\r\nHost: pool.internal\r\nX-Request-ID: flood-{i}\r\n"
    te = head + "Transfer-Encoding: chunked\r\n\r\n"
    kinds = [
        te + "+5\r\nhello\r\n0\r\n\r\n",  # a signed chunk size
        te + "5\r\nhelloXX0\r\n\r\n",  # chunk data without its CRLF
        te + "10000000000000000\r\nx\r\n",  # a chunk size over 64 bits
        te + "5\nhello\n0\n\n",  # bare LF
        te + f"{MAX_BODY * 2:x}\r\n" + "x" * (MAX_BODY * 2) + "\r\n0\r\n\r\n",  # over the limit
        head + f"Content-Length: {MAX_BODY * 4}\r\n\r\n",
        head + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        head + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        head + "X-Folded: a\r\n b\r\n\r\n",
        "M" * 8192 + " / HTTP/1.1\r\nHost: pool.internal\r\n\r\n",
        f"GET /{'u' * 16384} HTTP/1.1\r\nHost: pool.internal\r\n\r\n",
    ]
    kind = i % (len(kinds) + 1)
    if kind == len(kinds):
        return random.randbytes(4096)
    return kinds[kind].encode()


async def exchange(port: int, data: bytes, local: str, timeout: float) -> str:
    """Send `data`, read to the close: the answer's status, "closed" without one, "hung" when
    the proxy keeps the connection open past `timeout`."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    except OSError:
        return "refused"
    got = b""
    try:
        w.write(data)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "hung"
            try:
                chunk = await asyncio.wait_for(r.read(65536), left)
            except TimeoutError:
                return "hung"
            if not chunk:
                break
            got += chunk
    except OSError:
        pass  # a reset after (or instead of) the answer
    finally:
        w.close()
    return got[9:12].decode(errors="replace") if got.startswith(b"HTTP/1.") else "closed"


# --- the report ----------------------------------------------------------------------------


def verdict(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    rec = soak.rec
    missed = []
    defects = sum(w.failed + w.defects for w in [*rec.windows, rec.steady])
    if defects:
        missed.append(f"{defects} defects (target 0)")
    cycles = max(1, round(args.duration / args.cycle))
    length = args.duration / cycles
    # The reference: after the first cycle's faults (several cycles), else after warm-up.
    ref_end = length if cycles > 1 else WARMUP * length
    ref = [s for s in rec.samples if s["t"] <= ref_end] or rec.samples[:1]
    tail = [s for s in rec.samples if s["t"] >= args.duration - 0.1 * length] or rec.samples[-1:]
    memory: dict[str, Any] = {}
    if rec.samples:
        memory = {
            "rss_reference_mb": max(s["rss_mb"] for s in ref),
            "rss_end_mb": percentile([s["rss_mb"] for s in tail], 50),
            # The median: a fault's lingering closes and the two reads' race make spikes.
            "other_fds_reference": percentile([s["other_fds"] for s in ref], 50),
            "other_fds_end": percentile([s["other_fds"] for s in tail], 50),
        }
        if memory["rss_end_mb"] > memory["rss_reference_mb"] + args.rss_slack:
            missed.append(
                f"RSS grew: {memory['rss_end_mb']} MB at the end, "
                f"{memory['rss_reference_mb']} MB at t={ref_end:.0f}s (+{args.rss_slack} allowed)"
            )
        if memory["other_fds_end"] > memory["other_fds_reference"] + args.fd_slack:
            missed.append(
                f"FDs grew: {memory['other_fds_end']} not established connections at the end, "
                f"{memory['other_fds_reference']} at t={ref_end:.0f}s (+{args.fd_slack} allowed)"
            )
    if not soak.drain.get("clean"):
        missed.append(f"drain not clean: {soak.drain}")
    if args.max_p99_ms:
        slow = {m: p for m, v in rec.minutes.items() if (p := percentile(v, 99)) > args.max_p99_ms}
        if slow:
            missed.append(f"p99 over {args.max_p99_ms} ms in minutes {sorted(slow)}")
    return {"ok": not missed, "defects": defects, "missed": missed, **memory}


def report(soak: Soak, args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    rec = soak.rec
    windows = [w.summary() for w in [*rec.windows, rec.steady]]
    minutes = [
        {
            "minute": m,
            "requests": len(v) + rec.minute_failures.get(m, 0),
            "failed": rec.minute_failures.get(m, 0),
            "p50_ms": percentile(v, 50),
            "p90_ms": percentile(v, 90),
            "p99_ms": percentile(v, 99),
            "max_ms": max(v),
        }
        for m, v in sorted(rec.minutes.items())
    ]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "verdict": result,
        "windows": windows,
        "minutes": minutes,
        "drain": soak.drain,
        "shed": rec.shed,
        "samples": rec.samples,
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_report(data: dict[str, Any]) -> None:
    rows = [
        [
            w["name"], f"{w['start']:.0f}-{w['end']:.0f}", w["requests"], w["failed"],
            w["defects"], fmt(w["p50_ms"]), fmt(w["p99_ms"]),
            " ".join(f"{k}={v}" for k, v in {**w["failures"], **w["result"]}.items()),
        ]
        for w in data["windows"]
    ]  # fmt: skip
    head = ["window", "s", "requests", "failed", "fault defects", "p50 ms", "p99 ms", "result"]
    print(benchlib.table(head, rows, align="left"))
    print()
    rows = [
        [m["minute"], m["requests"], m["failed"], fmt(m["p50_ms"]), fmt(m["p90_ms"]),
         fmt(m["p99_ms"]), fmt(m["max_ms"])]
        for m in data["minutes"]
    ]  # fmt: skip
    print(
        benchlib.table(["minute", "requests", "failed", "p50", "p90", "p99", "max"], rows, "right")
    )
    print()
    samples = data["samples"]
    step = max(1, len(samples) // 12)
    keys = ("t", "rss_mb", "fds", "established", "other_fds")
    picked = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
    rows = [[s[k] for k in keys] for s in picked]
    head = ["t (s)", "RSS MB", "FDs", "established", "other FDs"]
    print(benchlib.table(head, rows, "right"))
    print()
    print(f"drain: {json.dumps(data['drain'])}")
    if data["shed"]:
        print(f"shed (not sent, {data['config']['max_inflight']} in flight): {data['shed']}")
    v = data["verdict"]
    print(f"verdict: {'PASS' if v['ok'] else 'FAIL'} " + "; ".join(v["missed"]))


def fault_names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    known = {name for name, _, _ in SCHEDULE}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown fault {', '.join(unknown) or value!r}; known: {', '.join(sorted(known))}"
        )
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--duration", type=float, default=3600, help="seconds of load (3600)")
    p.add_argument("--rate", type=float, default=500, help="load requests per second (500)")
    p.add_argument("--cycle", type=float, default=300, help="seconds per fault cycle (300)")
    p.add_argument("--max-inflight", type=int, default=512, help="load requests at once (512)")
    p.add_argument(
        "--connections", type=int, default=64, help="the load's connections at most (64)"
    )
    p.add_argument("--slowloris", type=int, default=200, help="connections per wave (200)")
    p.add_argument("--flood-rate", type=float, default=20, help="malformed requests/s (20)")
    p.add_argument("--cli-lines", type=int, default=20000, help="lines per CLI command (20000)")
    p.add_argument("--drain-requests", type=int, default=20, help="slow requests at SIGTERM")
    p.add_argument("--rss-slack", type=float, default=20, help="MB of RSS growth allowed (20)")
    p.add_argument("--fd-slack", type=int, default=16, help="other FDs' growth allowed (16)")
    p.add_argument("--max-p99-ms", type=float, default=0, help="p99 target per minute (off)")
    p.add_argument(
        "--faults",
        type=fault_names,
        default=(),
        help="only these faults, comma-separated (kill,slowloris,flood,reload,cli-storm); "
        "all by default",
    )
    p.add_argument("--json", type=Path, help="write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profile)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.duration < 15:
        raise BenchError("--duration must be at least 15 s")
    benchlib.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="waypost-soak-"))
    soak = Soak(args, tmp)
    log(f"{args.duration:g}s at {args.rate:g} req/s; logs in {tmp}")
    try:
        soak.start()
        asyncio.run(soak.main())
    finally:
        soak.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = verdict(soak, args)
    data = report(soak, args, result)
    print_report(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    benchlib.run(main)
