"""`python -m addons.schema PROFILE.yaml`: validate-config (see validate.py)."""

from __future__ import annotations

import sys

from addons.schema.validate import main

sys.exit(main(sys.argv[1:]))
