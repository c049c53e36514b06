"""The Ollama adapter: the one module that knows Ollama's wire format, its quirks and its failures.

Everything above this module (jobs, the GPU server, the NFS worker) sees normalised dicts and the
project's error types. The quirks handled here (see shared notes, "Ollama's REST API"):

* ``DELETE /api/delete`` answers 200 with an **empty body**: never parse it.
* A failed streamed pull answers HTTP **200** and ends with an ``{"error": ...}`` line.
* Not every error body is JSON: an unknown route answers text/plain ``404 page not found``.
* Pull progress omits ``completed``/``total`` while they are zero; a cached layer shows once with
  ``completed == total``.
* ``modified_at`` carries nanoseconds and a local offset: kept as the given string
  (``parse_timestamp`` turns it into an aware datetime with the nanoseconds truncated).
* ``details.families`` may be null; newer servers add keys: unknown keys are dropped.
* The verify phase of a pull is silent for tens of seconds: the stream's read timeout must be at
  least the stall timeout (stall detection itself lives in ``jobs.py``).

Timeouts are always explicit ``(connect, read)`` pairs, and every failure is mapped to an
``errors.py`` type in one place (``_map_request_exception`` / ``map_error``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator, Mapping

import requests
from urllib3.exceptions import HTTPError, ReadTimeoutError

from .errors import (
    GpuBridgeError,
    InsufficientStorage,
    InvalidModelName,
    InvalidRequest,
    ModelNotFound,
    OllamaError,
    OllamaTimeout,
    OllamaUnavailable,
)
from .ollama_loaded import LoadedModelsApi
from .ollama_wire import JsonDict, as_str, normalise_model, normalise_progress, normalise_running, parse_timestamp

__all__ = ["OllamaAdapter", "map_error", "normalise_model", "normalise_progress", "normalise_running",
           "parse_timestamp"]

log = logging.getLogger(__name__)


# A pull stream's read timeout when the caller gives none: long enough for the silent verify phase
# of a big model. Callers with a stall timeout pass ``read_timeout >= stall_timeout``.
DEFAULT_PULL_READ_TIMEOUT = 600.0
# How often the cancel watcher looks at the caller's cancel event while a pull stream is open.
CANCEL_POLL_SECONDS = 0.05
_MAX_ERROR_TEXT = 300
_READ_SIZE = 64 * 1024
_MAX_LINE = 1024 * 1024



# --- error mapping ------------------------------------------------------------------------------
def _error_text(body: bytes | str | None) -> str:
    """The message of an error body: JSON ``{"error": ...}`` when it is JSON, else the text itself."""
    if body is None:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_TEXT]
    message = data.get("error") if isinstance(data, dict) else None
    if isinstance(message, str):
        return message[:_MAX_ERROR_TEXT]
    return text[:_MAX_ERROR_TEXT]


def _is_json_error(body: bytes | str | None) -> bool:
    try:
        data = json.loads(body or b"")
    except ValueError:
        return False
    return isinstance(data, dict) and "error" in data


def map_error(message: str, *, status: int | None = None, model: str | None = None,
              json_body: bool = True) -> GpuBridgeError:
    """Ollama's error (HTTP status and/or message) → the project's error type. The one place."""
    lowered = message.lower()
    about = f" {model!r}" if model else ""
    if "no space left on device" in lowered:
        return InsufficientStorage(f"the GPU host ran out of disk space while pulling{about} (Ollama: {message})")
    if "file does not exist" in lowered and "manifest" in lowered:
        return ModelNotFound(f"model{about} does not exist in its registry: check the name and tag "
                             f"(Ollama: {message})")
    if status == 404:
        if not json_body:  # text/plain "404 page not found": a missing route, not a missing model
            return OllamaError(f"Ollama does not know this API route (is it too old?): {message or 'not found'}")
        return ModelNotFound(f"model{about} is not installed (Ollama: {message})" if model
                             else f"Ollama: {message}")
    if "not found" in lowered and "model" in lowered:
        return ModelNotFound(f"model{about} not found (Ollama: {message})")
    if status == 400 or "invalid model name" in lowered or "is invalid" in lowered:
        if "name" in lowered or "invalid model" in lowered:
            return InvalidModelName(f"Ollama refused the model name{about}: {message}")
        return InvalidRequest(f"Ollama refused the request: {message}")
    if status == 403:
        return OllamaError(f"Ollama refused the request with 403 (it only accepts local Host headers): {message}")
    if status is not None and status >= 400:
        return OllamaError(f"Ollama answered HTTP {status}: {message or 'no message'}")
    return OllamaError(f"Ollama: {message or 'unknown error'}")


def _map_request_exception(exc: requests.RequestException, base_url: str, what: str) -> GpuBridgeError:
    """requests' exceptions → ours. ConnectTimeout is a ConnectionError *and* a Timeout: unavailable."""
    if isinstance(exc, requests.ConnectTimeout):
        return OllamaUnavailable(f"Ollama at {base_url} did not accept a connection in time ({what})")
    if isinstance(exc, requests.ReadTimeout) or (
            isinstance(exc, requests.ConnectionError) and exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        # requests reports a read timeout inside a stream as a ConnectionError(ReadTimeoutError)
        return OllamaTimeout(f"Ollama at {base_url} did not answer in time ({what})")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return OllamaError(f"the connection to Ollama at {base_url} broke off during {what}")
    if isinstance(exc, requests.ConnectionError):
        return OllamaUnavailable(f"Ollama at {base_url} is not reachable ({what}): is the ollama service running?")
    return OllamaError(f"request to Ollama at {base_url} failed ({what}): {type(exc).__name__}")


def _abort_stream(resp: requests.Response) -> None:
    """Wake a thread blocked reading ``resp`` and drop the connection (Ollama then cancels the pull)."""
    raw = resp.raw
    try:
        raw.shutdown()  # urllib3 >= 2.3: shuts the socket for reading, designed for this
        return
    except Exception as exc:  # noqa: BLE001 - older urllib3 or already released: fall back to the socket
        log.debug("urllib3 shutdown unavailable (%s); shutting the socket", exc)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class OllamaAdapter(LoadedModelsApi):
    """A thin ``requests`` client for one Ollama server (normally ``http://127.0.0.1:11434``).

    ``loaded_models``, ``load`` and ``unload`` come from ``ollama_loaded.LoadedModelsApi``.

    Thread-safe: one ``requests.Session`` (urllib3's pool is thread-safe) shared by every request thread
    and pull runner. ``trust_env`` is off: Ollama is on loopback, so proxies and ``.netrc`` never apply.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 2.0, read_timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session = requests.Session()
        self._session.trust_env = False
        pool = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self._session.mount("http://", pool)
        self._session.mount("https://", pool)

    def __repr__(self) -> str:
        return f"<OllamaAdapter {self.base_url}>"

    # --- plumbing --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, what: str, *, body: Mapping[str, object] | None = None,
                 stream: bool = False, read_timeout: float | None = None) -> requests.Response:
        timeout = (self.connect_timeout, self.read_timeout if read_timeout is None else read_timeout)
        try:
            return self._session.request(method, self.base_url + path, json=body, stream=stream, timeout=timeout,
                                         allow_redirects=False)
        except requests.RequestException as exc:
            raise _map_request_exception(exc, self.base_url, what) from None

    def _raise_for(self, resp: requests.Response, *, model: str | None = None) -> None:
        if resp.status_code < 400:
            return
        try:
            body = resp.content
        except requests.RequestException:
            body = b""
        raise map_error(_error_text(body) or resp.reason or "", status=resp.status_code, model=model,
                        json_body=_is_json_error(body))

    def _json(self, resp: requests.Response, what: str) -> JsonDict:
        try:
            data = resp.json()
        except ValueError:
            raise OllamaError(f"Ollama answered {what} with something that is not JSON") from None
        except requests.RequestException as exc:
            raise _map_request_exception(exc, self.base_url, what) from None
        if not isinstance(data, dict):
            raise OllamaError(f"Ollama answered {what} with unexpected JSON")
        return data

    # --- API -------------------------------------------------------------------------------------
    def version(self, *, read_timeout: float | None = None) -> str:
        """Ollama's version string (``GET /api/version``); the cheapest liveness probe."""
        resp = self._request("GET", "/api/version", "version", read_timeout=read_timeout)
        self._raise_for(resp)
        return as_str(self._json(resp, "/api/version").get("version")) or "unknown"

    def list_models(self) -> list[JsonDict]:
        """Installed models, normalised (see ``normalise_model``), in Ollama's order (newest first)."""
        resp = self._request("GET", "/api/tags", "list models")
        self._raise_for(resp)
        models = self._json(resp, "/api/tags").get("models") or []
        return [normalise_model(m) for m in models if isinstance(m, dict)]

    def ps(self) -> list[JsonDict]:
        """Models loaded in memory (``GET /api/ps``), normalised (see ``normalise_running``)."""
        resp = self._request("GET", "/api/ps", "list running models")
        self._raise_for(resp)
        models = self._json(resp, "/api/ps").get("models") or []
        return [normalise_running(m) for m in models if isinstance(m, dict)]

    def delete(self, name: str) -> None:
        """Delete a model. Ollama answers 200 with an empty body: nothing is parsed on success."""
        resp = self._request("DELETE", "/api/delete", f"delete {name}", body={"model": name})
        self._raise_for(resp, model=name)
        resp.close()

    def copy(self, source: str, destination: str) -> None:
        """Copy a model under a new name (``POST /api/copy``): a new manifest over the same blobs, so
        nothing is downloaded. Ollama answers 200 with an empty body; a missing source is its 404."""
        resp = self._request("POST", "/api/copy", f"copy {source} to {destination}",
                             body={"source": source, "destination": destination})
        self._raise_for(resp, model=source)
        resp.close()

    def pull(self, name: str, *, cancel: threading.Event | None = None,
             read_timeout: float | None = None) -> Iterator[JsonDict]:
        """Pull ``name``, yielding each progress event (``normalise_progress``) as it arrives.

        Returns after the ``success`` line. Raises the mapped error on an ``{"error": ...}`` line,
        on an HTTP error, or when the stream ends without ``success``. When ``cancel`` is set the
        connection is shut (which wakes a blocked read, and makes Ollama stop the download once no
        other client waits) and the generator returns without raising. ``read_timeout`` is the
        longest silence tolerated (the verify phase is silent): pass at least the stall timeout.
        """
        if read_timeout is None:
            read_timeout = max(self.read_timeout, DEFAULT_PULL_READ_TIMEOUT)
        if cancel is not None and cancel.is_set():
            return
        resp = self._request("POST", "/api/pull", f"pull {name}", body={"model": name, "stream": True},
                             stream=True, read_timeout=read_timeout)
        finished = threading.Event()
        watcher = None
        try:
            self._raise_for(resp, model=name)
            if cancel is not None:
                watcher = threading.Thread(target=self._watch_cancel, args=(resp, cancel, finished),
                                           name=f"ollama-pull-cancel-{name}", daemon=True)
                watcher.start()
            yield from self._read_pull_stream(resp, name, cancel)
        finally:
            finished.set()
            resp.close()
            if watcher is not None:
                watcher.join(1.0)

    @staticmethod
    def _watch_cancel(resp: requests.Response, cancel: threading.Event, finished: threading.Event) -> None:
        # threading.Event has no callbacks: look at the caller's event until the stream is over.
        while not finished.is_set():
            if cancel.wait(CANCEL_POLL_SECONDS):
                if not finished.is_set():
                    _abort_stream(resp)
                return

    @staticmethod
    def _lines(resp: requests.Response) -> Iterator[bytes]:
        # read1 returns whatever one socket read delivers (chunked or not), so every progress line
        # is seen as soon as it arrives; requests' iter_lines would wait for a full buffer.
        raw = resp.raw
        buffer = b""
        while True:
            data = raw.read1(_READ_SIZE)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line
            if len(buffer) > _MAX_LINE:
                raise OllamaError("Ollama sent a pull-stream line longer than 1 MiB")
        if buffer.strip():
            yield buffer

    def _read_pull_stream(self, resp: requests.Response, name: str,
                          cancel: threading.Event | None) -> Iterator[JsonDict]:
        what = f"pull {name}"
        try:
            for line in self._lines(resp):
                if cancel is not None and cancel.is_set():
                    return
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except ValueError:
                    log.warning("ignoring a pull-stream line that is not JSON: %r", line[:200])
                    continue
                if not isinstance(raw, dict):
                    continue
                if "error" in raw:
                    raise map_error(as_str(raw.get("error")) or "pull failed", model=name)
                event = normalise_progress(raw)
                yield event
                if event["status"] == "success":
                    return
        except GpuBridgeError:
            raise
        except ReadTimeoutError:
            if cancel is not None and cancel.is_set():
                return
            raise OllamaTimeout(f"Ollama sent nothing for {what} within the read timeout") from None
        except (HTTPError, OSError, ValueError, AttributeError) as exc:
            # a socket shut by the cancel watcher surfaces as a protocol or socket error
            if cancel is not None and cancel.is_set():
                return
            raise OllamaError(f"the connection to Ollama at {self.base_url} broke off during {what} "
                              f"({type(exc).__name__})") from None
        if cancel is not None and cancel.is_set():
            return
        raise OllamaError(f"Ollama's pull stream for {name!r} ended before 'success'")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> OllamaAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
