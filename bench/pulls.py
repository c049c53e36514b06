"""Pull progress: how soon a progress line from Ollama reaches a polling client, and how long a stalled
pull takes to be reported.

A pass-through TCP proxy (tests/faults/faultproxy.py) sits between the GPU side (GPU server or NFS
worker) and the Ollama emulator and timestamps every chunk Ollama sends; the ``"completed"`` values
in the pull stream give the moment each progress value left Ollama. A client polls the job (or the
backend's pull status) every ``POLL_S`` and records when it first sees at least that value.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from bench.measure import HttpClient, percentile
from support.procs import emulator_control, wait_until

POLL_S = 0.005
_COMPLETED = re.compile(rb'"completed":(\d+)[,}]')


class ProgressTap:
    """``on_upstream_data`` for FaultProxy: (monotonic time, completed) of every progress line, in order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffer = b""
        self._events: list[tuple[float, int]] = []

    def __call__(self, chunk: bytes, at: float) -> None:
        with self._lock:
            data = self._buffer + chunk
            last_end = 0
            for m in _COMPLETED.finditer(data):
                self._events.append((at, int(m.group(1))))
                last_end = m.end()
            self._buffer = data[max(last_end, len(data) - 64):]  # a value split across chunks completes later

    def reset(self) -> None:
        with self._lock:
            self._buffer, self._events = b"", []

    def advances(self) -> list[tuple[float, int]]:
        """The first time each new, higher completed value was sent."""
        with self._lock:
            events = list(self._events)
        out, best = [], 0
        for at, value in events:
            if value > best:
                out.append((at, value))
                best = value
        return out


@dataclass
class PullPath:
    """One way a client follows a pull: how to start it, where to poll, how to read the answer."""

    name: str
    start: Callable[[str], str]  # model -> id to poll
    poll_url: Callable[[str], str]
    headers: dict
    completed: Callable[[dict], int]
    finished: Callable[[dict], bool]
    error_code: Callable[[dict], str | None]


def gpu_path(name: str, gpu_url: str, headers: dict) -> PullPath:
    def start(model: str) -> str:
        r = requests.post(f"{gpu_url}/api/models/{model}", headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()["id"]

    return PullPath(name, start, lambda job: f"{gpu_url}/api/jobs/{job}", headers, lambda d: d["completed"],
                lambda d: d["state"] not in ("queued", "running"), lambda d: d.get("error_code"))


def backend_path(name: str, backend_url: str) -> PullPath:
    def start(model: str) -> str:
        r = requests.post(f"{backend_url}/config/pull-model", json={"model": model}, timeout=15)
        r.raise_for_status()
        return r.json()["id"]

    def code(doc: dict) -> str | None:
        for result in doc.get("results", {}).values():
            job = result.get("job") or {}
            return job.get("error_code") or result.get("code")
        return None

    return PullPath(name, start, lambda pull: f"{backend_url}/config/pull-status/{pull}", {}, lambda d: d["completed"],
                lambda d: bool(d["done"]), code)


def _poll(path: PullPath, job: str, until: Callable[[dict], bool], max_s: float) -> list[tuple[float, dict]]:
    client = HttpClient(path.poll_url(job), path.headers, timeout=10)
    seen: list[tuple[float, dict]] = []
    end = time.monotonic() + max_s
    try:
        while time.monotonic() < end:
            if client():
                doc = json.loads(client.last_body)
                seen.append((time.monotonic(), doc))
                if until(doc):
                    break
            time.sleep(POLL_S)
    finally:
        client.close()
    return seen


def progress_delays(path: PullPath, tap: ProgressTap, emulator, model: str, size: int, speed: float,
                    max_s: float = 20.0) -> dict:
    """Pull ``model`` (one layer of ``size`` bytes at ``speed`` B/s); match what the client saw with Ollama's lines."""
    emulator_control(emulator, "config", {"add_remote": {model: [size]}, "pull_speed": speed})
    tap.reset()
    job = path.start(model)
    seen = _poll(path, job, path.finished, max_s)
    advances = tap.advances()
    delays = []
    for sent_at, value in advances:
        first = next((t for t, doc in seen if t >= sent_at and path.completed(doc) >= value), None)
        if first is not None:
            delays.append(first - sent_at)
    final = seen[-1][1] if seen else {}
    ms = [d * 1000 for d in delays]
    return {"lines": len(advances), "matched": len(delays), "polls": len(seen),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "max_ms": max(ms) if ms else float("nan"),
            "finished": bool(final) and path.finished(final), "error_code": path.error_code(final) if final else None}


def stall_detection(path: PullPath, tap: ProgressTap, emulator, model: str, configured_s: float) -> dict:
    """Stall a running pull (bytes stop, progress lines go on) and time how long until it is reported failed."""
    emulator_control(emulator, "config", {"add_remote": {model: [4_000_000_000]}, "pull_speed": 50e6, "stall": False})
    tap.reset()
    job = path.start(model)
    wait_until(lambda: any(v > 5_000_000 for _, v in tap.advances()), 10, 0.01, what="pull progress before the stall")
    emulator_control(emulator, "config", {"stall": [model]})
    try:
        seen = _poll(path, job, path.finished, configured_s + 15)
    finally:
        emulator_control(emulator, "config", {"stall": False})
    advances = tap.advances()
    if not seen or not path.finished(seen[-1][1]) or not advances:
        return {"configured_s": configured_s, "detected_s": float("nan"), "error_code": None}
    last_advance = advances[-1][0]
    reported = next(t for t, doc in seen if path.finished(doc))
    return {"configured_s": configured_s, "detected_s": reported - last_advance,
            "error_code": path.error_code(seen[-1][1])}
