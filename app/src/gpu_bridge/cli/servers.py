"""The sub-commands that run on the hosts: ``serve-gpu``, ``serve-backend``, ``nfs-worker``, ``nfs-init``,
``nfs-heartbeat``.

Their handlers live next to the code they drive and are named here as ``"module:function"``, imported
only when the command runs: ``gpu-bridge --help`` stays fast, and a production host running a client
command never imports the GPU server, the worker or Flask.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import Handler, SubParsers


class LazyHandler:
    """A handler named by ``"module:function"``, imported when called."""

    def __init__(self, spec: str):
        self.spec = spec

    def load(self) -> Handler:
        module, _, name = self.spec.partition(":")
        handler: Handler = getattr(importlib.import_module(module), name)
        return handler

    def __call__(self, args: argparse.Namespace) -> int:
        return self.load()(args)


def register(sub: SubParsers) -> None:
    p = sub.add_parser("serve-gpu", help="run the GPU HTTP server under gunicorn")
    p.add_argument("--bind", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(handler=LazyHandler("gpu_bridge.gpu_server.cli:cmd_serve_gpu"))

    p = sub.add_parser("serve-backend", help="run the production backend under gunicorn")
    p.add_argument("--bind", default=None, help="HOST:PORT (default $GPU_BRIDGE_BACKEND_BIND or 127.0.0.1:8000)")
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(handler=LazyHandler("gpu_bridge.backend.cli:cmd_serve_backend"))

    p = sub.add_parser("nfs-worker", help="serve commands from the NFS spool (GPU side)")
    p.set_defaults(handler=LazyHandler("gpu_bridge.nfs_worker:cmd_nfs_worker"))

    p = sub.add_parser("nfs-init", help="prepare the NFS share (directories, permissions, sentinel)")
    p.add_argument("--owner", help="UID:GID to own the spool directories")
    p.set_defaults(handler=LazyHandler("gpu_bridge.spool:cmd_nfs_init"))

    p = sub.add_parser("nfs-heartbeat", help="exit 0 when a worker's heartbeat advances")
    p.add_argument("--host-id", help="worker id (default $GPU_BRIDGE_NFS_HOST_ID or this host name)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p.set_defaults(handler=LazyHandler("gpu_bridge.spool:cmd_nfs_heartbeat"))
