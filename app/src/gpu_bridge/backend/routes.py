"""``/config/*``, ``/health`` and ``/api/openapi.json`` (response shapes in openapi.py)."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, g, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__, names
from ..client.fleet import merge_models, summarize, utc_now_iso
from ..errors import GpuBridgeError, InvalidRequest, NotFound
from ..logs import Fields
from ..request_guard import json_object, read_body, refuse_browser_requests
from .state import BackendState, auth_required, current_state, require_admin
from .db import DatabaseUnavailable, iso
from .openapi import openapi_document

log = logging.getLogger("gpu_bridge.backend")
bp = Blueprint("config", __name__)

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def _state() -> BackendState:
    return current_state()


def _db_failed(what: str, exc: Exception) -> None:
    # The first line only: a driver's message can run to pages (the statement and its parameters).
    log.error(Fields(message=f"database error: {what}", event="database_error", what=what,
                     error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


# --- request bodies -------------------------------------------------------------------------------
def _body() -> dict:
    """The body of a state-changing route: JSON from a non-browser client, bounded in size and depth."""
    st = _state()
    raw = read_body(request, st.settings.max_body_bytes)
    refuse_browser_requests(request, trusts_loopback=not auth_required(st), body=raw)
    return json_object(raw)


def _model_field(body: dict, *, pulling: bool = False) -> str:
    model = body.get("model", body.get("name"))
    if model is None:
        raise InvalidRequest("missing field 'model' (the model name, e.g. 'llama3.2:latest')")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    if pulling:  # a pull fetches: the registry allow-list applies, as on the GPU hosts
        return names.validate(model, _state().settings.allowed_registries).display
    return names.parse(model).display


def _hosts_field(body: dict) -> list[str] | None:
    # Exactly what the document says: absent, null or a JSON array of known host names or labels.
    hosts = body.get("hosts")
    if hosts is None or hosts == []:
        return None
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise InvalidRequest("'hosts' must be a JSON array of GPU host names or labels (name:port), e.g. "
                             f'["{_state().fleet.labels[0]}"]')
    return _state().fleet.select(hosts)


def _bool_query(name: str) -> bool:
    """A boolean query parameter as the document types it: true or false (absent: false)."""
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw in ("true", "false"):
        return raw == "true"
    raise InvalidRequest(f"query parameter {name}={names.shorten(raw)} must be true or false")


def _bool_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    raise InvalidRequest(f"'{name}' must be true or false (a JSON boolean)")


def _host_error(label: str, result: dict) -> str:
    """A host's error with its label once (transport messages already start with it)."""
    error = str(result.get("error"))
    return error if error.startswith(label) else f"{label}: {error}"


def _all_failed(what: str, results: dict, summary: dict, extra: dict) -> tuple:
    detail = "; ".join(_host_error(lbl, results[lbl]) for lbl in summary["failed"])
    body = {"error": f"{what} failed on every GPU host: {detail}", "code": summary["code"],
            "hosts": summary["failed"], **extra}
    return jsonify(body), summary["status"]


def _outcome(summary: dict) -> str:
    return "partial" if summary["partial"] else ("ok" if summary["ok"] else "failed")


def _audit(action: str, model: str | None, hosts: list[str], outcome: str, detail: dict) -> None:
    try:
        _state().db.audit(action, model, hosts, outcome, detail, g.get("request_id"))
    except SQLAlchemyError as exc:
        _db_failed("audit", exc)


def _brief(results: dict) -> dict:
    """Per-host results as the audit log keeps them (no progress noise)."""
    out = {}
    for lbl, r in results.items():
        if r.get("ok"):
            job = r.get("job") or {}
            out[lbl] = {"ok": True, **({"job_id": job.get("id"), "state": job.get("state")} if job else {})}
        else:
            out[lbl] = {"ok": False, "code": r.get("code"), "error": r.get("error")}
    return out


