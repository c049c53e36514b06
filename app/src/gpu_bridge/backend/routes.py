"""The backend's routes: ``/config/*``, ``/health`` and ``/api/openapi.json`` (shapes in openapi.py).

Listing and deleting models, the audit log, health and the document are here; the pull routes are
in pulls.py, registered below on the same blueprint (their endpoint names stay ``config.*``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__
from ..client.fleet import merge_models, summarize, utc_now_iso
from .as_code import copy_model, drift_report, plan_report, start_drift_monitor
from .db import DatabaseUnavailable, iso
from .inputs import bool_query, hosts_field, json_body, limit_query, model_field
from .loaded import load_model, loaded, unload_model
from .openapi import openapi_document
from .outcomes import JsonDict, all_failed, audit, brief, db_failed, host_error, outcome
from .pulls import cancel_pull, list_pulls, listing_changed, pull_model, pull_status
from .state import current_state, require_admin

bp = Blueprint("config", __name__)
bp.add_url_rule("/config/pull-model", view_func=pull_model, methods=["POST"])
bp.add_url_rule("/config/pull-status/<pull_id>", view_func=pull_status, methods=["GET"])
bp.add_url_rule("/config/cancel-pull", view_func=cancel_pull, methods=["POST"])
bp.add_url_rule("/config/pulls", view_func=list_pulls, methods=["GET"])
# Models as code (as_code.py): drift, plan, copy; the drift monitor starts with the app.
bp.add_url_rule("/config/drift", view_func=drift_report, methods=["GET"])
bp.add_url_rule("/config/plan", view_func=plan_report, methods=["GET"])
bp.add_url_rule("/config/copy-model", view_func=copy_model, methods=["POST"])
bp.record_once(start_drift_monitor)
# What is in GPU memory (loaded.py): the fleet's loaded models, load, unload.
bp.add_url_rule("/config/loaded", view_func=loaded, methods=["GET"])
bp.add_url_rule("/config/load-model", view_func=load_model, methods=["POST"])
bp.add_url_rule("/config/unload-model", view_func=unload_model, methods=["POST"])


# --- models -----------------------------------------------------------------------------------------
@bp.get("/config/models")
def list_models() -> ResponseReturnValue:
    st = current_state()
    refresh = bool_query("refresh")
    # Read before the hosts are asked: a change recorded meanwhile makes the new memo old at once.
    try:
        generation = st.listing_memo.generation()
    except SQLAlchemyError as exc:
        db_failed("read models generation", exc)
        generation = None  # nothing served from the memo, nothing stored in it
    memo = None if refresh else st.listing_memo.lookup(generation)
    if memo is not None:
        return jsonify({**memo, "source": "cache", "stale": False})

    listing = st.fleet.list_models()
    statuses, per_host = listing["hosts"], listing["per_host"]
    failed = [lbl for lbl in statuses if lbl not in per_host]
    if per_host:
        fetched_at = utc_now_iso()
        for label, models in per_host.items():
            try:
                st.db.store_host_models(label, models)
            except SQLAlchemyError as exc:
                db_failed("store model cache", exc)
                break
    # A host that did not answer (timeout, down, breaker open) contributes its last good list, marked
    # stale with its age: the listing never waits for a sick host and never forgets its models.
    cached: dict[str, list[JsonDict]]
    fetched: dict[str, datetime]
    cached, fetched = {}, {}
    if failed:
        try:
            cached, fetched = st.db.cached_models(failed)
        except SQLAlchemyError as exc:
            db_failed("read model cache", exc)
    now = datetime.now(UTC)
    for label in fetched:
        statuses[label].update(stale=True, cached_at=iso(fetched[label]),
                               age_s=round((now - fetched[label]).total_seconds(), 1))
    if per_host:
        models = merge_models({**per_host, **cached}) if cached else listing["models"]
        payload = {"models": models, "hosts": statuses, "source": "gpu", "stale": bool(failed),
                   "fetched_at": fetched_at}
        if failed:  # some host's models came from the cache (counted for the stale-answers alert)
            st.metrics.stale_answer()
        if not failed:
            st.listing_memo.store(generation, payload)
        return jsonify(payload)

    # No GPU host answered: the last good lists, marked stale.
    st.invalidate_listing()
    summary = summarize(statuses)
    if not fetched:
        detail = "; ".join(host_error(lbl, r) for lbl, r in statuses.items())
        resp = jsonify({"error": f"no GPU host answered and there is no cached model list yet: {detail}",
                        "code": summary["code"], "hosts": statuses})
        return resp, summary["status"]
    st.metrics.stale_answer()
    return jsonify({"models": merge_models(cached), "hosts": statuses, "source": "cache", "stale": True,
                    "fetched_at": iso(min(fetched.values()))})


@bp.post("/config/delete-model")
def delete_model() -> ResponseReturnValue:
    st = current_state()
    require_admin(st)
    body = json_body()
    model = model_field(body)
    labels = hosts_field(body) or st.fleet.labels
    results = st.fleet.delete(model, labels)
    summary = summarize(results)
    for lbl in summary["ok"]:
        try:
            st.db.forget_model(lbl, model)
        except SQLAlchemyError as exc:
            db_failed("update model cache", exc)
            listing_changed(st)
            break
    audit("delete", model, labels, outcome(summary), {"results": brief(results)})
    payload: JsonDict = {"model": model, "results": results}
    if summary["partial"]:
        payload["partial"] = True
    if not summary["ok"]:
        return all_failed(f"deleting {model}", results, summary, payload)
    return jsonify(payload)


@bp.get("/config/audit")
def audit_entries() -> ResponseReturnValue:
    st = current_state()
    try:
        entries = st.db.audit_entries(limit_query())
    except SQLAlchemyError as exc:
        db_failed("read audit log", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL") from None
    return jsonify({"entries": entries})


# --- health, OpenAPI ----------------------------------------------------------------------------------
@bp.get("/health")
def health() -> ResponseReturnValue:
    st = current_state()
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
def openapi() -> ResponseReturnValue:
    st = current_state()
    names_and_labels = [*st.fleet.labels, *(slot.host.name for slot in st.fleet.slots.values())]
    return jsonify(openapi_document(names_and_labels, st.settings.allowed_registries))
