"""The production backend host: gpu-bridge-backend on loopback, its secrets, reachability."""

import json

from molecule_support import (
    BACKEND_UNIT,
    BACKEND_URL,
    CONFIG_DIR,
    CREDENTIALS_DIR,
    GPU_PORT,
    backend,
    exposure,
    http,
    listeners,
    main_pid,
    setting,
)
from molecule_support.tls import BACKEND_CA, BACKEND_CERT, BACKEND_KEY, https

testinfra_hosts = ["prod_backends"]


def test_backend_active_and_enabled(host):
    svc = host.service(BACKEND_UNIT)
    assert svc.is_running
    assert svc.is_enabled


def test_backend_unit_valid(host):
    assert host.service(BACKEND_UNIT).is_valid


def test_backend_unit_exposure(host):
    assert exposure(host, BACKEND_UNIT) <= 2.0


def test_backend_runs_as_service_account(host):
    pid = main_pid(host, BACKEND_UNIT)
    assert pid > 0
    assert host.check_output("ps -o user= -p %s", str(pid)) == setting(host, "gpu_bridge_common_user")


def test_env_file(host):
    group = setting(host, "gpu_bridge_common_group")
    env = host.file(f"{CONFIG_DIR}/backend.env")
    assert (env.user, env.group, env.mode) == ("root", group, 0o640)
    content = env.content_string
    assert "GPU_BRIDGE_API_TOKEN=" not in content and "GPU_BRIDGE_BACKEND_TOKEN=" not in content


def test_credentials(host):
    for name in ("api-token", "backend-token"):
        f = host.file(f"{CREDENTIALS_DIR}/{name}")
        assert (f.user, f.group, f.mode) == ("root", "root", 0o600), name
        assert f.size > 0, name


def test_state_dir(host):
    d = host.file("/var/lib/gpu-bridge")
    user = setting(host, "gpu_bridge_common_user")
    assert (d.user, d.mode) == (user, 0o750)


def test_listening_sockets(host):
    """The backend on loopback only; the production web app is its only client."""
    assert listeners(host) == {"tcp://127.0.0.1:8000"}


def test_backend_health(host):
    r = http(host, "GET", BACKEND_URL + "/health")
    assert r["status"] == 200, r


BACKEND_SOCKET_UNIT = "gpu-bridge-backend.socket"
# Requests every 50 ms while `systemctl restart` runs, until 2 s after it returned: counts by outcome.
_RESTART_PROBE = """
import json, subprocess, sys, time, urllib.error, urllib.request
seen = {}
restart = subprocess.Popen(["systemctl", "restart", sys.argv[1]])
until = None
while until is None or time.monotonic() < until:
    try:
        with urllib.request.urlopen(sys.argv[2] + "/health", timeout=30) as r:
            key = str(r.status)
    except urllib.error.HTTPError as e:
        key = str(e.code)
    except OSError as e:
        key = type(e).__name__
    seen[key] = seen.get(key, 0) + 1
    if until is None and restart.poll() is not None:
        until = time.monotonic() + 2
    time.sleep(0.05)
print(json.dumps({"restart_rc": restart.returncode, "seen": seen}))
"""


def test_a_restart_refuses_no_request(host):
    """The socket (gpu-bridge-backend.socket) stays open while the backend restarts: requests wait
    for the new process instead of being refused (a channel switch restarts the backend)."""
    pid = main_pid(host, BACKEND_UNIT)
    result = json.loads(host.check_output("/usr/bin/python3 -c %s %s %s", _RESTART_PROBE, BACKEND_UNIT, BACKEND_URL))
    assert result["restart_rc"] == 0, result
    assert main_pid(host, BACKEND_UNIT) not in (0, pid)  # it did restart
    assert set(result["seen"]) == {"200"}, result
    assert host.service(BACKEND_SOCKET_UNIT).is_enabled


def test_tls_files(host):
    for path, mode in ((BACKEND_CA, 0o644), (BACKEND_CERT, 0o644), (BACKEND_KEY, 0o600)):
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "root", mode), path
    env = host.file(f"{CONFIG_DIR}/backend.env").content_string
    for line in ('GPU_BRIDGE_GPU_SCHEME="https"', f'GPU_BRIDGE_GPU_CA_FILE="{BACKEND_CA}"',
                 f'GPU_BRIDGE_CLIENT_CERT_FILE="{BACKEND_CERT}"'):
        assert line in env, env
    assert "LoadCredential=client-key:" in host.file(f"/etc/systemd/system/{BACKEND_UNIT}").content_string


def test_gpu_api_over_mutual_tls_ollama_not(host, gpus):
    """With the backend's client certificate the GPU hosts answer; without one nginx refuses; Ollama
    is not reachable from here at all."""
    for name in gpus:
        r = https(host, "GET", name, GPU_PORT, "/api/health", ca=BACKEND_CA, cert=BACKEND_CERT, key=BACKEND_KEY)
        assert r["status"] == 200 and r["body"]["ollama"]["reachable"] is True, (name, r)
        r = https(host, "GET", name, GPU_PORT, "/api/health", ca=BACKEND_CA)
        assert r["status"] == 403 and r["body"]["code"] == "client_certificate_required", (name, r)
        r = http(host, "GET", f"http://{name}:11434/api/version", timeout=5)
        assert r["status"] == 0, f"Ollama on {name} must be reachable on loopback only: {r}"


def test_gpu_api_refuses_a_client_certificate_it_did_not_sign(host, gpus):
    """A self-signed client certificate (not from the client CA) is refused too."""
    key, cert = "/tmp/rogue-client.key", "/tmp/rogue-client.pem"
    host.check_output("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=intruder "
                      "-addext extendedKeyUsage=clientAuth -days 1 -keyout %s -out %s 2>/dev/null", key, cert)
    try:
        for name in gpus:
            r = https(host, "GET", name, GPU_PORT, "/api/health", ca=BACKEND_CA, cert=cert, key=key)
            assert r["status"] in (0, 403), (name, r)
            if r["status"] == 403:
                assert r["body"]["code"] == "client_certificate_invalid", (name, r)
    finally:
        host.run("rm -f %s %s", key, cert)


def test_backend_lists_over_mutual_tls(host, gpus):
    r = backend(host, "GET", "/config/models?refresh=true")
    assert r["status"] == 200, r
    assert r["body"]["stale"] is False, r
    for label, entry in r["body"]["hosts"].items():
        assert entry["ok"] is True, (label, entry)
    assert len(r["body"]["hosts"]) == len(gpus), r


def test_backend_rejects_bad_model_name(host):
    r = backend(host, "POST", "/config/pull-model", {"model": "../../etc/passwd"})
    assert r["status"] == 400, r