# --- models -----------------------------------------------------------------------------------------
@bp.get("/config/models")
def list_models():
    st = _state()
    refresh = _bool_query("refresh")
    memo, max_age = st.listing_memo, st.settings.cache_max_age
    if memo and not refresh and max_age > 0 and time.monotonic() - memo[0] < max_age:
        return jsonify({**memo[1], "source": "cache", "stale": False})

    listing = st.fleet.list_models()
    statuses, per_host = listing["hosts"], listing["per_host"]
    failed = [lbl for lbl in statuses if lbl not in per_host]
    if per_host:
        fetched_at = utc_now_iso()
        for label, models in per_host.items():
            try:
                st.db.store_host_models(label, models)
            except SQLAlchemyError as exc:
                _db_failed("store model cache", exc)
                break
    # A host that did not answer (timeout, down, breaker open) contributes its last good list, marked
    # stale with its age: the listing never waits for a sick host and never forgets its models.
    cached: dict[str, list[dict]]
    fetched: dict[str, datetime]
    cached, fetched = {}, {}
    if failed:
        try:
            cached, fetched = st.db.cached_models(failed)
        except SQLAlchemyError as exc:
            _db_failed("read model cache", exc)
    now = datetime.now(UTC)
    for label in fetched:
        statuses[label].update(stale=True, cached_at=iso(fetched[label]),
                               age_s=round((now - fetched[label]).total_seconds(), 1))
    if per_host:
        models = merge_models({**per_host, **cached}) if cached else listing["models"]
        payload = {"models": models, "hosts": statuses, "source": "gpu", "stale": bool(failed),
                   "fetched_at": fetched_at}
        if not failed:
            st.listing_memo = (time.monotonic(), payload)
        return jsonify(payload)

    # No GPU host answered: the last good lists, marked stale.
    st.invalidate_listing()
    summary = summarize(statuses)
    if not fetched:
        detail = "; ".join(_host_error(lbl, r) for lbl, r in statuses.items())
        resp = jsonify({"error": f"no GPU host answered and there is no cached model list yet: {detail}",
                        "code": summary["code"], "hosts": statuses})
        return resp, summary["status"]
    return jsonify({"models": merge_models(cached), "hosts": statuses, "source": "cache", "stale": True,
                    "fetched_at": iso(min(fetched.values()))})


@bp.post("/config/pull-model")
def pull_model():
    st = _state()
    require_admin(st)
    body = _body()
    model = _model_field(body, pulling=True)
    labels = _hosts_field(body) or st.fleet.labels
    wait = _bool_field(body, "wait")
    pull_id = uuid.uuid4().hex
    results = st.fleet.pull(model, labels, wait=wait)
    summary = summarize(results)

    record = {}
    for lbl, r in results.items():
        if r.get("ok"):
            job = r.get("job") or {}
            record[lbl] = {"job_id": job.get("id"), "job": job}
        else:
            record[lbl] = {"error": r.get("error"), "code": r.get("code"), "status": r.get("status"),
                           **({"job": r["job"]} if r.get("job") else {})}
    state = _overall(record)["state"]
    stored = True
    try:
        st.db.create_pull(pull_id, model, state, record)
    except SQLAlchemyError as exc:
        _db_failed("record pull", exc)
        stored = False
    _audit("pull", model, labels, _outcome(summary), {"id": pull_id, "wait": wait, "results": _brief(results)})
    if wait and summary["ok"]:
        st.invalidate_listing()

    payload: dict[str, Any] = {"id": pull_id if stored else None, "model": model, "results": results}
    if summary["partial"]:
        payload["partial"] = True
    if not summary["ok"]:
        return _all_failed(f"pull of {model}", results, summary, payload)
    resp = jsonify(payload)
    if wait:
        resp.status_code = 200
    else:
        resp.status_code = 202
        if stored:
            resp.headers["Location"] = f"/config/pull-status/{pull_id}"
    return resp


