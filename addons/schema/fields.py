"""The building blocks of the profile schema: the base of every section, value types, `Env`.

- `Section`: a frozen pydantic model that refuses unknown keys.
- `Duration`, `Size`, `Port`, `Workers`, `Network`, `PortSpec`, `Method`: values written as an
  operator writes them (`30s`, `10MB`, `auto`, `10.0.0.0/8`, `8000-8999`, `trace`), checked
  and normalised.
- `Env`: marks a field an environment variable overrides (`env.py` derives its table from it).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from addons.kernel.units import parse_duration, parse_size, parse_workers


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Env:
    """`Annotated[..., Env("PROXY_PORT")]`: the variable that overrides this key."""

    name: str


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Port = Annotated[int, Field(ge=0, le=65535)]
Workers = Annotated[int | Literal["auto"], BeforeValidator(parse_workers)]


def _network(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError as e:
        raise ValueError(f"not an IP network in CIDR form (e.g. 10.0.0.0/8): {e}") from None


Network = Annotated[str, BeforeValidator(_network)]


def _port_spec(value: Any) -> str:
    text = str(value).strip()
    low, _, high = text.partition("-")
    try:
        ports = [int(low)] + ([int(high)] if high else [])
    except ValueError:
        raise ValueError("expected a port (443) or a range (8000-8999)") from None
    if not all(1 <= p <= 65535 for p in ports) or ports != sorted(ports):
        raise ValueError("ports go from 1 to 65535, ranges low-high")
    return text


PortSpec = Annotated[str, BeforeValidator(_port_spec)]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _method(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            "an HTTP method is a token such as TRACE (letters, digits, !#$%&'*+.^_`|~-)"
        )
    return value.upper()


Method = Annotated[str, BeforeValidator(_method)]
