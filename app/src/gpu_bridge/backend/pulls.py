"""The backend's pull routes: start a pull on GPU hosts, follow it, cancel it, list recent pulls.

A pull is recorded in the database with each host's job, so its status survives a backend restart
and is followed by asking only the hosts whose jobs have not finished. The routes are registered on
the backend's blueprint by routes.py.

Several backend instances share the database: a pull started through one is followed and cancelled
through any other (the record names each host's job). Two instances may follow or cancel one pull at
the same moment, so a record is written merged with the stored one (``settle``), and a pull that
installed a model bumps the change generation that every instance's listing memo checks.
"""

from __future__ import annotations

import uuid

from flask import jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from ..client.fleet import summarize
from ..errors import GpuBridgeError, InvalidRequest, NotFound
from .db import DatabaseUnavailable
from .inputs import bool_field, hosts_field, json_body, limit_query, model_field
from .outcomes import JsonDict, all_failed, audit, brief, db_failed, outcome
from .state import BackendState, current_state, require_admin

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def pull_model() -> ResponseReturnValue:
    """POST /config/pull-model: start (or with ``wait``, run) a pull on the chosen hosts."""
    st = current_state()
    require_admin(st)
    body = json_body()
    model = model_field(body, pulling=True)
    labels = hosts_field(body) or st.fleet.labels
    wait = bool_field(body, "wait")
    pull_id = uuid.uuid4().hex
    results = st.fleet.pull(model, labels, wait=wait)
    summary = summarize(results)

    record: dict[str, JsonDict] = {}
    for lbl, r in results.items():
        if r.get("ok"):
            job = r.get("job") or {}
            record[lbl] = {"job_id": job.get("id"), "job": job}
        else:
            record[lbl] = {"error": r.get("error"), "code": r.get("code"), "status": r.get("status"),
                           **({"job": r["job"]} if r.get("job") else {})}
    state = overall_state(record)["state"]
    installed = wait and bool(summary["ok"])  # the model is on those hosts now: every listing memo is old
    stored = True
    try:
        st.db.create_pull(pull_id, model, state, record, models_changed=installed)
    except SQLAlchemyError as exc:
        db_failed("record pull", exc)
        stored = False
        if installed:
            listing_changed(st)
    audit("pull", model, labels, outcome(summary), {"id": pull_id, "wait": wait, "results": brief(results)})

    payload: JsonDict = {"id": pull_id if stored else None, "model": model, "results": results}
    if summary["partial"]:
        payload["partial"] = True
    if not summary["ok"]:
        return all_failed(f"pull of {model}", results, summary, payload)
    resp = jsonify(payload)
    if wait:
        resp.status_code = 200
    else:
        resp.status_code = 202
        if stored:
            resp.headers["Location"] = f"/config/pull-status/{pull_id}"
    return resp


def overall_state(record: JsonDict) -> JsonDict:
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


def settle(stored: JsonDict, ours: JsonDict) -> tuple[str, JsonDict]:
    """This request's view of a pull's hosts merged with the stored one, which another instance may have
    written since this one read it; returns (overall state, hosts). A job the stored record has as
    finished stays as stored unless ours is finished too: a status read through one instance, which
    asked the host a moment before a cancel through another, must not make the cancelled job running
    again. (Left as it was, the next read would ask the host and repair it; this keeps the record from
    going backwards in between.)"""
    merged = dict(ours)
    for lbl, theirs in stored.items():
        their_state = (theirs.get("job") or {}).get("state")
        our_state = ((ours.get(lbl) or {}).get("job") or {}).get("state")
        if their_state in TERMINAL and our_state not in TERMINAL:
            merged[lbl] = theirs
    return overall_state(merged)["state"], merged


def listing_changed(st: BackendState) -> None:
    """The models changed but the write that should have recorded it failed: drop this process's memo
    and record the change on its own, so that other instances stop serving theirs. If that fails too,
    their memos last at most GPU_BRIDGE_CACHE_MAX_AGE seconds (and none is served while the database
    cannot be read)."""
    st.invalidate_listing()
    try:
        st.db.models_changed()
    except SQLAlchemyError as exc:
        db_failed("record models change", exc)


def _pull_results(record: JsonDict, live_errors: dict[str, JsonDict]) -> dict[str, JsonDict]:
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


def _load_pull(pull_id: str) -> JsonDict:
    st = current_state()
    if len(pull_id) > 64:
        raise NotFound(f"no pull with id {pull_id[:64]!r}...: see `gpu-bridge jobs` (GET /config/pulls) for the "
                       "pulls this backend knows", code="pull_not_found")
    try:
        rec = st.db.get_pull(pull_id)
    except SQLAlchemyError as exc:
        db_failed("read pull", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL and "
                                  "the database server") from None
    if rec is None:
        raise NotFound(f"no pull with id {pull_id!r}: see `gpu-bridge jobs` (GET /config/pulls) for the pulls "
                       "this backend knows", code="pull_not_found")
    return rec


def pull_status(pull_id: str) -> ResponseReturnValue:
    """GET /config/pull-status/<id>: the pull's state, asking the hosts about jobs not yet finished."""
    st = current_state()
    rec = _load_pull(pull_id)
    record = rec["hosts"]
    wanted = {lbl: h["job_id"] for lbl, h in record.items()
              if h.get("job_id") and (h.get("job") or {}).get("state") not in TERMINAL}
    live_errors: dict[str, JsonDict] = {}
    if wanted:
        before = overall_state(record)
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
        # Finished now: it may have installed the model, so every listing memo is old.
        finished = overall_state(record)["done"] and not before["done"]
        ours = record
        try:
            record = st.db.merge_pull(pull_id, lambda stored: settle(stored, ours), models_changed=finished) or record
        except SQLAlchemyError as exc:
            db_failed("update pull", exc)
            if finished:
                listing_changed(st)
    overall = overall_state(record)
    return jsonify({"id": rec["id"], "model": rec["model"], "created_at": rec["created_at"], **overall,
                    "results": _pull_results(record, live_errors)})


def cancel_pull() -> ResponseReturnValue:
    """POST /config/cancel-pull: cancel every unfinished job of a pull."""
    st = current_state()
    require_admin(st)
    body = json_body()
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
    ours = record
    try:
        record = st.db.merge_pull(pull_id, lambda stored: settle(stored, ours)) or record
    except SQLAlchemyError as exc:
        db_failed("update pull", exc)
    overall = overall_state(record)
    summary = summarize(results) if results else {"ok": [], "failed": [], "partial": False}
    audit("cancel", rec["model"], list(results), outcome(summary) if results else "ok",
           {"id": pull_id, "results": brief(results)})
    payload = {"id": pull_id, "model": rec["model"], **overall, "results": results}
    if results and not summary["ok"]:
        return all_failed(f"cancelling pull {pull_id}", results, summary, payload)
    return jsonify(payload)


def list_pulls() -> ResponseReturnValue:
    """GET /config/pulls: the latest pulls (``?limit=N``)."""
    st = current_state()
    limit = limit_query()
    try:
        recs = st.db.list_pulls(limit)
    except SQLAlchemyError as exc:
        db_failed("list pulls", exc)
        raise DatabaseUnavailable("the backend's database is unavailable: check GPU_BRIDGE_DATABASE_URL") from None
    return jsonify({"pulls": [{"id": r["id"], "model": r["model"], "created_at": r["created_at"],
                               "updated_at": r["updated_at"], "state": r["state"],
                               "hosts": list(r["hosts"])} for r in recs]})
