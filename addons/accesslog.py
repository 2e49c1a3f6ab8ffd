"""Structured logs: JSON (or text) lines on stdout or in a file, and one access line per request.

- Formats: mitmproxy's own terminal handler (`termlog`) gets our formatter, so every line on
  stdout, mitmproxy's included ("HTTP(S) proxy listening at ..."), is one JSON object with
  `timestamp` (ISO 8601 UTC, ms, Z), `level`, `logger`, `message` and any extra fields. Text
  mode keeps mitmproxy's line format and appends `key=value` fields. The formatters live in
  `kernel/logformat.py`: the supervisor writes its own lines with them.
- Access lines (logger `waypost.access`, INFO): message `request` from `response`/`error`,
  `connect` from `http_connected`/`http_connect_error` (when the tunnel opens, or is refused),
  and `tunnel` from `client_disconnected` when an established tunnel closes (bytes_sent and
  bytes_received are then the tunnel's wire bytes to and from the client, duration_ms its
  whole life, outcome `client_closed`, `server_closed` or `error`; counted through
  `metrics.watch_tunnel`/`watch_layer`/`end_tunnel`), with request_id, client_ip
  (`kernel.net.client_ip`: through `forwarding_trusted_proxies`, as the policies see it), method,
  url (secret query values redacted), status, duration_ms, bytes_sent, bytes_received,
  cache_hit, backend, user_agent (first USER_AGENT_MAX characters, when sent), trace_id
  (the request's span's when traced, else a valid W3C `traceparent`'s), and every decision
  recorded in `record(flow)`. They go straight to the output handler rather than through the root
  logger: mitmproxy's root handlers turn every record into an `add_log` event dispatched to
  all addons, which would cost more than the line.
- In JSON mode, mitmproxy's per-connection chatter (`client connect`, `server connect`, ...
  from `mitmproxy.proxy.server`) is raised to WARNING unless log_level is debug. mitmdump's
  `dumper` prints flows outside logging; set `flow_detail=0` (the bundle does) for pure JSON.
- Output `file`: waypost's records and the access lines go to `log_file` (written by a
  background thread in batches at most 50 ms late, reopened when logrotate moves it, rotated
  by size with old files removed by count and age: `kernel/logfile.py`); mitmproxy's lines
  and waypost errors stay on stdout, where startup failures are reported.

Hooks: configure, done, response, error, http_connected, http_connect_error, next_layer,
client_disconnected.
Options: log_level, log_format, log_output, log_file, log_file_max_size, log_file_max_age,
log_file_max_backups; forwarding_trusted_proxies (declared by `addons/kernel/net.py`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from typing import Any
from urllib.parse import unquote_plus

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import layer

from addons import errors
from addons.kernel import net
from addons.kernel.logfile import LineWriter, RotatingLog
from addons.kernel.logformat import JsonFormatter, TextFormatter
from addons.kernel.options import Option, at_least, declare, size
from addons.kernel.record import record
from addons.metrics import Tunnel, end_tunnel, sent_response, sent_status, watch_layer, watch_tunnel

log = logging.getLogger("waypost.accesslog")
access_log = logging.getLogger("waypost.access")

LEVELS = ("debug", "info", "warning", "error")
_LOGGED = "waypost.accesslog.logged"
_MITM_CHATTER = "mitmproxy.proxy.server"

# Query parameter names containing any of these are secrets (case-insensitive substrings:
# `x-api-key`, `client_secret`, `id_token` all match). Over-redacting beats leaking.
SECRET_WORDS = (
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "auth",
    "signature",
    "sig",
    "access_token",
    "api_key",
)
_SECRET_NAME = re.compile("|".join(re.escape(w) for w in SECRET_WORDS), re.IGNORECASE)
REDACTED = "REDACTED"


OPTIONS: tuple[Option, ...] = (
    Option(
        "log_level",
        str,
        "info",
        "Level of Waypost's own log records: debug, info, warning or error. Access lines "
        "are INFO, so `warning` turns them off. In JSON mode, `debug` also lets mitmproxy's "
        "per-connection lines through.",
        LEVELS,
    ),
    Option(
        "log_format",
        str,
        "json",
        "`json`: every log line (mitmproxy's too) is one JSON object with timestamp, level, "
        "logger, message and extra fields. `text`: mitmproxy's human lines, with key=value "
        "fields appended to Waypost's records.",
        ("json", "text"),
    ),
    Option(
        "log_output",
        str,
        "stdout",
        "`stdout`: all lines on standard output. `file`: Waypost's records and access lines "
        "go to log_file (written off the event loop, reopened after logrotate moves it); "
        "mitmproxy's own lines and Waypost errors stay on standard output.",
        ("stdout", "file"),
    ),
    Option(
        "log_file",
        str,
        "",
        "Path of the log file when log_output is `file`. Its directory must exist and be "
        "writable; the file is appended to.",
    ),
    Option(
        "log_file_max_size",
        str,
        "0",
        "Rotate log_file when a line would take it past this size (e.g. 100MB): it is renamed "
        "with the time appended and a new one started. 0: never (logrotate still works).",
    ),
    Option(
        "log_file_max_age",
        int,
        0,
        "Remove rotated log files older than this many days. 0: keep them.",
    ),
    Option(
        "log_file_max_backups",
        int,
        0,
        "Keep at most this many rotated log files, the newest. 0: keep them all.",
    ),
)
_ROTATION = frozenset({"log_file_max_size", "log_file_max_age", "log_file_max_backups"})
# Options that change where and how lines are written (termlog_verbosity is mitmproxy's).
_WATCHED = frozenset(
    {"log_level", "log_format", "log_output", "log_file", "termlog_verbosity", *_ROTATION}
)


# --- pure helpers --------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with secret-looking query values and any userinfo password replaced by REDACTED."""
    if "?" not in url and "@" not in url:
        return url
    scheme_sep = url.find("://")
    if scheme_sep != -1 and "@" in url:
        start = scheme_sep + 3
        end = len(url)
        for c in "/?#":
            i = url.find(c, start)
            if i != -1 and i < end:
                end = i
        at = url.rfind("@", start, end)
        if at != -1:
            user, sep, _ = url[start:at].partition(":")
            url = f"{url[:start]}{user}{':' + REDACTED if sep else ''}{url[at:]}"
    if "?" not in url:
        return url
    base, _, query = url.partition("?")
    query, hash_sep, fragment = query.partition("#")
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if eq and value and _SECRET_NAME.search(_unquote_name(name)):
            parts[i] = f"{name}={REDACTED}"
            changed = True
    if not changed:
        return url
    return f"{base}?{'&'.join(parts)}{hash_sep}{fragment}"


