"""GPU hosts, per phase: "rollback" (after rollback_nfs.yml: NFS worker only) or "restored"
(after restore_http.yml: HTTP server only)."""

import pytest
from molecule_support import GPU_PORT, HTTP_UNIT, SHARE_ROOT, WORKER_UNIT, exposure, ipv4, listeners, setting
from molecule_support.tls import GPU_UPSTREAM

testinfra_hosts = ["gpu_servers"]


@pytest.fixture
def channel(phase):
    assert phase in ("rollback", "restored"), f"phase {phase!r}: run the whole scenario (molecule test -s rollback)"
    return "nfs" if phase == "rollback" else "http"


def test_units(host, channel):
    on, off = (WORKER_UNIT, HTTP_UNIT) if channel == "nfs" else (HTTP_UNIT, WORKER_UNIT)
    assert host.service(on).is_running, on
    assert host.service(on).is_enabled, on
    assert not host.service(off).is_running, off
    assert not host.service(off).is_enabled, off
    assert host.service(on).is_valid
    assert exposure(host, on) <= 2.0
    assert host.service("ollama.service").is_running


def test_listeners(host, channel):
    """On the NFS channel the GPU API port is closed (nginx stopped too); the worker listens on nothing."""
    want = {"tcp://127.0.0.1:11434"}
    if channel == "http":
        want |= {f"tcp://{ipv4(host)}:{GPU_PORT}", f"tcp://{GPU_UPSTREAM}"}
    assert listeners(host) == want
    assert host.service("nginx.service").is_running == (channel == "http")


def test_spool_layout(host):
    """nfs-init made the spool; it belongs to the service account (same uid on every host)."""
    uid = int(setting(host, "gpu_bridge_common_uid"))
    assert host.file(f"{SHARE_ROOT}/.gpu-bridge-share").exists
    for d in ("gpu_commands", "gpu_status"):
        f = host.file(f"{SHARE_ROOT}/{d}")
        assert f.is_directory, d
        assert f.uid == uid, d
