"""`python -m addons --version`: Waypost's, mitmproxy's and Python's versions.

The subcommand packages keep their own entry points (`python -m addons.schema PROFILE.yaml`).
"""

from __future__ import annotations

import sys

from addons.kernel.version import versions

USAGE = "usage: python -m addons --version\n"


def main(argv: list[str]) -> int:
    if argv != ["--version"]:
        sys.stderr.write(USAGE)
        return 2
    sys.stdout.write(" ".join(f"{name} {v}" for name, v in versions().items()) + "\n")
    return 0


sys.exit(main(sys.argv[1:]))
