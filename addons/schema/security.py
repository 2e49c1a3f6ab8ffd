"""The `security:` section: trusted proxies, egress, TLS interception, ACL, rate limiting,
security headers, domain filtering and content-type filtering."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator, model_validator

from addons.kernel import hosts
from addons.schema.fields import Duration, Env, Network, PortSpec, Section


class Egress(Section):
    connect_ports: list[PortSpec] = ["443"]
    block_private: bool = True
    allowed_networks: list[Network] = []


class TlsInterception(Section):
    hosts: list[str] = []


Mode = Literal["enforce", "shadow"]
# Rule ids become metric labels and quoted policy names in RateLimit headers.
RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class Acl(Section):
    enabled: bool = True  # false: the lists are kept but not applied
    allowed_ips: list[Network] = []
    denied_ips: list[Network] = []
    mode: Mode = "enforce"


class RateLimitRule(Section):
    id: RuleId
    host: str | None = None
    path: str | None = None
    requests_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    burst: Annotated[int, Field(ge=0)] = 0
    mode: Mode | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None:
            hosts.parse_pattern(v)  # the rate limiter's grammar: a name, *.domain or an IP
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("a path prefix starting with /")
        return v

    @model_validator(mode="after")
    def _matches_something(self) -> RateLimitRule:
        if self.host is None and self.path is None:
            raise ValueError("a rule needs a host or a path (or both)")
        return self


class RateLimitBan(Section):
    after: Annotated[int, Field(ge=0)] = 0  # violations that ban a client; 0: no bans
    within: Duration = 60.0
    duration: Duration = 600.0
    status: Literal[429, 403] = 429


class RateLimiting(Section):
    enabled: Annotated[bool, Env("RATE_LIMIT_ENABLED")] = True  # false: no limit nor cap applies
    requests_per_second: Annotated[
        float, Field(ge=0, allow_inf_nan=False), Env("RATE_LIMIT_RPS")
    ] = 0
    burst: Annotated[int, Field(ge=0)] = 0
    mode: Mode = "enforce"
    exempt: list[Network] = []
    max_connections_per_ip: Annotated[int, Field(ge=0)] = 0
    max_clients: Annotated[int, Field(ge=1)] = 100_000
    rules: list[RateLimitRule] = []
    ban: RateLimitBan = RateLimitBan()

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, v: list[RateLimitRule]) -> list[RateLimitRule]:
        ids = [r.id for r in v]
        dup = sorted({i for i in ids if ids.count(i) > 1 or i == "default"})
        if dup:
            raise ValueError(f"rule ids must be unique and not 'default': {', '.join(dup)}")
        return v


def _header_value(value: Any) -> str:
    if not isinstance(value, str) or any(c < " " or c == "\x7f" for c in value):
        raise ValueError("a header value: text without control characters (empty turns it off)")
    return value.strip()


HeaderValue = Annotated[str, BeforeValidator(_header_value)]


def _also(name: str, other: str) -> Any:
    """The field is also accepted under the header-named key of the requirements."""
    return Field(validation_alias=AliasChoices(name, other))


class SecurityHeaders(Section):
    enabled: bool = False
    hsts: Annotated[HeaderValue, _also("hsts", "strict_transport_security")] = (
        "max-age=31536000; includeSubDomains"
    )
    content_type_options: Annotated[
        Literal["nosniff", ""], _also("content_type_options", "x_content_type_options")
    ] = "nosniff"
    frame_options: Annotated[
        Literal["DENY", "SAMEORIGIN", ""], _also("frame_options", "x_frame_options")
    ] = "DENY"
    content_security_policy: HeaderValue = ""
    override: bool = False

    @model_validator(mode="before")
    @classmethod
    def _on_when_named(cls, data: Any) -> Any:
        """A section that names the headers to add (as the requirements' does) turns them on, unless it
        says `enabled: false`."""
        named = {"strict_transport_security", "x_content_type_options", "x_frame_options"}
        named |= {"hsts", "content_type_options", "frame_options", "content_security_policy"}
        if isinstance(data, dict) and "enabled" not in data and named & data.keys():
            data = {**data, "enabled": True}
        return data

    @field_validator("hsts")
    @classmethod
    def _hsts(cls, v: str) -> str:
        if v and not re.match(r"(?i)\s*max-age=\d+\s*(;|$)", v):
            raise ValueError("HSTS starts with max-age=<seconds> (RFC 6797 §6.1)")
        return v


PolicyMode = Literal["enforce", "shadow"]
ListMode = Literal["blocklist", "allowlist", "mixed"]


class FilterFile(Section):
    path: str
    id: str | None = None  # the rule id (metric label); default: the file name without suffix
    list: Literal["blocked", "allowed"] = "blocked"
    mode: PolicyMode | None = None  # default: the policy's mode


def _file_spec(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class FilterDomains(Section):
    blocked: list[str] = []
    allowed: list[str] = []
    files: list[Annotated[FilterFile, BeforeValidator(_file_spec)]] = []


class FilterResponse(Section):
    status: Literal[403] = (
        403  # the requirements' key; a blocked domain is always 403 DOMAIN_BLOCKED
    )
    body: str = ""  # the message of the 403 JSON error; empty: a default naming host and rule


class Filtering(Section):
    mode: PolicyMode = "enforce"
    list_mode: ListMode = "blocklist"
    domains: FilterDomains = FilterDomains()
    ip_literals: Literal["allow", "deny", "check"] = "check"
    check_sni: bool = True
    reload_interval: Duration = 2.0
    response: FilterResponse = FilterResponse()

    @model_validator(mode="before")
    @classmethod
    def _list_mode_in_mode(cls, data: Any) -> Any:
        """The requirements' `mode: blocklist|allowlist|mixed` is Waypost's `list_mode`; Waypost's
        `mode` (enforce or shadow) then keeps its default."""
        if not isinstance(data, dict) or data.get("mode") not in typing.get_args(ListMode):
            return data
        data = dict(data)
        list_mode = data.pop("mode")
        if data.setdefault("list_mode", list_mode) != list_mode:
            raise ValueError(f"mode: {list_mode} and list_mode disagree")
        return data


class ContentFiltering(Section):
    mode: PolicyMode = "enforce"
    blocked_types: list[str] = []
    check_request: bool = False


class Security(Section):
    trusted_proxies: Annotated[list[Network], Env("TRUSTED_PROXIES")] = []
    egress: Egress = Egress()
    tls_interception: TlsInterception = TlsInterception()
    acl: Acl = Acl()
    rate_limiting: RateLimiting = RateLimiting()
    headers: SecurityHeaders = SecurityHeaders()
    filtering: Filtering = Filtering()
    content_filtering: ContentFiltering = ContentFiltering()
