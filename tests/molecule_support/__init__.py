"""Helpers for the molecule scenarios' testinfra tests (molecule/*/tests/).

Not a test module: pytest at the repository root never collects it (no ``test_`` prefix). The
scenario conftests put ``tests/`` on ``sys.path`` and import from here, so both scenarios check
the deployed stack the same way.

Everything that talks to a service runs *on* a host (``host.run``), with the host's own
``/usr/bin/python3`` and the standard library: the hosts have no curl, and the checks must see
what a process on that host sees (loopback binds, name resolution on the lab network).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO / "app" / "requirements.lock"

VENV = "/opt/gpu-bridge/venv"
CONFIG_DIR = "/etc/gpu-bridge"
CREDENTIALS_DIR = "/etc/gpu-bridge/credentials"
SHARE_ROOT = "/mnt/shared"
BACKEND_URL = "http://127.0.0.1:8000"
BACKEND_TOKEN_FILE = f"{CREDENTIALS_DIR}/backend-token"
GPU_PORT = 8001
OLLAMA_URL = "http://127.0.0.1:11434"

HTTP_UNIT = "gpu-http-server.service"
WORKER_UNIT = "gpu-nfs-worker.service"
BACKEND_UNIT = "gpu-bridge-backend.service"

# Models the emulator has installed at start (tests/ollama_emulator.py DEFAULT_INSTALLED) and one
# it can pull.
INSTALLED_MODEL = "llama3.2:latest"
PULLABLE_MODEL = "tinyllama:latest"

# Listeners that are not ours: rpcbind (pulled in by nfs-common, socket activated by systemd) on
# 111, and Docker's embedded DNS server on 127.0.0.11 (user-defined networks; test hosts only).
# Anything else listening must be ours and configured.
OS_LISTENER_PORTS = {111}
DOCKER_DNS = "127.0.0.11"


# ---------------------------------------------------------------------------------------------
# waiting


def poll(fn: Callable[[], Any], until: Callable[[Any], bool], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call ``fn`` until ``until(value)`` holds, at most ``timeout`` seconds; return the value.

    On timeout, fail with the last value seen, so the report says what the state was.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last seen: {value!r}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# pins


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line in the lock file."""
    pins = {}
    for m in re.finditer(r"(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", lock_file.read_text()):
        pins[normalize(m.group(1))] = m.group(2)
    return pins


def venv_packages(host, venv: str = VENV) -> dict[str, str]:
    """``{normalized name: version}`` installed in the venv."""
    out = host.check_output("%s/bin/python -m pip list --format=json --disable-pip-version-check", venv)
    return {normalize(p["name"]): p["version"] for p in json.loads(out)}


# ---------------------------------------------------------------------------------------------
# HTTP from a host

_HTTP = r"""
import json, sys, urllib.error, urllib.request
method, url, body, token_file, timeout = json.loads(sys.argv[1])
headers = {"Accept": "application/json"}
if body is not None:
    headers["Content-Type"] = "application/json"
if token_file:
    try:
        # A token file may hold several tokens, one a line (a rotation): the first is the one to send.
        headers["Authorization"] = "Bearer " + open(token_file).read().strip().splitlines()[0].strip()
    except FileNotFoundError:
        pass
data = None if body is None else json.dumps(body).encode()
req = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
except OSError as e:
    print(json.dumps({"status": 0, "body": None, "error": repr(e)}))
    sys.exit(0)
try:
    payload = json.loads(raw)
except ValueError:
    payload = raw.decode(errors="replace")
print(json.dumps({"status": status, "body": payload}))
"""


def http(host, method: str, url: str, body: Any = None, token_file: str | None = None, timeout: float = 30) -> dict:
    """One request made on ``host``: ``{"status": int (0: no answer), "body": json|str, "error"?}``."""
    arg = json.dumps([method, url, body, token_file, timeout])
    return json.loads(host.check_output("/usr/bin/python3 -c %s %s", _HTTP, arg))


def backend(host, method: str, path: str, body: Any = None, timeout: float = 60) -> dict:
    """A request to the backend on prod-01, with the backend token when there is one."""
    return http(host, method, BACKEND_URL + path, body, BACKEND_TOKEN_FILE, timeout)


def ollama_models(gpu_host) -> set[str]:
    """What Ollama (the emulator) on a GPU host has installed, asked directly (ground truth)."""
    r = http(gpu_host, "GET", OLLAMA_URL + "/api/tags")
    assert r["status"] == 200, r
    return {m["name"] for m in r["body"]["models"]}


def host_label(entry: Any) -> str:
    """A GPU host as the backend lists it ("gpu-01:8001", "gpu-01" or {"name": ...}) → "gpu-01"."""
    if isinstance(entry, dict):
        entry = entry.get("name") or entry.get("host") or entry.get("label") or ""
    return str(entry).rsplit(":", 1)[0] if str(entry).count(":") == 1 else str(entry)


def listing(host) -> dict:
    """GET /config/models on the backend; asserts 200 and returns the body."""
    r = backend(host, "GET", "/config/models")
    assert r["status"] == 200, r
    return r["body"]


