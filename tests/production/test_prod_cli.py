"""CLI pieces without real servers: progress rendering (TTY and not), target detection, error lines."""

from __future__ import annotations

import io
import re

import pytest
from flask import Flask, jsonify
from prod_helpers import StandIn

from gpu_bridge import cli, cli_ops
from gpu_bridge.cli_ops import Progress, detect, human_bytes, human_duration
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
    err = cli_ops._unreachable("http://gpu-01:8001", "connection refused")
    assert "cannot reach the GPU server at http://gpu-01:8001" in err.message
    assert "gpu-http-server.service" in err.message


def test_bad_url_and_cancel_without_id(capsys):
    assert cli.main(["health", "--url", "ftp://x"]) == 1
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert cli.main(["jobs", "--cancel"]) == 2
    assert "needs a job id" in capsys.readouterr().err


def test_default_url(monkeypatch):
    monkeypatch.delenv("GPU_BRIDGE_URL", raising=False)
    assert cli_ops.target_url(type("A", (), {"url": None})()) == "http://127.0.0.1:8000"