def _unquote_name(name: str) -> str:
    return unquote_plus(name) if "%" in name or "+" in name else name


class _Gate(logging.Filter):
    """On the terminal handler: waypost records by their own threshold, others by verbosity."""

    def __init__(self) -> None:
        super().__init__()
        self.others = logging.INFO
        self.waypost_min = logging.NOTSET

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("waypost"):
            return record.levelno >= self.waypost_min
        return record.levelno >= self.others


# --- access lines --------------------------------------------------------------------------------


def _body_len(message: http.Message | None) -> int | None:
    if message is None:
        return 0
    raw = message.raw_content
    if raw is not None:
        return len(raw)
    cl = message.headers.get("content-length")  # streamed: what was announced
    return int(cl) if cl and cl.isdigit() else None


_DEFAULT_PORTS = {(b"http", 80), (b"https", 443)}


def _url(req: http.Request) -> str:
    """`Request.url` from the raw fields: the property costs a Host lookup and a reparse."""
    data = req.data
    if data.authority and data.method == b"CONNECT":
        return data.authority.decode("utf-8", "surrogateescape")
    host = data.host if ":" not in data.host else f"[{data.host}]"
    port = "" if (data.scheme, data.port) in _DEFAULT_PORTS else f":{data.port}"
    path = data.path.decode("utf-8", "surrogateescape")
    return f"{data.scheme.decode('ascii', 'replace')}://{host}{port}{path}"


# A User-Agent is client input: kept to this many characters (the encoder escapes the rest).
USER_AGENT_MAX = 256
# W3C trace context: version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a valid W3C `traceparent` (not all zero, version not ff), else None."""
    if not traceparent:
        return None
    value = traceparent.strip()
    m = _TRACEPARENT.match(value)
    # Version 00 is exactly 55 characters; later versions may append fields, ff is invalid.
    if m is None or value[:2] == "ff" or (value[:2] == "00" and len(value) != 55):
        return None
    if m[1] == _ZERO_TRACE:
        return None
    return m[1]


