from __future__ import annotations

from pathlib import Path

import pytest

from addons import schema
from addons.kernel.units import format_duration, parse_duration, parse_size
from addons.schema import validate

ROOT = Path(__file__).resolve().parents[2]

ISSUE_PROFILE = """\
server: {host: 127.0.0.1, port: 8080, shutdown_timeout: 30s}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 9090, path: /metrics}
limits: {max_url_length: 8192, max_header_size: 16384, max_headers_count: 100, max_body_size: 10MB}
security:
  trusted_proxies: []            # CIDRs whose X-Forwarded-For is believed
  egress:
    connect_ports: [443]         # ports CONNECT may reach
    block_private: true
    allowed_networks: []
  tls_interception: {hosts: []}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("1.5s", 1.5), (7, 7), ("0", 0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "s", "10 parsecs", "-1s", "1d", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, size",
    [
        ("10MB", 10 << 20),
        ("512k", 512 << 10),
        ("1GiB", 1 << 30),
        ("100", 100),
        (5, 5),
        ("1.5KB", 1536),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "MB", "10 potatoes", "-5", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds, text", [(30.0, "30s"), (0.5, "500ms"), (0, "0s")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == seconds


def test_issue_profile_validates(tmp_path: Path) -> None:
    loaded = schema.load(write(tmp_path, ISSUE_PROFILE), {})
    p = loaded.profile
    assert p.server.shutdown_timeout == 30
    assert p.limits.max_body_size == 10 * 1024 * 1024
    assert p.security.egress.connect_ports == ["443"]
    opts = schema.to_options(p)
    assert opts["listen_port"] == 8080
    assert opts["limits_max_body_size"] == str(10 * 1024 * 1024)
    assert opts["server_shutdown_timeout"] == "30s"
    assert opts["stream_large_bodies"] == "1m"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_shipped_profiles_validate(name: str) -> None:
    schema.load(ROOT / "profiles" / name, {})


def test_default_profile_file_matches_builtin_defaults() -> None:
    shipped = schema.load(ROOT / "profiles" / "default.yaml", {}).profile
    assert shipped == schema.Profile()


def test_every_error_reported_at_once_with_lines(tmp_path: Path) -> None:
    text = """\
server: {host: 127.0.0.1, port: 70000}
logging: {level: loud}
limits:
  max_body_size: 10 potatoes
  max_header_sise: 100
security:
  trusted_proxies: [10.0.0.0/8, nonsense]
  egress: {connect_ports: [443, 99999, "9000-8000"]}
