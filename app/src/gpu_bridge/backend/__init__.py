"""The production backend: ``/config/*`` over ``GpuFleet``, a SQLAlchemy database (cache, pulls, audit).

``create_app(config=None)`` is the application factory gunicorn loads
(``gpu_bridge.backend:create_app()``); ``gpu-bridge serve-backend`` runs it.
"""

from .app import create_app

__all__ = ["create_app"]
