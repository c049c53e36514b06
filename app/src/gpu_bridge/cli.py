"""The ``gpu-bridge`` command.

Sub-commands are declared here; their handlers live next to the code they drive and are imported
lazily so ``gpu-bridge --help`` stays fast and a production host never imports server-only code.
Every handler returns an exit status; errors print one line, ``gpu-bridge: error: <what to fix>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import GpuBridgeError

# sub-command -> "module:function"
HANDLERS = {
    "serve-gpu": "gpu_bridge.gpu_server.cli:cmd_serve_gpu",
    "serve-backend": "gpu_bridge.backend.cli:cmd_serve_backend",
    "nfs-worker": "gpu_bridge.nfs_worker:cmd_nfs_worker",
    "nfs-init": "gpu_bridge.spool:cmd_nfs_init",
    "nfs-heartbeat": "gpu_bridge.spool:cmd_nfs_heartbeat",
    "models": "gpu_bridge.cli_ops:cmd_models",
    "jobs": "gpu_bridge.cli_ops:cmd_jobs",
    "health": "gpu_bridge.cli_ops:cmd_health",
}


REFUSED_TOKEN_OPTION = ("--token is refused: a token on the command line is visible to every user in `ps`; use "  # noqa: S105 - a message
                         "--token-file PATH, or GPU_BRIDGE_BACKEND_TOKEN(_FILE) / GPU_BRIDGE_API_TOKEN(_FILE)")


class _RefuseToken(argparse.Action):
    """``--token VALUE``: exit 2 with one line, before anything else runs (the value is never printed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"gpu-bridge: error: {REFUSED_TOKEN_OPTION}", file=sys.stderr)
        sys.exit(2)


def _refuse_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="backend or GPU server URL (default: $GPU_BRIDGE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--token-file", metavar="PATH",
                   help="file holding the bearer token (default: $GPU_BRIDGE_BACKEND_TOKEN(_FILE) for a backend, "
                        "$GPU_BRIDGE_API_TOKEN(_FILE) for a GPU server, else systemd's credentials directory); "
                        "tokens never go on the command line")
    _refuse_token(p)
    # SUPPRESS: when absent here, the value set before the command (``gpu-bridge --json models list``) stays.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=30.0, help="read timeout in seconds (default 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-bridge", description="Manage Ollama models on GPU hosts.")
    parser.add_argument("--version", action="version", version=f"gpu-bridge {__version__}")
    parser.add_argument("--json", action="store_true",
                        help="print JSON for scripts (models, jobs, health; also accepted after the command)")
    _refuse_token(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve-gpu", help="run the GPU HTTP server under gunicorn")
    p.add_argument("--bind", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--threads", type=int, default=8)

    p = sub.add_parser("serve-backend", help="run the production backend under gunicorn")
    p.add_argument("--bind", default=None, help="HOST:PORT (default $GPU_BRIDGE_BACKEND_BIND or 127.0.0.1:8000)")
    p.add_argument("--threads", type=int, default=8)

    sub.add_parser("nfs-worker", help="serve commands from the NFS spool (GPU side)")

    p = sub.add_parser("nfs-init", help="prepare the NFS share (directories, permissions, sentinel)")
    p.add_argument("--owner", help="UID:GID to own the spool directories")

    p = sub.add_parser("nfs-heartbeat", help="exit 0 when a worker's heartbeat advances")
    p.add_argument("--host-id", help="worker id (default $GPU_BRIDGE_NFS_HOST_ID or this host name)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")

    p = sub.add_parser("models", help="list, pull or delete models")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = msub.add_parser("list", help="list installed models")
    _client_options(m)
    m = msub.add_parser("pull", help="pull a model (live progress)")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    m.add_argument("--no-wait", action="store_true", help="start the pull and return")
    _client_options(m)
    m = msub.add_parser("delete", help="delete a model")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    _client_options(m)

    p = sub.add_parser("jobs", help="list pull jobs, or show one")
    p.add_argument("id", nargs="?")
    p.add_argument("--cancel", action="store_true", help="cancel the job ID")
    _client_options(p)

    p = sub.add_parser("health", help="show health of the backend and GPU hosts, or of one GPU host")
    _client_options(p)
    return parser


def _load(spec: str):
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_load(HANDLERS[args.command])(args) or 0)
    except GpuBridgeError as exc:
        print(f"gpu-bridge: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpu-bridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
