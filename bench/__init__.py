"""gpu-bridge benchmarks: ``scripts/bench`` (or ``python -m bench``) from the repository root.

Everything runs on this machine and talks only to 127.0.0.1: the Ollama emulator, the GPU server and
the backend under gunicorn as deployed (one gthread worker), ``gpu-bridge nfs-worker`` on a temporary
share, and a seed-style file-polling imitation; the fleet section (bench/fleet.py) adds stand-in GPU hosts
that answer from a canned body (bench/canned.py) and fault proxies. Every loop is bounded in count and time.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The benchmark reuses the test helpers: support.procs (processes) and faults/faultproxy.py (the tap).
for _path in (REPO / "tests", REPO / "tests" / "faults"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