def access_fields(flow: http.HTTPFlow, now: float) -> dict[str, Any]:
    """The access line's fields for a finished (or failed) request or CONNECT."""
    meta = record(flow)
    req = flow.request
    resp = sent_response(flow)
    status = sent_status(flow)
    end = (resp.timestamp_end or now) if resp is not None else now
    backend = meta.get("backend")
    if backend is None:
        server = flow.server_conn
        if server.address and server.timestamp_start is not None:
            backend = f"{server.address[0]}:{server.address[1]}"
    cache_hit = meta.get("cache_hit")
    if cache_hit is None:
        cache_hit = str(meta.get("cache", "")).upper() == "HIT"
    method = req.method
    tunnel = method == "CONNECT"
    fields: dict[str, Any] = {
        "request_id": errors.request_id(flow),
        "client_ip": net.client_ip(flow) or None,
        "method": method,
        "url": redact_url(_url(req)),
        "status": status,
        "duration_ms": round((end - req.timestamp_start) * 1000, 2),
        "bytes_sent": 0 if tunnel else _body_len(resp),
        "bytes_received": 0 if tunnel else _body_len(req),
        "cache_hit": bool(cache_hit),
        "backend": backend,
    }
    headers = req.headers
    agent = headers.get("user-agent")
    if agent is not None:
        fields["user_agent"] = agent[:USER_AGENT_MAX]
    trace = meta.get("trace_id") or trace_id(headers.get("traceparent"))
    if trace is not None:
        fields["trace_id"] = trace
    for k, v in meta.items():
        fields.setdefault(k, v)
    if flow.error is not None:
        fields["error"] = flow.error.msg
    return fields


def tunnel_fields(tunnel: Tunnel) -> dict[str, Any]:
    """The closing line of a CONNECT tunnel: the CONNECT's fields with the tunnel's bytes each
    way (on the wire), its whole duration and its outcome."""
    flow = tunnel.flow
    end = tunnel.end or time.time()
    fields = access_fields(flow, end)
    fields["duration_ms"] = round((end - flow.request.timestamp_start) * 1000, 2)
    fields["bytes_sent"] = tunnel.down  # to the client, from the server
    fields["bytes_received"] = tunnel.up  # from the client, to the server
    fields["outcome"] = outcome = tunnel.outcome()
    if outcome == "error":
        fields["error"] = tunnel.client.error or flow.server_conn.error
    return fields


def _emit(message: str, fields: dict[str, Any]) -> None:
    # A record made directly: Logger.info would also walk the stack for the caller's file
    # and line, a fifth of the line's cost, to say "accesslog.py" every time.
    record = logging.LogRecord(access_log.name, logging.INFO, __file__, 0, message, None, None)
    record.waypost = fields
    access_log.handle(record)


# --- addon ---------------------------------------------------------------------------------------


