"""validate-config is `nginx -t`: the schema, then every addon's and mitmproxy's own option
checks, each problem at its line; nothing listens, nothing is written, nothing keeps running.
tests/e2e/test_validate_config.py starts a real mitmdump with the same BAD profiles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from addons.schema import validate

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
PRD_EXAMPLES = sorted((ROOT / "tests" / "fixtures" / "prd").glob("*.yaml"))
TOKEN = "0123456789abcdef0123456789abcdef"

# name -> (profile text, the line and key path of the (first) problem). The first group passes
# the schema and is refused by an addon's or mitmproxy's own configure.
BAD: dict[str, tuple[str, int, str]] = {
    "domain": (
        'security:\n  filtering:\n    domains:\n      blocked: ["exa$mple..com"]\n',
        4,
        "security.filtering.domains.blocked",
    ),
    "missing_list_file": (
        "security:\n  filtering:\n    domains:\n      files: [/nonexistent/list.txt]\n",
        4,
        "security.filtering.domains.files",
    ),
    "content_type_regex": (
        'security:\n  content_filtering:\n    mode: enforce\n    blocked_types: ["/(un/"]\n',
        4,
        "security.content_filtering.blocked_types",
    ),
    "content_type_pattern": (
        'compression:\n  content_types: ["(bad"]\n',
        2,
        "compression.content_types",
    ),
    "interception_host": (
        'security:\n  tls_interception:\n    hosts: ["exa$mple"]\n',
        3,
        "security.tls_interception.hosts",
    ),
    "stream_large_bodies": (
        "mitmproxy:\n  stream_large_bodies: lots\n",
        2,
        "mitmproxy.stream_large_bodies",
    ),
    "log_file_directory": (
        "logging:\n  output: file\n  file: /nonexistent/dir/waypost.log\n",
        3,
        "logging.file",
    ),
    "cli_working_directory": (
        f"cli:\n  enabled: true\n  token: {TOKEN}\n  working_directory: /nonexistent/wd\n",
        4,
        "cli.working_directory",
    ),
    "cli_user": (
        f"cli:\n  enabled: true\n  token: {TOKEN}\n  run_as_user: nosuchuser_zz\n",
        4,
        "cli.run_as_user",
    ),
    "core_mode": ('mitmproxy:\n  mode: ["bogus:x"]\n', 2, "mitmproxy.mode"),
    "core_block_list": ("mitmproxy:\n  block_list: [bogus]\n", 2, "mitmproxy.block_list"),
    "core_map_remote": ("mitmproxy:\n  map_remote: [bad]\n", 2, "mitmproxy.map_remote"),
    "core_type": ("mitmproxy:\n  ssl_insecure: maybe\n", 2, "mitmproxy.ssl_insecure"),
    "core_unknown": ("mitmproxy:\n  no_such_option: 1\n", 2, "mitmproxy.no_such_option"),
    # The schema's own checks, across the sections.
    "yaml_syntax": ("server: [1,\n", 2, "not valid YAML"),
    "duplicate_key": ("server:\n  port: 1\n  port: 2\n", 3, "server.port"),
    "unknown_key": ("limits:\n  bogus: 1\n", 2, "limits.bogus"),
    "server_port": ("server:\n  port: 70000\n", 2, "server.port"),
    "server_duration": ("server:\n  shutdown_timeout: forever\n", 2, "server.shutdown_timeout"),
    "tls_files": (
        "server:\n  tls: {cert: /nonexistent.pem, key: /nonexistent.key}\n",
        2,
        "server.tls.cert",
    ),
    "tls_min_version": ('server:\n  tls:\n    min_version: "0.9"\n', 3, "server.tls.min_version"),
    "log_level": ("logging:\n  level: loud\n", 2, "logging.level"),
    "metrics_path": ("metrics:\n  path: nope\n", 2, "metrics.path"),
    "body_size": ("limits:\n  max_body_size: lots\n", 2, "limits.max_body_size"),
    "blocked_method": ('limits:\n  blocked_methods: ["GE T"]\n', 2, "limits.blocked_methods.0"),
    "via_type": ("headers:\n  via: 5\n", 2, "headers.via"),
    "acl_network": (
        'security:\n  acl:\n    allowed_ips: ["10.0.0.300/8"]\n',
        3,
        "security.acl.allowed_ips.0",
    ),
    "egress_network": (
        "security:\n  egress:\n    allowed_networks: [not-a-cidr]\n",
        3,
        "security.egress.allowed_networks.0",
    ),
    "connect_port": (
        "security:\n  egress:\n    connect_ports: [99999]\n",
        3,
        "security.egress.connect_ports.0",
    ),
    "trusted_proxy": ("security:\n  trusted_proxies: [x]\n", 2, "security.trusted_proxies.0"),
    "rate_negative": (
        "security:\n  rate_limiting:\n    requests_per_second: -5\n",
        3,
        "security.rate_limiting.requests_per_second",
    ),
    "rate_mode": (
        "security:\n  rate_limiting:\n    mode: shadwo\n",
        3,
        "security.rate_limiting.mode",
    ),
    "hsts": ("security:\n  headers:\n    hsts: bogus\n", 3, "security.headers.hsts"),
    "filter_mode": ("security:\n  filtering:\n    mode: sometimes\n", 3, "security.filtering.mode"),
    "redis_url": (
        'state:\n  backend: redis\n  redis_url: "http://x"\n',
        3,
        "state.redis_url",
    ),
    "cli_regex": (
        'cli:\n  argument_rules:\n    ls: {patterns: ["(bad"]}\n',
        3,
        "cli.argument_rules.ls.patterns",
    ),
    "gzip_level": ("compression:\n  levels: {gzip: 42}\n", 2, "compression.levels.gzip"),
    "algorithm": ("compression:\n  algorithms: [lzma]\n", 2, "compression.algorithms.0"),
    "cache_mode": ("cache:\n  mode: bogus\n", 2, "cache.mode"),
    "surrogate_name": ('cache:\n  surrogate_name: "a b"\n', 2, "cache.surrogate_name"),
    "default_backend": ('routing:\n  default_backend: "ftp://x"\n', 2, "routing.default_backend"),
    "listener_port": (
        'routing:\n  listeners:\n    - {port: 99999, backend: "http://127.0.0.1:1"}\n',
        3,
        "routing.listeners.0.port",
    ),
    "health_interval": ("health_checks:\n  interval: soon\n", 2, "health_checks.interval"),
    "breaker_threshold": (
        "circuit_breaker:\n  failure_threshold: 0\n",
        2,
        "circuit_breaker.failure_threshold",
    ),
}


def expected(path: Path, line: int, key: str) -> str:
    return f"{path}:{line}: {key}"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = validate.main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_profile_is_refused_at_its_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, line, key = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    code, out, err = run([str(path)], capsys)
    assert code == 1, out
    assert expected(path, line, key) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("path", PROFILES + PRD_EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_profiles_and_the_requirements_examples_are_valid(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # profiles/forward.yaml logs to /var/log/waypost, which need not exist here.
    monkeypatch.setenv("WAYPOST_LOGGING__FILE", str(tmp_path / "waypost.log"))
    code, out, err = run([str(path)], capsys)
    assert code == 0, err
    assert f"{path}: valid" in out
    assert not (tmp_path / "waypost.log").exists()


def test_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert "usage: scripts/validate-config" in out and "Exit status" in out
    assert run([], capsys)[0] == 2
    assert run(["a.yaml", "b.yaml"], capsys)[0] == 2


def test_paths_resolve_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "ads.txt").write_text("ads.example\n")
    (tmp_path / "p.yaml").write_text(
        "security:\n  filtering:\n    domains:\n      files: [lists/ads.txt]\n"
    )
    monkeypatch.chdir(tmp_path)
    assert run(["p.yaml"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path / "lists")
    code, _, err = run(["../p.yaml"], capsys)
    assert code == 1
    assert "../p.yaml:4: security.filtering.domains.files: filter_files: cannot read" in err


def test_nothing_is_written_and_nothing_keeps_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # mitmproxy's default confdir is ~/.mitmproxy
    log = tmp_path / "logs" / "waypost.log"
    log.parent.mkdir()
    path = tmp_path / "p.yaml"
    path.write_text(
        f"logging: {{output: file, file: {log}}}\n"
        "health_checks: {enabled: true, interval: 1s}\n"
        "routing:\n  default_backend: http://127.0.0.1:1\n"
    )
    threads = threading.active_count()
    assert run([str(path)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs", "p.yaml"]
    log.write_text("")
    assert run([str(path)], capsys)[0] == 0
    assert log.read_text() == ""  # not even the "profile applied" line
    assert threading.active_count() == threads
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # asyncio.run closed its loop and every task on it


def test_the_module_runs_from_any_directory(tmp_path: Path) -> None:
    """What scripts/validate-config runs (after scripts/setup), from the caller's directory."""
    (tmp_path / "p.yaml").write_text("limits:\n  max_body_size: lots\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "addons.schema", "p.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[1:] == [
        "  p.yaml:2: limits.max_body_size: expected a size such as 10MB, 512KB or 1GB, got 'lots'"
    ]
