"""Two backends, one database, behaving as one (issue 19): the listing memo checked against the
database's change generation, pull records merged under the write lock, migrations when several
instances start at once; then two real backend processes (gunicorn) on one private PostgreSQL database
(and on one SQLite file, as gunicorn workers on one host would share it) in front of two real GPU
servers and their emulators."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from prod_helpers import PYTHON, FakeFactory, FakeTransport, GpuSide, start_backend

from gpu_bridge.backend import create_app
from gpu_bridge.backend.db import LATEST, Database
from gpu_bridge.backend.pulls import settle
from gpu_bridge.backend.schema import MODELS_SCOPE, change_generation, schema_version
from support.procs import emulator_control, wait_until

MODEL = "tinyllama:latest"  # in the emulator's registry, not installed at its start


class SharedFakes(FakeFactory):
    """One fake per GPU host whichever app asks: two backends in front of the same hosts."""

    def __call__(self, host, settings):
        if host.name not in self.made:
            self.made[host.name] = FakeTransport(host, settings)
        return self.made[host.name]


@pytest.fixture
def two_apps(db_url):
    """Two backend apps (each its own memo, engine and fleet) on one database, memo on for 30 s."""
    fakes = SharedFakes()
    env = {"GPU_INSTANCE_HOSTS": "10.0.0.1,10.0.0.2", "GPU_BRIDGE_DATABASE_URL": db_url,
           "GPU_BRIDGE_CACHE_MAX_AGE": "30"}
    a = create_app(env, transport_factory=fakes).test_client()
    b = create_app(env, transport_factory=fakes).test_client()
    return a, b, fakes


def _names(client) -> tuple[set[str], str]:
    body = client.get("/config/models").get_json()
    assert body["stale"] is False
    return {m["name"] for m in body["models"]}, body["source"]


# --- in process: the memo, the merge ---------------------------------------------------------------------------
def test_a_wait_pull_through_one_is_listed_at_once_through_the_other(two_apps):
    a, b, _ = two_apps
    assert _names(b) == ({"llama3.2:latest"}, "gpu")
    assert _names(b) == ({"llama3.2:latest"}, "cache"), "the memo is on"
    assert a.post("/config/pull-model", json={"model": "tinyllama", "wait": True}).status_code == 200
    assert _names(b) == ({"llama3.2:latest", MODEL}, "gpu"), "B's memo was older than A's change"
    assert _names(b)[1] == "cache", "and memoised again once asked"
    assert _names(a) == ({"llama3.2:latest", MODEL}, "gpu")

    assert b.post("/config/delete-model", json={"model": "tinyllama"}).status_code == 200
    assert _names(a) == ({"llama3.2:latest"}, "gpu"), "a delete through B reaches A's memo"


def test_a_pull_seen_finishing_through_one_is_listed_through_the_other(two_apps):
    a, b, _ = two_apps
    pull_id = a.post("/config/pull-model", json={"model": "tinyllama"}).get_json()["id"]
    assert _names(b) == ({"llama3.2:latest"}, "gpu")
    assert a.get(f"/config/pull-status/{pull_id}").get_json()["state"] == "running"
    assert _names(b)[1] == "cache", "a pull still running changed nothing yet"
    assert a.get(f"/config/pull-status/{pull_id}").get_json()["state"] == "succeeded"
    assert _names(b) == ({"llama3.2:latest", MODEL}, "gpu")


def test_a_pull_started_through_one_is_followed_and_cancelled_through_the_other(two_apps):
    a, b, fakes = two_apps
    started = a.post("/config/pull-model", json={"model": "tinyllama"}).get_json()
    assert [p["id"] for p in b.get("/config/pulls").get_json()["pulls"]] == [started["id"]]
    cancelled = b.post("/config/cancel-pull", json={"id": started["id"]})
    assert cancelled.status_code == 200 and cancelled.get_json()["state"] == "cancelled"
    assert [c[0] for c in fakes.made["10.0.0.1"].calls].count("cancel_job") == 1
    status = a.get(f"/config/pull-status/{started['id']}").get_json()
    assert status["state"] == "cancelled" and status["done"] is True
    actions = [(e["action"], e["outcome"]) for e in a.get("/config/audit").get_json()["entries"]]
    assert actions == [("cancel", "ok"), ("pull", "ok")], "each instance's audit entries, read through one"


def test_a_status_read_from_before_a_cancel_does_not_undo_it(db_url):
    db = Database(db_url)
    db.migrate()
    running = {"h1": {"job_id": "j1", "job": {"id": "j1", "state": "running"}},
               "h2": {"job_id": "j2", "job": {"id": "j2", "state": "running"}}}
    db.create_pull("p", MODEL, "running", running)
    # B cancels h1 and h2; A, which asked the hosts just before, writes its older view afterwards.
    cancelled = {h: {**v, "job": {**v["job"], "state": "cancelled"}} for h, v in running.items()}
    db.merge_pull("p", lambda stored: settle(stored, cancelled))
    merged = db.merge_pull("p", lambda stored: settle(stored, running))
    assert merged == cancelled
    assert db.get_pull("p")["state"] == "cancelled"
    # A finished job in this request's view wins (the host said so last).
    succeeded = {h: {**v, "job": {**v["job"], "state": "succeeded"}} for h, v in running.items()}
    assert db.merge_pull("p", lambda stored: settle(stored, succeeded)) == succeeded
    assert db.merge_pull("missing", lambda stored: settle(stored, running)) is None


def test_changes_bump_the_generation_in_their_own_transaction(db_url):
    db = Database(db_url)
    db.migrate()
    assert db.models_generation() == 0
    db.create_pull("p1", MODEL, "running", {})
    db.update_pull("p1", "running", {})
    assert db.models_generation() == 0, "a pull that installed nothing yet changes no listing"
    db.create_pull("p2", MODEL, "succeeded", {}, models_changed=True)
    db.merge_pull("p1", lambda stored: ("succeeded", stored), models_changed=True)
    db.forget_model("h", MODEL)
    db.models_changed()
    assert db.models_generation() == 4


def test_an_unreadable_generation_serves_no_memo(two_apps, monkeypatch, caplog):
    a, _, fakes = two_apps
    assert _names(a)[1] == "gpu"
    state = a.application.extensions["gpu_bridge_backend"]

    def broken():
        raise sa.exc.OperationalError("SELECT generation", {}, Exception("server closed the connection"))

    monkeypatch.setattr(state.db, "models_generation", broken)
    calls = len(fakes.made["10.0.0.1"].calls)
    assert _names(a)[1] == "gpu" and _names(a)[1] == "gpu", "each listing asks the hosts"
    assert len(fakes.made["10.0.0.1"].calls) == calls + 2
    assert "database error: read models generation" in caplog.text


# --- two instances migrating at once (real processes) ----------------------------------------------------------
MIGRATOR = """
import sys
from pathlib import Path
from gpu_bridge.backend.db import Database
db = Database(sys.argv[1])
Path(sys.argv[2]).touch()
go = Path(sys.argv[3])
while not go.exists():  # spin: the three start within microseconds of each other
    pass
