"""Per-host circuit breaker: a dead GPU host costs no waiting.

closed     calls go through; ``threshold`` consecutive host failures open the circuit.
open       calls fail at once with ``CircuitOpen`` until ``cooldown`` seconds have passed.
half_open  after the cool-down the first caller runs the breaker's ``probe`` (a cheap health call),
           never its own call: a success closes the circuit and the call goes on; a failure opens it
           again for another cool-down. Other callers get ``CircuitOpen`` while the probe runs. (Without
           a probe the first call itself is the trial, as before.)

Only failures of the host count (the ``GpuHostError`` family: refused, reset, timed out, the GPU
server's own 5xx). A 4xx answer (unknown model, bad name) or a failed pull job means the host
answered, so it counts as a success. A refused token (``GpuHostUnauthorized``) is a configuration
error, not a sick host: it does not count either way, so rotating tokens cannot take hosts "down".
Every transition is logged (``gpu_bridge.backend.breaker``, event ``breaker_transition``) with the
host, the states and the reason, and reported to ``on_transition(host, old, new, reason)`` when given
(the backend's metrics count them): closed -> open, open -> half_open (the cool-down ended),
half_open -> open or closed (the trial's verdict), open -> closed (a call begun before the circuit
opened came back fine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import CircuitOpen, GpuBridgeError, GpuHostError, GpuHostUnauthorized
from ..logs import Fields

T = TypeVar("T")
# A child of the backend's logger: transitions land in its JSON log (the backend owns the breakers).
log = logging.getLogger("gpu_bridge.backend.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, name: str, threshold: int = 3, cooldown: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, probe: Callable[[], object] | None = None,
                 on_transition: Callable[[str, str, str, str], None] | None = None):
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.name = name
        # Called under the breaker's lock: it must be quick and must not call back into the breaker.
        self.on_transition = on_transition
        self.probe = probe
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.last_error: str | None = None
        self.last_error_code: str | None = None
        self.last_failure_at: float | None = None
        self.last_success_at: float | None = None

    # --- state -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._current_state()

    def _current_state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
            return HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until a trial call is allowed (0 when not open)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.cooldown - (self._clock() - self._opened_at))

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            state = self._current_state()
            out: dict[str, object] = {"state": state, "consecutive_failures": self._failures}
            if self._state == OPEN:
                out["retry_in_s"] = round(max(0.0, self.cooldown - (self._clock() - self._opened_at)), 1)
            if self.last_error is not None:
                out["last_error"] = self.last_error
                out["last_error_code"] = self.last_error_code
            return out

    def _move(self, new: str, reason: str, message: str | None = None) -> None:
        """Under the lock: enter ``new``; a change of state is logged and reported with its reason."""
        old, self._state = self._state, new
        if old == new:
            return
        verb = {OPEN: "opened", HALF_OPEN: "half-open"}.get(new, new)
        log.log(logging.INFO if new == HALF_OPEN else logging.WARNING, Fields(
            message=message or f"circuit for {self.name} {verb}: {reason}", event="breaker_transition",
            host=self.name, old_state=old, new_state=new, reason=reason, consecutive_failures=self._failures))
        if self.on_transition is not None:
            self.on_transition(self.name, old, new, reason)

    # --- protocol ----------------------------------------------------------------------------
    def before_call(self) -> bool:
        """Raise ``CircuitOpen`` or admit the call; True when the call is the half-open trial."""
        with self._lock:
            state = self._current_state()
            if state == CLOSED:
                return False
            if state == HALF_OPEN and not self._trial_in_flight:
                self._move(HALF_OPEN, f"the {self.cooldown:g} s cool-down is over, " + (
                    "probing its health" if self.probe is not None else "the next call is the trial"))
                self._trial_in_flight = True
                return True
            wait = max(0.0, self.cooldown - (self._clock() - self._opened_at))
            detail = f"; last error: {self.last_error}" if self.last_error else ""
            when = f"next try in {wait:.0f} s" if state == OPEN else "a trial call is in progress"
            failures = self._failures
        raise CircuitOpen(f"{self.name} is marked down after {failures} consecutive failures ({when}){detail}",
                          host=self.name)

    def record_success(self, trial: bool = False) -> None:
        with self._lock:
            self._failures = 0
            self._move(CLOSED, "the health probe succeeded" if trial else "a call succeeded")
            if trial:
                self._trial_in_flight = False
            self.last_success_at = self._clock()

    def record_failure(self, exc: BaseException | None = None, trial: bool = False) -> None:
        with self._lock:
            self._failures += 1
            if trial:
                self._trial_in_flight = False
            if exc is not None:
                self.last_error = getattr(exc, "message", None) or str(exc)
                self.last_error_code = getattr(exc, "code", None)
            self.last_failure_at = self._clock()
            if trial or self._state == HALF_OPEN or self._failures >= self.threshold:
                error = self.last_error or "no detail"
                reason = (f"the half-open probe failed: {error}" if trial
                          else f"{self._failures} consecutive failure(s): {error}")
                # Already open (a call begun before it opened failed too): no transition, a new cool-down.
                self._move(OPEN, reason, f"circuit for {self.name} opened for {self.cooldown:g} s after "
                                         f"{self._failures} consecutive failure(s)"
                                         f"{' (the half-open probe failed)' if trial else ''}: {error}")
                self._opened_at = self._clock()

    def release_trial(self, trial: bool) -> None:
        """The trial ended without a verdict (a bug, not a host failure): let the next call try."""
        if trial:
            with self._lock:
                self._trial_in_flight = False

    def _run_probe(self) -> None:
        """The half-open trial: the probe, not the caller's call. Raises CircuitOpen when it fails."""
        assert self.probe is not None
        try:
            self.probe()
        except GpuHostUnauthorized:
            self.record_success(trial=True)  # it answered; the token is another matter (reported by the call)
        except GpuHostError as exc:
            self.record_failure(exc, trial=True)
            raise CircuitOpen(f"{self.name} is still down: the health probe after the cool-down failed: "
                              f"{exc.message}", host=self.name) from None
        except GpuBridgeError:
            self.record_success(trial=True)
        except BaseException:
            self.release_trial(True)
            raise
        else:
            self.record_success(trial=True)

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        trial = self.before_call()
        if trial and self.probe is not None:
            self._run_probe()
            trial = False
        try:
            result = fn(*args, **kwargs)
        except GpuHostUnauthorized:
            self.release_trial(trial)  # a configuration error: neither a failure nor proof of health
            raise
        except GpuHostError as exc:
            self.record_failure(exc, trial)
            raise
        except GpuBridgeError:
            self.record_success(trial)  # the host answered (4xx, failed job): it is alive
            raise
        except BaseException:
            self.release_trial(trial)
            raise
        self.record_success(trial)
        return result

    def reset(self) -> None:
        with self._lock:
            self._failures, self._trial_in_flight = 0, False
            self._move(CLOSED, "reset")


__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]
