"""Constants and checks shared by the GPU server tests (importable: pytest puts this directory on sys.path)."""

from __future__ import annotations

TOKEN = "s3cret-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB_KEYS = {"id", "kind", "model", "state", "completed", "total", "percent", "status", "error", "error_code",
            "created_at", "started_at", "finished_at", "updated_at"}


def check_schema(value, schema: dict, document: dict, where: str = "$") -> list[str]:
    """Problems of ``value`` against an OpenAPI 3.0 schema (type, nullable, enum, required, properties,
    items, $ref): a small hand-rolled subset, enough to catch a document that drifts from the code."""
    if "$ref" in schema:
        target = document
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return check_schema(value, target, document, where)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null but not nullable"]
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    if kind:
        if kind in ("integer", "number") and isinstance(value, bool):
            return [f"{where}: boolean where {kind} expected"]
        if not isinstance(value, types[kind]):
            return [f"{where}: {type(value).__name__} where {kind} expected"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if kind == "object":
        problems += [f"{where}: missing required {key!r}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += check_schema(value[key], sub, document, f"{where}.{key}")
        undocumented = set(value) - set(schema.get("properties", {}))
        if schema.get("properties") and undocumented:
            problems.append(f"{where}: undocumented keys {sorted(undocumented)}")
    if kind == "array":
        for index, item in enumerate(value):
            problems += check_schema(item, schema.get("items", {}), document, f"{where}[{index}]")
    return problems
