"""The CLI's flat options: the table `load` declares, and their parsing into one `Settings`.

- `OPTIONS`: name, type, default and help of every `cli_` option.
- `parse_commands`, `parse_rules`, `resolve_user`: one option each -> a value, or ValueError.
- `settings_from`: every option checked -> `Settings`, or `OptionsError` naming the option.
- `log_warnings`: what an operator should hear about a valid but risky configuration.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from mitmproxy import exceptions
from pydantic import ValidationError

from addons.clirun.plan import Rule, Settings, env_refusal
from addons.kernel.options import Option, at_least, duration, size
from addons.schema import CliArgumentRule

log = logging.getLogger("waypost.cli")

# util-linux prlimit(1) sets the limits on itself and execs the command (no fork, no shell):
# resource limits without a preexec_fn, which is unsafe in mitmproxy's threaded process.
PRLIMIT_CANDIDATES = ("/usr/bin/prlimit", "/bin/prlimit")
# util-linux setpriv(1) drops to the command user the same way (setgroups, setgid, setuid, exec).
# subprocess's own user=/group= would do it too, but then Python cannot use vfork and forks
# the whole proxy process, which stalls its event loop for milliseconds per command.
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")

# Flat options: name, type, default, help (single-line: a multi-line help resets the option
# on every script reload).
OPTIONS: tuple[Option, ...] = (
    Option(
        "cli_enabled",
        bool,
        False,
        "Serve POST /cli/execute (management port, and proxy port addressed to the "
        "proxy or on reverse listeners). Also needs cli_token.",
    ),
    Option(
        "cli_token",
        str,
        "",
        "Bearer token for /cli/execute (Authorization: Bearer <token>); empty: the "
        "CLI_TOKEN environment variable; none at all keeps the endpoint off.",
    ),
    Option(
        "cli_allowed_commands",
        Sequence[str],
        [],
        "Absolute paths of the programs a request may run, named by base name or exact "
        "path; nothing else ever runs.",
    ),
    Option(
        "cli_argument_rules",
        str,
        "",
        'JSON object, command name -> {"prefix": [fixed leading args], "patterns": '
        '[regexes every client argument must fully match], "max_args": N}.',
    ),
    Option(
        "cli_env_allowlist",
        Sequence[str],
        [],
        "Environment variable names a request may set (loader variables such as LD_*, "
        "PYTHON*, PATH are always refused).",
    ),
    Option(
        "cli_max_concurrent",
        int,
        10,
        "Processes running at once; more requests get 429 RATE_LIMITED with Retry-After.",
    ),
    Option(
        "cli_process_timeout",
        str,
        "30s",
        "Wall-clock limit per process (and the cap of a request's timeout); then "
        "SIGTERM, grace period, SIGKILL to its process group.",
    ),
    Option(
        "cli_grace_period",
        str,
        "5s",
        "Time between SIGTERM and SIGKILL after a timeout or the output cap.",
    ),
    Option(
        "cli_max_memory_per_process",
        str,
        "512MB",
        "RLIMIT_AS (address space) of each process; 0 = no limit.",
    ),
    Option(
        "cli_max_cpu_time",
        str,
        "60s",
        "RLIMIT_CPU of each process (SIGXCPU, then SIGKILL a second later); 0 = no limit.",
    ),
    Option(
        "cli_max_file_size",
        str,
        "64MB",
        "RLIMIT_FSIZE: largest file a process may write (SIGXFSZ); 0 = no limit.",
    ),
    Option(
        "cli_max_processes",
        int,
        64,
        "RLIMIT_NPROC: processes of the user the command runs as (counts all of that "
        "user's processes); 0 = no limit.",
    ),
    Option(
        "cli_max_output_bytes",
        str,
        "10MB",
        "stdout plus stderr bytes relayed per execution; beyond it the output is "
        "truncated and the process stopped.",
    ),
    Option(
        "cli_working_directory",
        str,
        "/",
        "Fixed working directory of every process (absolute path).",
    ),
    Option(
        "cli_confine_paths",
        bool,
        True,
        "Refuse a client argument that names a path outside cli_working_directory (an absolute "
        "path, '..', a symlink out; also the value of --opt=value), unless the command's "
        "argument rule says paths: any.",
    ),
    Option(
        "cli_run_as_user",
        str,
        "nobody",
        "When the proxy runs as root, commands run as this user (its primary group, no "
        "supplementary groups); empty or root: as root (not recommended).",
    ),
    Option(
        "cli_heartbeat_interval",
        str,
        "10s",
        "A silent stream gets a heartbeat line this often (keeps idle timeouts away).",
    ),
)


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
            tuple(rule.prefix),
            tuple(re.compile(p) for p in rule.patterns),
            rule.max_args,
            rule.paths,
        )
    return out


def resolve_user(name: str, euid: int) -> tuple[int, int] | None:
    """(uid, gid) to run commands as: only when the proxy is root and a user is named."""
    if euid != 0 or not name or name == "root":
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None
    return entry.pw_uid, entry.pw_gid


def _fail(option: str, why: str) -> exceptions.OptionsError:
    return exceptions.OptionsError(f"{option}: {why}")


def _positive(option: str, value: str) -> float:
    seconds = duration(option, value)
    if seconds <= 0:
        raise _fail(option, "must be more than 0s")
    return seconds


def _tool(candidates: Sequence[str], name: str) -> str | None:
    """The first executable of `candidates`, else `name` found on PATH."""
    return next((p for p in candidates if os.access(p, os.X_OK)), None) or shutil.which(name)


def _commands_and_rules(o: Any) -> tuple[dict[str, str], dict[str, Rule]]:
    try:
        commands = parse_commands(o.cli_allowed_commands)
    except ValueError as e:
        raise _fail("cli_allowed_commands", str(e)) from None
    try:
        rules = parse_rules(o.cli_argument_rules, commands)
    except ValueError as e:
        raise _fail("cli_argument_rules", str(e)) from None
    for name in o.cli_env_allowlist:
        why = env_refusal(name)
        if why is not None:
            raise _fail("cli_env_allowlist", f"{name!r} {why}")
    return commands, rules


def settings_from(o: Any) -> Settings:
    """Every `cli_` option of `o` (mitmproxy's options) checked and parsed; OptionsError."""
    commands, rules = _commands_and_rules(o)
    process_timeout = _positive("cli_process_timeout", o.cli_process_timeout)
    grace_period = duration("cli_grace_period", o.cli_grace_period)
    max_cpu_time = duration("cli_max_cpu_time", o.cli_max_cpu_time)
    heartbeat = _positive("cli_heartbeat_interval", o.cli_heartbeat_interval)
    max_memory = size("cli_max_memory_per_process", o.cli_max_memory_per_process)
    max_file_size = size("cli_max_file_size", o.cli_max_file_size)
    max_output = size("cli_max_output_bytes", o.cli_max_output_bytes)
    max_concurrent = at_least("cli_max_concurrent", o.cli_max_concurrent, 1)
    max_processes = at_least("cli_max_processes", o.cli_max_processes, 0)
    wd = o.cli_working_directory
    if not os.path.isabs(wd) or not os.path.isdir(wd):
        raise _fail("cli_working_directory", f"{wd!r} is not an existing absolute directory")
    try:
        user = resolve_user(o.cli_run_as_user, os.geteuid())
    except ValueError as e:
        raise _fail("cli_run_as_user", str(e)) from None
    token = o.cli_token or os.environ.get("CLI_TOKEN", "")
    prlimit = _tool(PRLIMIT_CANDIDATES, "prlimit")
    if o.cli_enabled and token and prlimit is None:
        # Secure first: never run commands without their limits.
        raise _fail("cli_enabled", "prlimit (util-linux) is not installed; it applies the limits")
    return Settings(
        enabled=o.cli_enabled,
        token=token,
        commands=commands,
        rules=rules,
        env_allowlist=frozenset(o.cli_env_allowlist),
        max_concurrent=max_concurrent,
        process_timeout=process_timeout,
        grace_period=grace_period,
        max_memory=max_memory,
        max_cpu_time=int(max_cpu_time + 0.999),
        max_file_size=max_file_size,
        max_processes=max_processes,
        max_output=max(max_output, 1),
        working_directory=wd,
        confine_paths=o.cli_confine_paths,
        user=user,
        heartbeat=heartbeat,
        prlimit=prlimit or "",
        setpriv=_tool(SETPRIV_CANDIDATES, "setpriv"),
    )


def log_warnings(s: Settings) -> None:
    """Warn about a configuration that is valid but will not do what the operator expects."""
    if s.enabled and not s.token:
        log.warning("cli_enabled is set but no token (cli_token / CLI_TOKEN): CLI stays off")
    if s.active and os.geteuid() == 0 and s.user is None:
        log.warning("the proxy runs as root and cli_run_as_user is empty or root: "
                    "commands run as root")  # fmt: skip
    if s.active and s.confine_paths and os.path.realpath(s.working_directory) == "/":
        log.warning("cli_confine_paths confines arguments to cli_working_directory, which is /: "
                    "set a dedicated directory")  # fmt: skip
    for path in set(s.commands.values()):
        if s.active and not os.access(path, os.X_OK):
            log.warning("cli_allowed_commands: %s is not an executable file (yet)", path)
