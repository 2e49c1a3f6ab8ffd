"""Print every option of the bundle with its default and help (`scripts/options`).

`mitmdump -s addons/bundle.py --options` lists mitmproxy's options only: mitmproxy prints them
and exits before its script loader has run the script. Here mitmdump's master is built with
its default addons and the bundle's, then mitmproxy's own dump (`optmanager.dump_defaults`)
prints them all. Defaults only: no value from a profile, the environment or `--set` is shown.
"""

from __future__ import annotations

import asyncio
import sys

from mitmproxy import options, optmanager
from mitmproxy.tools.dump import DumpMaster

from addons import bundle


async def main() -> None:
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    master.addons.add(*bundle.addons)
    optmanager.dump_defaults(opts, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
