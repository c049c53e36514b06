"""The production backend, per phase: its transport, and what it can reach."""

import pytest
from molecule_support import BACKEND_UNIT, CONFIG_DIR, GPU_PORT, VENV
from molecule_support.tls import BACKEND_CA, BACKEND_CERT, BACKEND_KEY, https

testinfra_hosts = ["prod_backends"]


@pytest.fixture
def channel(phase):
    assert phase in ("rollback", "restored"), f"phase {phase!r}: run the whole scenario (molecule test -s rollback)"
    return "nfs" if phase == "rollback" else "http"


def test_backend_transport(host, channel):
    assert host.service(BACKEND_UNIT).is_running
    lines = host.file(f"{CONFIG_DIR}/backend.env").content_string.splitlines()
    transport = [line.split("=", 1)[1].strip().strip('"') for line in lines if line.startswith("GPU_BRIDGE_TRANSPORT=")]
    assert (transport or ["http"])[-1] == channel, lines


def test_gpu_http_only_on_http_channel(host, channel, gpus):
    for name in gpus:
        r = https(host, "GET", name, GPU_PORT, "/api/health", ca=BACKEND_CA, cert=BACKEND_CERT, key=BACKEND_KEY,
                  timeout=5)
        assert (r["status"] == 200) == (channel == "http"), (name, r)


def test_worker_heartbeats(host, channel, gpus):
    """The production side sees each worker's heartbeat advance, only while the worker runs."""
    for name in gpus:
        r = host.run("%s/bin/gpu-bridge nfs-heartbeat --host-id %s --timeout 6", VENV, name)
        assert (r.rc == 0) == (channel == "nfs"), (name, r.rc, r.stdout, r.stderr)
