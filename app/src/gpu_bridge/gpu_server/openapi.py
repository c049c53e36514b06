"""The GPU server's OpenAPI 3.0 description, written by hand to match routes.py (tests check real answers)."""

from __future__ import annotations

import copy
from typing import Any

from ..config import DEFAULT_ALLOWED_REGISTRIES
from ..keep_alive import MAX_SECONDS
from ..keep_alive import PATTERN as KEEP_ALIVE_PATTERN
from ..names import MAX_NAME_LENGTH, name_pattern
from ..request_guard import REQUEST_ID_PATTERN

Json = dict[str, Any]  # a piece of the OpenAPI document


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json, description: str, headers: Json | None = None) -> Json:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: Json | None = None) -> Json:
    return _json(_ref("Error"), description, headers)


_NULLABLE_STR = {"type": "string", "nullable": True}
_TIMESTAMP = {"type": "string", "format": "date-time", "nullable": True,
              "description": "ISO 8601 UTC, e.g. 2025-05-04T17:37:44.706Z"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_LOCATION = {"Location": {"description": "the job's URL, /api/jobs/{id}", "schema": {"type": "string"}}}
_REQUEST_ID = {"name": "X-Request-ID", "in": "header", "required": False,
               "description": "caller's request id (1 to 128 of A-Z a-z 0-9 . _ : -), echoed in the response "
                              "header of the same name; left out, one is generated; any other value is a 400",
               "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": REQUEST_ID_PATTERN}}


def model_name_parameter(allowed_registries: tuple[str, ...] | None) -> Json:
    """The ``name`` path parameter: Ollama's grammar exactly (names.name_pattern); for a pull, a
    three-part name's registry must be on the allow-list (GPU_BRIDGE_ALLOWED_REGISTRIES)."""
    registries = "" if allowed_registries is None else \
        f"; registry one of {', '.join(allowed_registries)} (GPU_BRIDGE_ALLOWED_REGISTRIES)"
    return {"name": "name", "in": "path", "required": True,
            "description": "Ollama model name host/namespace/model:tag; may contain '/' (send it as is or "
                           f"%2F-encoded; it is checked after decoding){registries}",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH,
                       "pattern": name_pattern(allowed_registries)},
            "example": "llama3.2:latest"}


_MODEL_NAME = model_name_parameter(None)
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_UNAUTHORIZED = _error("missing or wrong bearer token (code unauthorized)")

