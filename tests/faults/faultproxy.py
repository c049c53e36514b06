"""A small fault-injecting TCP proxy for tests and the benchmark (threads, standard library only).

    proxy = FaultProxy(upstream=("127.0.0.1", 8001)).start()   # listens on 127.0.0.1:<free port>
    proxy.set_mode("blackhole")                                 # switch at run time
    proxy.set_mode("latency", latency=0.3)
    proxy.stop()

Modes (``MODES``), applied to new connections *and* to data on connections already open, so a
client's kept-alive pooled connection meets the fault as well:

``pass``       forward bytes both ways.
``latency``    forward, but hold each chunk sent by the client for ``latency`` seconds first.
``drop``       accept, then close at once (FIN): the client sees the connection closed without an answer.
``reset``      accept, then close with ``SO_LINGER`` 0: the kernel sends RST (ECONNRESET at the client).
``blackhole``  accept and never answer: bytes from the client are read and discarded; the client
               waits until its own timeout.

Only loopback addresses are accepted, for both the listening side and the upstream: tests and the
benchmark must never send traffic off this machine. Every thread is a daemon bounded by ``stop()``.

``on_upstream_data(chunk: bytes, at: float)`` (optional) is called for every chunk coming back from
the upstream with its ``time.monotonic()`` arrival time: the benchmark uses it as a tap to timestamp
Ollama's pull-progress lines.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

MODES = ("pass", "latency", "drop", "reset", "blackhole")
_CHUNK = 65536


def _require_loopback(host: str, what: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"FaultProxy {what} {host!r} is not a loopback address: faults stay on 127.0.0.0/8")


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _finish(sock: socket.socket, linger: float = 0.5) -> None:
    """Close with FIN: shut the sending side, read what the peer still sends (closing a socket with
    unread data would send RST instead), then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if ready and not sock.recv(_CHUNK):
                break
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0, mode: str = "pass",
                 latency: float = 0.0, on_upstream_data: Callable[[bytes, float], None] | None = None):
        _require_loopback(upstream[0], "upstream")
        _require_loopback(host, "listen address")
        self.upstream = upstream
        self.host = host
        self._requested_port = port
        self.port = 0
        self.on_upstream_data = on_upstream_data
        self._lock = threading.Lock()
        self._mode = "pass"
        self._latency = 0.0
        self.set_mode(mode, latency=latency)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self.stats = {"accepted": 0, "dropped": 0, "reset": 0, "blackholed": 0, "forwarded": 0,
                      "upstream_failed": 0, "observer_errors": 0}

    # --- control -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    def set_mode(self, mode: str, *, latency: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        with self._lock:
            self._mode = mode
            if latency is not None:
                if latency < 0 or latency > 60:
                    raise ValueError("latency must be within 0..60 seconds")
                self._latency = float(latency)

    def close_connections(self) -> int:
        """Close (RST) every connection now open; returns how many."""
        with self._lock:
            socks = list(self._open)
            self._open.clear()
        for sock in socks:
            _abort(sock)
        return len(socks)

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._listener is not None:
            self._listener.close()
        self.close_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- plumbing ------------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._count("accepted")
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _fault_now(self, client: socket.socket) -> bool:
        """Apply drop/reset to ``client``; True when the connection is finished."""
        mode = self.mode
        if mode == "drop":
            self._count("dropped")
            _finish(client)
            return True
        if mode == "reset":
            self._count("reset")
            _abort(client)
            return True
        return False

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream: socket.socket | None = None
        try:
            if self._fault_now(client):
                return
            if self.mode == "blackhole":
                self._count("blackholed")
                self._swallow(client)
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                self._count("upstream_failed")
                _abort(client)  # the upstream is down: the client sees a reset, like a refused backend
                return
            self._track(upstream)
            self._count("forwarded")
            self._pump(client, upstream)
        finally:
            self._untrack(client)
            for sock in (client, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    def _swallow(self, client: socket.socket) -> None:
        """Blackhole: read and discard until the client gives up, the mode changes back or we stop."""
        while not self._stop.is_set() and self.mode == "blackhole":
            ready, _, _ = select.select([client], [], [], 0.1)
            if ready:
                try:
                    if not client.recv(_CHUNK):
                        return
                except OSError:
                    return
        if self.mode in ("drop", "reset"):
            self._fault_now(client)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
            except (OSError, ValueError):
                return
            for sock in ready:
                try:
                    data = sock.recv(_CHUNK)
                except OSError:
                    return
                if not data:
                    return
                at = time.monotonic()
                if sock is client:
                    mode = self.mode
                    if mode in ("drop", "reset"):
                        self._fault_now(client)
                        return
                    if mode == "blackhole":
                        self._count("blackholed")
                        self._swallow(client)
                        return
                    if mode == "latency" and self.latency > 0:
                        self._stop.wait(self.latency)
                elif self.on_upstream_data is not None:
                    try:
                        self.on_upstream_data(data, at)
                    except Exception:  # noqa: BLE001 - an observer's bug must not break the traffic
                        self._count("observer_errors")
                try:
                    peers[sock].sendall(data)
                except OSError:
                    return


__all__ = ["MODES", "FaultProxy"]
