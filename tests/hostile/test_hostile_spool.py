"""Issue 14 rows 3-6 and issue 13's "late NFS commands": anyone who can write to the share is hostile.

Real ``gpu-bridge nfs-worker`` processes on a temp share (the Ollama emulator behind them), except the
worker-clock test, which runs the worker class in this process with a clock 31 s ahead. Each test
plants what an attacker (or a broken clock) would, then asserts what a user sees: the answer file and
its error code, the model that must survive, the worker still serving the next good command, the log.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time

import pytest
from nfs.nfs_helpers import WorkerProcess, transport

from gpu_bridge import spool
from gpu_bridge.config import GpuServerSettings, NfsSettings
from gpu_bridge.nfs_worker import NfsWorker
from support.procs import emulator_control, wait_until

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
INSTALLED = "llama3.2:latest"  # installed in the emulator's startup state


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    spool.init_share(str(root))
    return root


@pytest.fixture
def start_worker():
    started: list[WorkerProcess] = []

    def start(root, ollama_url, *, wait=True, **env):
        w = WorkerProcess(root, HOST, ollama_url, **env)
        started.append(w)
        return w.start(wait=wait)

    yield start
    for w in started:
        w.stop()


# --- helpers ---------------------------------------------------------------------------------------
def paths_of(share) -> spool.HostPaths:
    paths = spool.HostPaths(str(share), HOST)
    spool.prepare_host(paths)
    return paths


def plant(paths: spool.HostPaths, name: str, data: bytes, *, where: str = "new") -> str:
    """Publish raw bytes under any name into new/ (or cur/), the way an attacker with write access can."""
    tmp = os.path.join(paths.cmd_tmp, f".plant.{time.time_ns()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    target = os.path.join(paths.cmd_new if where == "new" else paths.cmd_cur, name)
    os.rename(tmp, target)
    return target


def command_bytes(cmd: dict) -> bytes:
    return json.dumps(cmd).encode()  # allow_nan: NaN and Infinity are written as such


def answer_of(paths, rid: str, timeout: float = 10.0) -> dict:
    answer = spool.wait_answer(paths, rid, time.monotonic() + timeout)
    assert answer is not None, f"no answer to {rid} within {timeout} s"
    return answer


def assert_still_serving(w: WorkerProcess) -> None:
    assert w.proc.poll() is None, f"the worker exited:\n{w.output()}"
    ping = spool.make_command(HOST, "ping", timeout=10)
    spool.send_command(w.paths, ping)
    assert answer_of(w.paths, ping["id"])["ok"] is True


def quarantined(paths) -> dict[str, dict]:
    """bad/ entries (not the reason files) -> their reason documents."""
    out = {}
    for name in os.listdir(paths.cmd_bad):
        if not name.endswith(".reason.json"):
            reason = os.path.join(paths.cmd_bad, name + ".reason.json")
            out[name] = json.loads(open(reason).read()) if os.path.exists(reason) else {}
    return out


def installed(share) -> list[str]:
    return [m["name"] for m in transport(share, HOST).list_models()]


# --- row 3: files that crashed or froze the worker ---------------------------------------------------------
def test_row3_command_nested_5000_deep_is_refused_and_the_worker_keeps_serving(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    rid = spool.new_request_id()
    plant(w.paths, f"{rid}.json", b'{"op":' * 5000 + b"1" + b"}" * 5000)
    answer = answer_of(w.paths, rid)
    assert answer["ok"] is False and answer["error"]["code"] == "invalid_request"
    assert "nests deeper than 32 levels" in answer["error"]["error"]
    reasons = quarantined(w.paths)
    assert len(reasons) == 1 and "nests deeper" in next(iter(reasons.values()))["reason"]
    assert spool.list_names(w.paths.cmd_cur) == []
    assert_still_serving(w)


def test_row3_oversized_command_is_refused_unread(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    rid = spool.new_request_id()
    plant(w.paths, f"{rid}.json", b" " * (spool.MAX_COMMAND_BYTES + 1) + b"{}")
    answer = answer_of(w.paths, rid)
    assert answer["error"]["code"] == "invalid_request" and "larger than 65536 bytes" in answer["error"]["error"]
    assert_still_serving(w)


def test_row3_directory_named_like_a_command_is_quarantined_and_answered(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    rid = spool.new_request_id()
    directory = os.path.join(w.paths.cmd_new, f"{rid}.json")
    os.mkdir(directory)
    with open(os.path.join(directory, "inside"), "w") as fh:
        fh.write("x")
    answer = answer_of(w.paths, rid)
    assert answer["error"]["code"] == "invalid_request" and "a directory" in answer["error"]["error"]
    [(name, reason)] = quarantined(w.paths).items()
    assert os.path.isdir(os.path.join(w.paths.cmd_bad, name)) and "a directory" in reason["reason"]
    assert_still_serving(w)


def test_row3_fifo_named_like_a_command_never_blocks_heartbeat_or_sigterm(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    rid = spool.new_request_id()
    os.mkfifo(os.path.join(w.paths.cmd_new, f"{rid}.json"))
    answer = answer_of(w.paths, rid)
    assert answer["error"]["code"] == "invalid_request" and "a FIFO" in answer["error"]["error"]
    counter = spool.read_json(w.paths.heartbeat)["counter"]
    wait_until(lambda: spool.read_json(w.paths.heartbeat)["counter"] > counter + 1, 5, what="heartbeat advancing")
    assert_still_serving(w)
    started = time.monotonic()
    assert w.stop(timeout=10) == 0, w.output()
    assert time.monotonic() - started < 5, "SIGTERM was honoured promptly"


def test_row3_hostile_entries_left_in_cur_and_new_do_not_crash_restarts(share, start_worker, module_emulator,
                                                                        tmp_path):
    """The entries are already there when the worker starts (the state that made it exit on every start)."""
    paths = paths_of(share)
    deep, fifo, directory, link = (spool.new_request_id() for _ in range(4))
    plant(paths, f"{deep}.json", b"[" * 5000 + b"]" * 5000, where="cur")
    os.mkfifo(paths.cur_path(fifo))
    os.mkdir(paths.new_path(directory))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(spool.make_command(HOST, "ping", timeout=30, request_id=link)))
    os.symlink(outside, paths.cur_path(link))
    good = spool.make_command(HOST, "ping", timeout=30)
    spool.send_command(paths, good)

    w = start_worker(share, module_emulator.url)
    for rid in (deep, fifo, directory, link):
        assert answer_of(paths, rid)["error"]["code"] == "invalid_request", rid
    assert answer_of(paths, good["id"])["ok"] is True
    assert spool.list_names(paths.cmd_cur) == [] and spool.list_names(paths.cmd_new) == []
    assert len(quarantined(paths)) == 4
    assert w.stop() == 0
    w.start()  # and once more: nothing left that could stop a restart
    assert_still_serving(w)


def test_row3_name_that_is_not_a_request_id_is_quarantined_unanswered(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    plant(w.paths, "evil.json", command_bytes({"op": "delete", "args": {"model": INSTALLED},
                                              "deadline": time.time() + 30}))
    plant(w.paths, "no-suffix", b"{}")
    wait_until(lambda: len(quarantined(w.paths)) == 2, 10, what="both entries quarantined")
    assert spool.list_names(w.paths.answers) == []
    assert INSTALLED in installed(share)
    assert_still_serving(w)


# --- row 4: a planted progress file and a restart ------------------------------------------------------------
def _plant_progress(paths, model: str) -> str:
    rid = spool.new_request_id()
    job = {"id": rid, "model": model, "state": "running", "completed": 0, "total": 0}
    spool.write_json(paths.status_tmp, paths.job_path(rid), {"v": 1, "host": HOST, "seq": 1, "job": job})
    return rid


def _terminal_job(paths, rid: str) -> dict:
    def terminal():
        job = (spool.read_json(paths.job_path(rid)) or {}).get("job") or {}
        return job if job.get("state") in spool.TERMINAL_STATES else None

    return wait_until(terminal, 10, what=f"progress file {rid} terminal")


def test_row4_planted_progress_file_for_a_foreign_registry_is_not_resumed(share, start_worker, emulator):
    paths = paths_of(share)
    rid = _plant_progress(paths, "evil.com/x/y")
    w = start_worker(share, emulator.url)
    job = _terminal_job(paths, rid)
    assert job["state"] == "failed" and job["error_code"] == "registry_not_allowed"
    assert transport(share, HOST).get_job(rid)["error_code"] == "registry_not_allowed"
    assert emulator_control(emulator, "stats")["pull_requests"] == 0, "nothing reached Ollama"
    assert_still_serving(w)


def test_row4_planted_progress_file_is_not_resumed_when_the_disk_is_full(share, start_worker, emulator, tmp_path):
    paths = paths_of(share)
    rid = _plant_progress(paths, "tinyllama")
    w = start_worker(share, emulator.url, GPU_BRIDGE_OLLAMA_MODELS_DIR=str(tmp_path / "models"),
                     GPU_BRIDGE_MIN_FREE_GB="100000000")
    job = _terminal_job(paths, rid)
    assert job["state"] == "failed" and job["error_code"] == "insufficient_storage"
    assert emulator_control(emulator, "stats")["pull_requests"] == 0
    assert_still_serving(w)


def test_row4_hostile_progress_files_fifo_and_deep_json_are_skipped(share, start_worker, module_emulator):
    paths = paths_of(share)
    fifo = spool.new_request_id()
    os.mkfifo(paths.job_path(fifo))
    deep = spool.new_request_id()
    with open(paths.job_path(deep), "wb") as fh:
        fh.write(b'{"job":' * 5000 + b"{}" + b"}" * 5000)
    w = start_worker(share, module_emulator.url)  # starting at all is the point: the FIFO would block it
    for rid in (fifo, deep):  # the worker's own reading of a hostile progress file ('job' runs inline)
        ask = spool.make_command(HOST, "job", {"job_id": rid}, timeout=10)
        spool.send_command(paths, ask)
        assert answer_of(paths, ask["id"])["error"]["code"] == "job_not_found"
    assert_still_serving(w)


# --- row 5: symlinks and names that forge log lines ------------------------------------------------------------
def test_row5_symlink_in_inbox_is_not_followed_and_the_model_survives(share, start_worker, module_emulator, tmp_path):
    w = start_worker(share, module_emulator.url)
    assert INSTALLED in installed(share)
    rid = spool.new_request_id()
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(spool.make_command(HOST, "delete", {"model": INSTALLED}, timeout=30,
                                                     request_id=rid)))
    os.symlink(outside, w.paths.new_path(rid))
    answer = answer_of(w.paths, rid)
    assert answer["ok"] is False and answer["error"]["code"] == "invalid_request"
    assert "symbolic link" in answer["error"]["error"]
    assert rid not in w.audit_counts("exec")
    assert INSTALLED in installed(share)
    assert outside.exists(), "the link's target is left alone"
    [name] = quarantined(w.paths)
    assert stat.S_ISLNK(os.lstat(os.path.join(w.paths.cmd_bad, name)).st_mode)
    assert_still_serving(w)


def test_row5_newline_in_file_name_cannot_forge_worker_log_lines(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    forged = "2030-01-01 00:00:00,000 ERROR gpu_bridge.nfs_worker: FORGED"
    names = [f"{spool.new_request_id()}.json\n{forged} one", f"x\n{forged} two.json"]
    for name in names:
        plant(w.paths, name, b"{}")
    wait_until(lambda: len(quarantined(w.paths)) == 2, 10, what="both entries quarantined")
    assert_still_serving(w)
    assert w.stop() == 0
    lines = w.output().splitlines()
    hits = [line for line in lines if "FORGED" in line]
    assert len(hits) >= 2, w.output()
    for line in hits:
        assert not line.startswith("2030-"), f"forged log line: {line!r}"
        assert "\\n2030-01-01" in line, f"the newline is escaped: {line!r}"
    assert all(any(repr(n) == r["name"] for r in quarantined(w.paths).values()) for n in names)


def log_records(output: str) -> list[dict]:
    """The worker's log records: one JSON object a line (logs.py), other lines (tracebacks) skipped."""
    records = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# --- row 6: deadlines and clocks -------------------------------------------------------------------------------
