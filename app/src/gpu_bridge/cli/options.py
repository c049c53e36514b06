"""What every ``gpu-bridge`` parser shares: the refused ``--token``, the client options, the handler type.

Kept apart from ``target.py`` so building the parser imports nothing heavy (``requests`` costs ~0.1 s):
``gpu-bridge --help`` stays fast, and a server sub-command never loads the client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    # argparse names its sub-parser container privately; typeshed types it, so annotations may use it.
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

# A sub-command's handler: the parsed arguments in, the exit status out. Each command module sets it on
# its parser (``set_defaults(handler=...)``); ``main`` calls it.
Handler = Callable[[argparse.Namespace], int]

REFUSED_TOKEN_OPTION = ("--token is refused: a token on the command line is visible to every user in `ps`; use "  # noqa: S105 - a message
                        "--token-file PATH, or GPU_BRIDGE_BACKEND_TOKEN(_FILE) / GPU_BRIDGE_API_TOKEN(_FILE)")


class _RefuseToken(argparse.Action):
    """``--token VALUE``: exit 2 with one line, before anything else runs (the value is never printed)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> NoReturn:
        print(f"gpu-bridge: error: {REFUSED_TOKEN_OPTION}", file=sys.stderr)
        sys.exit(2)


def refuse_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)


def client_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to a backend or a GPU server (models, jobs, health)."""
    p.add_argument("--url", help="backend or GPU server URL (default: $GPU_BRIDGE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--token-file", metavar="PATH",
                   help="file holding the bearer token (default: $GPU_BRIDGE_BACKEND_TOKEN(_FILE) for a backend, "
                        "$GPU_BRIDGE_API_TOKEN(_FILE) for a GPU server, else systemd's credentials directory); "
                        "tokens never go on the command line")
    refuse_token(p)
    # SUPPRESS: when absent here, the value set before the command (``gpu-bridge --json models list``) stays.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=30.0, help="read timeout in seconds (default 30)")
