"""GPU hosts on the HTTP channel: ollama (the emulator), gpu-http-server; the NFS worker is off."""

import pytest
from molecule_support import (
    CONFIG_DIR,
    CREDENTIALS_DIR,
    GPU_PORT,
    HTTP_UNIT,
    WORKER_UNIT,
    exposure,
    http,
    ipv4,
    listeners,
    main_pid,
    setting,
)
from molecule_support.tls import GPU_CERT, GPU_CLIENT_CA, GPU_KEY, GPU_UPSTREAM, https

testinfra_hosts = ["gpu_servers"]
MAX_EXPOSURE = 2.0


def test_ollama_runs(host):
    assert host.service("ollama.service").is_running


def test_http_server_active_and_enabled(host):
    svc = host.service(HTTP_UNIT)
    assert svc.is_running
    assert svc.is_enabled


def test_http_unit_valid(host):
    assert host.service(HTTP_UNIT).is_valid


def test_http_unit_exposure(host):
    assert exposure(host, HTTP_UNIT) <= MAX_EXPOSURE


def test_http_server_runs_as_service_account(host):
    pid = main_pid(host, HTTP_UNIT)
    assert pid > 0
    user = host.check_output("ps -o user= -p %s", str(pid))
    assert user == setting(host, "gpu_bridge_common_user")


def test_nfs_worker_off_on_http_channel(host):
    svc = host.service(WORKER_UNIT)
    assert not svc.is_running
    assert not svc.is_enabled


def test_worker_unit_valid_and_hardened(host):
    # Installed even while off, so a rollback only starts it.
    assert host.service(WORKER_UNIT).is_valid
    assert exposure(host, WORKER_UNIT) <= MAX_EXPOSURE


def test_env_file(host):
    group = setting(host, "gpu_bridge_common_group")
    env = host.file(f"{CONFIG_DIR}/gpu-server.env")
    assert (env.user, env.group, env.mode) == ("root", group, 0o640)
    assert "GPU_BRIDGE_API_TOKEN=" not in env.content_string, "the token belongs in the credential file"


def test_api_token_credential(host):
    token = host.file(f"{CREDENTIALS_DIR}/api-token")
    assert (token.user, token.group, token.mode) == ("root", "root", 0o600)
    assert token.size > 0


def test_listening_sockets(host):
    """nginx on the private address only (never 0.0.0.0; Debian's default site on port 80 is gone),
    gunicorn and Ollama on loopback, nothing else."""
    assert listeners(host) == {f"tcp://{ipv4(host)}:{GPU_PORT}", f"tcp://{GPU_UPSTREAM}", "tcp://127.0.0.1:11434"}


def test_proxy_active_and_enabled(host):
    svc = host.service("nginx.service")
    assert svc.is_running
    assert svc.is_enabled
    assert host.run("nginx -t -q").rc == 0


def test_tls_files(host):
    for path, mode in ((GPU_CERT, 0o644), (GPU_KEY, 0o600), (GPU_CLIENT_CA, 0o644)):
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "root", mode), path
    # The certificate names the host as the backends address it (the inventory name).
    out = host.check_output("openssl x509 -in %s -noout -ext subjectAltName,extendedKeyUsage", GPU_CERT)
    assert f"DNS:{host.backend.get_hostname()}" in out and "TLS Web Server Authentication" in out, out


def test_health_answers_without_token(host):
    r = http(host, "GET", f"http://{GPU_UPSTREAM}/api/health")
    assert r["status"] == 200, r
    assert r["body"]["ollama"]["reachable"] is True, r


@pytest.mark.parametrize("path", ["/api/models", "/api/jobs"])
def test_api_needs_token(host, path):
    r = http(host, "GET", f"http://{GPU_UPSTREAM}{path}")
    assert r["status"] == 401, r
    assert r["body"]["code"] == "unauthorized", r


def test_api_with_token(host):
    r = http(host, "GET", f"http://{GPU_UPSTREAM}/api/models", token_file=f"{CREDENTIALS_DIR}/api-token")
    assert r["status"] == 200, r
    assert any(m["name"] == "llama3.2:latest" for m in r["body"]["models"]), r


def test_proxy_refuses_a_request_without_client_certificate(host):
    """TLS verifies (in the lab one CA signs server and client certificates, so the host's client CA
    verifies its own certificate), then nginx refuses: no client certificate."""
    r = https(host, "GET", host.backend.get_hostname(), GPU_PORT, "/api/health", ca=GPU_CLIENT_CA)
    assert r["status"] == 403, r
    assert r["body"]["code"] == "client_certificate_required", r


def test_proxy_refuses_plain_http(host):
    r = http(host, "GET", f"http://{ipv4(host)}:{GPU_PORT}/api/health")
    assert r["status"] == 400, r
    assert r["body"]["code"] == "tls_required", r
