"""Two backends on one PostgreSQL database, as behind a load balancer: prod-01 and prod-02 share db-01
(prepare_postgres.yml). Requests alternate between them; a pull started on one is read and cancelled
on the other; a change made through one is listed at once through the other; the audit log is one.

Each backend listens on its host's loopback (the production web app calls it there), so "the other
backend" is a request made on the other host."""

from collections import Counter

import pytest
import testinfra
from molecule_support import CONFIG_DIR, OLLAMA_URL, backend, hosts_of, http, listing, ollama_models

testinfra_hosts = ["prod-01"]  # the tests drive both backends themselves: run once

HA_MODEL = "smollm:135m"  # in the emulator's registry, installed nowhere at the start
ALTERNATING = 40
PATHS = ("/config/models", "/config/pulls", "/config/audit?limit=5", "/health")


NAMES = ("prod-01", "prod-02")


@pytest.fixture(scope="module")
def pair(request, ansible_runner):
    """[prod-01, prod-02] as testinfra hosts."""
    assert tuple(sorted(ansible_runner.get_hosts("prod_backends"))) == NAMES
    inventory = request.config.option.ansible_inventory
    return [testinfra.get_host(f"ansible://{n}", ansible_inventory=inventory) for n in NAMES]


@pytest.fixture
def slow_pulls(gpus):
    """Downloads at 1 MB/s on every GPU host (a minute and a half for HA_MODEL: time to cancel)."""
    before = {name: http(gpu, "GET", OLLAMA_URL + "/_emulator/config")["body"]["pull_speed"]
              for name, gpu in gpus.items()}
    for gpu in gpus.values():
        assert http(gpu, "POST", OLLAMA_URL + "/_emulator/config", {"pull_speed": 1e6})["status"] == 200
    yield
    for name, gpu in gpus.items():
        http(gpu, "POST", OLLAMA_URL + "/_emulator/config", {"pull_speed": before[name]})


def test_both_backends_use_the_shared_database(pair):
    for host in pair:
        env = host.file(f"{CONFIG_DIR}/database.env")
        assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
        assert "@db-01:5432/gpu_bridge" in env.content_string
        assert "DATABASE_URL" not in host.file(f"{CONFIG_DIR}/backend.env").content_string
        db = backend(host, "GET", "/health")["body"]["db"]
        assert db["ok"] is True and db["dialect"] == "postgresql", db


def test_a_pull_started_on_one_is_read_and_cancelled_on_the_other(pair, gpus, slow_pulls):
    a, b = pair
    r = backend(a, "POST", "/config/pull-model", {"model": HA_MODEL})
    assert r["status"] == 202, r
    pull_id = r["body"]["id"]
    assert pull_id in [p["id"] for p in backend(b, "GET", "/config/pulls")["body"]["pulls"]]
    status = backend(b, "GET", f"/config/pull-status/{pull_id}")
    assert status["status"] == 200 and status["body"]["state"] == "running", status
    cancelled = backend(b, "POST", "/config/cancel-pull", {"id": pull_id})
    assert cancelled["status"] == 200 and cancelled["body"]["state"] == "cancelled", cancelled
    status = backend(a, "GET", f"/config/pull-status/{pull_id}")
    assert status["body"]["state"] == "cancelled" and status["body"]["done"] is True, status
    for name, gpu in gpus.items():
        assert HA_MODEL not in ollama_models(gpu), name


def test_a_change_through_one_is_listed_at_once_through_the_other(pair, gpus):
    """Each backend keeps its last listing for GPU_BRIDGE_CACHE_MAX_AGE (10 s); the change generation
    in the database tells the other one that its copy is old."""
    names = set(gpus)
    for first, second in (pair, pair[::-1]):
        for host in (first, second):  # both memos warm, without the model
            listing(host)
        r = backend(first, "POST", "/config/pull-model", {"model": HA_MODEL, "wait": True}, timeout=120)
        assert r["status"] == 200, r
        assert hosts_of(listing(second), HA_MODEL) == names
        r = backend(second, "POST", "/config/delete-model", {"model": HA_MODEL})
        assert r["status"] == 200, r
        assert hosts_of(listing(first), HA_MODEL) == set()


def test_requests_alternating_between_the_backends(pair, capsys):
    statuses: Counter = Counter()
    failures = []
    for i in range(ALTERNATING):
        name, host = NAMES[i % 2], pair[i % 2]
        path = PATHS[(i // 2) % len(PATHS)]
        r = backend(host, "GET", path)
        statuses[f"{name} {r['status']}"] += 1
        if r["status"] != 200:
            failures.append((name, path, r))
    with capsys.disabled():
        print(f"\nHA: {ALTERNATING} requests alternating between prod-01 and prod-02: "
              f"{dict(sorted(statuses.items()))}, errors: {len(failures)}")
    assert not failures, failures[:3]


def test_the_audit_log_is_one(pair):
    """Entries written through both (the tests above), the same read through either."""
    entries = [backend(h, "GET", "/config/audit?limit=20")["body"]["entries"] for h in pair]
    assert entries[0] == entries[1]
    actions = [e["action"] for e in entries[0] if e["model"] == HA_MODEL]
    assert {"pull", "cancel", "delete"} <= set(actions), actions
