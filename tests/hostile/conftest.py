"""Fixtures shared by the hostile-input tests (a module may define its own of the same name)."""

from __future__ import annotations

import pytest
from hostile_helpers import gpu_config

from gpu_bridge.gpu_server import create_app as create_gpu_server
from support.procs import free_port


@pytest.fixture(scope="module")
def gpu_app():
    """A GPU server app whose Ollama is a closed port: what a hostile client reaches without Ollama."""
    app = create_gpu_server(gpu_config(f"http://127.0.0.1:{free_port()}"))
    app.testing = True
    yield app
    app.extensions["gpu_bridge"].close()