print(db.migrate())
"""


@pytest.mark.parametrize("rounds", [3])
def test_instances_migrating_a_fresh_database_at_once_all_start(db_url, tmp_path, rounds, request):
    """Before the write lock, SQLite failed about one start in four here: 'table schema_version already
    exists' (Python's sqlite3 runs DDL outside any transaction)."""
    for n in range(rounds):
        url = db_url if n == 0 else _fresh_like(db_url, tmp_path / f"r{n}", request)
        go = tmp_path / f"go-{n}"
        ready = [tmp_path / f"ready-{n}-{i}" for i in range(3)]
        procs = [subprocess.Popen([PYTHON, "-c", MIGRATOR, url, str(r), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in ready]
        wait_until(lambda: all(r.exists() for r in ready), 60, 0.01, what="migrators ready")  # noqa: B023
        go.touch()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        assert [o.strip().splitlines()[-1] for o in outputs] == [str(LATEST)] * 3
        engine = sa.create_engine(Database(url).url)
        with engine.connect() as conn:
            assert conn.execute(sa.select(schema_version.c.version)).scalars().all() == [LATEST]
            assert conn.execute(sa.select(change_generation)).all() == [(MODELS_SCOPE, 0)]
        engine.dispose()


def _fresh_like(db_url: str, directory: Path, request) -> str:
    if db_url.startswith("sqlite"):
        return f"sqlite:///{directory}/backend.db"
    return request.getfixturevalue("postgres").create_database(f"gb_ha_{directory.name}_{time.monotonic_ns()}")


# --- two real backend processes in front of two real GPU servers -----------------------------------------------
@pytest.fixture(scope="module")
def gpu_pair(tmp_path_factory):
    side = GpuSide("http", 2, tmp_path_factory.mktemp("gpus-ha"))
    yield side
    side.stop()


@pytest.fixture
def ha(gpu_pair, db_url):
    """Backends A and B started at once (both migrate the fresh database) on one database, memo on."""
    for emu in gpu_pair.emulators:
        emulator_control(emu, "reset")
    env = gpu_pair.backend_env(GPU_BRIDGE_DATABASE_URL=db_url, GPU_BRIDGE_CACHE_MAX_AGE="30")
    started: list = [None, None]
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            started[i] = start_backend(env)
        except BaseException as exc:  # noqa: BLE001 - reported below, after both tries
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        started[0].name, started[1].name = "A", "B"  # for the counts and messages below
        yield started[0], started[1]
    finally:
        for proc in started:
            if proc is not None:
                output = proc.output()
                proc.stop()
                assert "database_error" not in output, output[-3000:]


def _get(proc, path: str, **kw) -> requests.Response:
    return requests.get(proc.url + path, timeout=30, **kw)


def _post(proc, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(proc.url + path, json=body, timeout=60, **kw)


def _listed(proc) -> dict:
    r = _get(proc, "/config/models")
    assert r.status_code == 200, r.text
    return r.json()


def _has(listing: dict, model: str, labels: list[str]) -> bool:
    return any(m["name"] == model and sorted(m["hosts"]) == sorted(labels) for m in listing["models"])


def test_a_pull_started_on_a_is_read_and_cancelled_on_b(ha, gpu_pair):
    a, b = ha
    for emu in gpu_pair.emulators:
        emulator_control(emu, "config", {"pull_speed": 1e6})  # ~60 s for tinyllama: time to cancel
    r = _post(a, "/config/pull-model", {"model": "tinyllama"})
    assert r.status_code == 202, r.text
    pull_id = r.json()["id"]
    assert r.headers["Location"] == f"/config/pull-status/{pull_id}"

    assert pull_id in [p["id"] for p in _get(b, "/config/pulls").json()["pulls"]]
    status = _get(b, f"/config/pull-status/{pull_id}").json()
    assert status["state"] == "running" and set(status["results"]) == set(gpu_pair.labels)

    r = _post(b, "/config/cancel-pull", {"id": pull_id})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"
    assert {lbl: res["job"]["state"] for lbl, res in r.json()["results"].items()} == \
        dict.fromkeys(gpu_pair.labels, "cancelled")
    status = _get(a, f"/config/pull-status/{pull_id}").json()
    assert status["state"] == "cancelled" and status["done"] is True
    for emu in gpu_pair.emulators:  # the downloads really stopped on both hosts
        wait_until(lambda e=emu: emulator_control(e, "stats")["cancelled_downloads"] >= 1, 20, 0.1,
                   what="the emulator's download cancelled")
    assert not any(m["name"] == MODEL for m in _listed(a)["models"]), "nothing was installed"


def _round_trip(first, second, labels: list[str]) -> int:
    """Memos warm on both, a wait pull through ``first``, listings through ``second`` then ``first``;
    a delete through ``second``, listings through ``first`` then ``second``. Misses counted."""
    misses = 0
    for proc in (first, second):
        _listed(proc)
    r = _post(first, "/config/pull-model", {"model": "tinyllama", "wait": True})
    assert r.status_code == 200, r.text
    misses += sum(not _has(_listed(p), MODEL, labels) for p in (second, first))
    r = _post(second, "/config/delete-model", {"model": "tinyllama"})
    assert r.status_code == 200, r.text
    misses += sum(any(m["name"] == MODEL for m in _listed(p)["models"]) for p in (first, second))
    return misses


def test_a_change_through_one_is_seen_at_once_through_the_other(ha, gpu_pair):
    a, b = ha
    rounds = 20
    misses = sum(_round_trip(a, b, gpu_pair.labels) + _round_trip(b, a, gpu_pair.labels) for _ in range(rounds // 2))
    print(f"\nHA listings: {rounds} wait pulls and {rounds} deletes, each followed at once by listings through "
          f"both backends ({rounds * 4} listings): {misses} misses")
    assert misses == 0


def test_requests_alternating_between_two_backends_have_no_errors(ha, gpu_pair):
    """Two clients at once, each alternating between A and B, reads and writes mixed: every answer 2xx."""
    a, b = ha
    per_client = 60
    counts: Counter[str] = Counter()  # requests per backend
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        for i in range(per_client):
            proc, other = (a, b) if (i + offset) % 2 == 0 else (b, a)
            step = i % 6
            if step == 0:
                r = _post(proc, "/config/pull-model", {"model": "tinyllama"})
                pull_id = r.json().get("id") if r.ok else None
                if pull_id:  # followed through the other backend
                    r2 = _get(other, f"/config/pull-status/{pull_id}")
                    _count(counts, statuses, failures, lock, other, r2)
            elif step == 1:
                r = _get(proc, "/config/models")
            elif step == 2:
                r = _get(proc, "/config/pulls")
            elif step == 3:
                r = _get(proc, "/config/audit?limit=5")
            elif step == 4:
                r = _get(proc, "/health")
            else:
                r = _get(proc, "/config/models?refresh=true")
            _count(counts, statuses, failures, lock, proc, r)

    threads = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\nHA alternating: {counts.total()} requests (A {counts['A']}, B {counts['B']}), statuses "
          f"{dict(sorted(statuses.items()))}, errors {len(failures)}")
    assert not failures, failures[:5]
    assert counts["A"] >= per_client and counts["B"] >= per_client


def _count(counts: Counter[str], statuses: Counter[int], failures: list[str], lock: threading.Lock, proc,
           r: requests.Response) -> None:
    with lock:
        counts[proc.name] += 1
        statuses[r.status_code] += 1
        if not r.ok:
            failures.append(f"{proc.name} {r.request.method} {r.request.path_url}: {r.status_code} {r.text[:300]}")


def test_audit_entries_written_through_both_are_read_through_either(ha):
    a, b = ha
    assert _post(a, "/config/pull-model", {"model": "tinyllama", "wait": True},
                 headers={"X-Request-ID": "ha-through-a"}).status_code == 200
    assert _post(b, "/config/delete-model", {"model": "tinyllama"},
                 headers={"X-Request-ID": "ha-through-b"}).status_code == 200
    seen = [_get(p, "/config/audit?limit=10").json()["entries"] for p in (a, b)]
    assert seen[0] == seen[1]
    assert [(e["action"], e["request_id"]) for e in seen[0][:2]] == [("delete", "ha-through-b"),
                                                                      ("pull", "ha-through-a")]

