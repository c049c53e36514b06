"""The GPU server: the authenticated HTTP front door to Ollama on one GPU host (port 8001).

``create_app(config=None)`` builds the Flask app; gunicorn serves it with one worker process and
threads (``gpu-bridge serve-gpu`` or ``gunicorn 'gpu_bridge.gpu_server:create_app()'``).
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
