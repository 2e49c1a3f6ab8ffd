"""CLI streaming: `POST /cli/execute` runs allow-listed programs and streams their output.

A remote-execution endpoint, secure first: off unless `cli_enabled` and a token are set,
bearer-token auth, an allowlist of absolute paths, no shell ever, a filtered environment, and
limits on every process (time, memory, CPU, file size, processes, output, concurrency).

Where it answers:
- the management port (`addons/management.py` finds `management_routes()` by duck typing);
- the proxy port: an origin-form `POST /cli/execute` addressed to the proxy itself, and the
  same path on reverse listeners. mitmproxy cannot stream a body an addon makes, so such a
  flow is rerouted in `requestheaders` to this addon's own aiohttp listener on 127.0.0.1
  (ephemeral port; requests there must carry a per-process secret header that only the
  reroute adds) with request and response streaming on. The flow is marked
  `errors.waypost(flow)["local"] = "cli"`, which Egress lets through to exactly that listener.

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

Hooks: load, configure, running, done (sync; the listener is bound synchronously),
requestheaders (reroute), responseheaders (stream). Extension: management_routes().
Options (all `cli_`): enabled, token (else env CLI_TOKEN), allowed_commands, argument_rules
(JSON), env_allowlist, max_concurrent, process_timeout, grace_period, max_memory_per_process,
max_cpu_time, max_file_size, max_processes, max_output_bytes, working_directory, run_as_user,
heartbeat_interval.
Metrics: cli_processes (gauge), cli_executions_total{command,outcome}.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import collections
import hmac
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from aiohttp import web
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import ValidationError

from addons import errors, policy
from addons.kernel import units
from addons.kernel.options import spawn
from addons.management import addressed_to_proxy, bearer_status, bind
from addons.schema import CliArgumentRule

log = logging.getLogger("waypost.cli")

PATH = "/cli/execute"
INTERNAL_HEADER = "X-Waypost-Cli-Internal"
CLIENT_HEADER = "X-Waypost-Cli-Client"
REQUEST_ID_HEADER = "X-Waypost-Cli-Request-Id"
# The request object (with its `stdin`) and every streamed input line are bounded by this.
MAX_REQUEST_BYTES = 1024 * 1024
READ_CHUNK = 65536
# How often a waiting stream checks whether its client is gone (the management port's aiohttp
# runner does not cancel handlers on disconnect; the proxy-port listener does).
DISCONNECT_POLL = 0.25
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that make the dynamic loader, an interpreter or a shell run code of the caller's
# choosing. Refused (400) even when an operator allow-lists them.
ENV_DENY_PREFIXES = (
    "LD_", "DYLD_", "PYTHON", "PERL", "RUBY", "NODE_", "BASH_FUNC_", "MALLOC_", "GLIBC_",
    "GCONV_", "JAVA_", "_JAVA_", "GIT_", "LUA_",
)  # fmt: skip
ENV_DENY_NAMES = frozenset(
    {"BASH_ENV", "ENV", "IFS", "PS4", "SHELLOPTS", "BASHOPTS", "PATH", "LOCPATH", "NLSPATH",
     "HOSTALIASES", "RES_OPTIONS", "TMPDIR", "CDPATH", "PROMPT_COMMAND", "EDITOR", "VISUAL",
     "PAGER", "SSH_ASKPASS", "SUDO_ASKPASS", "OPENSSL_CONF", "OPENSSL_ENGINES"}
)  # fmt: skip
REQUEST_KEYS = frozenset({"command", "args", "stdin", "stdin_base64", "stdin_stream", "env",
                          "stream", "timeout"})  # fmt: skip
OUTCOMES = ("ok", "failed", "signaled", "timeout", "output_limit", "disconnected", "error")

# util-linux prlimit(1) sets the limits on itself and execs the command (no fork, no shell):
# resource limits without a preexec_fn, which is unsafe in mitmproxy's threaded process.
PRLIMIT_CANDIDATES = ("/usr/bin/prlimit", "/bin/prlimit")
# util-linux setpriv(1) drops to the command user the same way (setgroups, setgid, setuid, exec).
# subprocess's own user=/group= would do it too, but then Python cannot use vfork and forks
# the whole proxy process, which stalls its event loop for milliseconds per command.
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.05  # seconds between /proc samples of a process's CPU time and peak RSS

# --- metrics ---------------------------------------------------------------------------------


class Stats:
    """Plain counters, turned into Prometheus families when scraped (like metrics.Store)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.executions: dict[tuple[str, str], int] = {}

    def count(self, command: str, outcome: str) -> None:
        key = (command, outcome)
        self.executions[key] = self.executions.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cli_processes", "CLI processes running now.", self.in_flight)
        family = CounterMetricFamily(
            "cli_executions_total",
            "CLI requests by allow-listed command (_none: not in the list) and outcome.",
            labels=["command", "outcome"],
        )
        for (command, outcome), n in self.executions.items():
            family.add_metric([command, outcome], n)
        yield family


