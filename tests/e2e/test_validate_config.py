"""validate-config and a real mitmdump agree, both ways: every profile validate-config refuses
(tests/unit/test_validate_config.py's BAD table) stops mitmdump before it listens, with the same
`file:line: key: message` lines and no traceback; every shipped profile and requirements
example that it calls valid starts.

The mitmdumps run PARALLEL at a time to keep the runtime down: about 100 s for the ~60
profiles on two busy cores (each mitmdump spends ~1.5 s of CPU starting).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from addons.schema import validate
from tests.conftest import Proxy, start_proxy
from tests.unit.test_validate_config import BAD, PRD_EXAMPLES, PROFILES

PARALLEL = 4
# The first test waits for the module's outcomes: every mitmdump.
pytestmark = pytest.mark.timeout(600)
# Any listener: the proxy's, the management app's, a reverse listener's.
LISTENING = re.compile(r"(?i)listening at")
# The same environment for validate-config and mitmdump: the management port and the
# requirements examples' health checks (of example.com backends) out of the way; for the valid
# profiles, profiles/forward.yaml's /var/log/waypost moved to a directory that exists.
ENV = {"METRICS_PORT": "0", "WAYPOST_HEALTH_CHECKS__ENABLED": "false"}


@dataclass
class Outcome:
    validate_code: int
    validate_lines: list[str]
    proxy_code: int | None
    proxy_lines: list[str]
    listened: bool


def _start(path: Path, workdir: Path, env: dict[str, str], valid: bool) -> tuple[Proxy, bool]:
    p = start_proxy(workdir, options={"waypost_profile": str(path)}, env=env, wait=False)
    try:
        if valid:
            p.wait_for(LISTENING, timeout=60)
        else:
            p.proc.wait(60)
    except (TimeoutError, subprocess.TimeoutExpired):
        pass  # reported by the test: it did not listen, or did not exit
    listened = any(LISTENING.search(line) for line in p.lines)
    p.stop()
    return p, listened


def _validate(path: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """validate-config's exit code and problem lines, in the environment mitmdump gets."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("WAYPOST_")})
    os.environ.update(env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = validate.main([str(path)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, [line.strip() for line in err.getvalue().splitlines()[1:]]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case through validate-config (in this process, first: it sets os.environ), then
    through mitmdump, PARALLEL at a time."""
    tmp = tmp_path_factory.mktemp("validate-config")
    cases: dict[str, tuple[Path, bool]] = {}
    for name, (text, _, _) in BAD.items():
        path = tmp / f"{name}.yaml"
        path.write_text(text)
        cases[name] = (path, False)
    for path in PROFILES + PRD_EXAMPLES:
        cases[path.name] = (path, True)
    envs = {
        name: {**ENV, "WAYPOST_LOGGING__FILE": str(tmp / "waypost.log")} if valid else ENV
        for name, (_, valid) in cases.items()
    }
    checked = {name: _validate(path, envs[name]) for name, (path, _) in cases.items()}
    with ThreadPoolExecutor(PARALLEL) as pool:
        started = {}
        for name, (path, valid) in cases.items():
            workdir = tmp / f"run-{name}"
            workdir.mkdir()
            started[name] = pool.submit(_start, path, workdir, envs[name], valid)
        results = {}
        for name, future in started.items():
            proxy, listened = future.result()
            code, lines = checked[name]
            results[name] = Outcome(code, lines, proxy.proc.returncode, proxy.lines, listened)
    return results


@pytest.mark.parametrize("name", list(BAD))
def test_a_refused_profile_stops_mitmdump_with_the_same_lines(
    outcomes: dict[str, Outcome], name: str
) -> None:
    o = outcomes[name]
    _, line, key = BAD[name]
    assert o.validate_code == 1
    assert any(f"{name}.yaml:{line}: {key}" in problem for problem in o.validate_lines)
    out = "\n".join(o.proxy_lines)
    assert o.proxy_code not in (0, None), out
    assert not o.listened, out
    assert "Traceback" not in out
    for problem in o.validate_lines:
        assert problem in o.proxy_lines, out


@pytest.mark.parametrize("path", PROFILES + PRD_EXAMPLES, ids=lambda p: p.name)
def test_a_valid_profile_starts(outcomes: dict[str, Outcome], path: Path) -> None:
    o = outcomes[path.name]
    assert o.validate_code == 0, o.validate_lines
    assert o.listened, "\n".join(o.proxy_lines)


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            "filter_blocked=exa$mple..com",
            "--set filter_blocked: filter_blocked/filter_allowed: 'exa$mple..com' is not a host "
            "pattern",
        ),
        ("ratelimit_mode=shadwo", "--set ratelimit_mode: 'shadwo' is not one of"),
        (
            "filter_blokced=evil.example",
            "--set filter_blokced: not an option of any loaded addon (did you mean filter_blocked?)",
        ),
    ],
)
def test_a_bad_set_value_stops_mitmdump_before_it_listens(
    tmp_path: Path, option: str, line: str
) -> None:
    p = start_proxy(tmp_path, extra_args=("--set", option), env=ENV, wait=False)
    try:
        assert p.proc.wait(60) != 0
    finally:
        p.stop()
    out = "\n".join(p.lines)
    assert line in out
    assert not LISTENING.search(out)
    assert "Traceback" not in out