def hosts_of(body: dict, model: str) -> set[str]:
    """The GPU hosts a listing says hold ``model`` (empty when it is not listed)."""
    for m in body.get("models", []):
        if m.get("name") == model:
            return {host_label(h) for h in m.get("hosts", [])}
    return set()


def list_pull_delete(prod, gpus: dict, pull_timeout: float = 120) -> None:
    """The end-to-end round trip through the backend on ``prod``, whatever the channel.

    ``gpus``: {inventory name: testinfra host}. Checks the listing against what each host's
    Ollama really has, then pulls a model on every host and deletes it again.
    """
    names = set(gpus)
    # 1. the listing shows the installed model on every GPU host
    body = poll(
        lambda: listing(prod),
        lambda b: hosts_of(b, INSTALLED_MODEL) == names,
        30,
        f"{INSTALLED_MODEL} listed on {sorted(names)}",
    )
    for key in ("models", "source", "stale", "fetched_at"):
        assert key in body, f"/config/models lacks {key!r}: {body}"
    for name, gpu in gpus.items():
        for model in ollama_models(gpu):
            assert name in hosts_of(body, model), f"{model} on {name} missing from the listing: {body}"

    # 2. a pull through the backend completes on every host
    for gpu in gpus.values():
        assert PULLABLE_MODEL not in ollama_models(gpu), "start state: the model to pull is already there"
    r = backend(prod, "POST", "/config/pull-model", {"model": PULLABLE_MODEL, "wait": True}, timeout=pull_timeout)
    assert r["status"] == 200, r
    for name, gpu in gpus.items():
        poll(lambda g=gpu: ollama_models(g), lambda m: PULLABLE_MODEL in m, 30, f"{PULLABLE_MODEL} installed on {name}")
    poll(
        lambda: listing(prod),
        lambda b: hosts_of(b, PULLABLE_MODEL) == names,
        30,
        f"{PULLABLE_MODEL} listed on {sorted(names)} after the pull",
    )

    # 3. a delete through the backend removes it everywhere
    r = backend(prod, "POST", "/config/delete-model", {"model": PULLABLE_MODEL})
    assert r["status"] == 200, r
    for name, gpu in gpus.items():
        poll(
            lambda g=gpu: ollama_models(g), lambda m: PULLABLE_MODEL not in m, 30, f"{PULLABLE_MODEL} gone from {name}"
        )
    poll(
        lambda: listing(prod), lambda b: not hosts_of(b, PULLABLE_MODEL), 30, f"{PULLABLE_MODEL} gone from the listing"
    )


# ---------------------------------------------------------------------------------------------
# systemd, sockets, files


def exposure(host, unit: str) -> float:
    """``systemd-analyze security`` overall exposure of a loaded unit (0 best, 10 worst)."""
    out = host.check_output("systemd-analyze security --no-pager %s", unit)
    m = re.search(r"Overall exposure level for \S+:\s*([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


def main_pid(host, unit: str) -> int:
    return int(host.check_output("systemctl show -p MainPID --value %s", unit) or 0)


def listeners(host) -> set[str]:
    """TCP and UDP listening sockets as "proto://addr:port", without the ones that are not ours."""
    out = set()
    for s in host.socket.get_listening_sockets():
        if s.startswith("unix://"):
            continue
        addr, port = s.split("://", 1)[1].rsplit(":", 1)
        if int(port) not in OS_LISTENER_PORTS and addr != DOCKER_DNS:
            out.add(s)
    return out


def ipv4(host) -> str:
    """The host's address on the lab network (where the GPU server must bind)."""
    out = host.check_output("ip -4 -o addr show scope global")
    addrs = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    assert len(addrs) == 1, out
    return addrs[0]


def fstab_entry(host, path: str) -> dict | None:
    """The fstab entry of ``path`` as findmnt reports it, or None."""
    r = host.run("findmnt --fstab --json --output SOURCE,TARGET,FSTYPE,OPTIONS --mountpoint %s", path)
    if r.rc != 0:
        return None
    entries = json.loads(r.stdout)["filesystems"]
    assert len(entries) == 1, entries
    return entries[0]


def setting(host, name: str) -> Any:
    """A role input as deployed: the inventory's value (group_vars/host_vars), else the role
    default from roles/*/defaults/main.yml. Only for plain values (no Jinja)."""
    import yaml  # noqa: PLC0415 (controller-side; pyyaml comes with ansible)

    variables = host.ansible.get_variables()
    if name in variables:
        return variables[name]
    for defaults in sorted(REPO.glob("roles/*/defaults/main.yml")):
        data = yaml.safe_load(defaults.read_text()) or {}
        if name in data:
            return data[name]
    raise KeyError(f"{name}: neither in the inventory nor in a role's defaults")


def run_as_service_account(host, command: str, *args):
    """``host.run`` as the service account (runuser), from ``/``: root is "nobody" on a root_squash
    NFS share, and root's home is closed to the service account (find returns to its start dir)."""
    user = setting(host, "gpu_bridge_common_user")
    return host.run(f"cd / && runuser -u {user} -- {command}", *args)