if __name__ == "addons.cli":
    from addons.metrics import REGISTRY

    STATS = Stats()
    REGISTRY.register(STATS)
else:
    # Loaded as a script (`-s addons/cli.py`, re-executed on reload): share the package
    # module's collector instead of registering a second one.
    from addons.cli import STATS


# --- configuration ---------------------------------------------------------------------------


class Rule(NamedTuple):
    prefix: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    max_args: int | None


class Settings(NamedTuple):
    """The parsed options, swapped in one assignment. (A NamedTuple, not a dataclass: a
    dataclass fails in a module loaded with -s, which is not in sys.modules.)"""

    enabled: bool = False
    token: str = ""
    commands: Mapping[str, str] = MappingProxyType({})  # name or path -> path
    rules: Mapping[str, Rule] = MappingProxyType({})  # path -> rule
    env_allowlist: frozenset[str] = frozenset()
    max_concurrent: int = 10
    process_timeout: float = 30.0
    grace_period: float = 5.0
    max_memory: int = 512 * 1024**2
    max_cpu_time: int = 60
    max_file_size: int = 64 * 1024**2
    max_processes: int = 64
    max_output: int = 10 * 1024**2
    working_directory: str = "/"
    user: tuple[int, int] | None = None  # (uid, gid) to drop to
    heartbeat: float = 10.0
    prlimit: str = "/usr/bin/prlimit"
    setpriv: str | None = None

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.token)


def parse_commands(paths: Sequence[str]) -> dict[str, str]:
    """Allow-listed absolute paths -> {basename: path, path: path}; ValueError names the entry."""
    out: dict[str, str] = {}
    for path in paths:
        if not path.startswith("/") or os.path.normpath(path) != path or path.endswith("/"):
            raise ValueError(f"{path!r} is not a normalised absolute path (e.g. /usr/bin/uptime)")
        if any(c in path for c in "\0\n\r"):
            raise ValueError(f"{path!r} contains a control character")
        name = os.path.basename(path)
        if name in out and out[name] != path:
            raise ValueError(
                f"{out[name]!r} and {path!r} share the name {name!r}; requests name commands by "
                "base name, so each must be unique"
            )
        out[name] = out[path] = path
    return out


