"""The production backend host: gpu-bridge-backend on loopback, its secrets, reachability."""

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


def test_gpu_api_reachable_ollama_not(host, gpus):
    for name in gpus:
        r = http(host, "GET", f"http://{name}:{GPU_PORT}/api/health", timeout=5)
        assert r["status"] == 200, (name, r)
        r = http(host, "GET", f"http://{name}:11434/api/version", timeout=5)
        assert r["status"] == 0, f"Ollama on {name} must be reachable on loopback only: {r}"


def test_backend_rejects_bad_model_name(host):
    r = backend(host, "POST", "/config/pull-model", {"model": "../../etc/passwd"})
    assert r["status"] == 400, r
