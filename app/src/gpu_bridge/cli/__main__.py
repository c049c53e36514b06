"""``python -m gpu_bridge.cli``: the same command as the ``gpu-bridge`` console script."""

import sys

from .main import main

sys.exit(main())