def parse_rules(text: str, commands: Mapping[str, str]) -> dict[str, Rule]:
    """cli_argument_rules JSON -> {path: Rule}; ValueError with a readable reason."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError('expected a JSON object {"command": {"prefix": [...], ...}}')
    out: dict[str, Rule] = {}
    for name, spec in raw.items():
        path = commands.get(name)
        if path is None:
            raise ValueError(f"{name!r} is not in cli_allowed_commands")
        try:
            rule = CliArgumentRule.model_validate(spec)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, x['loc'])) or name}: {x['msg']}" for x in e.errors()
            )
            raise ValueError(f"{name}: {problems}") from None
        out[path] = Rule(
            tuple(rule.prefix), tuple(re.compile(p) for p in rule.patterns), rule.max_args
        )
    return out


def env_refusal(name: str) -> str | None:
    """Why an environment variable name may never be set by a request, or None."""
    if not _ENV_NAME.fullmatch(name):
        return "is not a valid variable name"
    upper = name.upper()
    if upper in ENV_DENY_NAMES or upper.startswith(ENV_DENY_PREFIXES):
        return "changes how programs are loaded or run and is never accepted"
    return None


def resolve_user(name: str, euid: int) -> tuple[int, int] | None:
    """(uid, gid) to run commands as: only when the proxy is root and a user is named."""
    if euid != 0 or not name or name == "root":
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None
    return entry.pw_uid, entry.pw_gid


# --- request validation (pure) ---------------------------------------------------------------


class Refusal(Exception):
    def __init__(self, code: str, message: str, rule: str = "", command: str = "_none") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rule = rule
        self.command = command


class Plan(NamedTuple):
    path: str
    argv: tuple[str, ...]  # arguments after the path: rule prefix + client args
    env: dict[str, str]
    stdin: bytes
    stdin_stream: bool
    stream: bool
    timeout: float


def _bad(message: str, command: str = "_none") -> Refusal:
    return Refusal("BAD_REQUEST", message, command=command)


def _stdin_bytes(obj: Mapping[str, Any], where: str) -> bytes:
    text, b64 = obj.get("stdin"), obj.get("stdin_base64")
    if text is not None and b64 is not None:
        raise _bad(f"{where}: give stdin or stdin_base64, not both")
    if text is not None:
        if not isinstance(text, str):
            raise _bad(f"{where}: stdin must be a string")
        return text.encode("utf-8", "surrogatepass")
    if b64 is not None:
        if not isinstance(b64, str):
            raise _bad(f"{where}: stdin_base64 must be a string")
        try:
            return base64.b64decode(b64, validate=True)
        except ValueError:
            raise _bad(f"{where}: stdin_base64 is not valid base64") from None
    return b""


def parse_request(obj: Any, s: Settings) -> Plan:
    """Validate a request object against the settings; raises Refusal."""
    if not isinstance(obj, dict):
        raise _bad("The request body must be a JSON object.")
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        raise _bad(
            f"Unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(REQUEST_KEYS))}."
        )
    command = obj.get("command")
    if not isinstance(command, str) or not command:
        raise _bad("command must be a non-empty string (a base name or an allow-listed path).")
    if any(c in command for c in "\0\n\r"):
        raise _bad("command contains a NUL or line break.")
    # Only exact allowlist entries: no PATH search, no relative paths, no "..".
    path = s.commands.get(command)
    if path is None or (("/" in command) and command != path):
        raise Refusal("COMMAND_NOT_ALLOWED", "This command is not allowed.", "allowed_commands")
    args = obj.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise _bad("args must be a list of strings.", path)
    if any("\0" in a for a in args):
        raise _bad("An argument contains a NUL byte.", path)
    rule = s.rules.get(path)
    argv = tuple(args)
    if rule is not None:
        if rule.max_args is not None and len(args) > rule.max_args:
            raise Refusal(
                "COMMAND_NOT_ALLOWED",
                f"At most {rule.max_args} arguments are allowed for this command.",
                "argument_rules",
                path,
            )
        if rule.patterns:
            for i, a in enumerate(args):
                if not any(p.fullmatch(a) for p in rule.patterns):
                    raise Refusal(
                        "COMMAND_NOT_ALLOWED",
                        f"Argument {i} is not allowed for this command.",
                        "argument_rules",
                        path,
                    )
        argv = rule.prefix + argv
    env_in = obj.get("env", {})
    if not isinstance(env_in, dict):
        raise _bad("env must be an object of string values.", path)
    env = {"PATH": SAFE_PATH}
    for name, value in env_in.items():
        why = env_refusal(name)
        if why is not None:
            raise _bad(f"env {name}: {why}.", path)
        if name not in s.env_allowlist:
            raise _bad(f"env {name} is not in the allowlist (cli.env_allowlist).", path)
        if not isinstance(value, str) or "\0" in value:
            raise _bad(f"env {name}: the value must be a string without NUL.", path)
        env[name] = value
    stdin = _stdin_bytes(obj, "request")
    flags = {}
    for key, default in (("stream", True), ("stdin_stream", False)):
        v = obj.get(key, default)
        if not isinstance(v, bool):
            raise _bad(f"{key} must be true or false.", path)
        flags[key] = v
    timeout = s.process_timeout
    t = obj.get("timeout")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise _bad("timeout must be a positive number of seconds.", path)
        timeout = min(float(t), s.process_timeout)
    return Plan(path, argv, env, stdin, flags["stdin_stream"], flags["stream"], timeout)


def limit_argv(prlimit: str, s: Settings) -> list[str]:
    """setpriv(1) (when dropping to the command user) and prlimit(1) in front of the command:
    core dumps off and the configured limits."""
    argv = []
    if s.user is not None and s.setpriv:
        uid, gid = s.user
        argv = [s.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    argv += [prlimit, "--core=0"]
    if s.max_memory:
        argv.append(f"--as={s.max_memory}")
    if s.max_cpu_time:
        # soft: SIGXCPU; hard one second later: SIGKILL
        argv.append(f"--cpu={s.max_cpu_time}:{s.max_cpu_time + 1}")
    if s.max_file_size:
        argv.append(f"--fsize={s.max_file_size}")
    if s.max_processes:
        argv.append(f"--nproc={s.max_processes}")
    return [*argv, "--"]


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


def parse_input_line(line: bytes) -> bytes:
    """One streamed stdin line: {"stdin": "text"} or {"stdin_base64": "..."}; ValueError."""
    try:
        obj = json.loads(line)
    except ValueError:
        raise ValueError("an input line is not JSON") from None
    if not isinstance(obj, dict) or set(obj) - {"stdin", "stdin_base64"}:
        raise ValueError('an input line must be {"stdin": "..."} or {"stdin_base64": "..."}')
    try:
        return _stdin_bytes(obj, "input line")
    except Refusal as e:
        raise ValueError(e.message) from None


class Utf8Chunks:
    """Binary-safe output decoding.

    Each chunk becomes {"data": text} when it is valid UTF-8 (a multi-byte character split
    across reads is held back and joined to the next chunk), else {"data_base64": ...} with
    the exact bytes. Nothing is replaced or lost; concatenating a stream's decoded pieces
    gives its bytes back.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")("strict")

    def feed(self, chunk: bytes, final: bool = False) -> dict[str, str] | None:
        pending = self._dec.getstate()[0]
        try:
            text = self._dec.decode(chunk, final)
        except UnicodeDecodeError:
            self._dec.reset()
            raw = pending + chunk
            return {"data_base64": base64.b64encode(raw).decode()} if raw else None
        return {"data": text} if text else None


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


