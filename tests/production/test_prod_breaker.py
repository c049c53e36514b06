"""Circuit breaker: opens after N consecutive host failures, fails fast, half-opens after a cool-down."""

from __future__ import annotations

import threading

import pytest

from gpu_bridge.client.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gpu_bridge.errors import CircuitOpen, GpuHostUnreachable, ModelNotFound


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def down():
    raise GpuHostUnreachable("gpu-01:8001 refused the connection", host="gpu-01:8001")


def test_opens_after_threshold_and_fails_fast():
    clock = Clock()
    b = CircuitBreaker("gpu-01:8001", threshold=3, cooldown=10, clock=clock)
    calls = []

    def failing():
        calls.append(1)
        down()

    for _ in range(2):
        with pytest.raises(GpuHostUnreachable):
            b.call(failing)
        assert b.state == CLOSED
    with pytest.raises(GpuHostUnreachable):
        b.call(failing)
    assert b.state == OPEN
    with pytest.raises(CircuitOpen) as info:
        b.call(failing)
    assert len(calls) == 3, "an open breaker must not call the host"
    assert info.value.host == "gpu-01:8001"
    assert "refused the connection" in info.value.message
    assert info.value.code == "gpu_circuit_open" and info.value.status == 503


def test_success_resets_the_count():
    b = CircuitBreaker("h", threshold=2, cooldown=10, clock=Clock())
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    assert b.call(lambda: "ok") == "ok"
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    assert b.state == CLOSED


def test_client_errors_do_not_count():
    b = CircuitBreaker("h", threshold=1, cooldown=10, clock=Clock())

    def missing():
        raise ModelNotFound("model 'x' not found", host="h")

    for _ in range(3):
        with pytest.raises(ModelNotFound):
            b.call(missing)
    assert b.state == CLOSED


def test_half_open_admits_one_trial_then_closes_on_success():
    clock = Clock()
    b = CircuitBreaker("h", threshold=1, cooldown=5, clock=clock)
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    assert b.state == OPEN
    assert b.retry_in() == pytest.approx(5)
    clock.now += 5
    assert b.state == HALF_OPEN

    entered, release = threading.Event(), threading.Event()
    results = []

    def slow_trial():
        entered.set()
        release.wait(5)
        return "ok"

    t = threading.Thread(target=lambda: results.append(b.call(slow_trial)))
    t.start()
    assert entered.wait(5)
    with pytest.raises(CircuitOpen, match="trial call is in progress"):
        b.call(lambda: "second caller")
    release.set()
    t.join(5)
    assert results == ["ok"]
    assert b.state == CLOSED
    assert b.call(lambda: 1) == 1


def test_half_open_failure_reopens_for_another_cooldown():
    clock = Clock()
    b = CircuitBreaker("h", threshold=2, cooldown=5, clock=clock)
    for _ in range(2):
        with pytest.raises(GpuHostUnreachable):
            b.call(down)
    clock.now += 6
    with pytest.raises(GpuHostUnreachable):
        b.call(down)  # the trial
    assert b.state == OPEN
    with pytest.raises(CircuitOpen):
        b.call(lambda: "x")
    clock.now += 5
    assert b.state == HALF_OPEN


def test_a_bug_in_the_trial_releases_it():
    clock = Clock()
    b = CircuitBreaker("h", threshold=1, cooldown=1, clock=clock)
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    clock.now += 1

    def bug():
        raise RuntimeError("not a host failure")

    with pytest.raises(RuntimeError):
        b.call(bug)
    assert b.call(lambda: "next trial") == "next trial"
    assert b.state == CLOSED


def test_snapshot_reports_state_and_last_error():
    clock = Clock()
    b = CircuitBreaker("h", threshold=1, cooldown=30, clock=clock)
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    snap = b.snapshot()
    assert snap["state"] == OPEN
    assert snap["consecutive_failures"] == 1
    assert snap["last_error_code"] == "gpu_unreachable"
    assert snap["retry_in_s"] == 30


# --- the half-open trial is a health probe, never the caller's call (issue 13) ----------------------------------
def _opened(clock, probe):
    b = CircuitBreaker("gpu-01:8001", threshold=1, cooldown=10, clock=clock, probe=probe)
    with pytest.raises(GpuHostUnreachable):
        b.call(down)
    assert b.state == OPEN
    clock.now += 10
    assert b.state == HALF_OPEN
    return b


def test_half_open_runs_the_probe_first_then_the_call():
    clock, order = Clock(), []
    b = _opened(clock, probe=lambda: order.append("probe"))
    assert b.call(lambda: order.append("call") or "answer") == "answer"
    assert order == ["probe", "call"] and b.state == CLOSED


def test_a_failed_probe_keeps_the_circuit_open_and_never_runs_the_call():
    clock, calls = Clock(), []
    b = _opened(clock, probe=down)
    with pytest.raises(CircuitOpen, match="health probe after the cool-down failed"):
        b.call(lambda: calls.append(1))
    assert calls == [] and b.state == OPEN and b.retry_in() == 10


def test_a_long_call_after_the_probe_does_not_block_others_as_a_trial():
    clock = Clock()
    b = _opened(clock, probe=lambda: None)
    release, inside = threading.Event(), threading.Event()

    def long_pull():
        inside.set()
        release.wait(5)

    t = threading.Thread(target=b.call, args=(long_pull,))
    t.start()
    assert inside.wait(5)
    assert b.call(lambda: "other") == "other"  # the closed circuit admits others during the long call
    release.set()
    t.join(5)


def test_a_refused_token_is_not_a_host_failure():
    from gpu_bridge.errors import GpuHostUnauthorized

    b = CircuitBreaker("gpu-01:8001", threshold=2, cooldown=10, clock=Clock())

    def refused():
        raise GpuHostUnauthorized("token rejected by gpu-01:8001", host="gpu-01:8001")

    for _ in range(10):
        with pytest.raises(GpuHostUnauthorized):
            b.call(refused)
    assert b.state == CLOSED and b.snapshot()["consecutive_failures"] == 0


def test_transitions_are_logged_with_host_and_reason(caplog):
    import logging

    # Straight on the breaker's logger: the backend's logger above it does not propagate to the root.
    logger = logging.getLogger("gpu_bridge.backend.breaker")
    logger.addHandler(caplog.handler)
    try:
        clock = Clock()
        b = _opened(clock, probe=lambda: None)
        b.call(lambda: None)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert any("circuit for gpu-01:8001 opened" in m and "refused the connection" in m for m in messages), messages
    assert any("circuit for gpu-01:8001 closed: the health probe succeeded" in m for m in messages), messages
