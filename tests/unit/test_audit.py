"""scripts/audit.py: pip-audit's answers read right, and "nothing audited" is never "clean"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import audit  # noqa: E402

# pip-audit 2.x `--format json` output, as it prints it.
VULNERABLE = {
    "dependencies": [
        {"name": "h11", "version": "0.14.0", "vulns": [
            {"id": "GHSA-vqfr-h8mv-ghfj", "fix_versions": ["0.16.0"],
             "aliases": ["CVE-2025-43859"], "description": "..."}]},
        {"name": "pyyaml", "version": "6.0.2", "vulns": []},
    ],
    "fixes": [],
}  # fmt: skip
UNREACHABLE = {
    "dependencies": [
        {"name": "requests", "skip_reason": "Dependency not found on PyPI and could not be "
         "audited: requests (2.19.0)"},
    ],
    "fixes": [],
}  # fmt: skip


def test_a_vulnerable_pin_is_listed_with_its_fix_and_fails() -> None:
    report = audit.interpret(".venv", VULNERABLE)
    assert report.audited == 2
    assert report.vulnerable == [("h11", "0.14.0", "GHSA-vqfr-h8mv-ghfj, CVE-2025-43859", "0.16.0")]
    assert "VULNERABLE h11 0.14.0: GHSA-vqfr-h8mv-ghfj, CVE-2025-43859 (fixed in: 0.16.0)" in (
        audit.render(report)
    )
    assert audit.exit_code([report]) == 1


def test_a_clean_audit_passes() -> None:
    clean = {"dependencies": [{"name": "pyyaml", "version": "6.0.2", "vulns": []}]}
    report = audit.interpret(".venv", clean)
    assert audit.exit_code([report]) == 0
    assert "no known vulnerabilities" in audit.render(report)


def test_nothing_audited_is_not_clean() -> None:
    report = audit.interpret(".venv", UNREACHABLE)
    assert report.audited == 0 and audit.exit_code([report]) == 2
    assert "nothing audited: Dependency not found on PyPI" in audit.render(report)
    # One line audited elsewhere is enough to report on, and a vulnerability always wins.
    clean = audit.interpret(
        ".venv-py3.12", {"dependencies": [{"name": "a", "version": "1", "vulns": []}]}
    )
    assert audit.exit_code([report, clean]) == 0
    assert audit.exit_code([report, audit.interpret(".venv", VULNERABLE)]) == 1


def test_the_installed_set_is_pinned_without_waypost() -> None:
    pins = audit.installed(Path(sys.prefix)).splitlines()  # the virtualenv running the tests
    assert any(p.startswith("mitmproxy==") for p in pins)
    assert not any(p.lower().startswith("waypost") for p in pins)


def test_the_real_pip_audit_takes_our_command_line() -> None:
    # One pin, so one question to the vulnerability service: whatever the network allows, the
    # answer is audited or skipped, never a pip-audit usage error.
    report = audit.audit(".venv", "pyyaml==6.0.2\n", [])
    assert report.audited + len(report.skipped) == 1