# --- one execution ---------------------------------------------------------------------------


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
        """Relay output into `events` until the command ended and its group is gone."""
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


# --- the addon -------------------------------------------------------------------------------


def _error(
    code: str, message: str, rid: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=errors.STATUS[code],
        body=errors.body(code, message, rid),
        content_type="application/json",
        headers={"X-Request-ID": rid, "Cache-Control": "no-store", **(headers or {})},
    )


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _read_line(content: Any, buf: bytearray, limit: int) -> bytes | None:
    """The next line (without its newline) of a streamed body; None at EOF; ValueError when
    a line exceeds `limit`."""
    while True:
        i = buf.find(b"\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[: i + 1]
            return line
        if len(buf) > limit:
            raise ValueError(f"a line is longer than {limit} bytes")
        chunk = await content.readany()
        if not chunk:
            if buf:
                line = bytes(buf)
                buf.clear()
                return line
            return None
        buf += chunk


# Flat options: name, type, default, help (single-line: a multi-line help resets the option
# on every script reload).
OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    (
        "cli_enabled",
        bool,
        False,
        "Serve POST /cli/execute (management port, and proxy port addressed to the "
        "proxy or on reverse listeners). Also needs cli_token.",
    ),
    (
        "cli_token",
        str,
        "",
        "Bearer token for /cli/execute (Authorization: Bearer <token>); empty: the "
        "CLI_TOKEN environment variable; none at all keeps the endpoint off.",
    ),
    (
        "cli_allowed_commands",
        Sequence[str],
        [],
        "Absolute paths of the programs a request may run, named by base name or exact "
        "path; nothing else ever runs.",
    ),
    (
        "cli_argument_rules",
        str,
        "",
        'JSON object, command name -> {"prefix": [fixed leading args], "patterns": '
        '[regexes every client argument must fully match], "max_args": N}.',
    ),
    (
        "cli_env_allowlist",
        Sequence[str],
        [],
        "Environment variable names a request may set (loader variables such as LD_*, "
        "PYTHON*, PATH are always refused).",
    ),
    (
        "cli_max_concurrent",
        int,
        10,
        "Processes running at once; more requests get 429 RATE_LIMITED with Retry-After.",
    ),
    (
        "cli_process_timeout",
        str,
        "30s",
        "Wall-clock limit per process (and the cap of a request's timeout); then "
        "SIGTERM, grace period, SIGKILL to its process group.",
    ),
    (
        "cli_grace_period",
        str,
        "5s",
        "Time between SIGTERM and SIGKILL after a timeout or the output cap.",
    ),
    (
        "cli_max_memory_per_process",
        str,
        "512MB",
        "RLIMIT_AS (address space) of each process; 0 = no limit.",
    ),
    (
        "cli_max_cpu_time",
        str,
        "60s",
        "RLIMIT_CPU of each process (SIGXCPU, then SIGKILL a second later); 0 = no limit.",
    ),
    (
        "cli_max_file_size",
        str,
        "64MB",
        "RLIMIT_FSIZE: largest file a process may write (SIGXFSZ); 0 = no limit.",
    ),
    (
        "cli_max_processes",
        int,
        64,
        "RLIMIT_NPROC: processes of the user the command runs as (counts all of that "
        "user's processes); 0 = no limit.",
    ),
    (
        "cli_max_output_bytes",
        str,
        "10MB",
        "stdout plus stderr bytes relayed per execution; beyond it the output is "
        "truncated and the process stopped.",
    ),
    (
        "cli_working_directory",
        str,
        "/",
        "Fixed working directory of every process (absolute path).",
    ),
    (
        "cli_run_as_user",
        str,
        "nobody",
        "When the proxy runs as root, commands run as this user (its primary group, no "
        "supplementary groups); empty or root: as root (not recommended).",
    ),
    (
        "cli_heartbeat_interval",
        str,
        "10s",
        "A silent stream gets a heartbeat line this often (keeps idle timeouts away).",
    ),
)


