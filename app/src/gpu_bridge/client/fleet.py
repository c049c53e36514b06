"""``GpuFleet``: every configured GPU host behind one object, one transport and one breaker each.

- listing asks every host in parallel and merges the answers: each model says which hosts have it
  (``hosts: [label, ...]``) and each host says whether it answered (``ok`` or ``error``/``code``);
- pull and delete go to every host (or a chosen subset, by name or label) in parallel and report per
  host; a host whose breaker is open answers ``gpu_circuit_open`` at once instead of costing a timeout;
- single-host operations prefer a healthy host (``call_any``).

Deadlines: a fan-out never waits longer than its deadline (``GPU_BRIDGE_FANOUT_DEADLINE`` for
listings and health; connect + read timeout + 1 s for starting pulls and deleting). A host that has
not answered by then is reported with ``reason: "timeout"`` and the answer goes out with what
arrived; its call goes on in the background and still informs its breaker. Read calls (listing,
health) are single-flight per host: while one is in flight, later fan-outs wait on the same call
instead of stacking threads on a hung host. All fan-outs share one bounded thread pool.

Every failed host carries a ``reason``: ``timeout``, ``unreachable``, ``unauthorized`` (a token
mismatch: fix the configuration; the breaker does not count it), ``circuit_open`` or ``error``.

Host labels (``name:port``) identify hosts everywhere; a selection may also use the bare name.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import names
from ..config import BackendSettings, GpuHost
from ..errors import (
    ConfigError,
    GpuBridgeError,
    GpuHostError,
    GpuHostTimeout,
    InvalidRequest,
    NoHealthyHost,
)
from . import make_transport
from .base import GpuTransport, JsonDict
from .breaker import CLOSED, HALF_OPEN, CircuitBreaker
from .fleet_answers import degraded_reason, error_summary, failure_reason, merge_models, summarize, utc_now_iso

TransportFactory = Callable[[GpuHost, BackendSettings], GpuTransport]


def _stamp(times: dict[str, float], label: str, _done: Future[Outcome]) -> None:
    times.setdefault(label, time.monotonic())


class FleetObserver(Protocol):
    """Who hears about the fleet (the backend's metrics): each breaker transition, and each host's
    outcome (``ok`` or a ``failure_reason``) and wait in each fan-out. Called on request threads and
    the pool's: both must be quick and must not call back into the fleet."""

    def breaker_changed(self, host: str, old: str, new: str, reason: str) -> None: ...

    def fanout_result(self, host: str, operation: str, outcome: str, seconds: float) -> None: ...

# One host's outcome in a fan-out: (True, what the method returned) or (False, the error it raised).
Outcome = tuple[bool, Any]


# Calls that only read: one in flight per host at a time (see the module docstring).
SINGLE_FLIGHT = frozenset({"list_models", "health", "loaded_models"})
MAX_POOL_THREADS = 64


@dataclass
class HostSlot:
    host: GpuHost
    transport: GpuTransport
    breaker: CircuitBreaker
    latency_ms: float | None = None
    last_ok_at: str | None = None
    extra: JsonDict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.host.label


class GpuFleet:
    def __init__(self, settings: BackendSettings, transport_factory: TransportFactory = make_transport,
                 *, clock: Callable[[], float] = time.monotonic, observer: FleetObserver | None = None):
        self.settings = settings
        self.observer = observer
        hosts = settings.client.hosts
        if not hosts:
            raise ConfigError("no GPU host configured: set GPU_INSTANCE_HOSTS (comma-separated host[:port]) "
                              "or GPU_INSTANCE_HOST")
        cs = settings.client
        self.slots: dict[str, HostSlot] = {}
        for host in hosts:
            transport = transport_factory(host, settings)
            self.slots[host.label] = HostSlot(
                host=host, transport=transport,
                breaker=CircuitBreaker(host.label, cs.breaker_threshold, cs.breaker_cooldown, clock=clock,
                                       probe=transport.probe,
                                       on_transition=observer.breaker_changed if observer else None))
        self.transport_kind = next(iter(self.slots.values())).transport.kind
        self.fanout_deadline = cs.fanout_deadline
        self.change_deadline = cs.connect_timeout + cs.read_timeout + 1.0
        # One pool for every fan-out: enough threads for two calls per host in flight at once.
        self._pool = ThreadPoolExecutor(max_workers=min(MAX_POOL_THREADS, max(4, 2 * len(hosts))),
                                        thread_name_prefix="gpu-fleet")
        self._inflight: dict[tuple[str, str, tuple[object, ...]], Future[Outcome]] = {}
        self._started: dict[Future[Outcome], float] = {}  # when each single-flight call began
        self._inflight_lock = threading.Lock()

    # --- hosts ---------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.slots)

    def select(self, hosts: Iterable[str] | None) -> list[str]:
        """Labels for a selection of names or labels; None or empty → every host."""
        if not hosts:
            return self.labels
        chosen: list[str] = []
        for wanted in hosts:
            if not isinstance(wanted, str) or not wanted.strip():
                raise InvalidRequest("'hosts' must be a list of GPU host names or labels (name:port)")
            wanted = wanted.strip()
            matches = [lbl for lbl, s in self.slots.items() if wanted in (lbl, s.host.name)]
            if not matches:
                raise InvalidRequest(f"unknown GPU host {wanted!r}: known hosts are {', '.join(self.labels)} "
                                     "(GPU_INSTANCE_HOSTS)")
            chosen.extend(m for m in matches if m not in chosen)
        return chosen

    def preferred(self) -> list[str]:
        """Hosts best first: closed breakers by latency, then half-open, then open."""
        rank = {CLOSED: 0, HALF_OPEN: 1}

        def key(label: str) -> tuple[int, float]:
            slot = self.slots[label]
            return (rank.get(slot.breaker.state, 2), slot.latency_ms if slot.latency_ms is not None else 1e9)

        return sorted(self.slots, key=key)

    # --- calls -----------------------------------------------------------------------------------
    def call(self, label: str, method: str, *args: object) -> Any:
        """One transport method on one host, through its breaker (by name: any ``GpuTransport`` method)."""
        slot = self.slots.get(label)
        if slot is None:
            raise InvalidRequest(f"unknown GPU host {label!r}: known hosts are {', '.join(self.labels)}")
        started = time.monotonic()
        result = slot.breaker.call(getattr(slot.transport, method), *args)
        slot.latency_ms = round((time.monotonic() - started) * 1000, 1)
        slot.last_ok_at = utc_now_iso()
        return result

    def call_any(self, method: str, *args: object) -> tuple[str, object]:
        """Run on the best host; on a host failure try the next. Returns (label, result)."""
        errors: list[str] = []
        for label in self.preferred():
            try:
                return label, self.call(label, method, *args)
            except GpuHostError as exc:
                errors.append(exc.message)
        raise NoHealthyHost("no GPU host could serve the request: " + "; ".join(errors))

    def _submit(self, label: str, method: str, args: tuple[object, ...]) -> Future[Outcome]:
        """The call as a future on the shared pool; a read call joins one already in flight."""
        def one() -> Outcome:
            try:
                return True, self.call(label, method, *args)
            except GpuBridgeError as exc:
                return False, exc

        if method not in SINGLE_FLIGHT:
            # Each task gets a copy of the caller's context (the request id travels with it).
            return self._pool.submit(contextvars.copy_context().run, one)
        key = (label, method, args)
        with self._inflight_lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = self._pool.submit(contextvars.copy_context().run, one)
            self._inflight[key] = fut
            self._started[fut] = time.monotonic()

        def forget(done: Future[Outcome]) -> None:
            with self._inflight_lock:
                if self._inflight.get(key) is done:
                    del self._inflight[key]
                self._started.pop(done, None)

        fut.add_done_callback(forget)
        return fut

    def fan_out(self, labels: list[str], method: str, *args: object,
                deadline: float | None = None) -> dict[str, Outcome]:
        """``method(*args)`` on each host in parallel: {label: (True, result) | (False, GpuBridgeError)}.

        With a ``deadline`` (seconds), hosts that have not answered by then get ``GpuHostTimeout``. A
        read call that joined one already in flight for a whole deadline is not waited for at all: that
        host is known to be late, and the answer goes out at once (from the cache, for a listing)."""
        futures = {lbl: self._submit(lbl, method, args) for lbl in labels}
        now = time.monotonic()
        done_at: dict[str, float] = {}  # when each host's answer arrived (for the observer)
        if self.observer is not None:
            for lbl, fut in futures.items():
                fut.add_done_callback(functools.partial(_stamp, done_at, lbl))
        with self._inflight_lock:
            known_late = {f for f in futures.values()
                          if deadline is not None and now - self._started.get(f, now) >= deadline}
        wait([f for f in futures.values() if f not in known_late], timeout=deadline)
        out: dict[str, Outcome] = {}
        for lbl, fut in futures.items():
            if fut.done():
                out[lbl] = fut.result()
            else:
                out[lbl] = (False, GpuHostTimeout(
                    f"{lbl} did not answer within the {deadline:g} s deadline of this request "
                    f"({'GPU_BRIDGE_FANOUT_DEADLINE' if deadline == self.fanout_deadline else 'connect + read timeout'}"
                    "); its call goes on in the background", host=lbl))
        if self.observer is not None:
            end = time.monotonic()
            for lbl, (ok, value) in out.items():
                self.observer.fanout_result(lbl, method, "ok" if ok else failure_reason(value),
                                            done_at.get(lbl, end) - now)
        return out

    # --- operations ------------------------------------------------------------------------------
    def list_models(self, hosts: Iterable[str] | None = None) -> JsonDict:
        """``{"models": merged, "hosts": {label: status}, "per_host": {label: [model, ...]}}``
        (``per_host`` only for hosts that answered)."""
        labels = self.select(hosts)
        answers = self.fan_out(labels, "list_models", deadline=self.fanout_deadline)
        per_host: dict[str, list[JsonDict]] = {}
        statuses: dict[str, JsonDict] = {}
        for label, (ok, value) in answers.items():
            if ok:
                per_host[label] = list(value)
                statuses[label] = {"ok": True, "models": len(value), "latency_ms": self.slots[label].latency_ms}
            else:
                statuses[label] = error_summary(value)
        return {"models": merge_models(per_host), "hosts": statuses, "per_host": per_host}

    def pull(self, model: str, hosts: Iterable[str] | None = None, *, wait: bool = False) -> dict[str, JsonDict]:
        """Start (or, with wait, run) a pull on each selected host: {label: {"ok", "job"} | failure}."""
        name = names.parse(model).display
        labels = self.select(hosts)
        # Waiting is bounded by the pull's own limits (GPU_BRIDGE_PULL_TIMEOUT without progress,
        # GPU_BRIDGE_PULL_DEADLINE in all), starting by connect + read timeout.
        answers = self.fan_out(labels, "pull_and_wait" if wait else "start_pull", name,
                               deadline=None if wait else self.change_deadline)
        return {lbl: ({"ok": True, "job": value} if ok else error_summary(value)) for lbl, (ok, value) in
                answers.items()}

    def delete(self, model: str, hosts: Iterable[str] | None = None) -> dict[str, JsonDict]:
        name = names.parse(model).display
        labels = self.select(hosts)
        answers = self.fan_out(labels, "delete_model", name, deadline=self.change_deadline)
        return {lbl: ({"ok": True, **(value or {})} if ok else error_summary(value)) for lbl, (ok, value) in
                answers.items()}

    def get_job(self, label: str, job_id: str) -> JsonDict:
        job: JsonDict = self.call(label, "get_job", job_id)
        return job

    def cancel_job(self, label: str, job_id: str) -> JsonDict:
        job: JsonDict = self.call(label, "cancel_job", job_id)
        return job

    def jobs(self, wanted: dict[str, str]) -> dict[str, Outcome]:
        """Several (host → job id) look-ups in parallel."""
        def one(label: str) -> Outcome:
            try:
                return True, self.get_job(label, wanted[label])
            except GpuBridgeError as exc:
                return False, exc

        labels = [lbl for lbl in wanted if lbl in self.slots]
        if not labels:
            return {}
        futures = {lbl: self._pool.submit(contextvars.copy_context().run, one, lbl) for lbl in labels}
        wait(list(futures.values()), timeout=self.change_deadline)
        return {lbl: fut.result() if fut.done() else (False, GpuHostTimeout(
            f"{lbl} did not answer within {self.change_deadline:g} s (connect + read timeout)", host=lbl))
            for lbl, fut in futures.items()}

    def health(self) -> dict[str, JsonDict]:
        """Each host's state: probes ``health()`` through the breaker (an open breaker costs nothing)."""
        answers = self.fan_out(self.labels, "health", deadline=self.fanout_deadline)
        out: dict[str, JsonDict] = {}
        for label, (ok, value) in answers.items():
            slot = self.slots[label]
            entry: JsonDict = {"ok": ok, "breaker": slot.breaker.snapshot(), "latency_ms": slot.latency_ms,
                     "last_ok_at": slot.last_ok_at}
            if ok:
                doc = value if isinstance(value, dict) else {}
                entry["status"] = doc.get("status")
                ollama = doc.get("ollama") or {}
                entry["ollama_reachable"] = ollama.get("reachable")
                if doc.get("status") not in (None, "ok"):
                    entry["reason"] = degraded_reason(doc)
                # A host without a usable GPU still serves model operations: only Ollama decides "ok".
                entry["ok"] = ollama.get("reachable") is not False
                if not entry["ok"]:
                    entry["error"] = f"{label}: Ollama is not reachable" + (
                        f" ({ollama['error']})" if ollama.get("error") else "") + \
                        f": check ollama.service on {slot.host.name}"
                    entry["code"] = "ollama_unavailable"
            else:
                entry["error"], entry["code"] = value.message, value.code
                entry["reason"] = failure_reason(value)
            out[label] = entry
        return out

    def status(self) -> dict[str, JsonDict]:
        """Breaker and latency per host, without any network call."""
        return {lbl: {"breaker": s.breaker.snapshot(), "latency_ms": s.latency_ms, "last_ok_at": s.last_ok_at}
                for lbl, s in self.slots.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots.values():
            try:
                slot.transport.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass


__all__ = ["FleetObserver", "GpuFleet", "HostSlot", "error_summary", "merge_models", "summarize", "utc_now_iso"]
