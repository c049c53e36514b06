"""OpenAPI 3.0 description of the backend, hand-written to match routes.py."""

from __future__ import annotations

import copy
from typing import Any

from .. import __version__
from ..config import DEFAULT_ALLOWED_REGISTRIES
from ..keep_alive import MAX_SECONDS
from ..keep_alive import PATTERN as KEEP_ALIVE_PATTERN
from ..names import MAX_NAME_LENGTH, name_pattern
from ..request_guard import REQUEST_ID_PATTERN

Json = dict[str, Any]  # a piece of the document
_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> Json:
    return _json(_ERROR, description)


_REQUEST_ID = {"name": "X-Request-ID", "in": "header", "required": False,
               "description": "caller's request id (1 to 128 of A-Z a-z 0-9 . _ : -), echoed and forwarded to the "
                              "GPU hosts; left out, one is generated; any other value is a 400",
               "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": REQUEST_ID_PATTERN}}


def _bool_query(name: str, description: str) -> Json:
    return {"name": name, "in": "query", "schema": {"type": "boolean"}, "description": description}


def openapi_document(hosts: list[str] | None = None,
                     allowed_registries: tuple[str, ...] = DEFAULT_ALLOWED_REGISTRIES) -> Json:
    """The document as this backend applies it: ``hosts`` (its GPU hosts' labels and names) is the
    enum of a body's ``hosts`` entries; a pull's model name carries the registry allow-list."""
    host_item = {"type": "string", "minLength": 1}
    if hosts:
        host_item["enum"] = sorted(set(hosts))
    host_result = {
        "type": "object",
        "description": "One GPU host's outcome: ok with a Job (pull) or deleted name, or an error.",
        "properties": {
            "ok": {"type": "boolean"},
            "job": {"$ref": "#/components/schemas/Job"},
            "deleted": {"type": "string"}, "unloaded": {"type": "string"},
            "error": {"type": "string"}, "code": {"type": "string"}, "status": {"type": "integer"},
        },
        "required": ["ok"],
    }
    def model_field(registries: tuple[str, ...] | None) -> Json:
        return {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH, "pattern": name_pattern(registries),
                "example": "llama3.2:latest"}

    model_body: dict[str, Any] = {
        "type": "object", "required": ["model"],
        "properties": {
            "model": model_field(None),
            "hosts": {"type": "array", "items": host_item, "nullable": True,
                      "description": "GPU host names or labels (name:port); absent, null or []: every host"},
        },
    }
    pull_body = {**model_body, "properties": {**model_body["properties"],
                                              "model": model_field(tuple(allowed_registries)),
                                              "wait": {"type": "boolean", "default": False,
                                                       "description": "answer when the pull ends on every host "
                                                                      "(the backend polls the jobs; "
                                                                      "GPU_BRIDGE_PULL_TIMEOUT without progress)"}}}
    per_host = {"type": "object", "additionalProperties": host_result}
    load_body = {**model_body, "properties": {
        **model_body["properties"],
        "keep_alive": {"description": "how long the model stays loaded after its last use: a duration (30s, 5m, "
                                      "1h30m), seconds, or forever / -1; at most a year unless forever; absent: "
                                      "Ollama's default",
                       "oneOf": [{"type": "string", "pattern": KEEP_ALIVE_PATTERN, "example": "1h"},
                                 {"type": "number", "enum": [-1]},
                                 {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_SECONDS}]},
        "wait": {"type": "boolean", "default": True,
                 "description": "answer when the load ends on every host (false: 202 with each host's job)"}}}
    loaded_entry = {"type": "object", "properties": {
        "host": {"type": "string"}, "name": {"type": "string"}, "model": {"type": "string"},
        "digest": {"type": "string"}, "size": {"type": "integer"},
        "size_vram": {"type": "integer", "description": "of size, the bytes in GPU memory"},
        "cpu_spill": {"type": "boolean", "description": "size_vram < size: part runs from system memory (slow)"},
        "context_length": {"type": "integer", "nullable": True},
        "expires_at": {"type": "string", "description": "as Ollama gives it; about 292 years ahead: forever"},
        "stale": {"type": "boolean", "description": "from the host's last answer: it did not answer now"}}}
    copy_body = {"type": "object", "required": ["source", "destination"],
                 "properties": {"source": model_field(None), "destination": model_field(None),
                                "hosts": model_body["properties"]["hosts"]}}
    drift_item = {"type": "object", "required": ["host", "model", "kind", "detail"], "properties": {
        "host": {"type": "string"}, "model": {"type": "string", "description": "'*' for an unreachable host"},
        "kind": {"type": "string", "enum": ["missing", "extra", "diverged", "not_loaded", "unreachable"]},
        "detail": {"type": "string"}}}
    action = {"type": "object", "required": ["host", "op", "model", "reason"], "properties": {
        "host": {"type": "string"}, "op": {"type": "string", "enum": ["delete", "pull", "update", "load"]},
        "model": {"type": "string"}, "reason": {"type": "string"},
        "snapshot": {"type": "string", "description": "update: where the replaced build is kept"},
        "keep_alive": {"description": "load: how long the model stays in memory"}}}
    drift_report = {"type": "object",
                    "required": ["in_sync", "checked_at", "age_s", "update", "drift", "plan", "counts", "hosts"],
                    "properties": {
                        "in_sync": {"type": "boolean"}, "checked_at": {"type": "string", "format": "date-time"},
                        "age_s": {"type": "number", "description": "seconds since the observation ended"},
                        "interval_s": {"type": "number"}, "update": {"type": "boolean"},
                        "drift": {"type": "array", "items": drift_item}, "plan": {"type": "array", "items": action},
                        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "hosts": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                            "declared": {"type": "boolean"}, "ok": {"type": "boolean"}, "group": {"type": "string"},
                            "prune": {"type": "boolean"}, "models": {"type": "integer"},
                            "residency_known": {"type": "boolean"}, "error": {"type": "string"}}}}}}
    progress = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "created_at": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "succeeded", "failed", "cancelled", "partial"]},
            "done": {"type": "boolean"},
            "completed": {"type": "integer"}, "total": {"type": "integer"},
            "percent": {"type": "number", "nullable": True},
            "results": per_host,
        },
    }
    failed = "every selected GPU host failed: the common status of the failures (else 502); body names the hosts"
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "gpu-bridge backend", "version": __version__,
                 "description": "Model management on the GPU hosts for the production web app. State-changing "
                                "routes need 'Authorization: Bearer <admin token>' when the backend is bound "
                                "beyond loopback. Every answer carries X-Request-ID."},
        "paths": {
            "/config/models": {"get": {
                "summary": "Models on every GPU host, merged; the cached list (stale: true) when none answers",
                "parameters": [{"name": "refresh", "in": "query", "schema": {"type": "boolean"},
                                "description": "skip the short-lived cache (GPU_BRIDGE_CACHE_MAX_AGE)"}],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/ModelList"}, "merged model list"),
                    "502": _err("no host answered (e.g. token rejected) and nothing is cached"),
                    "503": _err("no host answered and nothing is cached; 'hosts' says why per host"),
                    "504": _err("every host timed out and nothing is cached"),
                }}},
            "/config/pull-model": {"post": {
                "summary": "Start a pull on every (or the chosen) GPU host",
                "requestBody": {"required": True, "content": {"application/json": {"schema": pull_body}}},
                "responses": {
                    "202": _json({"type": "object", "properties": {
                        "id": {"type": "string", "description": "backend pull id for /config/pull-status/{id}"},
                        "model": {"type": "string"}, "results": per_host, "partial": {"type": "boolean"}}},
                        "started on at least one host (header Location: /config/pull-status/{id})"),
                    "200": _json({"type": "object"}, "wait: true and the pull ended on at least one host"),
                    "400": _err("bad JSON, missing 'model', invalid model name, unknown host"),
                    "401": _err("admin token missing or wrong"),
                    "404": _err("wait: true and every host's pull failed with model_not_found"),
                    "409": _err("wait: true and every host's pull was cancelled"),
                    "429": _err("every host refused to queue the pull (queue_full or rate_limited)"),
                    "413": _err("body larger than GPU_BRIDGE_MAX_BODY_BYTES"),
                    "502": _err(failed), "503": _err(failed), "504": _err(failed),
                }}},
            "/config/pull-status/{id}": {"get": {
                "summary": "Progress of a pull, per host and overall",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(progress, "pull progress"),
                              "404": _err("unknown pull id (code pull_not_found)"),
                              "503": _err("database unavailable")}}},
            "/config/cancel-pull": {"post": {
                "summary": "Cancel a running pull on every host it runs on",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id"],
                    "properties": {"id": {"type": "string", "minLength": 1}}}}}},
                "responses": {"200": _json(progress, "cancelled (or already finished)"),
                              "400": _err("missing id"), "401": _err("admin token missing or wrong"),
                              "404": _err("unknown pull id, or every host no longer knows the job"),
                              "409": _err("every host's job had already finished (code conflict)"),
                              "502": _err(failed), "503": _err(failed), "504": _err(failed)}}},
            "/config/pulls": {"get": {
                "summary": "Recent pulls (newest first)",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50}}],
                "responses": {"400": _err("limit is not an integer"),
                              "200": _json({"type": "object", "properties": {"pulls": {"type": "array", "items": {
                    "type": "object"}}}}, "recent pulls")}}},
            "/config/delete-model": {"post": {
                "summary": "Delete a model on every (or the chosen) GPU host",
                "requestBody": {"required": True, "content": {"application/json": {"schema": model_body}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "model": {"type": "string"}, "results": per_host, "partial": {"type": "boolean"}}},
                        "deleted on at least one host"),
                    "400": _err("bad request"), "401": _err("admin token missing or wrong"),
                    "404": _err("the model is on no selected host (code model_not_found)"),
                    "502": _err(failed), "503": _err(failed), "504": _err(failed),
                }}},
            "/config/loaded": {"get": {
                "summary": "What every GPU host holds in memory; a host that does not answer: its last answer, stale",
                "responses": {
                    "200": _json({"type": "object", "required": ["models", "hosts", "source", "stale", "fetched_at"],
                                  "properties": {
                                      "models": {"type": "array", "items": loaded_entry},
                                      "hosts": {"type": "object", "additionalProperties": {"type": "object"}},
                                      "source": {"type": "string", "enum": ["gpu", "cache"]},
                                      "stale": {"type": "boolean"}, "fetched_at": {"type": "string"}}},
                                 "loaded models, one entry per host and model"),
                    "502": _err("no host answered (e.g. token rejected) and none answered before"),
                    "503": _err("no host answered and none answered before; 'hosts' says why per host"),
                    "504": _err("every host timed out and none answered before"),
                }}},
            "/config/load-model": {"post": {
                "summary": "Load an installed model into GPU memory on every (or the chosen) GPU host",
                "requestBody": {"required": True, "content": {"application/json": {"schema": load_body}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "model": {"type": "string"}, "keep_alive": {"type": "number", "nullable": True},
                        "results": per_host, "partial": {"type": "boolean"}}}, "loaded on at least one host"),
                    "202": _json({"type": "object"}, "wait: false: the load jobs started on at least one host"),
                    "400": _err("bad JSON, missing 'model', invalid model name or keep_alive, unknown host; every "
                                "host refused an embedding-only model"),
                    "401": _err("admin token missing or wrong"),
                    "404": _err("the model is installed on no selected host (code model_not_found)"),
                    "409": _err("every host's load was cancelled"),
                    "413": _err("body larger than GPU_BRIDGE_MAX_BODY_BYTES"),
                    "429": _err("every host refused to queue the load (queue_full or rate_limited)"),
                    "502": _err(failed), "503": _err(failed), "504": _err(failed),
                }}},
            "/config/unload-model": {"post": {
                "summary": "Unload a model from GPU memory on every (or the chosen) GPU host",
                "requestBody": {"required": True, "content": {"application/json": {"schema": model_body}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "model": {"type": "string"}, "results": per_host, "partial": {"type": "boolean"}}},
                        "not in memory on at least one host any more (not loaded there is no error)"),
                    "400": _err("bad request"), "401": _err("admin token missing or wrong"),
                    "404": _err("the model is installed on no selected host (code model_not_found)"),
                    "429": _err("every host refused (rate_limited)"),
                    "502": _err(failed), "503": _err(failed), "504": _err(failed),
                }}},
            "/config/drift": {"get": {
                "summary": "How the GPU hosts differ from their declared models (models as code)",
                "description": "From the backend's last observation (refreshed every GPU_BRIDGE_DRIFT_INTERVAL s; "
                               "checked_at and age_s say how old it is). drift kinds: missing, extra, diverged, "
                               "not_loaded, unreachable.",
                "parameters": [_bool_query("refresh", "observe the GPU hosts now instead of answering from the last "
                                                      "observation")],
                "responses": {"200": _json(drift_report, "the drift and the plan that would fix it"),
                              "404": _err("no declared state: GPU_BRIDGE_DECLARED_MODELS_FILE is unset "
                                          "(drift_not_configured)"),
                              "503": _err("the declared-models file is unusable (declared_state_invalid)")}}},
            "/config/plan": {"get": {
                "summary": "The actions that bring the GPU hosts to their declared models (what models apply runs)",
                "parameters": [_bool_query("update", "re-pull every declared model for a newer build (each "
                                                     "replaced build is kept as a snapshot)"),
                               _bool_query("refresh", "observe the GPU hosts now")],
                "responses": {"200": _json(drift_report, "the plan, with the drift it answers"),
                              "404": _err("no declared state (drift_not_configured)"),
                              "503": _err("the declared-models file is unusable (declared_state_invalid)")}}},
            "/config/copy-model": {"post": {
                "summary": "Copy a model under another name on every (or the chosen) GPU host (no download)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": copy_body}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "source": {"type": "string"}, "destination": {"type": "string"}, "results": per_host,
                        "partial": {"type": "boolean"}}}, "copied on at least one host"),
                    "400": _err("bad request"), "401": _err("admin token missing or wrong"),
                    "404": _err("the source is on no selected host (code model_not_found)"),
                    "429": _err("every host refused (rate_limited)"),
                    "502": _err(failed), "503": _err(failed), "504": _err(failed),
                }}},
            "/config/audit": {"get": {
                "summary": "Audit log of pull, cancel and delete requests (newest first)",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50}}],
                "responses": {"400": _err("limit is not an integer"),
                              "200": _json({"type": "object", "properties": {"entries": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "id": {"type": "integer"}, "at": {"type": "string"}, "action": {"type": "string"},
                        "model": {"type": "string"}, "hosts": {"type": "array", "items": {"type": "string"}},
                        "outcome": {"type": "string", "enum": ["ok", "partial", "failed"]},
                        "detail": {"type": "object"}, "request_id": {"type": "string"}}}}}}, "audit entries")}}},
            "/health": {"get": {
                "summary": "Liveness, database and each GPU host's state (always 200 while the process runs)",
                "responses": {"200": _json({"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded"]},
                    "version": {"type": "string"}, "uptime_seconds": {"type": "number"},
                    "transport": {"type": "string", "enum": ["http", "nfs"]},
                    "db": {"type": "object", "properties": {"ok": {"type": "boolean"}, "dialect": {"type": "string"},
                                                            "schema_version": {"type": "integer"},
                                                            "error": {"type": "string"}}},
                    "gpu_hosts": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                        "ok": {"type": "boolean"}, "status": {"type": "string"},
                        "breaker": {"type": "object", "properties": {
                            "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                            "consecutive_failures": {"type": "integer"}, "last_error": {"type": "string"}}},
                        "latency_ms": {"type": "number", "nullable": True},
                        "error": {"type": "string"}, "code": {"type": "string"}}}},
                }}, "health")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (admin token beyond loopback unless GPU_BRIDGE_METRICS_PUBLIC=true)",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": _err("the admin token is required")}}},
            "/api/openapi.json": {"get": {"summary": "This document",
                                          "responses": {"200": {"description": "OpenAPI 3.0 document"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "code"], "properties": {
                    "error": {"type": "string"}, "code": {"type": "string"}, "host": {"type": "string"},
                    "hosts": {"description": "failed host labels (or, for /config/models, status per host)"},
                    "results": per_host}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "model": {"type": "string"},
                    "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "completed": {"type": "integer"}, "total": {"type": "integer"},
                    "percent": {"type": "number", "nullable": True},
                    # null until Ollama's first progress line
                    "status": {"type": "string", "nullable": True},
                    "error": {"type": "string", "nullable": True}, "error_code": {"type": "string", "nullable": True},
                    "created_at": {"type": "string"}, "started_at": {"type": "string", "nullable": True},
                    "finished_at": {"type": "string", "nullable": True}, "updated_at": {"type": "string"}}},
                "ModelList": {"type": "object", "required": ["models", "hosts", "source", "stale", "fetched_at"],
                              "properties": {
                                  "models": {"type": "array", "items": {"type": "object", "properties": {
                                      "name": {"type": "string"}, "size": {"type": "integer"},
                                      "digest": {"type": "string"}, "modified_at": {"type": "string"},
                                      "details": {"type": "object"},
                                      "hosts": {"type": "array", "items": {"type": "string"}},
                                      "digests": {"type": "object", "additionalProperties": {
                                          "type": "string", "nullable": True},
                                          "description": "each host's digest of this name"},
                                      "diverged": {"type": "boolean",
                                                   "description": "the hosts hold different builds (digests)"},
                                      "digest_differs": {"type": "boolean",
                                                         "description": "earlier name of diverged (only when true)"},
                                      "snapshot": {"type": "boolean",
                                                   "description": "kept by models as code for rollback"}}}},
                                  "hosts": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                                      "ok": {"type": "boolean"}, "error": {"type": "string"},
                                      "code": {"type": "string"}}}},
                                  "source": {"type": "string", "enum": ["gpu", "cache"]},
                                  "stale": {"type": "boolean"},
                                  "fetched_at": {"type": "string"}}},
            },
        },
    }
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["parameters"] = [*operation.get("parameters", []), copy.deepcopy(_REQUEST_ID)]
            operation["responses"].setdefault("400", _err("invalid_request: X-Request-ID breaks its pattern"))
    return document
