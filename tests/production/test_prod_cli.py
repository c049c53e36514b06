"""CLI pieces without real servers: progress rendering (TTY and not), target detection, error lines."""

from __future__ import annotations

import io
import re

import pytest
from flask import Flask, jsonify
from prod_helpers import StandIn

from gpu_bridge import cli
from gpu_bridge.cli import output, target
from gpu_bridge.cli.output import Progress, human_bytes, human_duration
from gpu_bridge.cli.target import detect
from gpu_bridge.errors import GpuBridgeError
from support.procs import free_port


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_non_tty_progress_prints_a_line_per_ten_percent_or_status_change():
    out, clock = io.StringIO(), Clock()
    p = Progress("pulling tinyllama:latest", out, tty=False, clock=clock)
    total = 1_000_000_000
    p.update(0, 0, "pulling manifest")
    for i in range(0, 101):
        clock.now += 0.5
        p.update(total * i // 100, total, "pulling 2af3b81862c6")
    p.update(total, total, "verifying sha256 digest")
    p.update(total, total, "success")
    p.finish("pulled tinyllama:latest")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "pulling tinyllama:latest: pulling manifest"
    percents = [int(m.group(1)) for line in lines if (m := re.search(r": (\d+)% ", line))]
    assert percents[:2] == [0, 10] and 100 in percents
    assert len(lines) <= 16, lines
    assert any("MB/s" in line for line in lines)
    assert lines[-2].endswith("success") and lines[-1] == "pulled tinyllama:latest"


def test_tty_progress_redraws_one_line_with_bytes_percent_speed_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress("pulling x", out, tty=True, clock=clock)
    p.update(0, 200_000_000, "pulling manifest")
    clock.now = 1.0
    p.update(50_000_000, 200_000_000, "pulling abc")
    clock.now = 2.0
    p.update(100_000_000, 200_000_000, "pulling abc")
    p.finish()
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 3 and text.endswith("\n") and text.count("\n") == 1
    last = frames[-1]
    assert "[##########----------]" in last and " 50.0%" in last
    assert "100.0 MB/200.0 MB" in last and "50.0 MB/s" in last and "ETA 0:02" in last


def test_formatting_helpers():
    assert human_bytes(None) == "?"
    assert human_bytes(999) == "999 B"
    assert human_bytes(4_683_075_271) == "4.7 GB"
    assert human_duration(None) == "--:--"
    assert human_duration(75) == "1:15"
    assert human_duration(3725) == "1:02:05"


def _standin(routes: dict):
    app = Flask("x")
    for path, body in routes.items():
        app.add_url_rule(path, path, (lambda b=body: jsonify(b)))
    return StandIn(app)


def test_detect_tells_gpu_server_from_backend():
    gpu = _standin({"/api/health": {"status": "ok", "ollama": {"reachable": True}}})
    backend = _standin({"/api/openapi.json": {"openapi": "3.0.3", "info": {"title": "gpu-bridge backend"}}})
    other = _standin({"/": {"hello": 1}})
    try:
        assert detect(gpu.url, 5) == "gpu"
        assert detect(backend.url, 5) == "backend"
        with pytest.raises(GpuBridgeError, match="neither a gpu-bridge backend nor a GPU server"):
            detect(other.url, 5)
    finally:
        for s in (gpu, backend, other):
            s.stop()


def test_refused_backend_is_one_line_that_says_what_to_fix(capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("GPU_BRIDGE_URL", url)
    assert cli.main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert err == (f"gpu-bridge: error: cannot reach the backend at {url} (connection refused): is "
                   "gpu-bridge-backend.service running? (set --url or GPU_BRIDGE_URL)\n")


def test_refused_gpu_port_names_the_gpu_service():
    err = target._unreachable("http://gpu-01:8001", "connection refused")
    assert "cannot reach the GPU server at http://gpu-01:8001" in err.message
    assert "gpu-http-server.service" in err.message


def test_bad_url_and_cancel_without_id(capsys):
    assert cli.main(["health", "--url", "ftp://x"]) == 1
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert cli.main(["jobs", "--cancel"]) == 2
    assert "needs a job id" in capsys.readouterr().err


def test_default_url(monkeypatch):
    monkeypatch.delenv("GPU_BRIDGE_URL", raising=False)
    assert target.target_url(type("A", (), {"url": None})()) == "http://127.0.0.1:8000"


def test_progress_over_several_hosts_says_so_on_both_renderings():
    out, clock = io.StringIO(), Clock()
    p = Progress("pulling tinyllama:latest", out, tty=False, clock=clock, hosts=2)
    p.update(63_769_945, 127_539_890, "pulling 68c6d4110620")
    assert out.getvalue() == "pulling tinyllama:latest: 50% (63.8 MB of 127.5 MB across 2 hosts) pulling 68c6d4110620\n"
    out = io.StringIO()
    p = Progress("pulling x", out, tty=True, clock=clock, hosts=3)
    p.update(1_000_000, 3_000_000, "pulling abc")
    assert "1.0 MB/3.0 MB across 3 hosts" in out.getvalue()
    out = io.StringIO()
    Progress("pulling x", out, tty=False, clock=clock).update(1_000_000, 3_000_000)
    assert "across" not in out.getvalue()


def test_a_host_label_is_said_once():
    assert output.once("pulling x failed on every GPU host: gpu-01:8001: gpu-01:8001: model 'x' is not "
                       "installed") == "pulling x failed on every GPU host: gpu-01:8001: model 'x' is not installed"
    assert output.once("gpu-01:8001: gpu-01:8001 refused the connection") == "gpu-01:8001 refused the connection"
    assert output.once("gpu-01:8001: gpu-01:80011 x") == "gpu-01:8001: gpu-01:80011 x"  # different hosts
    assert output.host_message("gpu-01:8001", "gpu-01:8001 refused") == "gpu-01:8001 refused"
    assert output.host_message("gpu-01:8001", "model gone") == "gpu-01:8001: model gone"


def test_health_table_rows_follow_the_json(capsys):
    doc = {"status": "degraded", "version": "0.1.0", "transport": "http",
           "db": {"ok": True, "dialect": "sqlite", "schema_version": 2},
           "gpu_hosts": {
               "gpu-01:8001": {"ok": True, "status": "ok", "latency_ms": 3.0, "breaker": {"state": "closed"}},
               "gpu-02:8001": {"ok": True, "status": "degraded", "latency_ms": 4.0, "breaker": {"state": "closed"},
                               "reason": "no GPU visible (NVML found no GPU)"},
               "gpu-03:8001": {"ok": False, "latency_ms": None, "code": "gpu_circuit_open",
                               "breaker": {"state": "open", "retry_in_s": 12.5},
                               "error": "gpu-03:8001: gpu-03:8001 refused the connection"}}}
    backend = _standin({"/health": doc,
                        "/api/openapi.json": {"openapi": "3.0.3", "info": {"title": "gpu-bridge backend"}}})
    try:
        assert cli.main(["health", "--url", backend.url]) == 1
    finally:
        backend.stop()
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["gpu-01:8001"][0] == "ok"
    assert rows["gpu-02:8001"][0] == "degraded"
    assert rows["gpu-02:8001"][1].endswith("no GPU visible (NVML found no GPU)")
    assert rows["gpu-03:8001"][0] == "FAILING"
    assert "breaker open (trial in 12.5 s)" in rows["gpu-03:8001"][1]
    assert rows["gpu-03:8001"][1].endswith("gpu-03:8001 refused the connection")
    assert rows["gpu-03:8001"][1].count("gpu-03:8001") == 1


def test_a_pull_answered_without_a_job_id_is_one_line(capsys):
    """A server that answers the pull but gives no job id to follow: say so, and which URL to check."""
    app = Flask("no-job-id")
    app.add_url_rule("/api/health", "health", lambda: jsonify({"status": "ok", "ollama": {"reachable": True}}))
    app.add_url_rule("/api/models/<path:name>", "pull", lambda name: jsonify({"state": "queued"}), methods=["POST"])
    gpu = StandIn(app)
    try:
        assert cli.main(["models", "pull", "tinyllama", "--url", gpu.url]) == 1
    finally:
        gpu.stop()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("gpu-bridge: error: 127.0.0.1:") and "answered no job id" in err and gpu.url in err
