"""Profiles: the YAML schema, strict validation with file/line errors, env overrides, and the
map from a profile to the addons' flat options.

A profile is parsed into an immutable `Profile` (pydantic, unknown keys refused), then turned
into the flat options of the addons (`to_options`), which is all the addons ever read.

    load("profiles/prod.yaml", os.environ) -> Loaded    # raises ProfileError listing every problem
    choose(option, os.environ) -> the profile path startup loads (--set, WAYPOST_PROFILE, default)
    to_options(loaded.profile) -> {"listen_port": 8080, "cache_max_memory": "268435456", ...}

Modules: fields (value types, `Section`, `Env`), models (`Profile` and its general sections;
`ALIASES`, the product requirements' other names),
security and routes (those sections), env (the environment tables: `Env` marks and
`WAYPOST_<SECTION>__<KEY>`), loading (YAML, line map, aliases, errors), options (the option
map and the `enabled: false` `SWITCHES`), validate (`python -m addons.schema`).
"""

from __future__ import annotations

from addons.schema.env import ENV_OVERRIDES, SYSTEMATIC
from addons.schema.loading import Loaded, ProfileError, choose, load
from addons.schema.models import (
    ALIASES,
    COMPRESSIBLE_TYPES,
    CliArgumentRule,
    Profile,
)
from addons.schema.options import CORE_DEFAULTS, OPTIONS, SWITCHES, listener_options, to_options
from addons.schema.routes import RouteRule
from addons.schema.security import FilterFile, RateLimitRule

__all__ = [
    "ALIASES",
    "COMPRESSIBLE_TYPES",
    "CORE_DEFAULTS",
    "ENV_OVERRIDES",
    "OPTIONS",
    "CliArgumentRule",
    "FilterFile",
    "Loaded",
    "Profile",
    "ProfileError",
    "RateLimitRule",
    "RouteRule",
    "SWITCHES",
    "SYSTEMATIC",
    "choose",
    "listener_options",
    "load",
    "to_options",
]
