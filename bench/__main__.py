"""``python -m bench [--quick] [--rounds N] [--out FILE]``."""

from __future__ import annotations

import sys

from bench.main import main

sys.exit(main())