@pytest.mark.parametrize("deadline", [float("nan"), float("inf"), float("-inf"), 1e300, "next_year"])
def test_row6_nan_infinity_1e300_and_next_year_deadlines_are_refused(share, start_worker, module_emulator,
                                                                     deadline):
    w = start_worker(share, module_emulator.url)
    cmd = spool.make_command(HOST, "delete", {"model": INSTALLED}, timeout=30)
    cmd["deadline"] = time.time() + 365 * 86400 if deadline == "next_year" else deadline
    plant(w.paths, f"{cmd['id']}.json", command_bytes(cmd))
    answer = answer_of(w.paths, cmd["id"])
    assert answer["ok"] is False and answer["error"]["code"] == "invalid_request"
    expected = "not a finite number" if deadline != "next_year" and deadline != 1e300 else "s ahead of this worker"
    assert expected in answer["error"]["error"] and "not executed" in answer["error"]["error"]
    assert cmd["id"] not in w.audit_counts("exec")
    assert INSTALLED in installed(share)
    assert_still_serving(w)


def test_row6_producer_clock_31s_behind_gets_expired_answer_naming_the_skew(share, start_worker, module_emulator):
    w = start_worker(share, module_emulator.url)
    now = time.time()
    cmd = spool.make_command(HOST, "ping", timeout=30, now=now - 31)  # its clock says now - 31
    spool.send_command(w.paths, cmd)
    answer = answer_of(w.paths, cmd["id"])
    assert answer["error"]["code"] == "command_expired"
    assert "clocks look skewed" in answer["error"]["error"] and "behind the share" in answer["error"]["error"]
    assert_still_serving(w)
    assert w.stop() == 0
    warnings = [r["message"] for r in log_records(w.output())
                if r.get("level") == "warning" and r.get("logger") == "gpu_bridge.nfs_worker"]
    assert any(m.startswith("clock skew:") and "behind the share's" in m for m in warnings), w.output()


