"""One worker of an instance: mitmdump in this process, started by the supervisor.

`python -m addons.supervisor.worker [mitmdump arguments]` runs what `mitmdump` would.
"""

from __future__ import annotations

import sys

from mitmproxy.tools.main import mitmdump

from addons.kernel import reuseport


def main(argv: list[str]) -> int:
    # Workers share the supervisor's stdout: one write per line keeps their lines whole.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    reuseport.install()
    return mitmdump(argv) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
