"""Fixtures for the NFS channel tests: a prepared share in a temp directory, worker processes."""

from __future__ import annotations

import pytest
from nfs_helpers import WorkerProcess

from gpu_bridge import spool


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    assert spool.init_share(str(root)) is True
    return root


@pytest.fixture
def workers():
    """Factory: ``workers(root, host_id, ollama_url, **env)`` starts a worker; all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(root, host_id, ollama_url, *, wait=True, **env):
        w = WorkerProcess(root, host_id, ollama_url, **env)
        started.append(w)
        return w.start(wait=wait)

    yield start
    for w in started:
        w.stop()