class AccessLog:
    def __init__(self) -> None:
        self.gate = _Gate()
        self.termlog: logging.Handler | None = None
        self.termlog_formatter: logging.Formatter | None = None
        self.stdout_handler: logging.Handler | None = None
        self.file_handler: logging.Handler | None = None
        self.writer: LineWriter | None = None
        self.chatter_level: int | None = None

    def load(self, loader: Any) -> None:
        net.load(loader)  # client_ip honours forwarding_trusted_proxies
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        if not updated & _WATCHED:
            return
        opts = ctx.options
        to_file = opts.log_output == "file"
        reopen = bool(updated & {"log_output", "log_file", *_ROTATION}) or self.file_handler is None
        if to_file:
            _check_log_file(opts.log_file, reopen)
        level = logging.getLevelName(opts.log_level.upper())
        logging.getLogger("waypost").setLevel(level)
        json_mode = opts.log_format == "json"
        out = self._terminal(json_mode, level, to_file)
        if to_file:
            out = self._file_output(opts.log_file, reopen, json_mode)
        else:
            self._close_file()
        self._route_access(out)
        self._quiet_chatter(json_mode and level > logging.DEBUG)

    def _terminal(self, json_mode: bool, level: int, to_file: bool) -> logging.Handler:
        """Format and gate the terminal handler (mitmproxy's termlog, else our own on stdout)."""
        termlog = self._adopt_termlog()
        formatter = JsonFormatter() if json_mode else TextFormatter(self.termlog_formatter)
        # The terminal handler's level is termlog_verbosity; our records have their own.
        opts = ctx.options
        name = opts.termlog_verbosity if "termlog_verbosity" in opts else "info"
        verbosity = logging.getLevelName(name.upper())
        self.gate.others = verbosity if isinstance(verbosity, int) else logging.INFO
        self.gate.waypost_min = logging.ERROR if to_file else logging.NOTSET
        if termlog is not None:
            termlog.setFormatter(formatter)
            termlog.setLevel(min(self.gate.others, level))
            return termlog
        if self.stdout_handler is None:
            self.stdout_handler = logging.StreamHandler(sys.stdout)
            self.stdout_handler.addFilter(self.gate)
            logging.getLogger("waypost").addHandler(self.stdout_handler)
        self.stdout_handler.setFormatter(formatter)
        return self.stdout_handler

    def _adopt_termlog(self) -> logging.Handler | None:
        """mitmproxy's terminal handler, with our gate on it (once per handler)."""
        termlog = self._termlog_handler()
        if termlog is not None and termlog is not self.termlog:
            self._restore()
            self.termlog = termlog
            self.termlog_formatter = termlog.formatter
            termlog.addFilter(self.gate)
        return termlog

    def _file_output(self, path: str, reopen: bool, json_mode: bool) -> logging.Handler:
        out = self.file_handler
        if reopen or out is None:
            self._close_file()
            out = self._open_file(path)
        # Files get full dates; mitmproxy's terminal format has only the time of day.
        out.setFormatter(JsonFormatter() if json_mode else TextFormatter())
        return out

    def _route_access(self, out: logging.Handler) -> None:
        # Access lines skip the root logger (see the module docstring).
        access_log.propagate = False
        for h in list(access_log.handlers):
            access_log.removeHandler(h)
        if out is not self.stdout_handler:
            access_log.addHandler(out)
        else:
            access_log.propagate = True  # reaches stdout_handler on "waypost" once

    def _quiet_chatter(self, quiet: bool) -> None:
        chatter = logging.getLogger(_MITM_CHATTER)
        if self.chatter_level is None:
            self.chatter_level = chatter.level
        chatter.setLevel(logging.WARNING if quiet else self.chatter_level)

    @staticmethod
    def _termlog_handler() -> logging.Handler | None:
        try:
            addon = ctx.master.addons.get("termlog")
        except AttributeError:
            return None
        handler = getattr(addon, "logger", None)
        return handler if isinstance(handler, logging.Handler) else None

    def _open_file(self, path: str) -> logging.Handler:
        opts = ctx.options
        rotation = (
            size("log_file_max_size", opts.log_file_max_size),
            at_least("log_file_max_age", opts.log_file_max_age, 0),
            at_least("log_file_max_backups", opts.log_file_max_backups, 0),
        )
        try:
            target = RotatingLog(path, *rotation)
        except OSError as e:
            raise exceptions.OptionsError(
                f"log_file: cannot open {path!r}: {e.strerror} (check the path and permissions)"
            ) from None
        self.writer = LineWriter(target)
        # QueueHandler formats in the caller (with our formatter); the thread only writes.
        self.file_handler = logging.handlers.QueueHandler(self.writer.queue)
        logging.getLogger("waypost").addHandler(self.file_handler)
        return self.file_handler

    def _close_file(self) -> None:
        if self.file_handler is not None:
            logging.getLogger("waypost").removeHandler(self.file_handler)
            access_log.removeHandler(self.file_handler)
            self.file_handler = None
        if self.writer is not None:
            self.writer.stop()
            self.writer = None

    def _restore(self) -> None:
        if self.termlog is not None:
            self.termlog.removeFilter(self.gate)
            if self.termlog_formatter is not None:
                self.termlog.setFormatter(self.termlog_formatter)
            self.termlog = None

    def done(self) -> None:
        for h in list(access_log.handlers):
            access_log.removeHandler(h)
        access_log.propagate = True
        self._close_file()
        if self.stdout_handler is not None:
            logging.getLogger("waypost").removeHandler(self.stdout_handler)
            self.stdout_handler = None
        self._restore()
        if self.chatter_level is not None:
            logging.getLogger(_MITM_CHATTER).setLevel(self.chatter_level)
            self.chatter_level = None
        logging.getLogger("waypost").setLevel(logging.NOTSET)

    # -- hooks --

    def _log(self, flow: http.HTTPFlow, message: str) -> None:
        if not access_log.isEnabledFor(logging.INFO) or flow.metadata.get(_LOGGED):
            return
        flow.metadata[_LOGGED] = True
        _emit(message, access_fields(flow, time.time()))

    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow, "request")

    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow, "request")

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._log(flow, "connect")
        watch_tunnel(flow)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        watch_layer(nextlayer)

    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = end_tunnel(client)
        if tunnel is not None and access_log.isEnabledFor(logging.INFO):
            _emit("tunnel", tunnel_fields(tunnel))

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._log(flow, "connect")


def _check_log_file(path: str, reopen: bool) -> None:
    """`OptionsError` unless `path` names a file to log to (checked again only when reopened)."""
    if not path:
        raise exceptions.OptionsError(
            "log_file: empty while log_output is file (set log_file=/path/to/waypost.log)"
        )
    problem = _unwritable(path) if reopen else None
    if problem:
        raise exceptions.OptionsError(
            f"log_file: cannot write {path!r}: {problem} "
            "(create the directory or fix its permissions)"
        )


def _unwritable(path: str) -> str | None:
    """Why `path` cannot be appended to, or None. Only stat/access calls: nothing that blocks."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "the file is not writable"
    if not os.path.isdir(directory):
        return f"directory {directory!r} does not exist"
    return None if os.access(directory, os.W_OK) else f"directory {directory!r} is not writable"


addons = [AccessLog()]
