#!/usr/bin/env python3
"""Lists the models through the local backend every 0.2 s until /run/<name>.stop exists, and writes
what it saw to /run/<name>.json (bounded: at most 30 minutes of requests). Usage: listing-loop NAME

Counted apart: answers (by status), stale listings (the backend's cache answered for a GPU host that
did not: allowed, flagged in the answer), answers in which a GPU host refused the token
(unauthorized), and requests the backend did not take (refused connection or no answer: the
scenario's switch and back must have none, because the backend's socket stays open)."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = "http://127.0.0.1:8000/config/models?refresh=true"
NAME = sys.argv[1] if len(sys.argv) > 1 else "listing-loop"
STOP, OUT = f"/run/{NAME}.stop", f"/run/{NAME}.json"
counts = {"sent": 0, "status": {}, "stale": 0, "stale_hosts": 0, "unauthorized": 0, "backend_down": 0,
          "slowest_s": 0.0, "examples": [], "done": False}


def save():
    with open(OUT + ".tmp", "w") as fh:
        json.dump(counts, fh)
    os.replace(OUT + ".tmp", OUT)


def example(entry):
    if len(counts["examples"]) < 5:
        counts["examples"].append(entry)


deadline = time.monotonic() + 1800
while not os.path.exists(STOP) and time.monotonic() < deadline:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            status, body = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, body = e.code, {}
    except OSError as e:
        counts["backend_down"] += 1
        example({"error": str(e)})
        time.sleep(0.2)
        continue
    counts["slowest_s"] = max(counts["slowest_s"], round(time.monotonic() - started, 3))
    counts["sent"] += 1
    counts["status"][str(status)] = counts["status"].get(str(status), 0) + 1
    hosts = body.get("hosts") or {}
    refused = [h for h, s in hosts.items() if s.get("reason") == "unauthorized"]
    counts["unauthorized"] += bool(refused)
    counts["stale"] += bool(body.get("stale"))
    counts["stale_hosts"] += sum(1 for s in hosts.values() if s.get("stale"))
    if status != 200 or refused:
        example({"status": status, "hosts": hosts})
    if counts["sent"] % 10 == 0:
        save()
    time.sleep(0.2)
counts["done"] = True
save()