class Cli:
    def __init__(self) -> None:
        self.settings = Settings()
        self.in_flight = 0
        self.listen_addrs: list[tuple[str, int]] = []  # the proxy-port reroute target
        self._secret = secrets.token_urlsafe(32)
        self._listener: _Listener | None = None
        self._executions: set[Execution] = set()
        self._is_running = False

    def load(self, loader: Any) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, help_text)

    def configure(self, updated: set[str]) -> None:
        if not any(k.startswith("cli_") for k in updated):
            return
        o = ctx.options

        def fail(option: str, why: str) -> exceptions.OptionsError:
            return exceptions.OptionsError(f"{option}: {why}")

        try:
            commands = parse_commands(o.cli_allowed_commands)
        except ValueError as e:
            raise fail("cli_allowed_commands", str(e)) from None
        try:
            rules = parse_rules(o.cli_argument_rules, commands)
        except ValueError as e:
            raise fail("cli_argument_rules", str(e)) from None
        for name in o.cli_env_allowlist:
            why = env_refusal(name)
            if why is not None:
                raise fail("cli_env_allowlist", f"{name!r} {why}")
        durations = {}
        for opt in ("cli_process_timeout", "cli_grace_period", "cli_max_cpu_time",
                    "cli_heartbeat_interval"):  # fmt: skip
            try:
                durations[opt] = units.parse_duration(getattr(o, opt))
            except ValueError as e:
                raise fail(opt, str(e)) from None
        if durations["cli_process_timeout"] <= 0 or durations["cli_heartbeat_interval"] <= 0:
            raise fail("cli_process_timeout/cli_heartbeat_interval", "must be more than 0s")
        sizes = {}
        for opt in ("cli_max_memory_per_process", "cli_max_file_size", "cli_max_output_bytes"):
            try:
                sizes[opt] = units.parse_size(getattr(o, opt))
            except ValueError as e:
                raise fail(opt, str(e)) from None
        if o.cli_max_concurrent < 1:
            raise fail("cli_max_concurrent", "must be at least 1")
        if o.cli_max_processes < 0:
            raise fail("cli_max_processes", "cannot be negative (0 = no limit)")
        wd = o.cli_working_directory
        if not os.path.isabs(wd) or not os.path.isdir(wd):
            raise fail("cli_working_directory", f"{wd!r} is not an existing absolute directory")
        try:
            user = resolve_user(o.cli_run_as_user, os.geteuid())
        except ValueError as e:
            raise fail("cli_run_as_user", str(e)) from None
        token = o.cli_token or os.environ.get("CLI_TOKEN", "")
        prlimit = next((p for p in PRLIMIT_CANDIDATES if os.access(p, os.X_OK)), None)
        prlimit = prlimit or shutil.which("prlimit")
        setpriv = next((p for p in SETPRIV_CANDIDATES if os.access(p, os.X_OK)), None)
        if o.cli_enabled and token and prlimit is None:
            # Secure first: never run commands without their limits.
            raise fail(
                "cli_enabled", "prlimit (util-linux) is not installed; it applies the limits"
            )
        s = Settings(
            enabled=o.cli_enabled,
            token=token,
            commands=commands,
            rules=rules,
            env_allowlist=frozenset(o.cli_env_allowlist),
            max_concurrent=o.cli_max_concurrent,
            process_timeout=durations["cli_process_timeout"],
            grace_period=durations["cli_grace_period"],
            max_memory=sizes["cli_max_memory_per_process"],
            max_cpu_time=int(durations["cli_max_cpu_time"] + 0.999),
            max_file_size=sizes["cli_max_file_size"],
            max_processes=o.cli_max_processes,
            max_output=max(sizes["cli_max_output_bytes"], 1),
            working_directory=wd,
            user=user,
            heartbeat=durations["cli_heartbeat_interval"],
            prlimit=prlimit or "",
            setpriv=setpriv or shutil.which("setpriv"),
        )
        if s.enabled and not s.token:
            log.warning("cli_enabled is set but no token (cli_token / CLI_TOKEN): CLI stays off")
        if s.active and os.geteuid() == 0 and user is None:
            log.warning("the proxy runs as root and cli_run_as_user is empty or root: "
                        "commands run as root")  # fmt: skip
        for path in set(commands.values()):
            if s.active and not os.access(path, os.X_OK):
                log.warning("cli_allowed_commands: %s is not an executable file (yet)", path)
        self.settings = s
        if self._is_running:
            self._sync_listener()

    def running(self) -> None:
        self._is_running = True
        self._sync_listener()

    def done(self) -> None:
        self._is_running = False
        for ex in list(self._executions):
            ex.abort("disconnected")  # the proxy is going away: nothing may outlive it
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self.listen_addrs = []

    def _sync_listener(self) -> None:
        if self.settings.active and self._listener is None:
            app = web.Application()
            app.router.add_route("*", PATH, self._internal)
            self._listener = _Listener(bind("127.0.0.1", 0), app)
            self.listen_addrs = [self._listener.addr]
            log.info("cli listening at %s:%d (proxy-port requests are rerouted here)",
                     *self._listener.addr)  # fmt: skip
        elif not self.settings.active and self._listener is not None:
            self._listener.stop()
            self._listener = None
            self.listen_addrs = []

    # --- extension of the management app ---

    def management_routes(
        self,
    ) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        return {PATH: self._direct} if self.settings.active else {}

    # --- proxy port: reroute to our listener with streaming ---

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        if req.path.partition("?")[0] != PATH or not self.listen_addrs:
            return
        if not isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            ps = ctx.master.addons.get("proxyserver")
            addrs = ps.listen_addrs() if ps else []
            if not addressed_to_proxy(req.host, req.port, flow.client_conn.sockname, addrs):
                return
        meta = errors.waypost(flow)
        meta["local"] = "cli"
        meta["backend"] = "cli"
        peer = flow.client_conn.peername
        req.headers[INTERNAL_HEADER] = self._secret
        req.headers[CLIENT_HEADER] = peer[0] if peer else "-"
        req.headers[REQUEST_ID_HEADER] = errors.request_id(flow)
        host, port = self.listen_addrs[0]
        req.scheme = "http"
        req.host = host
        req.port = port
        # The body is the process's stdin: hand it over as it arrives.
        req.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and errors.waypost(flow).get("local") == "cli":
            flow.response.stream = True

    # --- the endpoint ---

    async def _internal(self, request: web.Request) -> web.StreamResponse:
        secret = request.headers.get(INTERNAL_HEADER, "")
        if not hmac.compare_digest(
            secret.encode("utf-8", "surrogateescape"), self._secret.encode()
        ):
            return _error("NOT_FOUND", "Not found.", errors.new_request_id())
        client = request.headers.get(CLIENT_HEADER, "-")
        rid = request.headers.get(REQUEST_ID_HEADER) or errors.new_request_id()
        return await self._execute(request, client, rid)

    async def _direct(self, request: web.Request) -> web.StreamResponse:
        incoming = request.headers.get("X-Request-ID", "")
        rid = incoming if errors._VALID_REQUEST_ID.fullmatch(incoming) else errors.new_request_id()
        return await self._execute(request, request.remote or "-", rid)

    async def _execute(self, request: web.Request, client: str, rid: str) -> web.StreamResponse:
        s = self.settings
        if not s.active:
            return _error("NOT_FOUND", "The CLI endpoint is off.", rid)
        auth = bearer_status(request.headers.get("Authorization"), s.token)
        if auth != 200:
            STATS.count("_none", "unauthorized")
            if auth == 401:
                return _error("UNAUTHORIZED", "Missing or malformed bearer token.", rid,
                              {"WWW-Authenticate": "Bearer"})  # fmt: skip
            policy.decide("cli", "token", client, decision="block", request_id=rid)
            return _error("ACCESS_DENIED", "Wrong bearer token.", rid)
        if request.method != "POST":
            return _error("METHOD_NOT_ALLOWED", "Use POST.", rid, {"Allow": "POST"})
        if request.content_type != "application/json":
            return _error("UNSUPPORTED_MEDIA_TYPE", "The body must be application/json.", rid)
        try:
            plan, rest = await self._read_plan(request, s)
        except Refusal as r:
            STATS.count(r.command, "refused")
            if r.code == "COMMAND_NOT_ALLOWED":
                policy.decide("cli", r.rule, client, decision="block", request_id=rid,
                              command=r.command)  # fmt: skip
            return _error(r.code, r.message, rid)
        if self.in_flight >= s.max_concurrent:
            STATS.count(plan.path, "rate_limited")
            return _error("RATE_LIMITED", f"{s.max_concurrent} commands are running; retry later.",
                          rid, {"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        STATS.in_flight += 1
        # _run releases the slot once the process group is gone.
        return await self._run(request, plan, rest, s, client, rid)

    async def _read_plan(self, request: web.Request, s: Settings) -> tuple[Plan, bytearray]:
        """The request object, and what of the body follows it (streamed stdin lines).

        The body is one JSON object (any layout), or, for stdin streaming, NDJSON whose first
        line is the request object with "stdin_stream": true.
        """
        rest = bytearray()
        too_large = Refusal(
            "PAYLOAD_TOO_LARGE", f"The request object is over {MAX_REQUEST_BYTES} bytes."
        )
        try:
            first = await _read_line(request.content, rest, MAX_REQUEST_BYTES)
        except ValueError:
            raise too_large from None
        try:
            obj: Any = json.loads(first) if first is not None else None
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("stdin_stream") is True:
            return parse_request(obj, s), rest
        body = bytearray(first or b"")
        if rest:
            body += b"\n" + rest
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise too_large
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise _bad(f"The body is not valid JSON: {e}") from None
        return parse_request(obj, s), bytearray()

    async def _run(
        self,
        request: web.Request,
        plan: Plan,
        rest: bytearray,
        s: Settings,
        client: str,
        rid: str,
    ) -> web.StreamResponse:
        ex = Execution(plan, s)
        kind = "application/x-ndjson" if plan.stream else "application/json"
        resp = web.StreamResponse(headers=self._headers(kind, rid))
        resp.enable_chunked_encoding()
        start = asyncio.ensure_future(ex.start())
        runner: asyncio.Future[None] | None = None
        feeder: asyncio.Future[None] | None = None
        try:
            # The head leaves at once (aiohttp sends a StreamResponse's head in prepare): the
            # client knows it was accepted while the process is being spawned.
            await resp.prepare(request)
            try:
                # Shielded: if the client leaves meanwhile, _finish still gets the pid to kill.
                await asyncio.shield(start)
            except OSError as e:
                ex.fail(f"the process could not be started: {e.strerror or e}")
            else:
                self._executions.add(ex)
                runner = asyncio.ensure_future(ex.run())
                feeder = asyncio.ensure_future(self._feed(ex, request, rest))
            if plan.stream:
                await self._relay(request, ex, resp)
            else:
                await self._collect(request, ex, resp)
            await resp.write_eof()
        except ConnectionError:
            ex.abort("disconnected")  # a write failed: the client is gone
        finally:
            if not ex.done.is_set():
                ex.abort("disconnected")  # also when aiohttp cancelled us on disconnect
            if feeder is not None:
                feeder.cancel()
            spawn(self._finish(ex, start, runner, client, rid))
        return resp

    @staticmethod
    def _headers(content_type: str, rid: str) -> dict[str, str]:
        return {
            "Content-Type": content_type,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Request-ID": rid,
        }

    async def _next(
        self, request: web.Request, ex: Execution, idle: Callable[[], Awaitable[None]]
    ) -> tuple[str, bytes] | None:
        """The next output piece; None when the command has ended. Runs `idle` when silent
        for a heartbeat interval; raises ConnectionError when the client is gone."""
        last = time.monotonic()
        while not ex.pending:
            ex.wake.clear()
            try:
                await asyncio.wait_for(ex.wake.wait(), DISCONNECT_POLL)
            except TimeoutError:
                if _disconnected(request):
                    raise ConnectionResetError("client gone") from None
                if time.monotonic() - last >= ex.settings.heartbeat:
                    await idle()
                    last = time.monotonic()
        return ex.pending.popleft()

    async def _relay(self, request: web.Request, ex: Execution, resp: web.StreamResponse) -> None:
        """stream: true: one NDJSON event per line, numbered by `seq`."""
        seq = 0

        async def emit(event: dict[str, Any]) -> None:
            nonlocal seq
            event["seq"] = seq
            seq += 1
            await resp.write(json.dumps(event, ensure_ascii=False).encode() + b"\n")

        if ex.pid is not None:
            await emit({"type": "start", "pid": ex.pid, "command": ex.plan.path,
                        "timeout": ex.plan.timeout})  # fmt: skip
        decoders = {"stdout": Utf8Chunks(), "stderr": Utf8Chunks()}
        while (
            item := await self._next(request, ex, lambda: emit({"type": "heartbeat"}))
        ) is not None:
            kind, chunk = item
            piece = decoders[kind].feed(chunk)
            if piece:
                await emit({"type": kind, **piece})
        for kind, dec in decoders.items():
            piece = dec.feed(b"", final=True)
            if piece:
                await emit({"type": kind, **piece})
        await emit(ex.exit_record())

    async def _collect(self, request: web.Request, ex: Execution, resp: web.StreamResponse) -> None:
        """stream: false: one JSON object at the end. Whitespace is written meanwhile as the
        heartbeat (leading whitespace is valid JSON), so idle timeouts do not fire."""
        out = {"stdout": bytearray(), "stderr": bytearray()}

        async def idle() -> None:
            await resp.write(b" ")

        while (item := await self._next(request, ex, idle)) is not None:
            out[item[0]] += item[1]
        result: dict[str, Any] = {"pid": ex.pid}
        for kind, data in out.items():
            try:
                result[kind] = data.decode("utf-8")
            except UnicodeDecodeError:
                result[f"{kind}_base64"] = base64.b64encode(data).decode()
        result["exit"] = ex.exit_record()
        await resp.write(json.dumps(result, ensure_ascii=False).encode() + b"\n")

    async def _feed(self, ex: Execution, request: web.Request, rest: bytearray) -> None:
        """Write the request's stdin, then (stdin_stream) each input line, then close stdin."""
        assert ex.proc is not None and ex.proc.stdin is not None
        stdin = ex.proc.stdin
        try:
            if ex.plan.stdin:
                stdin.write(ex.plan.stdin)
                ex.stdin_bytes += len(ex.plan.stdin)
                await stdin.drain()
            if ex.plan.stdin_stream:
                while (
                    line := await _read_line(request.content, rest, MAX_REQUEST_BYTES)
                ) is not None:
                    if not line.strip():
                        continue
                    data = parse_input_line(line)
                    if data:
                        stdin.write(data)
                        ex.stdin_bytes += len(data)
                        await stdin.drain()
        except ValueError as e:
            ex.stdin_error = f"{e}; stdin was closed"
        except (BrokenPipeError, ConnectionResetError):
            pass  # the process closed its stdin or ended
        except Exception as e:  # the request body broke off (client gone, bad chunking)
            ex.stdin_error = f"the request body ended early ({type(e).__name__}); stdin was closed"
        finally:
            try:
                stdin.close()
            except Exception:
                pass

    def _release(self) -> None:
        self.in_flight -= 1
        STATS.in_flight -= 1

    async def _finish(
        self,
        ex: Execution,
        start: asyncio.Future[None],
        runner: asyncio.Future[None] | None,
        client: str,
        rid: str,
    ) -> None:
        """Once the process group is gone: free the slot, count, and log one event."""
        try:
            try:
                await start
            except OSError as e:
                ex.fail(f"the process could not be started: {e.strerror or e}")
            if runner is None and ex.proc is not None:
                # The client left while the process was being spawned: kill it now that the
                # pid is known, and reap it.
                ex.abort("disconnected")
                self._executions.add(ex)
                runner = asyncio.ensure_future(ex.run())
            if runner is not None:
                await runner
        except Exception:
            log.exception("cli execution of %s failed", ex.plan.path)
        finally:
            self._executions.discard(ex)
            self._release()
        record = ex.exit_record()
        STATS.count(ex.plan.path, record["outcome"])
        fields = {
            "request_id": rid,
            "client_ip": client,
            "command": ex.plan.path,
            "args": list(ex.plan.argv),
            "env_names": sorted(k for k in ex.plan.env if k != "PATH"),  # never the values
            "stdin_bytes": ex.stdin_bytes,  # never the content
            "stdout_bytes": ex.bytes_out["stdout"],
            "stderr_bytes": ex.bytes_out["stderr"],
            "stream": ex.plan.stream,
            "pid": ex.pid,
            **{k: v for k, v in record.items() if k != "type"},
        }
        log.info("cli execution", extra={"waypost": fields})


class _Listener:
    """The loopback listener proxy-port flows are rerouted to (handlers are cancelled when the
    connection drops, so a disconnect kills the process at once)."""

    def __init__(self, sock: socket.socket, app: web.Application) -> None:
        self.sock = sock
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        self.server: asyncio.Server | None = None
        self.stopped = False
        self.task = spawn(self._serve())

    async def _serve(self) -> None:
        await self.runner.setup()
        if self.stopped:
            return
        self.server = await asyncio.get_running_loop().create_server(
            self.runner.server,  # type: ignore[arg-type]
            sock=self.sock,
        )
        if self.stopped:
            self.server.close()

    def stop(self) -> None:
        """Release the port now (sync); the connection cleanup runs as a task."""
        self.stopped = True
        if self.server is not None:
            self.server.close()
        else:
            self.task.cancel()
            self.sock.close()
        spawn(self.runner.cleanup())


addons = [Cli()]