"""
    with pytest.raises(schema.ProfileError) as e:
        schema.load(write(tmp_path, text), {})
    problems = e.value.problems
    src = str(tmp_path / "p.yaml")
    assert any(p.startswith(f"{src}:1: server.port") for p in problems)
    assert any(p.startswith(f"{src}:2: logging.level") and "'loud'" in p for p in problems)
    assert any(p.startswith(f"{src}:4: limits.max_body_size") for p in problems)
    assert any(
        p.startswith(f"{src}:5: limits.max_header_sise: unknown key") and "max_header_size" in p
        for p in problems
    )
    assert any(p.startswith(f"{src}:7: security.trusted_proxies.1") for p in problems)
    assert any(p.startswith(f"{src}:8: security.egress.connect_ports.1") for p in problems)
    assert any(p.startswith(f"{src}:8: security.egress.connect_ports.2") for p in problems)
    assert len(problems) == 7
    assert str(e.value).startswith(f"{src}: 7 problems:")


def test_duplicate_keys_and_unknown_sections(tmp_path: Path) -> None:
    with pytest.raises(schema.ProfileError) as e:
        schema.load(write(tmp_path, "server: {port: 1}\nbogus: {}\nserver: {port: 2}\n"), {})
    assert any(":3: server: duplicate key" in p for p in e.value.problems)
    assert any(":2: bogus: unknown key (allowed: server," in p for p in e.value.problems)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("server: [unclosed\n", "not valid YAML"),
        ("- a list\n", "a profile is a mapping"),
        ("logging: {output: file}\n", "needs logging.file"),
        ("metrics: {path: metrics}\n", "metrics.path: must start with /"),
    ],
)
def test_shape_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(schema.ProfileError, match=fragment):
        schema.load(write(tmp_path, text), {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(schema.ProfileError, match="cannot read the profile"):
        schema.load(tmp_path / "nope.yaml", {})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert schema.load(write(tmp_path, ""), {}).profile == schema.Profile()


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "PROXY_PORT": "3128",
        "LOG_LEVEL": "debug",
        "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.0.0/16",
        "MAX_BODY_SIZE": "1MB",
        "ADMIN_TOKEN": "s3cret",
        "METRICS_PORT": "9191",
    }
    loaded = schema.load(write(tmp_path, ISSUE_PROFILE), env)
    p = loaded.profile
    assert (p.server.port, p.logging.level, p.metrics.port) == (3128, "debug", 9191)
    assert p.security.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]
    assert p.limits.max_body_size == 1 << 20
    assert p.admin.token == "s3cret"
    assert loaded.where(("server", "port")) == "environment variable PROXY_PORT"
    assert loaded.where(("server", "host")).endswith("p.yaml:1")


def test_environment_table_is_derived_from_the_schema() -> None:
    assert schema.ENV_OVERRIDES == {
        "PROXY_HOST": ("server", "host"),
        "PROXY_PORT": ("server", "port"),
        "SHUTDOWN_TIMEOUT": ("server", "shutdown_timeout"),
        "WAYPOST_EVENT_LOOP": ("server", "event_loop"),
        "CONNECT_TIMEOUT": ("server", "timeouts", "connect"),
        "READ_TIMEOUT": ("server", "timeouts", "read"),
        "BACKEND_TIMEOUT": ("server", "timeouts", "read"),
        "PROXY_TLS_ENABLED": ("server", "tls", "enabled"),
        "LOG_LEVEL": ("logging", "level"),
        "LOG_FORMAT": ("logging", "format"),
        "LOG_OUTPUT": ("logging", "output"),
        "LOG_FILE": ("logging", "file"),
        "METRICS_ENABLED": ("metrics", "enabled"),
        "METRICS_HOST": ("metrics", "host"),
        "METRICS_PORT": ("metrics", "port"),
        "MAX_BODY_SIZE": ("limits", "max_body_size"),
        "TRUSTED_PROXIES": ("security", "trusted_proxies"),
        "RATE_LIMIT_ENABLED": ("security", "rate_limiting", "enabled"),
        "RATE_LIMIT_RPS": ("security", "rate_limiting", "requests_per_second"),
        "ADMIN_TOKEN": ("admin", "token"),
        "CLI_ENABLED": ("cli", "enabled"),
        "CLI_TOKEN": ("cli", "token"),
        "CLI_MAX_CONCURRENT": ("cli", "max_concurrent"),
        "CLI_TIMEOUT": ("cli", "process_timeout"),
        "CACHE_ENABLED": ("cache", "enabled"),
        "CACHE_MAX_MEMORY": ("cache", "max_memory"),
        "CACHE_DEFAULT_TTL": ("cache", "default_ttl"),
        "DEFAULT_BACKEND": ("routing", "default_backend"),
    }


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(schema.ProfileError) as e:
        schema.load(write(tmp_path, ISSUE_PROFILE), {"PROXY_PORT": "http"})
    assert e.value.problems[0].startswith("environment variable PROXY_PORT: server.port:")


def test_every_option_maps_from_an_existing_key() -> None:
    opts = schema.to_options(schema.Profile())
    assert set(schema.OPTIONS) <= set(opts)
    for path, _ in schema.OPTIONS.values():
        obj: object = schema.Profile()
        for key in path:
            obj = getattr(obj, key)


def test_mitmproxy_section_overrides_core_defaults(tmp_path: Path) -> None:
    loaded = schema.load(
        write(tmp_path, "mitmproxy: {stream_large_bodies: 5m, block_global: false}\n"), {}
    )
    opts = schema.to_options(loaded.profile)
    assert opts["stream_large_bodies"] == "5m"
    assert opts["block_global"] is False


def test_validate_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate.main([str(ROOT / "profiles" / "prod.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    assert validate.main([str(write(tmp_path, "mitmproxy: {no_such_option: 1}\n"))]) == 1
    assert "mitmproxy.no_such_option: not a mitmproxy option" in capsys.readouterr().err
