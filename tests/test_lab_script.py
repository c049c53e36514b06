"""`scripts/lab down` against a stand-in `docker` (no containers are touched): the lab's logs stay
unless `--purge` is given, and a bad argument is a one-line error."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Answers what `scripts/lab down` asks; records every call. DOCKER_UP=0 makes `docker info` fail.
FAKE_DOCKER = """#!/bin/sh
echo "$*" >> "$DOCKER_CALLS"
case "$1" in
info) [ "${DOCKER_UP:-1}" = 1 ] ;;
ps) echo c0ffee ;;
*) exit 0 ;;
esac
"""


@pytest.fixture
def lab(tmp_path):
    """A copy of scripts/lab in a scratch tree (its .lab/ is the scratch one) and a fake docker on PATH."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "lab", tmp_path / "scripts" / "lab")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    docker = bindir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    log = tmp_path / ".lab" / "ansible.log"
    log.parent.mkdir()
    log.write_text("PLAY [all] ...\n")
    calls = tmp_path / "docker-calls"

    def run(*args: str, docker_up: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DOCKER_CALLS": str(calls),
               "DOCKER_UP": "1" if docker_up else "0"}
        return subprocess.run(["bash", str(tmp_path / "scripts" / "lab"), *args], capture_output=True, text=True,
                              env=env, timeout=30, check=False)

    run.log, run.calls = log, calls
    return run


def test_down_removes_the_hosts_and_keeps_the_logs(lab):
    r = lab("down")
    assert r.returncode == 0, r.stderr
    assert lab.log.read_text() == "PLAY [all] ...\n"
    assert "kept the logs in .lab/ (scripts/lab down --purge removes them)" in r.stderr
    calls = lab.calls.read_text().splitlines()
    assert "rm -f c0ffee" in calls
    assert "network rm gpu-bridge-lab" in calls and "volume rm gpu-bridge-lab-share" in calls


def test_down_purge_removes_the_logs_too(lab):
    r = lab("down", "--purge")
    assert r.returncode == 0, r.stderr
    assert not lab.log.parent.exists()
    assert "removed the logs in .lab/" in r.stderr
    assert "rm -f c0ffee" in lab.calls.read_text().splitlines()


def test_down_without_docker_keeps_the_logs_unless_purged(lab):
    r = lab("down", docker_up=False)
    assert r.returncode == 0 and lab.log.exists()
    assert "Docker is not running" in r.stderr
    r = lab("down", "--purge", docker_up=False)
    assert r.returncode == 0 and not lab.log.parent.exists()


def test_down_refuses_an_unknown_argument(lab):
    r = lab("down", "--all")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "down takes only --purge" in r.stderr
    assert lab.log.exists() and not lab.calls.exists()
