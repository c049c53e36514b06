"""An imitation of the seed system's command channel, for comparison: file commands and existence polling.

The producer writes ``commands/<id>.json`` and then checks ``os.path.exists(answers/<id>.json)`` every
second; the worker (its own process) lists ``commands/`` every second, asks Ollama for the model list
and writes the answer. Both poll at 1 s, as the seed did. On a local file system ``exists()`` sees a
new file at once; on NFS with default mount options a cached negative lookup hid it for 30-60 s more
(shared/notes/nfs-channel.md), so these figures are the seed's best case.

    python -m bench.seed ROOT OLLAMA_URL MAX_SECONDS     # the worker (exits after MAX_SECONDS)
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

POLL_S = 1.0
ANSWER_TIMEOUT_S = 30.0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def worker(root: Path, ollama_url: str, max_seconds: float) -> int:
    if not ollama_url.startswith("http://127."):
        raise SystemExit("seed worker: Ollama must be on 127.0.0.0/8")
    commands, answers = root / "commands", root / "answers"
    commands.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + max_seconds
    while time.monotonic() < end and not (root / "stop").exists():
        for name in sorted(os.listdir(commands)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            path = commands / name
            with urllib.request.urlopen(f"{ollama_url}/api/tags", timeout=10) as response:  # noqa: S310 - loopback
                models = json.loads(response.read())
            _write_atomic(answers / name, json.dumps(models).encode())
            path.unlink()
        time.sleep(POLL_S)
    return 0


class SeedProducer:
    """One seed-style request: write the command, poll ``os.path.exists`` every second, read the answer."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self) -> bool:
        name = f"{uuid.uuid4().hex}.json"
        _write_atomic(self.root / "commands" / name, json.dumps({"op": "list"}).encode())
        answer = self.root / "answers" / name
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not os.path.exists(answer):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        ok = isinstance(json.loads(answer.read_bytes()).get("models"), list)
        answer.unlink()
        return ok


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
