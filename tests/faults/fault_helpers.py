"""Processes and bookkeeping for the fault-injection tests (importable: pytest puts this directory on sys.path).

Everything listens on 127.0.0.1. Backends run with short timeouts and a quick circuit breaker so a
fault is detected, and recovered from, within seconds; every wait is a bounded ``wait_until``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests

from support.procs import QuickStopProcess, start_gunicorn, wait_until

GPU_TOKEN = "fault-gpu-token-4f1c2a9e0b7d"
GPU_APP = "gpu_bridge.gpu_server:create_app()"
BACKEND_APP = "gpu_bridge.backend:create_app()"

# Backend settings for fault tests: a dead host costs at most ~1 s per request before its breaker opens
# (2 failures), and the breaker lets a trial through after 1 s.
BACKEND_FAST = {
    "GPU_BRIDGE_CONNECT_TIMEOUT": "0.5",
    "GPU_BRIDGE_READ_TIMEOUT": "0.6",
    "GPU_BRIDGE_RETRIES": "1",
    "GPU_BRIDGE_BREAKER_THRESHOLD": "2",
    "GPU_BRIDGE_BREAKER_COOLDOWN": "1",
    "GPU_BRIDGE_CACHE_MAX_AGE": "0",
}


QuickStop = QuickStopProcess


def gunicorn(app: str, env: dict, *, probe: str, name: str, port: int | None = None, threads: int = 8) -> QuickStop:
    """gunicorn as deployed (one gthread worker process) on 127.0.0.1:<port>, stopped with SIGQUIT."""
    return start_gunicorn(app, env, probe=probe, name=name, port=port, threads=threads, process_class=QuickStop)


def start_gpu_server(ollama_url: str, *, port: int | None = None, **extra: str) -> QuickStop:
    env = {"GPU_BRIDGE_API_TOKEN": GPU_TOKEN, "GPU_BRIDGE_OLLAMA_URL": ollama_url,
           "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0", "GPU_BRIDGE_MIN_FREE_GB": "0",
           "GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT": "0.5", "GPU_BRIDGE_OLLAMA_READ_TIMEOUT": "5",
           **{k: str(v) for k, v in extra.items()}}
    return gunicorn(GPU_APP, env, probe="/api/health", name="gpu-server", port=port)


def start_backend(hosts: str, db_path, **extra: str) -> QuickStop:
    env = {"GPU_INSTANCE_HOSTS": hosts, "GPU_BRIDGE_API_TOKEN": GPU_TOKEN, "GPU_BRIDGE_TRANSPORT": "http",
           "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{db_path}", "GPU_BRIDGE_BACKEND_BIND": "127.0.0.1:8000",
           **BACKEND_FAST, **{k: str(v) for k, v in extra.items()}}
    return gunicorn(BACKEND_APP, env, probe="/api/openapi.json", name="backend")


# --- bookkeeping ------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What a fault scenario did and saw: printed in the terminal summary of the test run."""

    scenario: str
    sent: int = 0
    server_errors: int = 0  # 5xx answers
    transport_errors: int = 0  # no HTTP answer at all (the backend must always answer)
    stale: int = 0  # listings answered from the cache with stale: true
    statuses: dict[int, int] = field(default_factory=dict)
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, response: requests.Response | None) -> None:
        with self.lock:
            self.sent += 1
            if response is None:
                self.transport_errors += 1
                return
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                self.server_errors += 1
            if response.status_code == 200 and response.headers.get("Content-Type", "").startswith("application/json"):
                body = response.json()
                if isinstance(body, dict) and body.get("stale") is True:
                    self.stale += 1

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        codes = " ".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()))
        extra = f"  ({'; '.join(self.notes)})" if self.notes else ""
        return (f"{self.scenario:<34} sent {self.sent:>4}  5xx {self.server_errors:>2}  no-answer "
                f"{self.transport_errors:>2}  stale {self.stale:>3}  recovery {recovery:>8}  [{codes}]{extra}")


TALLIES: list[Tally] = []


def tally(scenario: str) -> Tally:
    t = Tally(scenario)
    TALLIES.append(t)
    return t


def get(session: requests.Session, url: str, t: Tally, timeout: float = 10.0) -> requests.Response | None:
    try:
        response = session.get(url, timeout=timeout)
    except requests.RequestException:
        response = None
    t.record(response)
    return response


def measure_recovery(check, timeout: float = 15.0, interval: float = 0.05) -> float:
    """Seconds until ``check()`` is truthy (bounded by ``timeout``)."""
    started = time.monotonic()
    wait_until(check, timeout, interval, what="recovery")
    return time.monotonic() - started


class ListingLoad:
    """``threads`` clients asking ``url`` in a loop (each at most ``max_each`` times) until stopped."""

    def __init__(self, url: str, t: Tally, *, threads: int = 4, max_each: int = 2000):
        self.url, self.t, self.max_each = url, t, max_each
        self.stop_event = threading.Event()
        self.answers: list[tuple[float, int | None, str | None]] = []  # (monotonic, status, source)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with requests.Session() as session:
            for _ in range(self.max_each):
                if self.stop_event.is_set():
                    return
                response = get(session, self.url, self.t)
                source = None
                if response is not None and response.status_code == 200:
                    source = response.json().get("source")
                with self._lock:
                    self.answers.append((time.monotonic(), None if response is None else response.status_code,
                                         source))

    def start(self) -> ListingLoad:
        for thread in self.threads:
            thread.start()
        return self

    def count(self, predicate=lambda answer: True) -> int:
        with self._lock:
            return sum(1 for a in self.answers if predicate(a))

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in self.threads), "load threads did not stop"
