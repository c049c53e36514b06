"""The ``gpu-bridge`` entry point: assembles the parser from the command modules and runs the handler.

Each command module adds its own sub-parser (``register(subparsers)``) and sets its handler; adding a
command is one module and one line in ``COMMANDS``. Every handler returns an exit status; a project
error prints one line, ``gpu-bridge: error: <what to fix>``, and exits 1 (never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import GpuBridgeError
from . import health, jobs, models, servers
from .options import refuse_token

if TYPE_CHECKING:
    from .options import Handler, SubParsers

# In the order ``gpu-bridge --help`` lists them.
COMMANDS: tuple[Callable[[SubParsers], None], ...] = (
    servers.register,
    models.register,
    jobs.register,
    health.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-bridge", description="Manage Ollama models on GPU hosts.")
    parser.add_argument("--version", action="version", version=f"gpu-bridge {__version__}")
    parser.add_argument("--json", action="store_true",
                        help="print JSON for scripts (models, jobs, health; also accepted after the command)")
    refuse_token(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except GpuBridgeError as exc:
        print(f"gpu-bridge: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpu-bridge: interrupted", file=sys.stderr)
        return 130
