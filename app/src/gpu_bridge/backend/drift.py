"""Continuous drift detection on the backend: the declared models (declared.py) × what the GPU hosts
hold, through ``reconcile`` (the engine the CLI and the Ansible module use too).

``DriftMonitor`` keeps the last observation of the fleet: every host's installed models with their
digests, and which are resident in GPU memory for hosts where a model is declared ``loaded`` (when the
GPU server offers ``GET /api/models/loaded``; otherwise residency is unknown and never drift). It is
refreshed

- by a background thread every ``GPU_BRIDGE_DRIFT_INTERVAL`` seconds (0: only on request), and
- on request (``GET /config/drift?refresh=true``, and the first request when nothing was observed yet).

Never more than one refresh runs at a time: a forced refresh waits for the one in flight and then
reuses it only when that one started after the request arrived (an older one may predate the change
the caller wants to see, e.g. the end of ``models apply``). Every answer says when its observation was
made (``checked_at``) and how old it is (``age_s``).

The metric ``gpu_bridge_model_drift{host,model,kind}`` is 1 for each drift item of the last
observation; a collector reads it at scrape time, so a drift that went away has no series any more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from flask.sansio.app import App
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from .. import reconcile
from ..client.fleet import GpuFleet, utc_now_iso
from ..config import BackendSettings
from ..errors import GpuBridgeError
from ..logs import Fields
from . import declared
from .declared import DeclaredState, DriftNotConfigured, InvalidDeclaredState

log = logging.getLogger("gpu_bridge.backend.drift")
JsonDict = dict[str, Any]
EXTENSION = "gpu_bridge_drift"
# Codes a GPU server without the loaded-models route answers with: residency unknown, not a failure.
_NO_RESIDENCY = frozenset({"not_implemented", "not_found", "method_not_allowed"})


@dataclass
class Observation:
    """One refresh: the fleet as it was seen, and the declaration it was compared with."""

    state: DeclaredState
    observed: dict[str, reconcile.Observed]
    statuses: dict[str, JsonDict]
    started: float  # monotonic, when the hosts were asked
    checked_at: str  # the same moment, ISO 8601 UTC
    finished: float = field(default_factory=time.monotonic)

    def drift(self) -> list[reconcile.Drift]:
        return reconcile.detect_drift(self.state.specs, self.observed)

    def plan(self, *, update: bool) -> list[reconcile.Action]:
        return reconcile.plan(self.state.specs, self.observed, update=update)


class DriftMonitor:
    """The backend's view of drift; one per app (``app.extensions[EXTENSION]``)."""

    def __init__(self, settings: BackendSettings, fleet: GpuFleet) -> None:
        self.path = settings.declared_models_file
        self.interval = settings.drift_interval
        self.fleet = fleet
        self._state: DeclaredState | None = None
        self._error: InvalidDeclaredState | None = None
        self._error_stamp: tuple[int, int] | None = None  # the file as it was when _error was found
        self._logged_error: str | None = None
        self._last: Observation | None = None
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.path:
            try:
                self._declared()
            except InvalidDeclaredState:
                pass  # logged once by _declared; the backend serves the rest, /config/drift answers 503

    # --- the declaration -------------------------------------------------------------------------
    def _declared(self) -> DeclaredState:
        """The checked declaration, read again when the role rewrote the file; raises its error."""
        if not self.path:
            raise DriftNotConfigured("no declared models: set GPU_BRIDGE_DECLARED_MODELS_FILE (the prod_backend "
                                     "role writes it from the inventory's gpu_bridge_models; README, Models as code)")
        stamp = declared.file_stamp(self.path)
        current = self._state
        if current is not None and stamp == current.stamp:
            return current
        if self._error is not None and stamp is not None and stamp == self._error_stamp:
            raise self._error
        try:
            self._state = declared.load(self.path, self.fleet)
        except InvalidDeclaredState as exc:
            self._state, self._error, self._error_stamp = None, exc, stamp
            if exc.message != self._logged_error:  # one line per distinct problem, not one per refresh
                self._logged_error = exc.message
                log.error(Fields(message=f"declared models unusable: {exc.message}", event="declared_state_invalid",
                                 path=self.path))
            raise
        self._error = self._logged_error = None
        return self._state

    # --- observing ---------------------------------------------------------------------------------
    def refresh(self, *, newer_than: float | None = None) -> Observation:
        """Observe the fleet now (one refresh at a time). ``newer_than`` (monotonic): reuse a refresh
        that started after it, when one finished while this call waited for the lock."""
        with self._refresh_lock:
            last = self._last
            if newer_than is not None and last is not None and last.started >= newer_than:
                return last
            state = self._declared()
            started, checked_at = time.monotonic(), utc_now_iso()
            observed, statuses = self._observe(state)
            self._last = Observation(state, observed, statuses, started, checked_at)
            return self._last

    def _observe(self, state: DeclaredState) -> tuple[dict[str, reconcile.Observed], dict[str, JsonDict]]:
        declared_labels = [spec.host for spec in state.specs]
        listing = self.fleet.list_models(declared_labels) if declared_labels else {"hosts": {}, "per_host": {}}
        statuses: dict[str, JsonDict] = listing["hosts"]
        per_host: dict[str, list[JsonDict]] = listing["per_host"]
        wants_residency = [spec.host for spec in state.specs
                           if spec.host in per_host and any(d.loaded for d in spec.models)]
        loaded = self._loaded(wants_residency)
        observed: dict[str, reconcile.Observed] = {}
        for label in declared_labels:
            if label in per_host:
                observed[label] = reconcile.Observed.from_listing(label, per_host[label], loaded.get(label))
            else:
                status = statuses.get(label) or {}
                observed[label] = reconcile.Observed(label, error=str(status.get("error") or "did not answer"))
        return observed, statuses

    def _loaded(self, labels: list[str]) -> dict[str, list[JsonDict] | None]:
        """Each host's resident models (``transport.loaded_models``), or None where unknown."""
        usable = [lbl for lbl in labels if callable(getattr(self.fleet.slots[lbl].transport, "loaded_models", None))]
        out: dict[str, list[JsonDict] | None] = dict.fromkeys(labels)
        if not usable:
            return out
        for label, (ok, value) in self.fleet.fan_out(usable, "loaded_models",
                                                     deadline=self.fleet.fanout_deadline).items():
            if ok and isinstance(value, list):
                out[label] = value
            elif not ok and isinstance(value, GpuBridgeError) and value.code not in _NO_RESIDENCY:
                log.warning(Fields(message=f"drift: {label}'s loaded models could not be read: {value.message}",
                                   host=label))
        return out

    # --- answers -------------------------------------------------------------------------------------
    def observation(self, *, refresh: bool = False) -> Observation:
        """The last observation, or a new one when asked or when there is none yet."""
        self._declared()  # a broken or missing file is the answer, whatever was observed before
        if refresh or self._last is None:
            return self.refresh(newer_than=time.monotonic())
        return self._last

    def report(self, *, refresh: bool = False, update: bool = False) -> JsonDict:
        """``GET /config/drift`` (and ``/config/plan``, with ``update``)."""
        obs = self.observation(refresh=refresh)
        drift = obs.drift()
        actions = obs.plan(update=update)
        return {
            "in_sync": not drift,
            "checked_at": obs.checked_at,
            "age_s": round(time.monotonic() - obs.finished, 1),
            "interval_s": self.interval,
            "update": update,
            "drift": [d.to_dict() for d in drift],
            "plan": [a.to_dict() for a in actions],
            "counts": reconcile.counts(actions),
            "hosts": self._hosts(obs),
        }

    def _hosts(self, obs: Observation) -> dict[str, JsonDict]:
        specs = {spec.host: spec for spec in obs.state.specs}
        out: dict[str, JsonDict] = {}
        for label in self.fleet.labels:
            spec = specs.get(label)
            if spec is None:
                out[label] = {"declared": False}
                continue
            seen = obs.observed[label]
            entry: JsonDict = {"declared": True, "ok": seen.error is None, "group": spec.group, "prune": spec.prune,
                               "models": len(spec.models), "residency_known": seen.loaded is not None}
            if seen.error is not None:
                status = obs.statuses.get(label) or {}
                entry.update(error=seen.error, code=status.get("code"), reason=status.get("reason"))
            out[label] = entry
        return out

    # --- the schedule ----------------------------------------------------------------------------------
    def start(self) -> None:
        """The background refresh, when there is a declaration and an interval."""
        if not self.path or self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="drift-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except GpuBridgeError:
                pass  # a bad declaration is logged by _declared; unreachable hosts are drift, not errors
            except Exception:  # noqa: BLE001 - the schedule must outlive any one failure; the log has it
                log.exception("drift refresh failed")
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()

    # --- the metric ------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """``gpu_bridge_model_drift{host,model,kind}``: 1 per drift item of the last observation."""
        family = GaugeMetricFamily("gpu_bridge_model_drift",
                                   "1 for each way a GPU host differs from its declared models (kind: missing, "
                                   "extra, diverged, not_loaded, unreachable)", labels=["host", "model", "kind"])
        last = self._last
        if last is not None and self._error is None:
            for item in last.drift():
                family.add_metric([item.host, item.model, item.kind], 1.0)
        yield family
        checked = GaugeMetricFamily("gpu_bridge_model_drift_checked_timestamp_seconds",
                                    "When the drift was last checked (Unix time); alert when it gets old")
        if last is not None:
            checked.add_metric([], datetime.fromisoformat(last.checked_at.replace("Z", "+00:00"))
                               .astimezone(UTC).timestamp())
        yield checked

    def describe(self) -> list[Metric]:
        return []  # the series depend on the last observation


def install(app: App, settings: BackendSettings, fleet: GpuFleet, registry: CollectorRegistry) -> DriftMonitor:
    """The app's monitor: on ``app.extensions[EXTENSION]`` for the routes, its gauge on ``registry``
    (the backend's /metrics), its schedule started."""
    monitor = DriftMonitor(settings, fleet)
    app.extensions[EXTENSION] = monitor
    registry.register(monitor)
    monitor.start()
    return monitor


def current_monitor() -> DriftMonitor:
    monitor: DriftMonitor = current_app.extensions[EXTENSION]
    return monitor


__all__ = ["EXTENSION", "DriftMonitor", "Observation", "current_monitor", "install"]
