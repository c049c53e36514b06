"""The OpenAPI document describes every route, and real answers match its schemas."""

from __future__ import annotations

import re

import pytest

from gpu_server_helpers import AUTH, check_schema
from support.procs import emulator_control, wait_until


@pytest.fixture
def doc(client):
    response = client.get("/api/openapi.json", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


def schema_for(doc, path, method, status):
    response = doc["paths"][path][method]["responses"][str(status)]
    return response["content"]["application/json"]["schema"]


def assert_matches(doc, path, method, response):
    schema = schema_for(doc, path, method, response.status_code)
    problems = check_schema(response.get_json(), schema, doc)
    assert not problems, problems


def test_document_basics(doc):
    assert doc["openapi"].startswith("3.0")
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "GPU_BRIDGE_API_TOKEN"}
    assert doc["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/api/health"]["get"]["security"] == []
    assert {"Job", "Error", "Model", "Health"} <= set(doc["components"]["schemas"])


def test_every_route_and_method_is_documented(client, doc):
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in client.application.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("api.methods_"):
            continue  # routes.py's _exact_methods: they only answer OPTIONS and refuse (405) other methods
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented


def test_every_ref_resolves(doc):
    refs = re.findall(r"'\$ref': '#/components/schemas/(\w+)'", str(doc))
    assert refs and set(refs) <= set(doc["components"]["schemas"])


def test_real_answers_match_the_schemas(client, doc, ollama):
    assert_matches(doc, "/api/health", "get", client.get("/api/health"))
    assert_matches(doc, "/api/ready", "get", client.get("/api/ready", headers=AUTH))
    assert_matches(doc, "/api/models", "get", client.get("/api/models", headers=AUTH))
    assert_matches(doc, "/api/models/{name}", "delete", client.delete("/api/models/qwen2.5:0.5b", headers=AUTH))
    assert_matches(doc, "/api/models/{name}", "delete", client.delete("/api/models/qwen2.5:0.5b", headers=AUTH))
    assert_matches(doc, "/api/models/{name}", "post", client.post("/api/models/a..b", headers=AUTH))
    assert_matches(doc, "/api/ready", "get", client.get("/api/ready"))  # 401
    pulled = client.post("/api/models/tinyllama", headers=AUTH)
    assert pulled.status_code == 202
    assert_matches(doc, "/api/models/{name}", "post", pulled)
    job_id = pulled.get_json()["id"]
    done = wait_until(lambda: (r := client.get(f"/api/jobs/{job_id}", headers=AUTH)).get_json()["state"]
                      == "succeeded" and r, timeout=15, what="pull")
    assert_matches(doc, "/api/jobs/{job_id}", "get", done)
    assert_matches(doc, "/api/jobs", "get", client.get("/api/jobs", headers=AUTH))
    assert_matches(doc, "/api/jobs/{job_id}", "delete", client.delete(f"/api/jobs/{job_id}", headers=AUTH))  # 409
    assert_matches(doc, "/api/jobs/{job_id}", "get", client.get("/api/jobs/missing", headers=AUTH))  # 404
    failed = client.post("/api/models/no-such-model?wait=true", headers=AUTH)
    assert failed.status_code == 404
    assert_matches(doc, "/api/models/{name}", "post", failed)  # Error with the job inside
    emulator_control(ollama, "config", {"stall": True})
    running = client.post("/api/models/smollm:135m", headers=AUTH).get_json()
    assert_matches(doc, "/api/jobs/{job_id}", "delete", client.delete(f"/api/jobs/{running['id']}", headers=AUTH))


def test_the_checker_itself_catches_drift(doc):
    job_schema = {"$ref": "#/components/schemas/Job"}
    assert check_schema({"id": "x"}, job_schema, doc)  # missing keys
    error_schema = {"$ref": "#/components/schemas/Error"}
    assert check_schema({"error": "e", "code": 3}, error_schema, doc)  # wrong type
    assert check_schema({"error": "e", "code": "c", "stack": "..."}, error_schema, doc)  # undocumented key
    assert not check_schema({"error": "e", "code": "c"}, error_schema, doc)
