from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from mitmproxy.version import VERSION

from addons.kernel.version import versions

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_versions() -> None:
    assert versions() == {
        "waypost": importlib.metadata.version("waypost"),
        "mitmproxy": VERSION,
        "python": platform.python_version(),
    }


def test_python_m_addons_version() -> None:
    done = run("-m", "addons", "--version")
    assert done.returncode == 0, done.stderr
    v = versions()
    assert done.stdout == f"waypost {v['waypost']} mitmproxy {VERSION} python {v['python']}\n"


def test_python_m_addons_without_version_is_a_usage_error() -> None:
    done = run("-m", "addons")
    assert done.returncode == 2 and "--version" in done.stderr and not done.stdout


def test_python_m_addons_schema_still_runs(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("nonsense_key: 1\n")
    done = run("-m", "addons.schema", str(profile))
    assert done.returncode != 0 and done.stdout + done.stderr
