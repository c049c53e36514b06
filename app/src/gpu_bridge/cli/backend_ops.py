"""``model_exec.ModelOps`` for one GPU host through a backend's routes: what ``gpu-bridge models apply``
and ``models rollback`` run each plan step with.

Every call names the one host (``"hosts": [label]``), so an apply goes host by host, batch by batch,
through the same routes (and the same audit log, limits and allow-list) as any operator's command:
the merged listing's per-host digests, pull (started, then followed until it ends), delete, copy, load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..errors import GpuBridgeError, GpuHostError, ModelNotFound

if TYPE_CHECKING:  # the target pulls in requests, which `gpu-bridge --help` need not load
    from .target import BackendClient, JsonDict

POLL_INTERVAL = 0.5  # seconds between polls of a pull
NO_PROGRESS_LIMIT = 900.0  # a pull that shows no change for this long is given up (the GPU side stalls at 300 s)


class BackendModelOps:
    """One GPU host (by its backend label) reached through ``backend``; ``say`` gets progress lines."""

    def __init__(self, backend: BackendClient, host: str, say: Callable[[str], None] | None = None) -> None:
        self.backend, self.host = backend, host
        self.say = say or (lambda line: None)

    def _call(self, method: str, path: str, body: JsonDict | None = None) -> JsonDict:
        try:
            return self.backend.call(method, path, body)
        except GpuBridgeError as exc:
            if exc.code == "model_not_found":
                raise ModelNotFound(exc.message, host=self.host) from None
            raise

    def list_models(self) -> list[dict[str, object]]:
        """The host's models with its own digest of each (the merged listing's ``digests``)."""
        data = self._call("GET", "/config/models?refresh=true")
        status = (data.get("hosts") or {}).get(self.host) or {}
        if not status.get("ok") or status.get("stale"):
            raise GpuHostError(f"{self.host}: its models could not be read: {status.get('error') or 'no answer'}",
                               host=self.host, code=status.get("code") or "gpu_unreachable")
        return [{"name": m.get("name"), "digest": (m.get("digests") or {}).get(self.host, m.get("digest"))}
                for m in data.get("models") or [] if self.host in (m.get("hosts") or [])]

    def copy(self, source: str, destination: str) -> None:
        self._one("copy", self._call("POST", "/config/copy-model",
                                     {"source": source, "destination": destination, "hosts": [self.host]}))

    def delete(self, name: str) -> None:
        self._one("delete", self._call("POST", "/config/delete-model", {"model": name, "hosts": [self.host]}))

    def load(self, name: str, keep_alive: str | int | None) -> None:
        body: JsonDict = {"model": name, "hosts": [self.host], "wait": True}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        self._one("load", self._call("POST", "/config/load-model", body))

    def pull(self, name: str) -> None:
        """Start the pull on this host, then follow it until it ends (bounded by progress, not time)."""
        started = self._call("POST", "/config/pull-model", {"model": name, "hosts": [self.host], "wait": False})
        self._one("pull", started)
        pull_id = started.get("id")
        if not isinstance(pull_id, str) or not pull_id:
            raise GpuBridgeError(f"{self.host}: the backend started the pull of {name} without a pull id to follow")
        last_key, last_change, last_said = None, time.monotonic(), 0.0
        while True:
            status = self._call("GET", f"/config/pull-status/{quote(pull_id, safe='')}")
            result = (status.get("results") or {}).get(self.host) or {}
            job = result.get("job") or {}
            if status.get("done"):
                if job.get("state") == "succeeded":
                    return
                message = job.get("error") or result.get("error") or f"pull {job.get('state') or 'failed'}"
                cls = ModelNotFound if (job.get("error_code") or result.get("code")) == "model_not_found" \
                    else GpuBridgeError
                raise cls(f"{self.host}: {message}", host=self.host, code=job.get("error_code") or result.get("code"))
            key = (job.get("state"), job.get("completed"), job.get("status"))
            now = time.monotonic()
            if key != last_key:
                last_key, last_change = key, now
            elif now - last_change > NO_PROGRESS_LIMIT:
                raise GpuBridgeError(f"{self.host}: the pull of {name} made no progress for {NO_PROGRESS_LIMIT:.0f} s; "
                                     f"it may still run: `gpu-bridge jobs {pull_id}`")
            if now - last_said >= 5 and job.get("percent") is not None:
                self.say(f"pulling {name}: {job.get('percent')}% ({job.get('status') or job.get('state')})")
                last_said = now
            time.sleep(POLL_INTERVAL)

    def _one(self, what: str, answer: JsonDict) -> None:
        """This host's result in a fan-out answer: its failure as an error (the backend answers 2xx
        when any host succeeded, and we asked one)."""
        result = (answer.get("results") or {}).get(self.host)
        if isinstance(result, dict) and not result.get("ok"):
            cls = ModelNotFound if result.get("code") == "model_not_found" else GpuBridgeError
            raise cls(f"{what} on {self.host} failed: {result.get('error')}", host=self.host, code=result.get("code"))


__all__ = ["BackendModelOps"]
