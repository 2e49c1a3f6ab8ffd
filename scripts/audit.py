"""`scripts/audit`: pip-audit over the exact dependency set of each installed mitmproxy line.

The set audited is what `scripts/setup` resolved and installed (`pip freeze` of the
virtualenv, Waypost itself left out), pinned, without dependency resolution: the versions that
run, not the ranges pyproject.toml allows. pip-audit asks PyPI's vulnerability service about
each pin; a pin it could not ask about is "skipped", and pip-audit then still says "No known
vulnerabilities found". Here a run where nothing could be audited exits 2 instead, so a
network failure never reads as a clean bill.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = (".venv", ".venv-py3.12")
# The pip-audit installed beside the interpreter that runs this (scripts/audit: .venv's).
PIP_AUDIT = Path(sys.executable).with_name("pip-audit")


@dataclass
class Report:
    venv: str
    audited: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    vulnerable: list[tuple[str, str, str, str]] = field(default_factory=list)
    # (name, version, vulnerability id and aliases, versions that fix it)


def interpret(venv: str, output: dict) -> Report:
    """pip-audit's JSON output as a report."""
    report = Report(venv)
    for dep in output.get("dependencies", []):
        if "skip_reason" in dep:
            report.skipped.append((dep["name"], dep["skip_reason"]))
            continue
        report.audited += 1
        for vuln in dep.get("vulns", []):
            ids = ", ".join([vuln["id"], *vuln.get("aliases", [])])
            fixes = ", ".join(vuln.get("fix_versions", [])) or "no fixed version yet"
            report.vulnerable.append((dep["name"], dep["version"], ids, fixes))
    return report


def exit_code(reports: list[Report]) -> int:
    if any(r.vulnerable for r in reports):
        return 1
    if not any(r.audited for r in reports):
        return 2
    return 0


def render(report: Report) -> str:
    lines = [f"== {report.venv}: {report.audited} packages audited, {len(report.skipped)} skipped"]
    for name, version, ids, fixes in report.vulnerable:
        lines.append(f"VULNERABLE {name} {version}: {ids} (fixed in: {fixes})")
    if not report.vulnerable and report.audited:
        lines.append("no known vulnerabilities")
    if report.skipped and not report.audited:
        lines.append(f"nothing audited: {report.skipped[0][1]}")
    elif report.skipped:
        lines += [f"skipped {name}: {why}" for name, why in report.skipped]
    return "\n".join(lines)


def installed(venv: Path) -> str:
    """The virtualenv's packages as pins (name==version lines), Waypost itself left out."""
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Waypost can still appear: as a comment ("# Editable Git install ... (waypost==0.1.0)"),
    # or as a plain pin when its egg-info is on the path (PYTHONPATH=the checkout).
    pins = [
        line
        for line in frozen.splitlines()
        if "==" in line and not line.startswith("#") and not line.lower().startswith("waypost")
    ]
    return "".join(line + "\n" for line in pins)


def audit(name: str, pins: str, extra: list[str]) -> Report:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        requirements.write(pins)
        requirements.flush()
        run = subprocess.run(
            [str(PIP_AUDIT), "-r", requirements.name, "--no-deps", "--disable-pip",
             "--format", "json", "--progress-spinner", "off", *extra],
            capture_output=True,
            text=True,
        )  # fmt: skip
    try:
        output = json.loads(run.stdout)
    except ValueError:
        raise SystemExit(f"pip-audit failed for {name}:\n{run.stderr.strip()}") from None
    return interpret(name, output)


def main(argv: list[str]) -> int:
    reports = [
        audit(v, installed(ROOT / v), argv) for v in VENVS if (ROOT / v / "bin" / "python").exists()
    ]
    for report in reports:
        print(render(report))
    code = exit_code(reports)
    if code == 2:
        print("audit: nothing could be audited (is PyPI's JSON API reachable?)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
