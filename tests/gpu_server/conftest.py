"""Fixtures for the GPU server tests: apps on Flask's test client, talking to an emulator process."""

from __future__ import annotations

import pytest

from gpu_bridge.gpu_server import create_app
from gpu_server_helpers import TOKEN
from support.procs import emulator_control


@pytest.fixture
def ollama(module_emulator):
    """The module's emulator, reset to its startup state (knobs, installed models, counters)."""
    emulator_control(module_emulator, "reset")
    return module_emulator


@pytest.fixture
def make_app():
    """``make_app(ollama_url, **env)``: a GPU server app; its jobs are shut down after the test."""
    apps = []

    def factory(ollama_url: str, **env):
        config = {"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": ollama_url,
                  **{key: str(value) for key, value in env.items()}}
        app = create_app(config)
        app.testing = True
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["gpu_bridge"].close()


@pytest.fixture
def client(make_app, ollama):
    """A test client on a default app (rate limit off) in front of a freshly reset emulator."""
    return make_app(ollama.url, GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=0).test_client()