def _overall(record: dict) -> dict:
    """Overall state and progress of a pull from its per-host record."""
    states, completed, total = [], 0, 0
    for h in record.values():
        job = h.get("job") or {}
        state = job.get("state") if h.get("job_id") else "failed"
        states.append(state or "queued")
        if isinstance(job.get("total"), int) and isinstance(job.get("completed"), int):
            completed += job["completed"]
            total += job["total"]
    if any(s in ACTIVE for s in states):
        overall = "running"
    elif states and all(s == "succeeded" for s in states):
        overall = "succeeded"
    elif states and all(s == "cancelled" for s in states):
        overall = "cancelled"
    elif any(s == "succeeded" for s in states):
        overall = "partial"
    else:
        overall = "failed"
    percent = round(100.0 * completed / total, 1) if total else None
    if overall == "succeeded":
        percent = 100.0
    return {"state": overall, "done": overall not in ("running",), "completed": completed, "total": total,
            "percent": percent}


def _pull_results(record: dict, live_errors: dict) -> dict:
    results = {}
    for lbl, h in record.items():
        if h.get("job_id"):
            entry = {"ok": True, "job": h.get("job")}
            if lbl in live_errors:
                entry = {"ok": False, "job": h.get("job"), **live_errors[lbl]}
        else:
            entry = {"ok": False, "error": h.get("error"), "code": h.get("code"), "status": h.get("status")}
            if h.get("job"):
                entry["job"] = h["job"]
        results[lbl] = entry
    return results


def _load_pull(pull_id: str) -> dict:
    st = _state()
    if len(pull_id) > 64:
        raise NotFound(f"no pull with id {pull_id[:64]!r}...: see `gpu-bridge jobs` (GET /config/pulls) for the "
                       "pulls this backend knows", code="pull_not_found")
    try:
        rec = st.db.get_pull(pull_id)
    except SQLAlchemyError as exc:
        _db_failed("read pull", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL and "
                                  "the database server") from None
    if rec is None:
        raise NotFound(f"no pull with id {pull_id!r}: see `gpu-bridge jobs` (GET /config/pulls) for the pulls "
                       "this backend knows", code="pull_not_found")
    return rec


@bp.get("/config/pull-status/<pull_id>")
def pull_status(pull_id: str):
    st = _state()
    rec = _load_pull(pull_id)
    record = rec["hosts"]
    wanted = {lbl: h["job_id"] for lbl, h in record.items()
              if h.get("job_id") and (h.get("job") or {}).get("state") not in TERMINAL}
    live_errors: dict[str, dict] = {}
    if wanted:
        before = _overall(record)
        for lbl in [lbl for lbl in wanted if lbl not in st.fleet.slots]:
            # The host was removed from GPU_INSTANCE_HOSTS since the pull started: nobody can follow it.
            message = f"{lbl} is no longer in GPU_INSTANCE_HOSTS: its job cannot be followed"
            live_errors[lbl] = {"error": message, "code": "unknown_host", "status": 404}
            job = dict(record[lbl].get("job") or {})
            job.update(state="failed", error=message, error_code="unknown_host")
            record[lbl]["job"] = job
        for lbl, (ok, value) in st.fleet.jobs(wanted).items():
            if ok:
                record[lbl]["job"] = value
            elif isinstance(value, GpuBridgeError):
                live_errors[lbl] = {"error": value.message, "code": value.code, "status": value.status}
                if value.code == "job_not_found":
                    # The host forgot the job (restart or retention): it will never finish now.
                    job = dict(record[lbl].get("job") or {})
                    job.update(state="failed", error=value.message, error_code="job_not_found")
                    record[lbl]["job"] = job
        after = _overall(record)
        try:
            st.db.update_pull(pull_id, after["state"], record)
        except SQLAlchemyError as exc:
            _db_failed("update pull", exc)
        if after["done"] and not before["done"]:
            st.invalidate_listing()
    overall = _overall(record)
    return jsonify({"id": rec["id"], "model": rec["model"], "created_at": rec["created_at"], **overall,
                    "results": _pull_results(record, live_errors)})


