"""``gpu-bridge serve-gpu``: the GPU server under gunicorn, as the systemd unit runs it."""

from __future__ import annotations

import argparse
import re

from ..config import GpuServerSettings
from ..errors import ConfigError
from ..serve import run_gunicorn
from .app import check_settings, create_app

_BIND = re.compile(r"^(unix:.+|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):\d{1,5})$")


def cmd_serve_gpu(args: argparse.Namespace) -> int:
    """Read and check the settings first (a bad value is one clear line), then serve until SIGTERM."""
    if not _BIND.match(args.bind or ""):
        raise ConfigError(f"--bind {args.bind!r} must be HOST:PORT (e.g. 127.0.0.1:8001) or unix:PATH")
    settings = GpuServerSettings.from_env()
    check_settings(settings)
    run_gunicorn(lambda: create_app(settings), args.bind, threads=max(1, args.threads))
    return 0