SCHEMAS: Json = {
    "Error": {
        "type": "object", "required": ["error", "code"],
        "properties": {
            "error": {"type": "string", "description": "a message for humans"},
            "code": {"type": "string", "description": "a stable machine code, e.g. invalid_model_name"},
            "host": {"type": "string"},
            "job": _ref("Job"),
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "model", "state", "completed", "total", "percent", "status", "error", "error_code",
                     "created_at", "started_at", "finished_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "kind": {"type": "string", "enum": ["pull", "load"],
                     "description": "pull: a download (byte progress); load: into GPU memory (no byte progress)"},
            "keep_alive": {"type": "number", "nullable": True,
                           "description": "loads only: seconds, -1 forever, null for Ollama's default"},
            "model": {"type": "string", "description": "the model as pulled, with its tag"},
            "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "completed": {"type": "integer", "description": "bytes downloaded, summed over layers"},
            "total": {"type": "integer", "description": "bytes to download, summed over the layers seen so far"},
            "percent": {"type": "number", "nullable": True},
            "status": {**_NULLABLE_STR, "description": "Ollama's last status line"},
            "error": _NULLABLE_STR,
            "error_code": {**_NULLABLE_STR, "description": "e.g. model_not_found, pull_stalled, cancelled"},
            "created_at": _TIMESTAMP, "started_at": _TIMESTAMP, "finished_at": _TIMESTAMP, "updated_at": _TIMESTAMP,
            "joined": {"type": "boolean", "description": "only in a pull's answer: true when it joined a running pull"},
        },
    },
    "JobList": {"type": "object", "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "items": _ref("Job")}}},
    "ModelDetails": {
        "type": "object",
        "required": ["parent_model", "format", "family", "families", "parameter_size", "quantization_level"],
        "properties": {
            "parent_model": {"type": "string"}, "format": {"type": "string"}, "family": {"type": "string"},
            "families": {"type": "array", "items": {"type": "string"}, "description": "[] when Ollama says null"},
            "parameter_size": {"type": "string"}, "quantization_level": {"type": "string"},
        },
    },
    "Model": {
        "type": "object", "required": ["name", "size", "digest", "modified_at", "details"],
        "properties": {
            "name": {"type": "string", "example": "llama3.2:latest"},
            "size": {"type": "integer"},
            "digest": {"type": "string", "description": "hex, without sha256:"},
            "modified_at": {"type": "string", "description": "as Ollama gives it: RFC 3339 with nanoseconds"},
            "details": _ref("ModelDetails"),
        },
    },
    "ModelList": {"type": "object", "required": ["models"],
                  "properties": {"models": {"type": "array", "items": _ref("Model")}}},
    "Deleted": {"type": "object", "required": ["deleted"], "properties": {"deleted": {"type": "string"}}},
    "CopyRequest": {
        "type": "object", "required": ["source", "destination"],
        "properties": {"source": _MODEL_NAME["schema"], "destination": _MODEL_NAME["schema"]},
    },
    "Copied": {
        "type": "object", "required": ["source", "destination", "digest"],
        "properties": {"source": {"type": "string"}, "destination": {"type": "string"},
                       "digest": {**_NULLABLE_STR,
                                  "description": "the copy's digest (the source's: the blobs are shared)"}},
    },
    "LoadedModel": {
        "type": "object",
        "required": ["name", "model", "digest", "size", "size_vram", "cpu_spill", "context_length", "expires_at"],
        "properties": {
            "name": {"type": "string", "example": "llama3.2:latest"}, "model": {"type": "string"},
            "digest": {"type": "string", "description": "hex, without sha256:"},
            "size": {"type": "integer", "description": "bytes in memory (weights and context), GPU and system"},
            "size_vram": {"type": "integer", "description": "of which bytes in GPU memory"},
            "cpu_spill": {"type": "boolean",
                          "description": "size_vram < size: part of the model runs from system memory (slow)"},
            "context_length": {"type": "integer", "nullable": True,
                               "description": "the runner's context window (null from an Ollama too old)"},
            "expires_at": {"type": "string", "description": "when Ollama unloads it, as Ollama gives it (local "
                                                            "time, nanoseconds); about 292 years ahead: forever"},
        },
    },
    "LoadedModelList": {"type": "object", "required": ["models"],
                        "properties": {"models": {"type": "array", "items": _ref("LoadedModel")}}},
    "LoadRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"keep_alive": {
            "description": "how long the model stays loaded after its last use: a duration (30s, 5m, 1h30m: "
                           f"units ns us ms s m h), seconds, or forever / -1; more than zero, at most {MAX_SECONDS} s "
                           "(a year) unless forever; absent: Ollama's default (OLLAMA_KEEP_ALIVE)",
            "oneOf": [{"type": "string", "pattern": KEEP_ALIVE_PATTERN, "example": "1h"},
                      {"type": "number", "enum": [-1]},
                      {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_SECONDS}]}},
    },
    "Unloaded": {"type": "object", "required": ["unloaded"], "properties": {"unloaded": {"type": "string"}}},
    "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "GpuDevice": {
        "type": "object",
        "required": ["index", "name", "memory_total_bytes", "memory_used_bytes", "utilization_percent",
                     "temperature_c"],
        "properties": {
            "index": {"type": "integer"}, "name": _NULLABLE_STR,
            "memory_total_bytes": {"type": "integer", "nullable": True},
            "memory_used_bytes": {"type": "integer", "nullable": True},
            "utilization_percent": {"type": "integer", "nullable": True},
            "temperature_c": {"type": "integer", "nullable": True},
            "error": {"type": "string", "description": "metrics that could not be read"},
        },
    },
    "Health": {
        "type": "object", "required": ["status", "version", "uptime_seconds", "ollama", "gpu", "pulls"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"],
                       "description": "degraded when Ollama does not answer or no GPU is available"},
            "version": {"type": "string"},
            "uptime_seconds": {"type": "number"},
            "ollama": {
                "type": "object", "required": ["reachable", "version", "latency_ms"],
                "properties": {"reachable": {"type": "boolean"}, "version": _NULLABLE_STR,
                               "latency_ms": {"type": "number", "nullable": True}, "error": {"type": "string"}},
            },
            "gpu": {
                "type": "object", "required": ["available", "devices"],
                "properties": {"available": {"type": "boolean"},
                               "devices": {"type": "array", "items": _ref("GpuDevice")},
                               "error": {"type": "string"}},
            },
            "pulls": {"type": "object", "required": ["running", "queued"],
                      "properties": {"running": {"type": "integer"}, "queued": {"type": "integer"}}},
        },
    },
}

