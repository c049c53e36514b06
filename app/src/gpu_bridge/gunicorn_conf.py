"""gunicorn's configuration for the systemd units: ``gunicorn -c python:gpu_bridge.gunicorn_conf APP``.

gunicorn reads this module's globals as its settings. They are ``gpu_bridge.serve.gunicorn_options``
of the process environment: the same settings ``gpu-bridge serve-gpu`` / ``serve-backend`` use, with
the deployed values (``GPU_BRIDGE_GUNICORN_*``) set by the unit (roles/*/templates/*.service.j2).
A malformed value stops the start with one line naming it, not a traceback.
"""

from __future__ import annotations

import os
import sys

from .errors import ConfigError
from .serve import gunicorn_options

try:
    globals().update(gunicorn_options(os.environ))
except ConfigError as _exc:
    sys.exit(f"gpu-bridge: gunicorn configuration: {_exc}")
