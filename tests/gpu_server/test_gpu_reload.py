"""A reload keeps running pulls and their jobs (issue 14, row 11), with real gunicorn and the emulator.

``systemctl reload gpu-http-server`` sends SIGHUP to the gunicorn master, which starts a new worker
process and stops the old one. With ``GPU_BRIDGE_JOB_STATE_FILE`` the new worker takes the job table
over and resumes the unfinished pull under the same id; Ollama (the emulator) either shares the
download still under way or resumes the partial bytes, so the model is downloaded once in total."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from gpu_server_helpers import AUTH, TOKEN
from support.procs import emulator_control, start_emulator, start_gunicorn, wait_until

pytestmark = pytest.mark.integration
APP = "gpu_bridge.gpu_server:create_app()"
MODEL = "phi3:mini"  # not installed in the emulator, no layer shared with an installed model
SPEED = 40e6  # bytes per second: the 229 MB model takes about 6 s


def worker_pids(master: int) -> set[int]:
    """gunicorn worker processes: the master's children."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                found.add(int(entry.name))
    return found


@pytest.fixture
def stack(tmp_path):
    emulator = start_emulator("--pull-speed", str(SPEED))
    state_file = tmp_path / "state" / "jobs.json"
    state_file.parent.mkdir()
    env = {"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": emulator.url,
           "GPU_BRIDGE_JOB_STATE_FILE": str(state_file), "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0",
           "GPU_BRIDGE_PULL_STALL_TIMEOUT": "20"}
    server = start_gunicorn(APP, env, probe="/api/health", name="gpu-server-reload")
    yield emulator, server, state_file
    server.stop()
    emulator.stop()


def test_hup_during_a_pull_keeps_the_job_and_downloads_the_model_once(stack):
    emulator, server, state_file = stack
    session = requests.Session()
    session.headers.update(AUTH)
    before = emulator_control(emulator, "stats")
    assert MODEL not in before["installed"]

    r = session.post(f"{server.url}/api/models/{MODEL}", timeout=10)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_until(lambda: session.get(f"{server.url}/api/jobs/{job_id}", timeout=5).json()["completed"] > 20e6,
               10, what="the pull under way")
    master = server.proc.pid
    old_workers = worker_pids(master)
    assert len(old_workers) == 1

    os.kill(master, signal.SIGHUP)  # what ExecReload=/bin/kill -HUP $MAINPID does
    polls, states, percents = 0, [], []
    deadline = time.monotonic() + 60
    job = None
    while time.monotonic() < deadline:
        got = session.get(f"{server.url}/api/jobs/{job_id}", timeout=10)
        polls += 1
        assert got.status_code == 200, f"poll {polls}: {got.status_code} {got.text}"  # the job never vanishes
        job = got.json()
        states.append(job["state"])
        percents.append(job["percent"])
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert job is not None and job["state"] == "succeeded", (job, server.output()[-3000:])
    assert job["id"] == job_id and job["model"] == MODEL

    new_workers = worker_pids(master)
    assert new_workers and not new_workers & old_workers, "the reload started a new worker process"
    assert "resuming pull job" in server.output()

    stats = emulator_control(emulator, "stats")
    total = job["total"]
    print(f"reload: {polls} polls, states {sorted(set(states))}, downloads_started "
          f"{stats['downloads_started']}, cancelled {stats['cancelled_downloads']}, completed "
          f"{stats['completed_downloads']}, downloaded {stats['downloaded_bytes']} of {total} bytes")
    # Downloaded once in total: every byte of the model's layers exactly once (a resumed download adds
    # only what the cancelled one had not fetched; a shared one is one download).
    assert total == 229_065_738
    assert stats["downloaded_bytes"] == total
    assert stats["completed_downloads"] == 1
    assert MODEL in stats["installed"]
    saved = {j["id"]: j for j in json.loads(state_file.read_text())["jobs"]}
    assert saved[job_id]["state"] == "succeeded"


def test_two_quick_reloads_and_a_new_pull_in_between(stack):
    """A second HUP while the first new worker is still taking over; a pull started between them."""
    emulator, server, _ = stack
    session = requests.Session()
    session.headers.update(AUTH)
    first = session.post(f"{server.url}/api/models/{MODEL}", timeout=10).json()["id"]
    os.kill(server.proc.pid, signal.SIGHUP)
    second = wait_until(lambda: session.post(f"{server.url}/api/models/smollm:135m", timeout=10).json().get("id"),
                        20, what="a pull accepted during the reload")
    time.sleep(0.5)
    os.kill(server.proc.pid, signal.SIGHUP)

    def finished(job_id):
        job = session.get(f"{server.url}/api/jobs/{job_id}", timeout=10).json()
        return job if job["state"] not in ("queued", "running") else None

    for job_id in (first, second):
        job = wait_until(lambda j=job_id: finished(j), 60, interval=0.2, what=f"job {job_id}")
        assert job["state"] == "succeeded", job
    stats = emulator_control(emulator, "stats")
    assert stats["completed_downloads"] == 2
    assert {MODEL, "smollm:135m"} <= set(stats["installed"])
    assert stats["downloaded_bytes"] == 229_065_738 + 91_728_321  # both models, each byte once


def test_the_unit_keeps_the_job_table_in_its_state_directory():
    """gpu-http-server.service.j2: the reload's state file lies in the unit's own StateDirectory= (the
    only place ProtectSystem=strict lets the service write), and ExecReload= is still a plain HUP."""
    unit = (Path(__file__).resolve().parents[2] / "roles" / "gpu_http_server" / "templates"
            / "gpu-http-server.service.j2").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in unit if "=" in line and not line.startswith(("#", "{")))
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    name, _, path = settings["Environment"].partition("=")
    assert name == "GPU_BRIDGE_JOB_STATE_FILE"
    assert Path(path).parent == Path("/var/lib") / settings["StateDirectory"]
