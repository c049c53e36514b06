"""Stand-in GPU servers that answer from a canned response: many ports, one process, asyncio.

The fleet benchmark puts N of these behind one backend so that the hosts cost next to nothing and
the backend's own CPU time per listing (and per host) can be read off its process. Each port answers
``GET /api/models`` with a fixed body (a real GPU server's answer, captured by the benchmark) and
``GET /api/health`` with a fixed ``ok``; anything else is 404. HTTP/1.1 keep-alive, GET only.

    python -m bench.canned BODY_FILE PORTS_FILE COUNT MAX_SECONDS

binds COUNT ports on 127.0.0.1 (port 0: the kernel picks), writes them as a JSON list to PORTS_FILE
(atomically) and serves until MAX_SECONDS have passed or it is terminated.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

MAX_HEAD = 16384


def _response(status: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n")
    return head.encode() + body


class Canned:
    def __init__(self, models_body: bytes):
        self.answers = {
            "/api/models": _response("200 OK", models_body),
            "/api/health": _response("200 OK", b'{"status":"ok","version":"canned"}'),
        }
        self.not_found = _response("404 Not Found", b'{"error":"not found","code":"not_found"}')
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, _, headers = head.partition(b"\r\n")
                parts = request_line.split(b" ")
                path = parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) == 3 else ""
                for line in headers.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and value.strip().isdigit():
                        await reader.readexactly(min(int(value), 1 << 20))
                writer.write(self.answers.get(path, self.not_found))
                self.served += 1
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def serve(body: bytes, ports_file: Path, count: int, max_seconds: float) -> None:
    canned = Canned(body)
    servers = [await asyncio.start_server(canned.handle, "127.0.0.1", 0, limit=MAX_HEAD, backlog=256)
               for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    tmp = ports_file.with_name(f".{ports_file.name}.tmp")
    tmp.write_text(json.dumps(ports))
    os.replace(tmp, ports_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    except TimeoutError:
        pass
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    body_file, ports_file, count, max_seconds = Path(argv[0]), Path(argv[1]), int(argv[2]), float(argv[3])
    if not 1 <= count <= 256:
        raise SystemExit("canned: 1..256 ports")
    asyncio.run(serve(body_file.read_bytes(), ports_file, count, max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
