"""What is in Ollama's memory, and loading or unloading a model: the adapter's ``/api/ps`` and
``/api/generate`` calls, as a mixin of ``ollama.OllamaAdapter`` (which supplies the plumbing:
``_request``, ``_raise_for``, ``_json``, ``_watch_cancel``).

Ollama has no load or unload endpoint. A generate request with an empty prompt loads the model and
answers one JSON object (``done_reason: "load"``) once it is resident; the same with ``keep_alive: 0``
unloads it (``done_reason: "unload"``, also for a model that was not loaded). A model that is not
installed is a 404; an embedding-only model cannot generate, so Ollama refuses to load it that way
with a 400 (``"X" does not support generate``): it loads on its first embedding request instead.

``/api/ps`` entries carry the weights' ``size`` (plus the KV cache), the part of it in GPU memory
(``size_vram``; less than ``size`` when Ollama spilled layers to system memory, which makes the
model several times slower), the runner's ``context_length`` and ``expires_at`` (local time with
nanoseconds, as given; about 292 years ahead for a model kept forever).

This module does not import ``ollama.py`` (which imports it): the few coercions it needs are here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

import requests

from .errors import InvalidRequest, OllamaError

JsonDict = dict[str, Any]


def _int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, float) and value == value else 0


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def normalise_loaded(raw: Mapping[str, object]) -> JsonDict:
    """One ``/api/ps`` entry → ``{name, model, digest, size, size_vram, cpu_spill, context_length, expires_at}``."""
    name = _str(raw.get("name")) or _str(raw.get("model"))
    size, size_vram = _int(raw.get("size")), _int(raw.get("size_vram"))
    context = raw.get("context_length")
    return {
        "name": name,
        "model": _str(raw.get("model")) or name,
        "digest": _str(raw.get("digest")),
        "size": size,
        "size_vram": size_vram,
        "cpu_spill": size_vram < size,  # part of the model runs from system memory
        "context_length": _int(context) if context is not None else None,  # older Ollama leaves it out
        "expires_at": _str(raw.get("expires_at")),
    }


class _Plumbing(Protocol):
    """What the mixin uses of ``OllamaAdapter``."""

    base_url: str

    def _request(self, method: str, path: str, what: str, *, body: Mapping[str, object] | None = None,
                 stream: bool = False, read_timeout: float | None = None) -> requests.Response: ...

    def _raise_for(self, resp: requests.Response, *, model: str | None = None) -> None: ...

    def _json(self, resp: requests.Response, what: str) -> JsonDict: ...

    def _watch_cancel(self, resp: requests.Response, cancel: threading.Event, finished: threading.Event) -> None: ...


class LoadedModelsApi:
    """``loaded_models``, ``load`` and ``unload`` of ``OllamaAdapter``."""

    def loaded_models(self: _Plumbing, *, read_timeout: float | None = None) -> list[JsonDict]:
        """Models in memory now (``GET /api/ps``), normalised (``normalise_loaded``), in Ollama's order."""
        resp = self._request("GET", "/api/ps", "list loaded models", read_timeout=read_timeout)
        self._raise_for(resp)
        models = self._json(resp, "/api/ps").get("models") or []
        return [normalise_loaded(m) for m in models if isinstance(m, dict)]

    def load(self: _Plumbing, name: str, *, keep_alive: float | None = None, cancel: threading.Event | None = None,
             read_timeout: float | None = None) -> JsonDict:
        """Load ``name`` into memory and return Ollama's answer once it is resident.

        ``keep_alive``: seconds, -1 for forever, None for Ollama's default (``keep_alive.parse``).
        ``read_timeout``: the longest a load may take (a 70B model takes minutes). Setting ``cancel``
        drops the connection, which makes Ollama give the load up; the call then raises, and the
        caller (the job manager) has already marked the job cancelled.
        """
        body: JsonDict = {"model": name, "prompt": "", "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        resp = self._request("POST", "/api/generate", f"load {name}", body=body, stream=True,
                             read_timeout=read_timeout)
        finished = threading.Event()
        watcher = None
        if cancel is not None:
            watcher = threading.Thread(target=self._watch_cancel, args=(resp, cancel, finished),
                                       name=f"ollama-load-cancel-{name}", daemon=True)
            watcher.start()
        try:
            try:
                self._raise_for(resp, model=name)
            except InvalidRequest as exc:
                if "does not support" not in exc.message:
                    raise
                raise InvalidRequest(f"{name} cannot be loaded with a prompt: it is an embedding-only model, which "
                                     f"Ollama loads on its first embedding request ({exc.message})") from None
            answer = self._json(resp, "/api/generate")
        finally:
            finished.set()
            resp.close()
            if watcher is not None:
                watcher.join(1.0)
        error = answer.get("error")
        if error is not None:
            raise OllamaError(f"Ollama could not load {name}: {_str(error) or error!r}")
        return {"model": name, "done_reason": _str(answer.get("done_reason")) or "load"}

    def unload(self: _Plumbing, name: str) -> None:
        """Unload ``name`` now (generate with ``keep_alive: 0``). Not loaded is no error; not installed
        is ``ModelNotFound``."""
        body = {"model": name, "prompt": "", "keep_alive": 0, "stream": False}
        resp = self._request("POST", "/api/generate", f"unload {name}", body=body)
        self._raise_for(resp, model=name)
        resp.close()


__all__ = ["LoadedModelsApi", "normalise_loaded"]
