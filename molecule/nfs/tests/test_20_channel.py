"""List, pull and delete through the backend over the NFS channel, GPU HTTP servers stopped."""

import json

from molecule_support import (
    BACKEND_TOKEN_FILE,
    BACKEND_UNIT,
    BACKEND_URL,
    CONFIG_DIR,
    GPU_PORT,
    HTTP_UNIT,
    WORKER_UNIT,
    http,
    list_pull_delete,
)

testinfra_hosts = ["prod_backends"]

# Timed on the backend host itself (not through SSH): N listings that bypass the backend's memo
# (?refresh=true), so each one goes through the NFS transport.
_TIMED = r"""
import json, sys, time, urllib.request
url, token_file, n = json.loads(sys.argv[1])
h = {"Accept": "application/json"}
try:
    h["Authorization"] = "Bearer " + open(token_file).read().strip()
except FileNotFoundError:
    pass
out = []
for _ in range(n):
    t = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=10) as r:
        body = json.loads(r.read())
    out.append({"status": r.status, "seconds": time.monotonic() - t, "source": body.get("source")})
print(json.dumps(out))
"""


def test_only_the_nfs_channel_runs(host, gpus):
    lines = host.file(f"{CONFIG_DIR}/backend.env").content_string.splitlines()
    assert "GPU_BRIDGE_TRANSPORT=nfs" in [line.replace('"', "") for line in lines], lines
    assert host.service(BACKEND_UNIT).is_running
    for name, gpu in gpus.items():
        assert not gpu.service(HTTP_UNIT).is_running, f"{HTTP_UNIT} still runs on {name}"
        assert gpu.service(WORKER_UNIT).is_running, f"{WORKER_UNIT} not running on {name}"
        r = http(host, "GET", f"http://{name}:{GPU_PORT}/api/health", timeout=5)
        assert r["status"] == 0, f"the GPU HTTP server on {name} still answers: {r}"


def test_list_pull_delete_over_nfs(host, gpus):
    list_pull_delete(host, gpus)


def test_listing_answers_in_under_a_second(host):
    arg = json.dumps([BACKEND_URL + "/config/models?refresh=true", BACKEND_TOKEN_FILE, 5])
    runs = json.loads(host.check_output("/usr/bin/python3 -c %s %s", _TIMED, arg))
    print("\nlisting over NFS (refresh=true): " + ", ".join(f"{r['seconds'] * 1000:.0f} ms" for r in runs))
    for r in runs:
        assert r["status"] == 200 and r["source"] == "gpu", r
        assert r["seconds"] < 1.0, runs
