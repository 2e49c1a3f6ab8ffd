"""Log lines: Waypost's JSON and text shapes, for the workers (accesslog) and the supervisor.

JSON: one object per record, `timestamp` (ISO 8601 UTC, ms, Z), `level` (CRITICAL reads FATAL,
the requirements' name), `logger`, `message`, then the record's extra fields (its `waypost`
dict first) and, in a worker of several, `worker`. Text: the inner formatter's line plus
escaped `key=value` fields. Kept here, not in an addon, because the supervisor process (which
loads no addon) writes its own lines in the same shape.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from addons.kernel import instance

_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "waypost",
}


def iso_timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds and Z, as in error bodies."""
    global _second
    whole = int(created)
    if _second[0] != whole:  # strftime costs microseconds; the second changes rarely
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


_second: tuple[int, str] = (-1, "")


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


# ensure_ascii escapes every non-ASCII character, so no raw bidi/control code point from a
# client reaches a terminal; json escapes C0 controls, and DEL is done by hand. Compact
# separators (`"status":200`), so greps like `'"duration_ms":[0-9]{3,}'` match. One encoder:
# json.dumps with any argument builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=True, default=_json_default, separators=(",", ":"))


def to_json(obj: dict[str, Any]) -> str:
    s = _ENCODER.encode(obj)
    return s.replace("\x7f", "\\u007f") if "\x7f" in s else s


def text_value(value: object) -> str:
    """A field value for text lines: bare when plainly printable, else a JSON string."""
    s = value if isinstance(value, str) else str(value)
    if s and s.isascii() and s.isprintable() and " " not in s and '"' not in s:
        return s
    return to_json(s)  # type: ignore[arg-type]


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    fields = record.__dict__.get("waypost")
    out: dict[str, Any] = dict(fields) if fields else {}
    for k in record.__dict__.keys() - _RECORD_ATTRS:
        v = record.__dict__[k]
        if k == "client" and isinstance(v, tuple) and len(v) >= 2:
            v = f"{v[0]}:{v[1]}"
        out.setdefault(k, v)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, then extra fields; and
    `worker`, this process's index, when it is one of several workers of an instance."""

    def __init__(self) -> None:
        super().__init__()
        me = instance.identity()
        self.worker = me.index if me.supervised else None

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": iso_timestamp(record.created),
            "level": _LEVEL_NAMES.get(record.levelname, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        fields = record.__dict__.get("waypost")
        if fields is not None and len(record.__dict__) <= _plain_record_size:
            out.update(fields)  # the access-line fast path: nothing else to look for
        else:
            for k, v in _extra(record).items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return to_json(out)


# The requirements' name for the level of failures that stop the proxy (Python's CRITICAL).
_LEVEL_NAMES = {"CRITICAL": "FATAL"}
# A record made with only extra={"waypost": ...} has this many attributes.
_plain_record_size = len(vars(logging.LogRecord("", 0, "", 0, "", (), None))) + 1


class TextFormatter(logging.Formatter):
    """A human line (mitmproxy's format when wrapping its formatter) plus escaped `k=v` fields."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        if record.__dict__.get("waypost") is None and not record.name.startswith("waypost"):
            return line
        fields = _extra(record)
        fields.pop("client", None)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={text_value(v)}" for k, v in fields.items())
