"""schemathesis against the OpenAPI documents both services publish (``/api/openapi.json``).

Every operation is fuzzed with schema-valid (positive) and schema-violating (negative) inputs through
the WSGI apps; every answer must be free of server errors and conform to the document: documented
status code, content type, headers and body schema. The backend has a real GPU server process
(gunicorn) and Ollama emulator behind it, so its answers are the real ones.

Mismatches already reported to the document owners are listed in ``KNOWN``: the fuzzing ignores
exactly those and nothing else (none at present). The deterministic tests below pin mismatches that
were found and fixed: a job's ``status`` is null until the first progress line, and a bad ``limit``
answers a documented 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import schemathesis
from hostile_helpers import ADMIN_AUTH, GPU_AUTH, backend_config, gpu_config, gunicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from gpu_bridge import __version__
from gpu_bridge.backend import create_app as create_backend
from gpu_bridge.backend.openapi import openapi_document
from gpu_bridge.gpu_server import create_app as create_gpu_server
from gpu_bridge.gpu_server.openapi import build_document
from support.procs import emulator_control

pytestmark = pytest.mark.integration

EXAMPLES = 25
CHECKS = (not_a_server_error, openapi_checks.status_code_conformance, openapi_checks.content_type_conformance,
          openapi_checks.response_schema_conformance, openapi_checks.response_headers_conformance)
GPU_DOC = build_document(__version__)
BACKEND_DOC = openapi_document()
GPU_SCHEMA = schemathesis.openapi.from_dict(GPU_DOC)
BACKEND_SCHEMA = schemathesis.openapi.from_dict(BACKEND_DOC)


def _operations(schema) -> dict:
    return {result.ok().label: result.ok() for result in schema.get_all_operations()}


GPU_OPERATIONS = _operations(GPU_SCHEMA)
BACKEND_OPERATIONS = _operations(BACKEND_SCHEMA)


class DocMismatch(AssertionError):
    """An answer that does not conform to the published document."""


@dataclass(frozen=True)
class Known:
    what: str
    operations: frozenset[str] | None  # None: any operation
    matches: Callable[[Failure], bool]


KNOWN: dict[str, list[Known]] = {
    "backend": [],
    "gpu": [],
}


def _validate(case, response, known: list[Known], checks=CHECKS) -> None:
    try:
        case.validate_response(response, checks=list(checks))
    except FailureGroup as group:
        label = case.operation.label
        left = [f for f in group.exceptions
                if not any((k.operations is None or label in k.operations) and k.matches(f) for k in known)]
        if left:
            detail = "\n\n".join(f"[{f.code}] {f.title}: {f.message}" for f in left)
            answer = response.content[:600].decode(errors="replace")
            raise DocMismatch(f"{label}: {len(left)} failure(s)\n{detail}\n\nrequest: {case.as_curl_command()}\n"
                              f"answer: {response.status_code} {answer}") from None


def _fuzz(operation, mode: str, app, headers: dict, known: list[Known]) -> int:
    calls = 0

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case):
        nonlocal calls
        calls += 1
        _validate(case, case.call(app=app, headers=headers), known)

    try:
        run()
    except Unsatisfiable:
        if mode == "negative":
            return 0  # the document constrains nothing here: no schema-violating input exists
        raise
    return calls


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ollama(module_emulator):
    emulator_control(module_emulator, "reset")
    emulator_control(module_emulator, "config", {"pull_speed": 5e9, "verify_seconds": 0})
    yield module_emulator
    emulator_control(module_emulator, "reset")


@pytest.fixture(scope="module")
def gpu_app(ollama):
    app = create_gpu_server(gpu_config(ollama.url))
    app.testing = True
    yield app
    app.extensions["gpu_bridge"].close()


@pytest.fixture(scope="module")
def backend_app(ollama, tmp_path_factory):
    gpu = gunicorn("gpu_bridge.gpu_server:create_app()", gpu_config(ollama.url), probe="/api/health",
                   name="gpu-server", access_log=False)
    app = create_backend(backend_config(f"127.0.0.1:{gpu.port}", tmp_path_factory.mktemp("schema") / "b.db"))
    app.testing = True
    yield app
    gpu.stop()


# --- the documents -----------------------------------------------------------------------------------------------
def test_served_documents_are_the_ones_tested(gpu_app, backend_app):
    r = gpu_app.test_client().get("/api/openapi.json", headers=GPU_AUTH)
    assert r.status_code == 200 and r.get_json() == json.loads(json.dumps(GPU_DOC))
    # The backend serves its document with its own GPU hosts as the enum of a body's "hosts" and its
    # allow-list in a pull's name pattern; the fuzzing below uses the general form of the same document.
    state = backend_app.extensions["gpu_bridge_backend"]
    hosts = [*state.fleet.labels, *(slot.host.name for slot in state.fleet.slots.values())]
    served_doc = openapi_document(hosts, state.settings.allowed_registries)
    r = backend_app.test_client().get("/api/openapi.json")
    assert r.status_code == 200 and r.get_json() == json.loads(json.dumps(served_doc))
    assert served_doc["paths"].keys() == BACKEND_DOC["paths"].keys()
    # Every route the apps serve is described (static files aside), and nothing else.
    for app, doc in ((gpu_app, GPU_DOC), (backend_app, BACKEND_DOC)):
        served = {(m, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).replace("{pull_id}", "{id}"))
                  for rule in app.url_map.iter_rules()
                  # routes.py's _exact_methods guards only refuse (405) the methods a route does not take
                  if rule.endpoint != "static" and not rule.endpoint.startswith("api.methods_")
                  for m in rule.methods - {"HEAD", "OPTIONS"}}
        documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
        assert served == documented, f"served only: {served - documented}; documented only: {documented - served}"


# --- fuzzing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", sorted(GPU_OPERATIONS))
def test_gpu_server_conforms_to_its_document(gpu_app, label, mode):
    _fuzz(GPU_OPERATIONS[label], mode, gpu_app, GPU_AUTH, KNOWN["gpu"])


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", sorted(BACKEND_OPERATIONS))
def test_backend_conforms_to_its_document(backend_app, label, mode):
    _fuzz(BACKEND_OPERATIONS[label], mode, backend_app, ADMIN_AUTH, KNOWN["backend"])


# --- known document mismatches, one deterministic test each -------------------------------------------------------
def test_backend_doc_job_status_null(backend_app, ollama):
    operation = BACKEND_OPERATIONS["POST /config/pull-model"]
    case = operation.Case(body={"model": "tinyllama"}, media_type="application/json")
    emulator_control(ollama, "config", {"latency_ms": 400})  # the first progress line is still to come
    try:
        response = case.call(app=backend_app, headers=ADMIN_AUTH)
    finally:
        emulator_control(ollama, "config", {"latency_ms": 0})
    body = json.loads(response.content)
    jobs = [r["job"] for r in body["results"].values()]
    assert response.status_code == 202 and jobs and jobs[0]["status"] is None, body  # the premise
    _validate(case, response, [])


@pytest.mark.parametrize("path", ["/config/pulls", "/config/audit"])
def test_backend_doc_bad_limit(backend_app, path):
    case = BACKEND_OPERATIONS[f"GET {path}"].Case(query={"limit": "abc"})
    response = case.call(app=backend_app, headers=ADMIN_AUTH)
    assert response.status_code == 400, response.content  # the premise
    _validate(case, response, [])
