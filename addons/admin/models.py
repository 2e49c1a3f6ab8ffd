"""The admin API's requests and answers as pydantic models: they validate what comes in, and
the OpenAPI document (`openapi.py`) is generated from them, with their examples."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ExplainRequest(BaseModel):
    """A request to explain: nothing is sent and no state changes."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "method": "GET",
                    "url": "https://example.com/index.html",
                    "client_ip": "192.0.2.10",
                    "headers": {"Accept": "text/html"},
                }
            ]
        },
    )

    method: str = Field(default="GET", min_length=1, max_length=32, pattern=r"^[A-Za-z]+$")
    url: str = Field(
        min_length=1,
        max_length=65536,
        description="Absolute URL (http:// or https://); for CONNECT, host:port.",
    )
    client_ip: str = Field(default="127.0.0.1", max_length=64, description="The client's IP.")
    headers: dict[str, str] = {}
    listener: Literal["forward", "reverse"] = Field(
        default="forward",
        description="The kind of listener the request arrives on: reverse applies the "
        "router's default backend and its no-route refusal.",
    )

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value.strip("[]")))

    @model_validator(mode="after")
    def _target(self) -> ExplainRequest:
        if self.method == "CONNECT":
            host, sep, port = self.url.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError("url: a CONNECT target is host:port")
            return self
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url: an absolute http:// or https:// URL")
        try:
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError:
            raise ValueError("url: the port is not a number from 1 to 65535") from None
        return self


class Decision(BaseModel):
    """What one addon would decide (`explain()` of that addon); extra fields are its details."""

    model_config = ConfigDict(extra="allow")

    addon: str = Field(description="The addon that answered.")
    decision: str = Field(description="allow, block, would_block (shadow), limit, route, ...")
    rule: str | None = None
    shadow: bool = Field(default=False, description="True when the rule only reports.")
    refuses: bool = Field(default=False, description="The request would be refused here.")


class ExplainAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request": {
                        "method": "GET",
                        "url": "https://ads.example/x",
                        "client_ip": "192.0.2.10",
                        "headers": {},
                    },
                    "outcome": "block",
                    "refused_by": "filter",
                    "decisions": [
                        {"addon": "acl", "decision": "allow", "rule": None, "shadow": False,
                         "refuses": False},
                        {"addon": "filter", "decision": "block", "rule": "inline",
                         "shadow": False, "refuses": True, "host": "ads.example"},
                    ],
                }
            ]
        }
    )  # fmt: skip

    request: ExplainRequest
    outcome: Literal["allow", "block"] = Field(
        description="block when an enforced decision refuses the request, else allow."
    )
    refused_by: str | None = Field(default=None, description="The first addon that refuses.")
    decisions: list[Decision] = Field(description="In pipeline order.")


class ConfigEntry(BaseModel):
    value: Any
    option: str | None = Field(default=None, description="The flat option that carries it.")
    source: Literal["file", "env", "set", "default"]
    where: str | None = Field(default=None, description="file:line, or the variable's name.")


class ConfigAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "profile": "profiles/prod.yaml",
                    "keys": {
                        "server.port": {"value": 8080, "option": "listen_port",
                                        "source": "file", "where": "profiles/prod.yaml:3"},
                        "admin.token": {"value": "********", "option": "admin_token",
                                        "source": "env", "where": "ADMIN_TOKEN"},
                    },
                    "redacted": [{"key": "admin.token", "why": "secret"}],
                }
            ]
        }
    )  # fmt: skip

    profile: str | None = Field(description="The profile file in force (None: defaults).")
    keys: dict[str, ConfigEntry]
    redacted: list[dict[str, str]] = Field(description="Which keys were redacted, and why.")


class VersionAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"waypost": "0.5.0", "mitmproxy": "11.0.2", "python": "3.11.2"}]
        }
    )

    waypost: str
    mitmproxy: str
    python: str


class ReloadAnswer(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"reloaded": True, "message": "profile profiles/prod.yaml reloaded"}]
        }
    )

    reloaded: bool
    message: str


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    request_id: str
    timestamp: str


class ErrorAnswer(BaseModel):
    """Every refusal (errors.py's shape); a bad body's `details` names the fields."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "BAD_REQUEST",
                        "message": "url: Field required",
                        "request_id": "3f2a9c",
                        "timestamp": "2026-01-01T00:00:00.000Z",
                    }
                }
            ]
        }
    )

    error: ErrorBody
