"""Durations (`30s`, `500ms`, `2m`), sizes (`10MB`, `512k`, `1GiB`) and worker counts (`4`,
`auto`) as operators write them.

Shared by the profile models, the flat options and the supervisor, so `--set x=10MB` and
`x: 10MB` in a profile mean the same thing. All raise ValueError with a readable reason.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: str | int | float) -> float:
    """Seconds from `30s`, `250ms`, `2m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.fullmatch(value.strip().lower())
        if not m:
            raise ValueError(f"expected a duration such as 30s, 500ms or 2m, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from `10MB`, `512k`, `1GiB` or a bare number of bytes (1 KB = 1024 bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 10MB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"expected a size such as 10MB, 512KB or 1GB, got {value!r}")
        # Proxies (nginx, squid, mitmproxy's own body_size_limit) read k/m/g as powers of 1024.
        size = int(float(m.group(1)) * 1024 ** _SIZE_POWERS[m.group(2).lower()])
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def parse_workers(value: str | int) -> int | str:
    """A number of worker processes, 1 or more, or `auto` (one per usable core)."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or not (text == "auto" or text.isdigit() and int(text) >= 1):
        raise ValueError(f"expected a number of workers (1 or more) or auto, got {value!r}")
    return text if text == "auto" else int(text)


def format_duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds != int(seconds) else f"{int(seconds)}s"
