"""Puts tests/ on sys.path (for tests/molecule_support) and loads the shared fixtures."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from molecule_support.fixtures import ansible_runner, gpus, phase, prod  # noqa: E402, F401