PATHS: Json = {
    "/api/health": {"get": {
        "summary": "Health of this GPU host (no authentication; never fails)", "operationId": "health",
        "security": [],
        "responses": {"200": _json(_ref("Health"), "health report")},
    }},
    "/api/ready": {"get": {
        "summary": "Ready when Ollama answers", "operationId": "ready",
        "responses": {"200": _json(_ref("Ready"), "Ollama answers"), "401": _UNAUTHORIZED,
                      "503": _error("Ollama does not answer (ollama_unavailable)")},
    }},
    "/api/models": {"get": {
        "summary": "Installed models", "operationId": "listModels",
        "responses": {"200": _json(_ref("ModelList"), "installed models, newest first"), "401": _UNAUTHORIZED,
                      "503": _error("Ollama is not reachable (ollama_unavailable)"),
                      "504": _error("Ollama did not answer in time (ollama_timeout)")},
    }},
    "/api/models/{name}": {
        "post": {
            "summary": "Pull a model (or join the running pull of the same model)", "operationId": "pullModel",
            "description": "Starts a background job and answers 202 at once; with wait=true it answers when the "
                           "pull ends (bounded by stall detection, not by a total deadline). Rate-limited.",
            "parameters": [_MODEL_NAME,
                           {"name": "wait", "in": "query", "required": False, "schema": {"type": "boolean"}}],
            "responses": {
                "200": _json(_ref("Job"), "wait=true: the pull succeeded", _LOCATION),
                "202": _json(_ref("Job"), "the job (joined: true when it joined a running pull)", _LOCATION),
                "400": _error("invalid_model_name, registry_not_allowed or invalid_request"),
                "401": _UNAUTHORIZED,
                "404": _error("wait=true: model_not_found (the error body carries the job)"),
                "409": _error("wait=true: the job was cancelled (code cancelled)"),
                "429": _error("queue_full, rate_limited, or too_many_waits (wait=true while "
                              "GPU_BRIDGE_MAX_WAITING_PULLS requests already wait)", _RETRY_AFTER),
                "502": _error("wait=true: ollama_error"),
                "503": _error("wait=true: ollama_unavailable"),
                "504": _error("wait=true: pull_stalled or ollama_timeout"),
                "507": _error("insufficient_storage: too little free disk space"),
            },
        },
        "delete": {
            "summary": "Delete an installed model", "operationId": "deleteModel",
            "description": "The registry allow-list does not apply (nothing is fetched). Rate-limited.",
            "parameters": [_MODEL_NAME],
            "responses": {"200": _json(_ref("Deleted"), "deleted"), "400": _error("invalid_model_name"),
                          "401": _UNAUTHORIZED, "404": _error("model_not_found: not installed"),
                          "429": _error("rate_limited", _RETRY_AFTER),
                          "503": _error("ollama_unavailable")},
        },
    },
    "/api/models/loaded": {"get": {
        "summary": "Models in memory now (Ollama's /api/ps), with the part spilled to system memory",
        "operationId": "loadedModels",
        "responses": {"200": _json(_ref("LoadedModelList"), "loaded models"), "401": _UNAUTHORIZED,
                      "503": _error("Ollama is not reachable (ollama_unavailable)"),
                      "504": _error("Ollama did not answer in time (ollama_timeout)")},
    }},
    "/api/models/{name}/load": {"post": {
        "summary": "Load an installed model into GPU memory (or join the same load running)",
        "operationId": "loadModel",
        "description": "A background job of kind load (follow or cancel it under /api/jobs); 202 at once, or with "
                       "wait=true when it ends. Nothing is downloaded: the grammar applies, the registry "
                       "allow-list does not. Rate-limited.",
        "parameters": [_MODEL_NAME, {"name": "wait", "in": "query", "required": False, "schema": {"type": "boolean"}}],
        "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("LoadRequest")}}},
        "responses": {
            "200": _json(_ref("Job"), "wait=true: the model is loaded", _LOCATION),
            "202": _json(_ref("Job"), "the load job (joined: true when it joined a running load)", _LOCATION),
            "400": _error("invalid_model_name; invalid_request: a bad keep_alive (zero, over a year), a body that "
                          "is not a JSON object, an unknown field; wait=true: an embedding-only model"),
            "401": _UNAUTHORIZED, "403": _error("forbidden: an Origin header (not for browsers)"),
            "404": _error("model_not_found: not installed on this host (pull it first)"),
            "409": _error("wait=true: the job was cancelled (code cancelled)"),
            "415": _error("unsupported_media_type: the body is not application/json"),
            "429": _error("rate_limited, queue_full or too_many_waits", _RETRY_AFTER),
            "502": _error("wait=true: ollama_error"), "503": _error("ollama_unavailable"),
            "504": _error("ollama_timeout (with wait=true: the load took longer than GPU_BRIDGE_PULL_STALL_TIMEOUT)"),
        },
    }},
    "/api/models/{name}/unload": {"post": {
        "summary": "Unload a model from memory now (no error when it was not loaded)", "operationId": "unloadModel",
        "description": "Rate-limited.",
        "parameters": [_MODEL_NAME],
        "responses": {"200": _json(_ref("Unloaded"), "not in memory any more"), "400": _error("invalid_model_name"),
                      "401": _UNAUTHORIZED, "404": _error("model_not_found: not installed"),
                      "429": _error("rate_limited", _RETRY_AFTER), "503": _error("ollama_unavailable"),
                      "504": _error("ollama_timeout")},
    }},
    "/api/copy": {"post": {
        "summary": "Copy a model under another name (no download: the blobs are shared)", "operationId": "copyModel",
        "description": "Both names are checked by the grammar; the registry allow-list does not apply (nothing is "
                       "fetched). models as code keeps the build an update replaces, and rolls back, with it. "
                       "Rate-limited.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CopyRequest")}}},
        "responses": {"200": _json(_ref("Copied"), "copied"),
                      "400": _error("invalid_model_name or invalid_request (a missing field, not JSON)"),
                      "401": _UNAUTHORIZED, "403": _error("forbidden: an Origin header (not for browsers)"),
                      "404": _error("model_not_found: the source is not installed"),
                      "415": _error("unsupported_media_type: the body is not application/json"),
                      "429": _error("rate_limited", _RETRY_AFTER),
                      "503": _error("ollama_unavailable"), "504": _error("ollama_timeout")},
    }},
    "/api/jobs": {"get": {
        "summary": "Pull jobs, newest first (finished ones are kept for GPU_BRIDGE_JOB_RETENTION s)",
        "operationId": "listJobs",
        "responses": {"200": _json(_ref("JobList"), "jobs"), "401": _UNAUTHORIZED},
    }},
    "/api/jobs/{job_id}": {
        "get": {"summary": "One pull job", "operationId": "getJob", "parameters": [_JOB_ID],
                "responses": {"200": _json(_ref("Job"), "the job"), "401": _UNAUTHORIZED,
                              "404": _error("job_not_found")}},
        "delete": {"summary": "Cancel a queued or running pull", "operationId": "cancelJob",
                   "parameters": [_JOB_ID],
                   "responses": {"200": _json(_ref("Job"), "the job, state cancelled"), "401": _UNAUTHORIZED,
                                 "404": _error("job_not_found"), "409": _error("conflict: already finished"),
                                 "429": _error("rate_limited", _RETRY_AFTER)}},
    },
    "/metrics": {"get": {
        "summary": "Prometheus metrics (no authentication when GPU_BRIDGE_METRICS_PUBLIC=true)",
        "operationId": "metrics",
        "responses": {"200": {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "401": _UNAUTHORIZED},
    }},
    "/api/openapi.json": {"get": {
        "summary": "This document", "operationId": "openapi",
        "responses": {"200": {"description": "OpenAPI 3.0 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": _UNAUTHORIZED},
    }},
}


def build_document(version: str, allowed_registries: tuple[str, ...] = DEFAULT_ALLOWED_REGISTRIES) -> Json:
    """The document as this server applies it: the pull route's name pattern carries the allow-list."""
    paths = copy.deepcopy(PATHS)
    pull = paths["/api/models/{name}"]["post"]
    pull["parameters"] = [model_name_parameter(tuple(allowed_registries)) if p.get("name") == "name" else p
                          for p in pull["parameters"]]
    for operations in paths.values():
        for operation in operations.values():
            operation.setdefault("parameters", []).append(_REQUEST_ID)
            operation["responses"].setdefault("400", _error("invalid_request: X-Request-ID breaks its pattern"))
            operation["responses"].setdefault("413", _error("payload_too_large: body over GPU_BRIDGE_MAX_BODY_BYTES"))
            operation["responses"].setdefault("500", _error("internal_error (details only in the server log)"))
    return {
        "openapi": "3.0.3",
        "info": {"title": "gpu-bridge GPU server", "version": version,
                 "description": "Authenticated front door to Ollama on one GPU host: models, pull jobs, health. "
                                "Every error is JSON {error, code}."},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "GPU_BRIDGE_API_TOKEN"}},
            "schemas": copy.deepcopy(SCHEMAS),
        },
    }
