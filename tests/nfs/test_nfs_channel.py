"""The NFS channel end to end: real worker and producer processes on a shared temp directory, the
Ollama emulator behind the worker. Each command must be answered exactly once, none lost, also when
the worker is SIGKILLed mid-stream; a dead worker must be reported as such, fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from nfs_helpers import PRODUCER, WorkerProcess, transport, worker_env

from gpu_bridge import spool
from gpu_bridge.errors import (
    Conflict,
    GpuHostUnreachable,
    InsufficientStorage,
    InvalidModelName,
    JobNotFound,
    ModelNotFound,
)
from support.procs import VENV_BIN, emulator_control, start_emulator, wait_until

pytestmark = pytest.mark.integration

TINY_TOTAL_MIN = 1_000_000  # tinyllama's layers in the emulator add up to ~64 MB


@pytest.fixture
def slow_emulator():
    """An emulator whose pulls take ~1.5 s for tinyllama (progress visible), function scope."""
    proc = start_emulator("--pull-speed", "40e6")
    yield proc
    proc.stop()


def run_producers(share, host_id: str, n_procs: int, per_proc: int, tmp_path, *, timeout: float = 20.0):
    procs, outs = [], []
    for i in range(n_procs):
        out = tmp_path / f"producer-{i}.json"
        outs.append(out)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_")}
        procs.append(subprocess.Popen([sys.executable, str(PRODUCER), str(share), host_id, str(per_proc), str(out),
                                       str(timeout)], env=env, start_new_session=True))
    return procs, outs


def collect(procs, outs, timeout: float = 90.0) -> list[dict]:
    for p in procs:
        assert p.wait(timeout) == 0
    return [json.loads(o.read_text()) for o in outs]


def visible(directory: str) -> list[str]:
    return spool.list_names(directory)


# --- exactly once ---------------------------------------------------------------------------------
def test_thousand_commands_from_four_producers_each_answered_once(share, workers, module_emulator, tmp_path):
    w = workers(share, "127.0.0.1", module_emulator.url)
    started = time.monotonic()
    procs, outs = run_producers(share, "127.0.0.1", 4, 250, tmp_path)
    results = collect(procs, outs)
    elapsed = time.monotonic() - started
    assert [r["ok"] for r in results] == [250] * 4, results
    assert all(not r["errors"] and r["retries"] == 0 for r in results)
    answered = w.wait_audit("answered", 1000)
    execs = w.audit_counts("exec")
    assert len(answered) == 1000 and set(answered.values()) == {1}
    assert set(execs) == set(answered) and set(execs.values()) == {1}
    assert len(visible(w.paths.answers)) == 1000
    assert visible(w.paths.cmd_new) == [] and visible(w.paths.cmd_cur) == []
    assert os.listdir(w.paths.cmd_tmp) == []
    print(f"1000 round trips from 4 producers in {elapsed:.2f} s")


def test_sigkill_mid_stream_loses_and_duplicates_nothing(share, workers, module_emulator, tmp_path):
    # Heartbeat 1.5 s: the restart below fits well inside the 4.5 s after which producers call it down.
    w = workers(share, "127.0.0.1", module_emulator.url, GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL="1.5")
    procs, outs = run_producers(share, "127.0.0.1", 4, 250, tmp_path)
    wait_until(lambda: sum(w.audit_counts("answered").values()) >= 300, 60, what="300 answers before the kill")
    w.kill()
    killed_at = sum(w.audit_counts("answered").values())
    w.start()
    results = collect(procs, outs)
    assert [r["ok"] for r in results] == [250] * 4, results
    assert all(not r["errors"] for r in results)
    boots = set().union(*(r["boots"] for r in results))
    assert len(boots) == 2, "both the killed and the restarted worker answered"
    assert killed_at < 1000

    answer_files = {n[:-5] for n in visible(w.paths.answers)}
    w.wait_audit("exec", len(answer_files))
    events = w.audit()
    execs, answered = w.audit_counts("exec"), w.audit_counts("answered")
    # Every executed command has exactly one answer file, and no answer was published twice.
    assert set(execs) == answer_files
    assert max(answered.values()) == 1
    # Only a command that was executing at the moment of the SIGKILL may have run twice (ping is
    # idempotent), and its second run is marked as a recovery.
    twice = [i for i, n in execs.items() if n > 1]
    assert len(twice) <= 1 and max(execs.values()) <= 2
    for rid in twice:
        assert any(e["id"] == rid and e["event"] == "exec" and e["recovered"] for e in events)
    total_retries = sum(r["retries"] for r in results)
    recovered = {e["id"] for e in events if e["recovered"]}
    print(f"killed after {killed_at} answers; recovered from cur/: {len(recovered)}; ran twice: {len(twice)}; "
          f"producer retries: {total_retries}")
    if total_retries == 0:
        assert len(answer_files) == 1000
    assert visible(w.paths.cmd_new) == [] and visible(w.paths.cmd_cur) == []


def test_claimed_but_unanswered_commands_are_served_after_restart(share, workers, module_emulator):
    paths = spool.HostPaths(str(share), "127.0.0.1")
    spool.prepare_host(paths)
    pending = spool.make_command("127.0.0.1", "ping", timeout=30)
    done = spool.make_command("127.0.0.1", "ping", timeout=30)
    for cmd in (pending, done):
        with open(paths.cur_path(cmd["id"]), "w") as fh:
            json.dump(cmd, fh)
    with open(paths.answer_path(done["id"]), "w") as fh:
        json.dump({"ok": True, "result": {"marker": "answered before the crash"}}, fh)
    w = workers(share, "127.0.0.1", module_emulator.url)
    answer = spool.wait_answer(paths, pending["id"], time.monotonic() + 10)
    assert answer["ok"] and answer["worker"]["recovered"] is True
    assert spool.read_answer(paths, done["id"])["result"] == {"marker": "answered before the crash"}
    wait_until(lambda: visible(paths.cmd_cur) == [], 5, what="cur/ emptied")
    assert done["id"] not in w.audit_counts("exec")


# --- refusals, expiry, liveness -------------------------------------------------------------------
def run_worker_once(env: dict, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "gpu-bridge"), "nfs-worker"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("case", ["missing", "unprepared", "unmounted"])
def test_worker_refuses_without_a_prepared_mounted_share(tmp_path, case):
    root = tmp_path / "share"
    extra = {}
    if case != "missing":
        root.mkdir()
    if case == "unmounted":
        spool.init_share(str(root))
        extra["GPU_BRIDGE_NFS_REQUIRE_MOUNT"] = "true"  # tmp_path lives on the root filesystem
    r = run_worker_once(worker_env(root, "gpu-01", "http://127.0.0.1:9", **extra))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpu-bridge: error: "), r.stderr
    expected = {"missing": "does not exist", "unprepared": "nfs-init", "unmounted": "not mounted"}[case]
    assert expected in r.stderr
    if root.exists():
        assert not (root / spool.COMMANDS_DIR / "gpu-01").exists(), "nothing may be written on a bad share"


def test_expired_commands_are_answered_expired_not_executed(share, workers, module_emulator):
    w = workers(share, "127.0.0.1", module_emulator.url)
    paths = w.paths
    stale = spool.make_command("127.0.0.1", "delete", {"model": "llama3.2:latest"}, timeout=-5)
    fresh = spool.make_command("127.0.0.1", "ping", timeout=10)
    spool.send_command(paths, stale)
    spool.send_command(paths, fresh)
    a = spool.wait_answer(paths, stale["id"], time.monotonic() + 10)
    b = spool.wait_answer(paths, fresh["id"], time.monotonic() + 10)
    assert a["ok"] is False and a["error"]["code"] == "command_expired" and "not executed" in a["error"]["error"]
    assert b["ok"] is True
    assert stale["id"] not in w.audit_counts("exec")
    assert "llama3.2:latest" in [m["name"] for m in transport(share, "127.0.0.1").list_models()]


def test_stopped_worker_is_reported_down_quickly(share, workers, module_emulator):
    w = workers(share, "127.0.0.1", module_emulator.url)
    t = transport(share, "127.0.0.1", command_timeout=20.0)
    assert t.list_models()
    assert t.health()["status"] == "ok"
    heartbeat = [str(VENV_BIN / "gpu-bridge"), "nfs-heartbeat", "--host-id", "127.0.0.1", "--timeout", "1"]
    env = worker_env(share, "127.0.0.1", module_emulator.url)
    assert subprocess.run(heartbeat, env=env, capture_output=True, timeout=20, check=False).returncode == 0

    w.signal(signal.SIGSTOP)  # hung worker: the process exists, its heartbeat stops
    try:
        def listing_fails():
            try:
                t.list_models()
            except GpuHostUnreachable as exc:
                return exc
            return None

        exc = wait_until(listing_fails, 5, what="list_models to report the worker down")
        assert "heartbeat is stale" in exc.message and "gpu-nfs-worker.service" in exc.message
        started = time.monotonic()
        with pytest.raises(GpuHostUnreachable):
            t.ping()
        assert time.monotonic() - started < 1.0, "a known-dead worker fails fast, not after command_timeout"
        fresh = transport(share, "127.0.0.1", command_timeout=20.0)  # a reader with no history
        started = time.monotonic()
        with pytest.raises(GpuHostUnreachable, match="stale"):
            fresh.ping()
        assert time.monotonic() - started < 3.0
        assert visible(w.paths.cmd_new) == [], "the unanswered command was withdrawn"
        r = subprocess.run(heartbeat, env=env, capture_output=True, text=True, timeout=20, check=False)
        assert r.returncode == 1 and "stuck" in r.stderr
    finally:
        w.signal(signal.SIGCONT)
    wait_until(lambda: t.list_models(), 5, what="listing after SIGCONT")

    assert w.stop() == 0  # SIGTERM: graceful, exit 0
    assert spool.read_json(w.paths.heartbeat)["state"] == "stopped"
    started = time.monotonic()
    with pytest.raises(GpuHostUnreachable, match="stopped"):
        t.list_models()
    assert time.monotonic() - started < 0.5


# --- pulls, delete, jobs --------------------------------------------------------------------------
def test_pull_progress_delete_and_unknown_model(share, workers, slow_emulator):
    w = workers(share, "127.0.0.1", slow_emulator.url)
    t = transport(share, "127.0.0.1")
    assert "tinyllama:latest" not in [m["name"] for m in t.list_models()]
    commands_before = len(w.audit())
    with pytest.raises(InvalidModelName):
        t.start_pull("Bad Name")
    assert len(w.audit()) == commands_before, "an invalid name is refused before anything is written"

    job = t.start_pull("tinyllama")
    assert job["state"] in ("queued", "running") and job["model"] == "tinyllama:latest"
    assert spool.valid_request_id(job["id"]), "jobs on the NFS channel carry the command id"
    joined = t.start_pull("tinyllama:latest")
    assert joined.get("joined") is True and joined["id"] != job["id"]

    seen = []

    def finished():
        current = t.get_job(job["id"])
        if 0 < current["completed"] < current["total"]:
            seen.append(current["completed"])
        return current if current["state"] in spool.TERMINAL_STATES else None

    final = wait_until(finished, 20, interval=0.05, what="the pull to finish")
    assert final["state"] == "succeeded" and final["percent"] == 100.0 and final["total"] > TINY_TOTAL_MIN
    assert len(set(seen)) >= 3, f"progress was visible while pulling: {seen}"
    assert seen == sorted(seen)
    # Each pull command that shares the download has its own progress file, replaced one after the other.
    wait_until(lambda: t.get_job(joined["id"])["state"] == "succeeded", 5, what="the joined job to finish")
    # models.json is refreshed before the terminal state is published: no stale listing.
    assert "tinyllama:latest" in [m["name"] for m in t.list_models()]

    assert t.delete_model("tinyllama") == {"deleted": "tinyllama:latest"}
    assert "tinyllama:latest" not in [m["name"] for m in t.list_models()]
    with pytest.raises(ModelNotFound) as exc:
        t.delete_model("tinyllama")
    assert exc.value.host == "127.0.0.1:8001"

    with pytest.raises(ModelNotFound) as exc:
        t.pull_and_wait("no-such-model:1b")
    assert exc.value.extra["job"]["state"] == "failed"
    with pytest.raises(JobNotFound):
        t.get_job("0000000000000000000-1-nohost-000000000000")
    assert {j["id"] for j in t.list_jobs()} >= {job["id"], joined["id"]}


def test_cancel_a_running_pull(share, workers, module_emulator):
    emulator_control(module_emulator, "config", {"pull_speed": 5e6})
    try:
        workers(share, "127.0.0.1", module_emulator.url)
        t = transport(share, "127.0.0.1")
        job = t.start_pull("smollm:135m")
        wait_until(lambda: t.get_job(job["id"])["completed"] > 0, 10, what="download started")
        cancelled = t.cancel_job(job["id"])
        assert cancelled["state"] == "cancelled" and cancelled["id"] == job["id"]
        assert t.get_job(job["id"])["state"] == "cancelled"
        with pytest.raises(Conflict):
            t.cancel_job(job["id"])
        with pytest.raises(JobNotFound):
            t.cancel_job("0000000000000000000-1-nohost-000000000000")
    finally:
        emulator_control(module_emulator, "reset")


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_pull_resumes_after_a_worker_restart(share, workers, slow_emulator, how):
    w = workers(share, "127.0.0.1", slow_emulator.url, GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL="1.0")
    t = transport(share, "127.0.0.1")
    job = t.start_pull("tinyllama")
    wait_until(lambda: t.get_job(job["id"])["completed"] > 0, 10, what="download started")
    done: dict = {}

    def follow():
        try:
            done["job"] = t.wait_job(job)  # production's pull_and_wait, spanning the restart
        except Exception as exc:
            done["error"] = exc

    thread = threading.Thread(target=follow)
    thread.start()
    if how == "sigkill":
        w.kill()
    else:
        assert w.stop() == 0
        interrupted = spool.read_json(w.paths.job_path(job["id"]))["job"]
        assert interrupted["state"] == "running" and "resumes" in interrupted["status"]
        with pytest.raises(GpuHostUnreachable, match="stopped"):
            t.get_job(job["id"])  # an unfinished job of a stopped worker is not reported as running
    w.start()
    thread.join(30)
    assert "error" not in done, done
    assert done["job"]["state"] == "succeeded" and done["job"]["id"] == job["id"]
    assert "tinyllama:latest" in [m["name"] for m in t.list_models()]


# --- fleet layout, housekeeping -------------------------------------------------------------------
def test_two_gpu_hosts_share_one_share(share, workers, module_emulator):
    a = workers(share, "127.0.0.1", module_emulator.url)
    b = workers(share, "127.0.0.2", module_emulator.url)
    ta, tb = transport(share, "127.0.0.1"), transport(share, "127.0.0.2")
    for _ in range(5):
        assert ta.ping()["host"] == "127.0.0.1"
        assert tb.ping()["host"] == "127.0.0.2"
    assert {e["id"] for e in a.audit()}.isdisjoint({e["id"] for e in b.audit()})
    assert len(a.wait_audit("answered", 5)) == 5 and len(b.wait_audit("answered", 5)) == 5


def test_housekeeping_removes_stale_temp_files_and_old_answers(share, module_emulator):
    paths = spool.HostPaths(str(share), "127.0.0.1")
    spool.prepare_host(paths)
    old = time.time() - 7200
    stale_tmp = os.path.join(paths.cmd_tmp, ".crashed-writer.tmp")
    old_answer = paths.answer_path("0000000000000000001-1-h-000000000001")
    new_answer = paths.answer_path("0000000000000000002-1-h-000000000002")
    for path in (stale_tmp, old_answer, new_answer):
        with open(path, "w") as fh:
            fh.write("{}")
    os.utime(stale_tmp, (old, old))
    os.utime(old_answer, (old, old))
    w = WorkerProcess(share, "127.0.0.1", module_emulator.url, GPU_BRIDGE_NFS_ANSWER_RETENTION="3600")
    try:
        w.start()
        assert not os.path.exists(stale_tmp) and not os.path.exists(old_answer)
        assert os.path.exists(new_answer)
    finally:
        assert w.stop() == 0


def test_pull_refused_when_the_models_disk_is_full(share, workers, module_emulator, tmp_path):
    """The worker applies the HTTP server's free-space rule (jobs.check_free_space): 507, no job."""
    models_dir = tmp_path / "models" / "not-created-yet"  # measured at its nearest existing parent
    workers(share, "127.0.0.1", module_emulator.url, GPU_BRIDGE_OLLAMA_MODELS_DIR=str(models_dir),
                GPU_BRIDGE_MIN_FREE_GB="100000000")
    t = transport(share, "127.0.0.1")
    with pytest.raises(InsufficientStorage) as exc:
        t.start_pull("tinyllama")
    assert "GPU_BRIDGE_MIN_FREE_GB" in exc.value.message and "on 127.0.0.1" in exc.value.message
    assert exc.value.status == 507
    assert t.list_jobs() == []
