"""job_state.py + jobs.py: the job table on disk, taken over by the next process (a reload's new worker).

Two JobManagers on one state file stand for the old and the new gunicorn worker process."""

from __future__ import annotations

import json
import time

import pytest
from test_jobs import FakeAdapter

from gpu_bridge.job_state import JobStateFile
from gpu_bridge.jobs import JobManager
from support.procs import wait_until

LAYER = {"status": "pulling abc", "digest": "sha256:abc", "total": 1000}


def manager(adapter, path, **kwargs) -> JobManager:
    return JobManager(adapter, stall_timeout=30, state=JobStateFile(str(path), progress_interval=0), **kwargs)


def records(path) -> dict[str, dict]:
    return {j["id"]: j for j in json.loads(path.read_text())["jobs"]}


@pytest.fixture
def state_path(tmp_path):
    return tmp_path / "jobs.json"


def test_a_new_process_resumes_running_pulls_under_the_same_id(state_path):
    old_adapter = FakeAdapter()
    old = manager(old_adapter, state_path)
    job, _ = old.submit("llama3.2")
    old_adapter.feeds["llama3.2:latest"].push({**LAYER, "completed": 400})
    wait_until(lambda: records(state_path)[job.id]["layers"], 5, what="progress on disk")
    assert records(state_path)[job.id]["state"] == "running"

    new_adapter = FakeAdapter()
    new = manager(new_adapter, state_path)  # the reload's new worker: claims the file at start
    resumed = new.get(job.id)
    assert resumed.model == "llama3.2:latest" and resumed.state in ("queued", "running")
    assert resumed.completed == 400  # shown at once, before Ollama reports again
    wait_until(lambda: new_adapter.calls == ["llama3.2:latest"], 5, what="the resumed pull")
    assert new.find_active("llama3.2") is resumed  # a new pull of it joins, no second download
    assert new.submit("llama3.2:latest") == (resumed, True)

    # The old process, superseded, writes no more: its view cannot overwrite the new table.
    old_adapter.feeds["llama3.2:latest"].push({**LAYER, "completed": 900})
    old.cancel(job.id)
    assert old._state.superseded
    assert records(state_path)[job.id]["state"] in ("queued", "running")

    new_adapter.feeds["llama3.2:latest"].push({**LAYER, "completed": 1000})
    new_adapter.feeds["llama3.2:latest"].succeed()
    assert new.wait(job.id, 5).state == "succeeded"
    assert records(state_path)[job.id]["state"] == "succeeded"
    assert records(state_path)[job.id]["created_at"] == pytest.approx(job.created_at)
    old.shutdown()
    new.shutdown()


def test_shutdown_keeps_pulls_for_the_next_process_but_a_cancel_is_final(state_path):
    first = manager(FakeAdapter(), state_path)
    kept, _ = first.submit("llama3.2")
    cancelled, _ = first.submit("qwen2.5:0.5b")
    first.cancel(cancelled.id)
    first.shutdown()  # a stopping worker process: not the user's cancel
    on_disk = records(state_path)
    assert on_disk[kept.id]["state"] in ("queued", "running")
    assert on_disk[cancelled.id]["state"] == "cancelled"

    adapter = FakeAdapter()
    second = manager(adapter, state_path)
    assert second.get(cancelled.id).state == "cancelled"  # finished jobs stay visible
    wait_until(lambda: adapter.calls == ["llama3.2:latest"], 5, what="only the unfinished pull resumes")
    second.shutdown()


def test_queued_jobs_resume_in_order_within_the_concurrency_limit(state_path):
    first = manager(FakeAdapter(), state_path, max_concurrent=1)
    ids = [first.submit(m)[0].id for m in ("llama3.2", "qwen2.5:0.5b", "tinyllama")]
    first.shutdown()
    adapter = FakeAdapter()
    second = manager(adapter, state_path, max_concurrent=1)
    wait_until(lambda: [second.get(i).state for i in ids] == ["running", "queued", "queued"], 5,
               what="one running, two queued")
    adapter.feeds["llama3.2:latest"].succeed()
    wait_until(lambda: adapter.calls == ["llama3.2:latest", "qwen2.5:0.5b"], 5, what="the next queued pull")
    second.shutdown()


def test_resumed_pulls_obey_the_registry_allow_list_and_bad_records_are_skipped(state_path):
    now = time.time()
    good_id, evil_id, old_id = "a" * 32, "b" * 32, "c" * 32
    state_path.write_text(json.dumps({"version": 1, "owner": "someone", "jobs": [
        {"id": good_id, "model": "llama3.2:latest", "state": "running", "created_at": now},
        {"id": evil_id, "model": "evil.example.com/x/y:latest", "state": "running", "created_at": now},
        {"id": old_id, "model": "tinyllama:latest", "state": "succeeded", "created_at": now - 9000,
         "finished_at": now - 8000},
        {"id": "../../etc", "model": "x", "state": "running"},
        {"id": "d" * 32, "model": ["nested"], "state": "running"},
        {"id": "e" * 32, "model": "phi3:mini", "state": "exploded"},
        "not a record",
    ]}))
    adapter = FakeAdapter()
    mgr = manager(adapter, state_path, allowed_registries=("registry.ollama.ai",))
    assert mgr.get(good_id).state in ("queued", "running")
    evil = mgr.get(evil_id)
    assert evil.state == "failed" and evil.error_code == "registry_not_allowed"
    assert {j.id for j in mgr.list()} == {good_id, evil_id}  # the expired and malformed ones are gone
    wait_until(lambda: adapter.calls == ["llama3.2:latest"], 5, what="only the allowed pull")
    mgr.shutdown()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "jobs": []}), "[" * 100_000])
def test_an_unreadable_state_file_starts_empty(state_path, content):
    state_path.write_text(content)
    mgr = manager(FakeAdapter(), state_path)
    assert mgr.list() == []
    job, _ = mgr.submit("llama3.2")
    assert job.id in records(state_path)  # and the file works again
    mgr.shutdown()


def test_a_missing_state_directory_does_not_stop_the_server(tmp_path):
    mgr = manager(FakeAdapter(), tmp_path / "absent" / "jobs.json")
    job, _ = mgr.submit("llama3.2")  # persistence off, with a warning; pulls still work
    assert mgr.get(job.id) is job
    mgr.shutdown()