@bp.post("/config/cancel-pull")
def cancel_pull():
    st = _state()
    require_admin(st)
    body = _body()
    pull_id = body.get("id")
    if not isinstance(pull_id, str) or not pull_id:
        raise InvalidRequest("missing field 'id' (the pull id from POST /config/pull-model)")
    rec = _load_pull(pull_id)
    record = rec["hosts"]
    results = {}
    for lbl, h in record.items():
        if not h.get("job_id"):
            continue
        if (h.get("job") or {}).get("state") in TERMINAL:
            results[lbl] = {"ok": True, "job": h["job"], "note": "already finished"}
            continue
        try:
            job = st.fleet.cancel_job(lbl, h["job_id"])
            record[lbl]["job"] = job
            results[lbl] = {"ok": True, "job": job}
        except GpuBridgeError as exc:
            results[lbl] = {"ok": False, "error": exc.message, "code": exc.code, "status": exc.status}
    overall = _overall(record)
    try:
        st.db.update_pull(pull_id, overall["state"], record)
    except SQLAlchemyError as exc:
        _db_failed("update pull", exc)
    summary = summarize(results) if results else {"ok": [], "failed": [], "partial": False}
    _audit("cancel", rec["model"], list(results), _outcome(summary) if results else "ok",
           {"id": pull_id, "results": _brief(results)})
    payload = {"id": pull_id, "model": rec["model"], **overall, "results": results}
    if results and not summary["ok"]:
        return _all_failed(f"cancelling pull {pull_id}", results, summary, payload)
    return jsonify(payload)


@bp.get("/config/pulls")
def list_pulls():
    st = _state()
    limit = _limit()
    try:
        recs = st.db.list_pulls(limit)
    except SQLAlchemyError as exc:
        _db_failed("list pulls", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL") from None
    return jsonify({"pulls": [{"id": r["id"], "model": r["model"], "created_at": r["created_at"],
                               "updated_at": r["updated_at"], "state": r["state"],
                               "hosts": list(r["hosts"])} for r in recs]})


@bp.post("/config/delete-model")
def delete_model():
    st = _state()
    require_admin(st)
    body = _body()
    model = _model_field(body)
    labels = _hosts_field(body) or st.fleet.labels
    results = st.fleet.delete(model, labels)
    summary = summarize(results)
    for lbl in summary["ok"]:
        try:
            st.db.forget_model(lbl, model)
        except SQLAlchemyError as exc:
            _db_failed("update model cache", exc)
            break
    st.invalidate_listing()
    _audit("delete", model, labels, _outcome(summary), {"results": _brief(results)})
    payload: dict[str, Any] = {"model": model, "results": results}
    if summary["partial"]:
        payload["partial"] = True
    if not summary["ok"]:
        return _all_failed(f"deleting {model}", results, summary, payload)
    return jsonify(payload)


@bp.get("/config/audit")
def audit_entries():
    st = _state()
    try:
        entries = st.db.audit_entries(_limit())
    except SQLAlchemyError as exc:
        _db_failed("read audit log", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL") from None
    return jsonify({"entries": entries})


def _limit() -> int:
    raw = request.args.get("limit", "50")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest("'limit' must be an integer") from None
    return max(1, min(value, 500))


# --- health, OpenAPI ----------------------------------------------------------------------------------
@bp.get("/health")
def health():
    st = _state()
    db = {"ok": True, "dialect": st.db.dialect}
    try:
        st.db.ping()
        db["schema_version"] = st.db.version()
    except SQLAlchemyError as exc:
        db = {"ok": False, "dialect": st.db.dialect, "error": str(getattr(exc, "orig", exc)).splitlines()[0]}
    hosts = st.fleet.health()
    healthy = db["ok"] and all(h["ok"] for h in hosts.values())
    return jsonify({"status": "ok" if healthy else "degraded", "version": __version__,
                    "uptime_seconds": round(time.monotonic() - st.started, 1), "transport": st.fleet.transport_kind,
                    "db": db, "gpu_hosts": hosts})


@bp.get("/api/openapi.json")
def openapi():
    st = _state()
    names_and_labels = [*st.fleet.labels, *(slot.host.name for slot in st.fleet.slots.values())]
    return jsonify(openapi_document(names_and_labels, st.settings.allowed_registries))
