"""The backend's GPU-memory routes: what is loaded across the fleet, and loading or unloading a model.

* ``GET /config/loaded``: every host's ``/api/models/loaded`` in one answer, with the model listing's
  deadline (``GPU_BRIDGE_FANOUT_DEADLINE``, single-flight per host) and its stale rule: a host that
  did not answer contributes its last good answer, marked ``stale`` with ``cached_at`` and ``age_s``,
  and the answer says ``stale: true``. What is in memory changes by the minute, so that memory is this
  process's only (not the database), and a remembered model whose ``expires_at`` has passed is left
  out: Ollama has unloaded it since. No host answered and nothing remembered: the listing's error.
* ``POST /config/load-model`` ``{"model", "keep_alive"?, "hosts"?, "wait"?}`` and
  ``POST /config/unload-model`` ``{"model", "hosts"?}``: the input checks, audit entries and error
  shapes of ``/config/pull-model`` and ``/config/delete-model``. A load waits for the hosts' load
  jobs by default (``wait: true``: a load takes seconds to minutes); ``wait: false`` answers 202 with
  the jobs, to follow on each host (``gpu-bridge jobs ID --url <GPU server>``).

Registered on the backend's blueprint by routes.py.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from flask import current_app, jsonify
from flask.typing import ResponseReturnValue

from .. import keep_alive
from ..client.fleet import error_summary, summarize, utc_now_iso
from ..errors import InvalidRequest
from ..ollama import parse_timestamp
from .db import iso
from .inputs import bool_field, hosts_field, json_body, model_field
from .outcomes import JsonDict, change_answer, host_error, per_host
from .state import current_state, require_admin

_MEMORY = "gpu_bridge_backend_loaded"


class LastLoaded:
    """Each host's last good loaded-model list, with when it arrived (this process only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[datetime, list[JsonDict]]] = {}

    def store(self, label: str, models: list[JsonDict], at: datetime) -> None:
        with self._lock:
            self._hosts[label] = (at, models)

    def get(self, label: str) -> tuple[datetime, list[JsonDict]] | None:
        with self._lock:
            return self._hosts.get(label)


def _memory() -> LastLoaded:
    memory: LastLoaded = current_app.extensions.setdefault(_MEMORY, LastLoaded())
    return memory


def _still_loaded(model: JsonDict, now: datetime) -> bool:
    """False once the model's ``expires_at`` has passed (an unreadable one counts as loaded)."""
    expires = parse_timestamp(model.get("expires_at") if isinstance(model.get("expires_at"), str) else None)
    return expires is None or expires > now


def loaded() -> ResponseReturnValue:
    """GET /config/loaded: ``{"models": [entry + "host" (+ "stale")], "hosts", "source", "stale", "fetched_at"}``."""
    st = current_state()
    fleet, memory = st.fleet, _memory()
    answers = fleet.fan_out(fleet.labels, "loaded_models", deadline=fleet.fanout_deadline)
    now = datetime.now(UTC)
    models: list[JsonDict] = []
    statuses: dict[str, JsonDict] = {}
    answered = remembered = False
    for label, (ok, value) in answers.items():
        if ok:
            answered = True
            memory.store(label, list(value), now)
            statuses[label] = {"ok": True, "models": len(value), "latency_ms": fleet.slots[label].latency_ms}
            models.extend({**m, "host": label} for m in value if isinstance(m, dict))
            continue
        statuses[label] = error_summary(value)
        last = memory.get(label)
        if last is not None:
            remembered = True
            at, entries = last
            statuses[label].update(stale=True, cached_at=iso(at), age_s=round((now - at).total_seconds(), 1))
            models.extend({**m, "host": label, "stale": True} for m in entries
                          if isinstance(m, dict) and _still_loaded(m, now))
    failed = [label for label, status in statuses.items() if not status.get("ok")]
    if not answered and not remembered:
        summary = summarize(statuses)
        detail = "; ".join(host_error(label, statuses[label]) for label in failed)
        return jsonify({"error": f"no GPU host answered and none has answered before: {detail}",
                        "code": summary["code"], "hosts": statuses}), summary["status"]
    models.sort(key=lambda m: (str(m.get("host")), str(m.get("name"))))
    return jsonify({"models": models, "hosts": statuses, "source": "gpu" if answered else "cache",
                    "stale": bool(failed), "fetched_at": utc_now_iso()})


def load_model() -> ResponseReturnValue:
    """POST /config/load-model: load on the chosen hosts (every host by default)."""
    st = current_state()
    require_admin(st)
    body = json_body()
    model = model_field(body)  # a load fetches nothing: the grammar, not the allow-list
    if "keep_alive" in body and body["keep_alive"] is None:  # as the document types it: absent, never null
        raise InvalidRequest("keep_alive is null: leave it out for Ollama's default")
    seconds = keep_alive.parse(body.get("keep_alive"))
    labels = hosts_field(body) or st.fleet.labels
    wait = bool_field(body, "wait", default=True)
    # Waiting is bounded by the load's own limits (the host's GPU_BRIDGE_PULL_STALL_TIMEOUT; here
    # GPU_BRIDGE_PULL_TIMEOUT plus a minute without change), starting by connect + read timeout.
    answers = st.fleet.fan_out(labels, "load_model", model, seconds, wait,
                               deadline=None if wait else st.fleet.change_deadline)
    results = {lbl: ({"ok": True, "job": value} if ok else error_summary(value)) for lbl, (ok, value) in
               answers.items()}
    return change_answer(f"loading {model}", "load", model, labels, results,
                         {"model": model, "keep_alive": seconds, "results": results},
                         {"keep_alive": seconds, "wait": wait}, status=200 if wait else 202)


def unload_model() -> ResponseReturnValue:
    """POST /config/unload-model: unload on the chosen hosts (not loaded there is no error)."""
    st = current_state()
    require_admin(st)
    body = json_body()
    model = model_field(body)
    labels = hosts_field(body) or st.fleet.labels
    answers = st.fleet.fan_out(labels, "unload_model", model, deadline=st.fleet.change_deadline)
    results = per_host(answers)
    return change_answer(f"unloading {model}", "unload", model, labels, results,
                         {"model": model, "results": results}, {})


__all__ = ["LastLoaded", "load_model", "loaded", "unload_model"]
