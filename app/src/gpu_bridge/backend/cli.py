"""``gpu-bridge serve-backend``: the backend under gunicorn (one gthread worker)."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import BackendSettings
from .app import check_settings
from .db import Database


def cmd_serve_backend(args: argparse.Namespace) -> int:
    settings = BackendSettings.from_env()
    if getattr(args, "bind", None):
        settings = dataclasses.replace(settings, bind=args.bind)
    # Fail here, with one readable line, rather than inside a gunicorn worker that will not boot.
    check_settings(settings)
    db = Database(settings.database_url, settings.retention)
    db.migrate()
    db.dispose()  # the worker opens its own connections after the fork

    from ..serve import run_gunicorn
    from .app import create_app

    run_gunicorn(lambda: create_app(settings), settings.bind, threads=getattr(args, "threads", 8) or 8)
    return 0
