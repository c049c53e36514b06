"""The backend's Prometheus metrics, in a registry of its own (several apps in one test process never collide).

What the backend alone knows: its circuit breakers, how each GPU host answered its fan-outs, the
model cache, the stale answers it served, its pulls and its database errors, and its own requests.

Two ways in, both cheap:

- counters and histograms the code bumps where things happen (one increment, never a loop): the
  request hook (``observe_request``, installed through ``web.RequestLog``), the fleet's observer
  (``breaker_changed``, ``fanout_result``: ``client.fleet.FleetObserver``), ``stale_answer`` from the
  listing route, and every database error through SQLAlchemy's ``handle_error`` event;
- gauges read at scrape time by ``BackendCollector`` (``watch``): breaker states from the fleet's
  memory, cache ages and pulls by state from the database (two small queries), NFS heartbeat ages.

Other modules add their own collectors to ``registry`` (the drift gauge, backend/drift.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import SQLAlchemyError

from ..client.breaker import CLOSED, HALF_OPEN, OPEN
from ..client.fleet import GpuFleet
from ..spool import Liveness
from .db import Database, as_utc
from .schema import host_listing, pulls

log = logging.getLogger("gpu_bridge.backend")

# Requests: the GPU server's buckets, so both services' latencies read alike on one dashboard.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0)
# Fan-outs: a listing waits at most GPU_BRIDGE_FANOUT_DEADLINE (2.5 s by default); a waited pull minutes.
_FANOUT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# A breaker's state as a number, so that "max" over hosts and "> 0" in alerts mean "worse than closed".
BREAKER_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


class BackendMetrics:
    """The backend's registry and the instruments the code bumps. Built by the app factory and kept
    on ``BackendState.metrics``; ``watch`` adds the scrape-time gauges once the fleet and database exist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The same names and labels as the GPU server's: one query covers both services (by job).
        # ``route`` is the Flask endpoint name (config.list_models), never the raw path.
        self.requests = Counter("gpu_bridge_http_requests_total", "HTTP requests by route (endpoint) and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("gpu_bridge_http_request_duration_seconds", "HTTP request duration by route",
                                 ["method", "route"], buckets=_REQUEST_BUCKETS, registry=self.registry)
        self.breaker_transitions = Counter(
            "gpu_bridge_breaker_transitions_total", "Circuit breaker transitions per GPU host",
            ["host", "from", "to"], registry=self.registry)
        self.fanout_latency = Histogram(
            "gpu_bridge_fanout_duration_seconds", "How long a fan-out waited for each GPU host, by operation",
            ["host", "operation"], buckets=_FANOUT_BUCKETS, registry=self.registry)
        self.fanout_results = Counter(
            "gpu_bridge_fanout_results_total",
            "Each GPU host's outcome in fan-outs: ok, timeout, unreachable, unauthorized, circuit_open, error",
            ["host", "operation", "outcome"], registry=self.registry)
        self.stale_answers = Counter(
            "gpu_bridge_stale_answers_total",
            "Model listings answered with stale: true (some host's models came from the cache)",
            registry=self.registry)
        self.database_errors = Counter(
            "gpu_bridge_database_errors_total", "Errors raised by the database driver (any statement, any route)",
            registry=self.registry)

    # --- what the code calls -------------------------------------------------------------------
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """``web.RequestLog.observe``: ``route`` is the endpoint name (``web.RequestLog.by_endpoint``)."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def breaker_changed(self, host: str, old: str, new: str, reason: str) -> None:
        """``client.fleet.FleetObserver``: a breaker moved (the breaker logs it with the reason)."""
        del reason  # logged by the breaker; a label from free text would grow without bound
        self.breaker_transitions.labels(host, old, new).inc()

    def fanout_result(self, host: str, operation: str, outcome: str, seconds: float) -> None:
        """``client.fleet.FleetObserver``: one host's part in one fan-out."""
        self.fanout_results.labels(host, operation, outcome).inc()
        self.fanout_latency.labels(host, operation).observe(seconds)

    def stale_answer(self) -> None:
        self.stale_answers.inc()

    # --- scrape time ---------------------------------------------------------------------------
    def watch(self, fleet: GpuFleet, db: Database) -> None:
        """The gauges read at scrape time, and the database's error count."""
        sa.event.listen(db.engine, "handle_error", self._database_error)
        self.registry.register(BackendCollector(fleet, db))
        # Every known series exists from the start at 0: rate() and increase() see the first event.
        for label in fleet.labels:
            for old, new in ((CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)):
                self.breaker_transitions.labels(label, old, new)

    def _database_error(self, context: ExceptionContext) -> None:
        self.database_errors.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class BackendCollector:
    """Gauges computed at scrape time. A figure that cannot be read now (the database is down) is
    left out of this scrape rather than exported as a made-up value; the error is counted."""

    def __init__(self, fleet: GpuFleet, db: Database) -> None:
        self.fleet = fleet
        self.db = db

    def describe(self) -> list[Metric]:
        return []  # the series depend on what the database and the fleet hold at scrape time

    def collect(self) -> Iterator[Metric]:
        yield self._breakers()
        yield from self._heartbeats()
        try:
            with self.db.engine.connect() as conn:
                listed = conn.execute(sa.select(host_listing.c.host, host_listing.c.fetched_at)).all()
                counts = conn.execute(sa.select(pulls.c.state, sa.func.count()).group_by(pulls.c.state)).all()
        except SQLAlchemyError as exc:
            log.warning("metrics: the database could not be read at scrape time: %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        now = datetime.now(UTC)
        ages = GaugeMetricFamily("gpu_bridge_model_cache_age_seconds",
                                 "Seconds since the cached model list of each GPU host was last refreshed",
                                 labels=["host"])
        for host, fetched_at in listed:
            if fetched_at is not None:
                ages.add_metric([str(host)], max(0.0, (now - as_utc(fetched_at)).total_seconds()))
        yield ages
        by_state = GaugeMetricFamily("gpu_bridge_backend_pulls", "Pull records in the backend's database by state",
                                     labels=["state"])
        for state, count in counts:
            by_state.add_metric([str(state)], float(count))
        yield by_state

    def _breakers(self) -> Metric:
        family = GaugeMetricFamily("gpu_bridge_breaker_state",
                                   "Circuit breaker state per GPU host: 0 closed, 1 half-open, 2 open",
                                   labels=["host"])
        for label, slot in self.fleet.slots.items():
            family.add_metric([label], BREAKER_VALUES.get(slot.breaker.state, 2.0))
        return family

    def _heartbeats(self) -> Iterator[Metric]:
        """NFS mode: each worker's heartbeat as this backend judges it (the HTTP transport has none:
        Prometheus scrapes the GPU server itself). A figure not known yet is left out."""
        ages = GaugeMetricFamily("gpu_bridge_nfs_heartbeat_age_seconds",
                                 "Seconds since each NFS worker's heartbeat was last seen to change "
                                 "(+Inf: no heartbeat file, or the worker stopped)", labels=["host"])
        up = GaugeMetricFamily("gpu_bridge_nfs_worker_up", "1 when the NFS worker's heartbeat is alive, else 0",
                               labels=["host"])
        found = False
        for label, slot in self.fleet.slots.items():
            heartbeat: Callable[[], Liveness] | None = getattr(slot.transport, "heartbeat", None)
            if heartbeat is None:
                continue
            found = True
            live = heartbeat()
            if live.age is not None:
                ages.add_metric([label], max(0.0, live.age))
            elif live.alive is False:
                ages.add_metric([label], math.inf)
            if live.alive is not None:
                up.add_metric([label], 1.0 if live.alive else 0.0)
        if found:
            yield ages
            yield up


__all__ = ["BREAKER_VALUES", "BackendCollector", "BackendMetrics"]
