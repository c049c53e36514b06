"""Fixtures for tests/production: PostgreSQL (started by the session), database URLs per dialect,
GPU servers on 127.0.0.1 and 127.0.0.2, the transport matrix (http / nfs), the backend process."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
from prod_helpers import PostgresServer, find_pg_bin, gpu_bridge_cmd

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres():
    bindir = find_pg_bin()
    if bindir is None:
        pytest.skip("!!! PostgreSQL server binaries missing: /usr/lib/postgresql/*/bin/initdb not found. "
                    "Install them (apt-get install postgresql) — CI has them, so these tests do run there. !!!")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, empty database of each supported dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/backend.db"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"gb_test_{os.getpid()}_{next(_db_counter)}")


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``gpu-bridge ARGS`` as a subprocess (stdout is a pipe: not a TTY)."""
    return subprocess.run(gpu_bridge_cmd(*args), capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).parent)


# --- the integration matrix ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["http", "nfs"])
def transport(request):
    """The channel between backend and GPU hosts; the same backend tests run once per transport."""
    return request.param


@pytest.fixture(scope="module")
def gpus(transport, tmp_path_factory):
    """Two GPU hosts (127.0.0.1, 127.0.0.2), each with its own emulator, over ``transport``."""
    from prod_helpers import GpuSide

    side = GpuSide(transport, 2, tmp_path_factory.mktemp(f"gpus-{transport}"))
    yield side
    side.stop()


@pytest.fixture
def gpu_side(gpus):
    """The module's GPU hosts with their emulators reset to the startup state."""
    from support.procs import emulator_control

    for emu in gpus.emulators:
        emulator_control(emu, "reset")
    return gpus


@pytest.fixture(scope="module")
def backend(gpus):
    """A backend process (``gpu-bridge serve-backend``) in front of the module's GPU hosts."""
    from prod_helpers import start_backend

    proc = start_backend(gpus.backend_env())
    yield proc
    proc.stop()


@pytest.fixture
def backends():
    """Factory for extra backend processes (own settings); all stopped at teardown."""
    from prod_helpers import start_backend

    started = []

    def start(env: dict, **kw):
        proc = start_backend(env, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
