"""errors.py: every error has a status and a code, and renders as {"error", "code"}."""

from __future__ import annotations

import inspect

import pytest

from gpu_bridge import errors

ALL = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.GpuBridgeError)]


@pytest.mark.parametrize("cls", ALL, ids=[c.__name__ for c in ALL])
def test_every_error_has_a_status_and_a_snake_case_code(cls):
    assert 400 <= cls.status <= 599
    assert cls.code and cls.code == cls.code.lower() and " " not in cls.code


def test_codes_are_unique():
    codes = [cls.code for cls in ALL]
    assert len(codes) == len(set(codes))


def test_to_dict_shape_and_host():
    assert errors.ModelNotFound("gone").to_dict() == {"error": "gone", "code": "model_not_found"}
    assert errors.GpuHostUnreachable("down", host="gpu1:8001").to_dict() == {
        "error": "down", "code": "gpu_unreachable", "host": "gpu1:8001"}


def test_status_and_code_can_be_overridden_per_instance():
    err = errors.GpuBridgeError("busy", status=503, code="shutting_down", extra={"retry": True})
    assert (err.status, err.code) == (503, "shutting_down")
    assert err.to_dict() == {"error": "busy", "code": "shutting_down", "retry": True}
    assert errors.GpuBridgeError.status == 500  # the class is untouched


@pytest.mark.parametrize(("given", "expected"), [(0, 1), (1, 1), (7, 7), (2.9, 2)])
def test_retry_after_is_a_positive_integer(given, expected):
    assert errors.QueueFull("full", retry_after=given).retry_after == expected


@pytest.mark.parametrize(("cls", "status", "code"), [
    (errors.InvalidModelName, 400, "invalid_model_name"), (errors.RegistryNotAllowed, 400, "registry_not_allowed"),
    (errors.Unauthorized, 401, "unauthorized"), (errors.JobNotFound, 404, "job_not_found"),
    (errors.Conflict, 409, "conflict"), (errors.PayloadTooLarge, 413, "payload_too_large"),
    (errors.QueueFull, 429, "queue_full"), (errors.RateLimited, 429, "rate_limited"),
    (errors.OllamaError, 502, "ollama_error"), (errors.OllamaUnavailable, 503, "ollama_unavailable"),
    (errors.OllamaTimeout, 504, "ollama_timeout"), (errors.PullStalled, 504, "pull_stalled"),
    (errors.InsufficientStorage, 507, "insufficient_storage"),
])
def test_contract_statuses(cls, status, code):
    """The statuses docs/architecture.md promises for the GPU server API."""
    assert (cls.status, cls.code) == (status, code)
