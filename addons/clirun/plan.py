"""What a request may run: plain data in, a `Plan` or a `Refusal` out (no I/O, no mitmproxy).

- `Settings`, `Rule`: the parsed options the checks apply (built by `clirun.options`).
- `parse_request`: the allow-listed command, its argument rules, the filtered environment,
  stdin, the stream flags and the timeout -> a `Plan`; anything else -> a `Refusal`.
- `parse_input_line`: one streamed stdin line.
- `env_refusal`: why a variable name may never be set by a request.
- `limit_argv`: setpriv(1) and prlimit(1) in front of the command, for the configured limits.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

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


class Rule(NamedTuple):
    prefix: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    max_args: int | None
    paths: str = "confined"  # "any": the command's arguments may name paths anywhere


class Settings(NamedTuple):
    """The parsed options, swapped in one assignment."""

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
    confine_paths: bool = True
    user: tuple[int, int] | None = None  # (uid, gid) to drop to
    heartbeat: float = 10.0
    prlimit: str = "/usr/bin/prlimit"
    setpriv: str | None = None

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.token)


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


def bad_request(message: str, command: str = "_none") -> Refusal:
    return Refusal("BAD_REQUEST", message, command=command)


def env_refusal(name: str) -> str | None:
    """Why an environment variable name may never be set by a request, or None."""
    if not _ENV_NAME.fullmatch(name):
        return "is not a valid variable name"
    upper = name.upper()
    if upper in ENV_DENY_NAMES or upper.startswith(ENV_DENY_PREFIXES):
        return "changes how programs are loaded or run and is never accepted"
    return None


def _stdin_bytes(obj: Mapping[str, Any], where: str) -> bytes:
    text, b64 = obj.get("stdin"), obj.get("stdin_base64")
    if text is not None and b64 is not None:
        raise bad_request(f"{where}: give stdin or stdin_base64, not both")
    if text is not None:
        if not isinstance(text, str):
            raise bad_request(f"{where}: stdin must be a string")
        return text.encode("utf-8", "surrogatepass")
    if b64 is not None:
        if not isinstance(b64, str):
            raise bad_request(f"{where}: stdin_base64 must be a string")
        try:
            return base64.b64decode(b64, validate=True)
        except ValueError:
            raise bad_request(f"{where}: stdin_base64 is not valid base64") from None
    return b""


def _allowed_path(command: Any, s: Settings) -> str:
    if not isinstance(command, str) or not command:
        raise bad_request(
            "command must be a non-empty string (a base name or an allow-listed path)."
        )
    if any(c in command for c in "\0\n\r"):
        raise bad_request("command contains a NUL or line break.")
    # Only exact allowlist entries: no PATH search, no relative paths, no "..".
    path = s.commands.get(command)
    if path is None or (("/" in command) and command != path):
        raise Refusal("COMMAND_NOT_ALLOWED", "This command is not allowed.", "allowed_commands")
    return path


def outside(arg: str, root: str) -> bool:
    """Whether `arg`, read as a path from `root` (the real working directory), leads out of it:
    an absolute path elsewhere, `..`, or a symlink that points away. In `--opt=value` the value
    counts too. Every argument is read as a path: no shell expands it, so only these forms, and
    links, reach outside."""
    values = [arg]
    if arg.startswith("-") and "=" in arg:
        values.append(arg.partition("=")[2])
    for value in values:
        real = os.path.realpath(os.path.join(root, value))
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _arguments(args: Any, path: str, rule: Rule | None, s: Settings) -> tuple[str, ...]:
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise bad_request("args must be a list of strings.", path)
    if any("\0" in a for a in args):
        raise bad_request("An argument contains a NUL byte.", path)
    if s.confine_paths and (rule is None or rule.paths != "any"):
        root = os.path.realpath(s.working_directory)
        for i, a in enumerate(args):
            if outside(a, root):
                raise Refusal(
                    "COMMAND_NOT_ALLOWED",
                    f"Argument {i} names a path outside the working directory.",
                    "confine_paths",
                    path,
                )
    if rule is None:
        return tuple(args)
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
    return rule.prefix + tuple(args)


def _environment(env_in: Any, path: str, allowlist: frozenset[str]) -> dict[str, str]:
    if not isinstance(env_in, dict):
        raise bad_request("env must be an object of string values.", path)
    env = {"PATH": SAFE_PATH}
    for name, value in env_in.items():
        why = env_refusal(name)
        if why is not None:
            raise bad_request(f"env {name}: {why}.", path)
        if name not in allowlist:
            raise bad_request(f"env {name} is not in the allowlist (cli.env_allowlist).", path)
        if not isinstance(value, str) or "\0" in value:
            raise bad_request(f"env {name}: the value must be a string without NUL.", path)
        env[name] = value
    return env


def parse_request(obj: Any, s: Settings) -> Plan:
    """Validate a request object against the settings; raises Refusal."""
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.")
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        raise bad_request(
            f"Unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(REQUEST_KEYS))}."
        )
    path = _allowed_path(obj.get("command"), s)
    argv = _arguments(obj.get("args", []), path, s.rules.get(path), s)
    env = _environment(obj.get("env", {}), path, s.env_allowlist)
    stdin = _stdin_bytes(obj, "request")
    flags = {}
    for key, default in (("stream", True), ("stdin_stream", False)):
        v = obj.get(key, default)
        if not isinstance(v, bool):
            raise bad_request(f"{key} must be true or false.", path)
        flags[key] = v
    timeout = s.process_timeout
    t = obj.get("timeout")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise bad_request("timeout must be a positive number of seconds.", path)
        timeout = min(float(t), s.process_timeout)
    return Plan(path, argv, env, stdin, flags["stdin_stream"], flags["stream"], timeout)


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
