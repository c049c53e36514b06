"""The ``gpu-bridge`` command, one module per sub-command (``main.py`` assembles them).

``main`` is the console script's entry point (``gpu_bridge.cli:main`` in app/pyproject.toml); note that
it hides the module of the same name (reach that one as ``sys.modules["gpu_bridge.cli.main"]``).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