def test_row6_worker_clock_31s_ahead_warns_and_says_so_in_expired_answers(share, module_emulator, caplog):
    nfs = NfsSettings(root=str(share), host_id=HOST, poll_interval=0.005, heartbeat_interval=0.2,
                      require_mount=False, models_refresh_interval=1.0)
    worker = NfsWorker(nfs, GpuServerSettings(ollama_url=module_emulator.url, min_free_bytes=0),
                       wall=lambda: time.time() + 31)
    caplog.set_level(logging.INFO, logger="gpu_bridge.nfs_worker")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: spool.read_json(worker.paths.heartbeat), 10, what="heartbeat")
        cmd = spool.make_command(HOST, "ping", timeout=30)  # a producer with a correct clock
        spool.send_command(worker.paths, cmd)
        answer = answer_of(worker.paths, cmd["id"])
        assert answer["error"]["code"] == "command_expired"
        assert "this worker's clock is 31 s ahead of the share's" in answer["error"]["error"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("clock skew" in m and "ahead of the share's" in m for m in warnings), warnings
        assert sum("clock skew" in m for m in warnings) == 1, "warned once, not on every heartbeat"
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive() and worker.exit_code == 0


# --- issue 13: a command that waited past its deadline in the worker's pool ---------------------------------------
def test_issue13_backed_up_worker_answers_late_command_expired_not_executed(share, start_worker, emulator):
    w = start_worker(share, emulator.url)
    emulator_control(emulator, "config", {"latency_ms": 2500})  # every Ollama call now takes 2.5 s
    # "list" always asks Ollama (health may answer from its one-second probe cache): fills the 4 pool threads
    slow = [spool.make_command(HOST, "list", timeout=20) for _ in range(4)]
    # Claimed well inside its 1.2 s (the worker polls every 5 ms), started only when a thread frees up.
    late = spool.make_command(HOST, "delete", {"model": INSTALLED}, timeout=1.2)
    for cmd in [*slow, late]:
        spool.send_command(w.paths, cmd)
    answer = answer_of(w.paths, late["id"])
    assert answer["ok"] is False and answer["error"]["code"] == "command_expired"
    assert "could start it after waiting" in answer["error"]["error"] and "not executed" in answer["error"]["error"]
    assert all(answer_of(w.paths, c["id"])["ok"] for c in slow)
    assert late["id"] not in w.audit_counts("exec")
    emulator_control(emulator, "config", {"latency_ms": 0})
    assert INSTALLED in installed(share)


def test_row3_directory_planted_as_heartbeat_json_does_not_stop_the_worker(share, start_worker, module_emulator):
    paths = paths_of(share)
    os.mkdir(paths.heartbeat)
    with open(os.path.join(paths.heartbeat, "inside"), "w") as fh:
        fh.write("x")
    w = start_worker(share, module_emulator.url)  # ready = its heartbeat file is written
    assert any("status file" in r["reason"] for r in quarantined(paths).values())
    assert_still_serving(w)
