"""scripts/options lists every option of the bundle with its help, mitmproxy's and Waypost's,
which `mitmdump -s addons/bundle.py --options` cannot (it answers before scripts load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_option_is_listed_with_its_help_and_default() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADMIN_TOKEN": "s3cret"}
    out = subprocess.run(
        [sys.executable, "scripts/options.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    listed = yaml.safe_load(out)
    for name in ("waypost_profile", "admin_token", "cli_token", "filter_blocked", "mode"):
        assert name in listed
    assert listed["admin_token"] == ""  # defaults only: never a configured secret
    assert "s3cret" not in out
    assert "# Path of the YAML profile to run with." in out
